"""Small image-classification data sets held as tensors on the training device.

Names (:func:`load_dataset`):

- ``synthetic`` (the default; no files): a deterministic, learnable 10-class RGB set drawn from
  a seed. Each class is a few coloured Gaussian blobs plus a low-frequency grating; every sample
  shifts its class pattern, jitters its colours, adds a faint pattern of another class and
  strong pixel noise, so a small ResNet learns it well above chance but not perfectly in a few
  hundred steps. Sample k of a split is the same whatever the requested size.
- ``cifar10`` / ``cifar100``: the official python-pickle batches, read from ``data_dir``
  (``cifar-10-batches-py/`` or ``cifar-100-python/``). When missing, the official tarball in
  ``data_dir`` (downloaded there first only when asked: ``download=True``) has its md5 checked,
  is extracted, and every extracted file is checked against its published md5. Batches are
  read with a restricted unpickler (:class:`BatchUnpickler`, :mod:`sigprop.cifar`) whatever
  their origin: it builds only dicts, lists, numbers, bytes and numpy arrays, so a hostile
  batch cannot run code.
- ``digits``: scikit-learn's bundled 8x8 digits (needs the optional ``scikit-learn``),
  upsampled to ``image_size`` and repeated over three channels.

Images are normalized with per-channel mean/std. There is no DataLoader: :class:`BatchStream`
shuffles and augments on the device, driven by a CPU ``torch.Generator`` whose state is
checkpointable, so the data order is reproducible on any device.

Augmentation (``AUGMENTATIONS``): ``none``; ``crop``, a random crop of the image zero-padded (in
normalized space, i.e. mean-colour padding) by :func:`crop_padding` pixels, about 1/8 of its
side (4 px at 32 px, the CIFAR convention; 1 px at 8 px); ``crop+flip``, the same plus
horizontal flips. Flips only suit data whose labels survive a mirror image: each data set names
its default (:func:`default_augment`): CIFAR ``crop+flip``; digits and synthetic ``crop`` (a
mirrored digit, or a mirrored synthetic class pattern, is not the same class).
"""

from __future__ import annotations

import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# re-exported (the `as` form): sigprop.data keeps every name it had before sigprop.cifar
from sigprop.cifar import BATCH_GLOBALS as BATCH_GLOBALS
from sigprop.cifar import CIFAR_PIXELS as CIFAR_PIXELS
from sigprop.cifar import (
    SOURCES,
    RemoteArchive,
    _fetch,
    _safe_extract,
    md5_of,
    read_cifar_batch,
)
from sigprop.cifar import BatchUnpickler as BatchUnpickler
from sigprop.errors import UserError
from sigprop.fields import check_value, one_of

DATA_ENV = "SIGPROP_DATA"


def default_data_dir() -> Path:
    """``$SIGPROP_DATA`` if set, else ``~/.cache/sigprop/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sigprop" / "data"


@dataclass
class ImageDataset:
    """Normalized float32 images (N, C, H, W) and int64 labels, train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to(self, device: torch.device | str) -> ImageDataset:
        return ImageDataset(
            self.name, self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
            self.test_y.to(device), self.num_classes, self.mean, self.std,
        )

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


# ----------------------------------------------------------------------------- synthetic
@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic set; the defaults are tuned so a tiny NF-ResNet learns it well
    above chance in a short CPU run without reaching 100% (tests/test_data.py checks both)."""

    num_classes: int = 10
    blobs: int = 3
    max_shift: float = 0.15  # fraction of the image size
    distractor: float = 0.6  # weight of another class's pattern mixed in
    noise: float = 1.0  # pixel noise std, relative to a unit-std class pattern
    colour_jitter: float = 0.3
    angle_jitter: float = 0.35  # radians: per-sample rotation of the class grating
    scale_jitter: float = 0.2  # relative per-sample change of the grating frequency
    chunk: int = 1024  # samples per independently seeded chunk


def _chunk_generator(seed: int, stream: int, chunk: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream, chunk]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (1 << 63)))


def _class_params(seed: int, spec: SyntheticSpec) -> dict[str, torch.Tensor]:
    g = _chunk_generator(seed, 0, 0)
    k, b = spec.num_classes, spec.blobs
    return {
        "centres": 0.2 + 0.6 * torch.rand(k, b, 2, generator=g),
        "widths": 0.07 + 0.12 * torch.rand(k, b, generator=g),
        "blob_colours": torch.randn(k, b, 3, generator=g),
        "freqs": (1.0 + 2.0 * torch.rand(k, 1, generator=g))
        * F.normalize(torch.randn(k, 2, generator=g), dim=1),
        "phases": 2 * math.pi * torch.rand(k, generator=g),
        "grating_colours": torch.randn(k, 3, generator=g),
    }


def _render(
    cls: dict[str, torch.Tensor], labels: torch.Tensor, shift: torch.Tensor, size: int,
    warp: torch.Tensor,
) -> torch.Tensor:
    """The class patterns of ``labels`` shifted by ``shift`` (fraction of the image), their
    gratings rotated by ``warp[:, 0]`` radians and scaled by ``warp[:, 1]``, each pattern scaled
    to unit std: (n, 3, size, size)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords[:, None], coords[None, :]
    centres = cls["centres"][labels] + shift[:, None, :]  # (n, blobs, 2)
    widths = cls["widths"][labels]
    dy = yy[None, None] - centres[..., 0, None, None]
    dx = xx[None, None] - centres[..., 1, None, None]
    blobs = torch.exp(-(dx**2 + dy**2) / (2 * widths[..., None, None] ** 2))  # (n, b, s, s)
    image = torch.einsum("nbhw,nbc->nchw", blobs, cls["blob_colours"][labels])
    cos, sin = torch.cos(warp[:, 0]), torch.sin(warp[:, 0])
    base = cls["freqs"][labels]
    freqs = warp[:, 1, None] * torch.stack(
        (cos * base[:, 0] - sin * base[:, 1], sin * base[:, 0] + cos * base[:, 1]), dim=1
    )
    arg = 2 * math.pi * (
        freqs[:, 0, None, None] * (yy[None] - shift[:, 0, None, None])
        + freqs[:, 1, None, None] * (xx[None] - shift[:, 1, None, None])
    ) + cls["phases"][labels][:, None, None]
    image = image + torch.cos(arg)[:, None] * cls["grating_colours"][labels][:, :, None, None]
    image = image - image.mean(dim=(1, 2, 3), keepdim=True)
    return image / image.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def synthetic_split(
    n: int, seed: int, stream: int, image_size: int = 32, spec: SyntheticSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` raw (unnormalized) synthetic images and labels of split ``stream`` (1 train,
    2 test), drawn chunk by chunk so a prefix does not depend on ``n``."""
    spec = spec or SyntheticSpec()
    cls = _class_params(seed, spec)
    xs, ys = [], []
    for chunk in range(math.ceil(n / spec.chunk)):
        keep = min(spec.chunk, n - chunk * spec.chunk)
        m = spec.chunk  # draw whole chunks, so a prefix does not depend on n
        g = _chunk_generator(seed, stream, chunk + 1)
        labels = torch.randint(0, spec.num_classes, (m,), generator=g)
        shift = spec.max_shift * (2 * torch.rand(m, 2, generator=g) - 1)
        other = (labels + torch.randint(1, spec.num_classes, (m,), generator=g)) % spec.num_classes
        other_shift = spec.max_shift * (2 * torch.rand(m, 2, generator=g) - 1)
        gain = 1 + spec.colour_jitter * torch.randn(m, 3, 1, 1, generator=g)
        offset = spec.colour_jitter * torch.randn(m, 3, 1, 1, generator=g)
        noise = spec.noise * torch.randn(m, 3, image_size, image_size, generator=g)
        warps = [
            torch.stack((spec.angle_jitter * (2 * torch.rand(m, generator=g) - 1),
                         1 + spec.scale_jitter * (2 * torch.rand(m, generator=g) - 1)), dim=1)
            for _ in range(2)
        ]
        image = _render(cls, labels, shift, image_size, warps[0])
        image = image + spec.distractor * _render(cls, other, other_shift, image_size, warps[1])
        xs.append((image * gain + offset + noise)[:keep])
        ys.append(labels[:keep])
    if not xs:
        return torch.zeros(0, 3, image_size, image_size), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


# the full test splits: the claims' test-set margins use them when a run does not say
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 10_000, 2_000
DIGITS_TEST = 297  # of scikit-learn's 1,797 digits


def _load_synthetic(
    data_dir: Path | None, train_size: int | None, test_size: int | None, seed: int,
    image_size: int, download: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    train_x, train_y = synthetic_split(SYNTHETIC_TRAIN if train_size is None else train_size,
                                       seed, 1, image_size)
    test_x, test_y = synthetic_split(SYNTHETIC_TEST if test_size is None else test_size, seed,
                                     2, image_size)
    return train_x, train_y, test_x, test_y, SyntheticSpec().num_classes


# ----------------------------------------------------------------------------- CIFAR
# The archives, their md5s and the restricted batch reader live in sigprop.cifar.


def ensure_cifar(name: str, data_dir: Path, download: bool = False) -> Path:
    """The folder of ``name``'s extracted batches in ``data_dir``; extracts the tarball found
    there (downloaded first only with ``download``) after checking its md5, and every file it
    extracts against the published md5s. A tarball that fails its check is deleted only if
    this call downloaded it: one found in ``data_dir`` is the user's, and stays."""
    source = SOURCES[name]
    folder = data_dir / source.folder
    needed = source.train_files + source.test_files
    if all((folder / f).is_file() for f in needed):
        return folder
    where = (f"put {source.folder}/ (extracted from {source.filename}, {source.url}) "
             f"under {data_dir}")
    archive = data_dir / source.filename
    downloaded = False
    if not archive.is_file():
        if not download:
            raise UserError(f"{name}: files not found in {folder} and download is off; {where}")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            _fetch(source.url, archive)
        except OSError as err:  # URLError, timeouts and HTTP errors are OSErrors
            reason = getattr(err, "reason", err)
            raise UserError(
                f"{name}: files not found in {folder} and download failed ({reason}); {where}"
            ) from None
        downloaded = True
    try:
        digest = md5_of(archive)
    except OSError as err:
        raise UserError(f"{name}: cannot read {archive}: {err.strerror or err}") from None
    if digest != source.md5:
        if downloaded:
            archive.unlink(missing_ok=True)
            raise UserError(
                f"{name}: checksum mismatch for the download of {source.url} (md5 {digest}, "
                f"expected {source.md5}); it was removed, try again or {where}"
            )
        raise UserError(
            f"{name}: checksum mismatch for {archive} (md5 {digest}, expected {source.md5}); "
            f"it is left in place: replace it with the official file (or remove it and "
            f"download again), or {where}"
        )
    _extract(name, archive, data_dir, source, where)
    return folder


def _extract(name: str, archive: Path, data_dir: Path, source: RemoteArchive,
             where: str) -> None:
    # Into a private folder first, checked there, then moved in file by file: a run reading
    # the folder meanwhile never sees half a file, and files already there (the user's) stay.
    try:
        staging = Path(tempfile.mkdtemp(prefix=".sigprop-extract-", dir=data_dir))
    except OSError as err:
        raise UserError(f"{name}: cannot extract {archive}: {err.strerror or err}") from None
    try:
        try:
            _safe_extract(archive, staging)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"{name}: cannot extract {archive}: {err}") from None
        extracted = staging / source.folder
        needed = source.train_files + source.test_files
        missing = [f for f in needed if not (extracted / f).is_file()]
        if missing:
            raise UserError(f"{name}: {archive} lacks {', '.join(missing)}; {where}")
        for file, want in source.file_md5.items():
            got = md5_of(extracted / file) if (extracted / file).is_file() else want
            if got != want:
                raise UserError(f"{name}: {file} in {archive} has md5 {got}, not the published "
                                f"{want}; nothing was extracted; {where}")
        folder = data_dir / source.folder
        folder.mkdir(exist_ok=True)
        for path in sorted(extracted.iterdir()):
            if path.is_file() and not (folder / path.name).exists():
                os.replace(path, folder / path.name)
    except OSError as err:
        raise UserError(f"{name}: cannot extract {archive}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_cifar(name: str) -> Callable:
    def load(
        data_dir: Path | None, train_size: int | None, test_size: int | None, seed: int,
        image_size: int, download: bool,
    ):
        source = SOURCES[name]
        folder = ensure_cifar(name, data_dir or default_data_dir(), download)
        parts = {}
        for split, files in (("train", source.train_files), ("test", source.test_files)):
            batches = [read_cifar_batch(folder / f, source.label_key, source.num_classes,
                                        source.file_md5.get(f)) for f in files]
            x = np.concatenate([b[0] for b in batches])
            y = np.concatenate([b[1] for b in batches])
            limit = train_size if split == "train" else test_size
            if limit is not None:
                x, y = x[:limit], y[:limit]
            parts[split] = (torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y))
        return (*parts["train"], *parts["test"], source.num_classes)

    return load


# ----------------------------------------------------------------------------- digits
def _load_digits(
    data_dir: Path | None, train_size: int | None, test_size: int | None, seed: int,
    image_size: int, download: bool,
):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "data set 'digits' needs scikit-learn: pip install 'sigprop[digits]'"
        ) from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0)[:, None]  # (N,1,8,8)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    # A fixed split (not the run's seed): every run sees the same test set.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = order[:DIGITS_TEST], order[DIGITS_TEST:]
    train_x, test_x = x[train_idx], x[test_idx]
    train_y, test_y = y[train_idx], y[test_idx]
    if train_size is not None:
        train_x, train_y = train_x[:train_size], train_y[:train_size]
    if test_size is not None:
        test_x, test_y = test_x[:test_size], test_y[:test_size]
    return train_x.expand(-1, 3, -1, -1), train_y, test_x.expand(-1, 3, -1, -1), test_y, 10


# ----------------------------------------------------------------------------- registry
AUGMENTATIONS = ("none", "crop", "crop+flip")
AUGMENT = one_of(AUGMENTATIONS)  # the rule of an augment value (sigprop.fields)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    test_images: int  # the full test split
    loader: Callable
    augment: str  # the default augmentation: flips only where a mirror image keeps the label
    # fixed per-channel statistics; None: measured on the training split
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


DATASETS: dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo(10, SYNTHETIC_TEST, _load_synthetic, "crop"),
    "cifar10": DatasetInfo(
        10, 10_000, _load_cifar("cifar10"), "crop+flip", (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": DatasetInfo(
        100, 10_000, _load_cifar("cifar100"), "crop+flip", (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "digits": DatasetInfo(10, DIGITS_TEST, _load_digits, "crop"),
}


def default_augment(name: str) -> str:
    """The augmentation data set ``name`` uses unless a run says otherwise."""
    return dataset_info(name).augment


def crop_padding(image_size: int) -> int:
    """Zero padding of the random crop: about 1/8 of the image side, at least 1 px."""
    return max(1, round(image_size / 8))


def dataset_names() -> list[str]:
    return list(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_size(value, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer or None, got {value!r}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    download: bool = False,
) -> ImageDataset:
    """Load data set ``name`` as normalized float32 CPU tensors (move with ``.to(device)``).

    ``train_size`` / ``test_size`` keep the first samples (None: all; synthetic: 10000 / 2000);
    asking for more than there are raises :class:`UserError`. ``seed`` only affects
    ``synthetic``. Images are resized (bilinear) to ``image_size`` when they differ. Nothing
    is downloaded unless ``download`` is True (CIFAR: see :func:`ensure_cifar`).
    """
    info = dataset_info(name)
    _check_size(train_size, "train_size")
    _check_size(test_size, "test_size")
    _check_size(image_size, "image_size")
    path = None if data_dir is None else Path(data_dir)
    train_x, train_y, test_x, test_y, num_classes = info.loader(
        path, train_size, test_size, seed, image_size, download
    )
    for split, want, have in (("train", train_size, len(train_y)), ("test", test_size,
                                                                    len(test_y))):
        if want is not None and have < want:
            raise UserError(f"{name} has {have} {split} samples, fewer than the {want} asked")
    if len(train_y) == 0:
        raise UserError(f"{name}: the training split is empty")
    train_x, test_x = _resize(train_x, image_size), _resize(test_x, image_size)
    if info.mean is not None:
        mean, std = info.mean, info.std
    else:
        std_t, mean_t = torch.std_mean(train_x, dim=(0, 2, 3))
        mean, std = tuple(mean_t.tolist()), tuple(std_t.clamp_min(1e-6).tolist())
    mean_v = torch.tensor(mean).view(1, -1, 1, 1)
    std_v = torch.tensor(std).view(1, -1, 1, 1)
    return ImageDataset(
        name=name,
        train_x=((train_x - mean_v) / std_v).contiguous(),
        train_y=train_y.long(),
        test_x=((test_x - mean_v) / std_v).contiguous(),
        test_y=test_y.long(),
        num_classes=num_classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size) or len(x) == 0:
        return x.float()
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


# ----------------------------------------------------------------------------- batches
def random_crop_flip(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, pad: int
) -> torch.Tensor:
    """Per-sample crop of ``x`` zero-padded by ``pad`` at (dy, dx) = ``offsets[i]`` in
    [0, 2*pad], then a horizontal flip where ``flips`` is True (None: no flips); all on x's
    device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (n, h, w, c).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flips is not None:
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out.contiguous()


class BatchStream:
    """Endless shuffled training batches of fixed size from on-device tensors.

    Each epoch is a fresh permutation; the last incomplete batch of an epoch is dropped. All
    randomness (order, crop offsets, flips) comes from one CPU generator seeded by ``seed``;
    :meth:`state_dict` / :meth:`load_state_dict` capture it exactly, for checkpoints.
    ``augment`` is one of ``AUGMENTATIONS``; ``pad`` (None: :func:`crop_padding` of the image
    side) is the crop's zero padding.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
        augment: str = "crop+flip", pad: int | None = None,
    ):
        if batch_size > len(y):
            raise UserError(
                f"batch_size {batch_size} is larger than the training set ({len(y)} samples)"
            )
        self.x, self.y = x, y
        self.batch_size, self.augment = batch_size, check_value("augment", augment, AUGMENT)
        self.pad = crop_padding(x.shape[-1]) if pad is None else pad
        self.generator = torch.Generator().manual_seed(seed)
        self.perm: torch.Tensor | None = None
        self.cursor = 0
        self.epoch = 0  # completed permutations

    @property
    def steps_per_epoch(self) -> int:
        return len(self.y) // self.batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.perm is None or self.cursor + self.batch_size > len(self.perm):
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(len(self.y), generator=self.generator)
            self.cursor = 0
        idx = self.perm[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        idx = idx.to(self.x.device, non_blocking=True)
        xb, yb = self.x[idx], self.y[idx]
        if self.augment != "none":
            offsets = torch.randint(0, 2 * self.pad + 1, (len(idx), 2), generator=self.generator)
            flips = None
            if self.augment == "crop+flip":
                flips = (torch.rand(len(idx), generator=self.generator) < 0.5).to(
                    xb.device, non_blocking=True)
            xb = random_crop_flip(xb, offsets.to(xb.device, non_blocking=True), flips, self.pad)
        return xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "perm": self.perm,
            "cursor": self.cursor,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"]
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])


def eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]

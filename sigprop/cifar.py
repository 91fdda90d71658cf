"""CIFAR-10/100 files: where the official archives live and their published md5s, the
restricted unpickler that reads a python batch as data (never as code), the download and the
tarball member check.

:func:`sigprop.data.ensure_cifar` puts these together for a data folder, and
:func:`sigprop.data.load_dataset` reads the batches; every name here is also importable from
:mod:`sigprop.data`. No torch: the batches come back as numpy arrays.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sigprop.errors import UserError


@dataclass(frozen=True)
class RemoteArchive:
    url: str
    md5: str
    filename: str  # the tarball's name in data_dir
    folder: str  # what it extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    # the published md5 of each file the tarball extracts to (torchvision's values)
    file_md5: dict[str, str] = field(default_factory=dict)
    num_classes: int = 10


_KRIZHEVSKY = "https://www.cs.toronto.edu/~kriz/"  # the page the official archives are on


def _published(filename: str, md5: str, folder: str, label_key: bytes, num_classes: int,
              train: dict[str, str], test: dict[str, str], meta: dict[str, str]) -> RemoteArchive:
    """An archive on Krizhevsky's page; ``train``, ``test`` and ``meta``: each file it
    extracts to, with its published md5 (torchvision's values)."""
    return RemoteArchive(_KRIZHEVSKY + filename, md5, filename, folder, tuple(train), tuple(test),
                         label_key, {**train, **test, **meta}, num_classes)


SOURCES: dict[str, RemoteArchive] = {
    "cifar10": _published(
        "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        label_key=b"labels", num_classes=10,
        train={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        },
        test={"test_batch": "40351d587109b95175f43aff81a1287e"},
        meta={"batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": _published(
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        label_key=b"fine_labels", num_classes=100,
        train={"train": "16019d7e3df5f24257cddd939b257f8d"},
        test={"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        meta={"meta": "7973b15100ade9c7d40fb424638fde48"}),
}
CIFAR_PIXELS = (3, 32, 32)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Refused(pickle.UnpicklingError):
    """A class or function a CIFAR batch does not hold: the file is not unpickled further."""


def _latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # how protocol-2 pickles written by Python 3 spell bytes; any other codec is refused
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"refusing _codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


def _batch_globals() -> dict[tuple[str, str], object]:
    # This numpy's own array and scalar reconstructors, under the module names numpy 1 and
    # numpy 2 write (the official batches name numpy.core.multiarray).
    array = np.zeros(1, dtype=np.uint8)
    found: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }
    for core in ("numpy.core", "numpy._core"):
        found[(f"{core}.multiarray", "_reconstruct")] = array.__reduce__()[0]
        found[(f"{core}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
        found[(f"{core}.numeric", "_frombuffer")] = array.__reduce_ex__(5)[0]
    return found


BATCH_GLOBALS = _batch_globals()


class BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR python batch holds (dicts, lists, numbers, bytes, numpy arrays)
    and refuses every other class or function, so unpickling runs no code of the file's."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return BATCH_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(
                f"refusing to load {module}.{name} (a CIFAR batch holds only arrays, lists, "
                f"numbers and bytes)"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise _Refused("refusing a persistent id (not in a CIFAR batch)")


class _Malformed(ValueError):
    """What is wrong with a batch file's content (the caller names the file)."""


def _kind(value: object) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _batch_arrays(entry: object, label_key: bytes,
                  num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(entry, dict):
        raise _Malformed(f"it holds {_kind(entry)}, not a dict of images and labels")
    for key in (b"data", label_key):
        if key not in entry:
            raise _Malformed(f"it has no {key.decode()!r} entry")
    data, labels = entry[b"data"], entry[label_key]
    if not isinstance(data, np.ndarray):
        raise _Malformed(f"its data is {_kind(data)}, not an array of pixel bytes")
    if data.dtype.kind not in "ui":
        raise _Malformed(f"its data has dtype {data.dtype}, not uint8 pixels")
    if data.ndim == 2 and data.shape[1] == math.prod(CIFAR_PIXELS):
        data = data.reshape(-1, *CIFAR_PIXELS)
    elif data.shape[1:] != CIFAR_PIXELS:
        raise _Malformed(f"its data has shape {tuple(data.shape)}, not (N, 3072): rows of "
                         f"32x32 RGB pixels")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise _Malformed("its data holds values outside [0, 255]")
        data = data.astype(np.uint8)
    name = label_key.decode()
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise _Malformed(f"its {name} are {_kind(labels)}, not a list of class indices")
    try:
        y = np.asarray(labels)
    except ValueError as err:
        raise _Malformed(f"its {name} are not a flat list of class indices ({err})") from None
    if len(y) and (y.dtype.kind not in "ui" or y.ndim != 1):
        raise _Malformed(f"its {name} are not a flat list of integer class indices")
    y = y.astype(np.int64)
    if len(y) != len(data):
        raise _Malformed(f"it has {len(data)} images but {len(y)} {name}")
    if num_classes is not None:
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if bad.size:
            raise _Malformed(f"label {y[bad[0]]} (sample {bad[0]}) is outside "
                             f"[0, {num_classes})")
    return data, y


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int | None = None,
                     md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: uint8 images (N, 3, 32, 32) and int64 labels in
    [0, ``num_classes``).

    Every file goes through :class:`BatchUnpickler`, the guard: batches written elsewhere (a
    shared data folder, tests writing the exact on-disk format) are read as data, never as
    code. ``md5`` (the published one) only adds to the error of a file that is not the
    published file; the bytes are read once, so the check and the unpickling see one content.
    Anything malformed is a :class:`UserError` naming the file and what is wrong.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read CIFAR batch {path}: {err.strerror or err}") from None
    try:
        entry = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        return _batch_arrays(entry, label_key, num_classes)
    except Exception as err:  # noqa: BLE001 - a hostile file can make unpickling raise anything
        why = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, (_Malformed, _Refused)):
            why = f"not a CIFAR python batch ({type(err).__name__}: {why})"
        if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
            why += "; it is not the published file (md5 differs)"
        raise UserError(f"cannot read CIFAR batch {path}: {why}") from None


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` via a temporary file (no partial file is left behind)."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _safe_extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        root = into.resolve()
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                raise UserError(f"refusing to extract {member.name!r} from {archive}")
        tar.extractall(into)

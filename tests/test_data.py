"""Data sets: synthetic determinism, the CIFAR pickle loaders on tiny files in the exact format,
download checksum handling, digits, and the on-device batch stream."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sigprop import data
from sigprop.data import BatchStream, load_dataset, random_crop_flip, synthetic_split
from sigprop.errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- synthetic
@pytest.mark.slow
def test_synthetic_is_deterministic_and_seed_dependent():
    a = load_dataset("synthetic", train_size=64, test_size=32, seed=3)
    b = load_dataset("synthetic", train_size=64, test_size=32, seed=3)
    c = load_dataset("synthetic", train_size=64, test_size=32, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, b.test_x)
    assert not torch.allclose(a.train_x, c.train_x)
    assert a.train_x.shape == (64, 3, 32, 32) and a.test_x.shape == (32, 3, 32, 32)
    assert a.num_classes == 10 and a.train_y.dtype == torch.long
    assert int(a.train_y.min()) >= 0 and int(a.train_y.max()) <= 9
    assert not torch.equal(a.train_x[:32], a.test_x)  # train and test are different draws


@pytest.mark.slow
def test_synthetic_prefix_does_not_depend_on_size():
    small_x, small_y = synthetic_split(100, seed=0, stream=1)
    big_x, big_y = synthetic_split(1500, seed=0, stream=1)
    assert torch.equal(small_x, big_x[:100]) and torch.equal(small_y, big_y[:100])


@pytest.mark.slow
def test_synthetic_is_normalized_and_uses_every_class():
    ds = load_dataset("synthetic", train_size=2000, test_size=10)
    mean = ds.train_x.mean(dim=(0, 2, 3))
    std = ds.train_x.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-3, rtol=0)
    counts = torch.bincount(ds.train_y, minlength=10)
    assert int(counts.min()) > 120  # roughly balanced


def test_synthetic_classes_differ_but_samples_vary():
    x, y = synthetic_split(1000, seed=0, stream=1)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    # class-mean images are distinct...
    dists = torch.cdist(means.flatten(1), means.flatten(1))
    assert float(dists[~torch.eye(10, dtype=torch.bool)].min()) > 1.0
    # ...and samples are far from their class mean (noise, shifts, jitter, distractors)
    spread = (x - means[y]).flatten(1).norm(dim=1).mean()
    assert float(spread) > float(dists.max())


def test_image_size_is_respected():
    ds = load_dataset("synthetic", train_size=8, test_size=8, image_size=16)
    assert ds.image_shape == (3, 16, 16)


# ----------------------------------------------------------------------------- CIFAR files
def cifar_entry(n: int, label_key: bytes, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    entry = {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        entry[b"coarse_labels"] = [v % 20 for v in entry[label_key]]
    return entry


def write_cifar10(root: Path, per_batch: int = 4, test: int = 3) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    entries = {f"data_batch_{i}": cifar_entry(per_batch, b"labels", 10, i) for i in range(1, 6)}
    entries["test_batch"] = cifar_entry(test, b"labels", 10, 99)
    for name, entry in entries.items():
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return entries


def write_cifar100(root: Path) -> dict[str, dict]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    entries = {"train": cifar_entry(7, b"fine_labels", 100, 1),
               "test": cifar_entry(5, b"fine_labels", 100, 2)}
    for name, entry in entries.items():
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return entries


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def test_cifar10_loader_reads_the_pickle_format(tmp_path):
    entries = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.num_classes == 10
    labels = sum((entries[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.train_y.tolist() == labels
    assert ds.test_y.tolist() == entries["test_batch"][b"labels"]
    raw = entries["data_batch_2"][b"data"][1]  # sample 5 overall
    pixels = unnormalize(ds.train_x[5:6], CIFAR10_MEAN, CIFAR10_STD)[0] * 255
    # rows of 3072 bytes: 1024 red, then green, then blue, each row-major 32x32
    expected = torch.from_numpy(raw.reshape(3, 32, 32).astype(np.float32))
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)
    assert ds.mean == CIFAR10_MEAN

    small = load_dataset("cifar10", data_dir=tmp_path, train_size=6, test_size=2,
                         download=False)
    assert torch.equal(small.train_x, ds.train_x[:6]) and len(small.test_y) == 2
    with pytest.raises(UserError, match="fewer than the 50 asked"):
        load_dataset("cifar10", data_dir=tmp_path, train_size=50, download=False)


def test_cifar100_loader_uses_fine_labels(tmp_path):
    entries = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert ds.num_classes == 100
    assert ds.train_y.tolist() == entries["train"][b"fine_labels"]
    assert ds.test_y.tolist() == entries["test"][b"fine_labels"]
    assert ds.train_x.shape == (7, 3, 32, 32)


def make_archive(source_root: Path, dest: Path) -> str:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(source_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(dest.read_bytes()).hexdigest()


def patch_source(monkeypatch, url: str, md5: str) -> None:
    source = data.SOURCES["cifar10"]
    monkeypatch.setitem(
        data.SOURCES, "cifar10",
        data.RemoteArchive(url, md5, source.filename, source.folder, source.train_files,
                           source.test_files, source.label_key),
    )


def test_download_verifies_checksum_and_extracts(tmp_path, monkeypatch):
    staging, cache = tmp_path / "staging", tmp_path / "cache"
    entries = write_cifar10(staging)
    archive = tmp_path / "served.tar.gz"
    md5 = make_archive(staging, archive)
    patch_source(monkeypatch, archive.as_uri(), md5)
    ds = load_dataset("cifar10", data_dir=cache, download=True)
    assert ds.test_y.tolist() == entries["test_batch"][b"labels"]
    assert (cache / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not list(cache.glob("*.part"))


def test_download_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    staging, cache = tmp_path / "staging", tmp_path / "cache"
    write_cifar10(staging)
    archive = tmp_path / "served.tar.gz"
    make_archive(staging, archive)
    patch_source(monkeypatch, archive.as_uri(), "0" * 32)
    with pytest.raises(UserError, match="checksum mismatch") as info:
        load_dataset("cifar10", data_dir=cache, download=True)
    assert "\n" not in str(info.value)
    assert not (cache / "cifar-10-python.tar.gz").exists()  # the bad file is gone
    assert not (cache / "cifar-10-batches-py").exists()  # and nothing was extracted


def test_missing_files_offline_say_where_to_put_them(tmp_path, monkeypatch):
    patch_source(monkeypatch, (tmp_path / "no-such-file.tar.gz").as_uri(), "0" * 32)
    with pytest.raises(UserError, match="download failed") as info:
        load_dataset("cifar10", data_dir=tmp_path / "cache", download=True)
    message = str(info.value)
    assert "cifar-10-batches-py" in message and str(tmp_path / "cache") in message
    assert "\n" not in message
    with pytest.raises(UserError, match="download is off"):
        load_dataset("cifar10", data_dir=tmp_path / "cache", download=False)


def test_archive_with_path_escape_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"x"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    patch_source(monkeypatch, archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(UserError, match="refusing to extract"):
        load_dataset("cifar10", data_dir=tmp_path / "cache", download=True)
    assert not (tmp_path / "escaped.txt").exists()


def test_corrupt_batch_is_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read CIFAR batch"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# ----------------------------------------------------------------------------- digits, names
def test_digits_upsampled_to_three_channel_images():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", image_size=32)
    assert ds.train_x.shape == (1500, 3, 32, 32) and ds.test_x.shape == (297, 3, 32, 32)
    assert ds.num_classes == 10
    assert set(ds.train_y.unique().tolist()) == set(range(10))
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 1])  # grey repeated over channels
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    again = load_dataset("digits", image_size=32, seed=5)
    assert torch.equal(again.test_y, ds.test_y)  # the split does not follow the seed


def test_digits_without_sklearn_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(UserError, match="scikit-learn"):
        load_dataset("digits")


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="valid: synthetic, cifar10, cifar100, digits"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="train_size"):
        load_dataset("synthetic", train_size=0)


# ----------------------------------------------------------------------------- batches
def test_crop_and_flip_geometry():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) + 1
    centred = random_crop_flip(x, torch.tensor([[2, 2], [2, 2]]), torch.tensor([False, True]), 2)
    assert torch.equal(centred[0], x[0])
    assert torch.equal(centred[1], x[1].flip(-1))
    corner = random_crop_flip(x, torch.tensor([[0, 0], [4, 3]]), torch.tensor([False, False]), 2)
    # offset (0, 0): the image moves down-right by the padding, zeros come in at the top left
    assert torch.equal(corner[0, :, 2:, 2:], x[0, :, :2, :2])
    assert float(corner[0, :, :2].abs().sum()) == 0.0
    # offset (4, 3): up by 2, left by 1
    assert torch.equal(corner[1, :, :2, :3], x[1, :, 2:, 1:])


def test_batch_stream_epochs_cover_every_sample_once():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    stream = BatchStream(x, y, batch_size=3, seed=0, augment="none")
    assert stream.steps_per_epoch == 3
    first = torch.cat([stream.next()[1] for _ in range(3)])
    assert len(set(first.tolist())) == 9  # one epoch, last partial batch dropped
    second = torch.cat([stream.next()[1] for _ in range(3)])
    assert stream.epoch == 1 and len(set(second.tolist())) == 9
    assert first.tolist() != second.tolist()  # a fresh permutation each epoch
    with pytest.raises(UserError, match="batch_size 11"):
        BatchStream(x, y, batch_size=11)


def test_batch_stream_state_round_trip():
    ds = load_dataset("synthetic", train_size=50, test_size=10)
    stream = BatchStream(ds.train_x, ds.train_y, batch_size=16, seed=7)
    for _ in range(4):
        stream.next()
    state = stream.state_dict()
    expected = [stream.next() for _ in range(3)]
    other = BatchStream(ds.train_x, ds.train_y, batch_size=16, seed=123)
    other.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [other.next() for _ in range(3)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    same_seed = BatchStream(ds.train_x, ds.train_y, batch_size=16, seed=7)
    xa, _ = same_seed.next()
    xb, _ = BatchStream(ds.train_x, ds.train_y, batch_size=16, seed=8).next()
    assert not torch.equal(xa, xb)


# ----------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("size, pad", [(4, 1), (8, 1), (12, 2), (16, 2), (32, 4), (64, 8)])
def test_crop_padding_is_an_eighth_of_the_side_at_least_one_pixel(size, pad):
    x = torch.randn(64, 1, size, size)
    stream = BatchStream(x, torch.zeros(64, dtype=torch.long), batch_size=64, augment="crop")
    assert stream.pad == pad
    # the largest shift seen over a batch is the padding: count the zero rows a crop brings in
    xb, _ = stream.next()
    zero_rows = (xb.abs().sum(dim=(1, 3)) == 0).sum(dim=1)
    assert int(zero_rows.max()) == pad


def test_augment_modes_flip_only_when_asked():
    x = torch.randn(256, 1, 8, 8)
    y = torch.zeros(256, dtype=torch.long)
    none, _ = BatchStream(x, y, batch_size=256, seed=3, augment="none").next()
    crop, _ = BatchStream(x, y, batch_size=256, seed=3, augment="crop").next()
    flip, _ = BatchStream(x, y, batch_size=256, seed=3, augment="crop+flip").next()
    order = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    assert torch.equal(none, x[order])
    # a crop is a shift: every cropped image equals its source at some offset, never mirrored
    def matches_shift(img, src, mirror):
        src = src.flip(-1) if mirror else src
        padded = torch.nn.functional.pad(src, (1, 1, 1, 1))
        return any(torch.equal(img, padded[:, dy:dy + 8, dx:dx + 8])
                   for dy in range(3) for dx in range(3))
    assert all(matches_shift(crop[i], x[order[i]], False) for i in range(256))
    mirrored = sum(not matches_shift(flip[i], x[order[i]], False) for i in range(256))
    assert 90 < mirrored < 166  # about half the images are flipped
    with pytest.raises(UserError, match="augment must be one of"):
        BatchStream(x, y, batch_size=8, augment="rotate")


def test_data_sets_default_to_label_preserving_augmentation():
    from sigprop.data import default_augment
    from sigprop.train import TrainConfig

    assert default_augment("digits") == "crop"  # a mirrored 2 is not a 2
    assert default_augment("synthetic") == "crop"
    assert default_augment("cifar10") == "crop+flip"
    assert TrainConfig(data="digits").augment == "crop"
    assert TrainConfig(data="cifar10", model={"name": "nf_resnet26"}).augment == "crop+flip"
    assert TrainConfig(augment=False).augment == "none"
    with pytest.raises(UserError, match="augment must be one of"):
        TrainConfig(augment="mixup")


@pytest.mark.slow
def test_small_bn_resnet_learns_8px_digits_with_the_default_augmentation():
    # the old default (4 px padding and flips on 8 px digits) left this network at 19.5%
    from sigprop.train import train

    result = train({
        "model": {"name": "bn_resnet26_v2", "stem": "cifar", "width_mult": 0.125,
                  "depths": [1, 1, 1, 1]},
        "data": "digits", "image_size": 8, "batch_size": 32, "steps": 60, "base_lr": 0.8,
        "device": "cpu", "eval_every": 0,
    })
    assert result.config["augment"] == "crop"
    assert result.final_acc > 0.8


@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_the_recorded_test_split_size_is_the_loaded_one(name):
    """The claims' test-set margins read DatasetInfo.test_images for runs that do not say."""
    from sigprop.data import dataset_info, load_dataset

    assert dataset_info(name).test_images == len(load_dataset(name, image_size=8).test_y)

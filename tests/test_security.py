"""Security (issue 24): nobody else's code runs as the user.

- The worker launcher: another local user plants a file (or a symlink) at the predictable path
  the runner once used in the shared temp folder, with the content it expects, and rewrites it
  after the runner checked it. The planted code must never run.
- CIFAR batch files: a batch whose unpickling runs a command must not run it, in a grid run on
  ``data_dir`` and in ``spp --input cifar10``; malformed batches are one line naming the file.
- Data that is not ours: a corrupt tarball is reported and kept, nothing downloads unless asked.
- Losing the Ray head mid-grid ends the grid in one line, its runs queued again for a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ablations import executors
from ablations.executors import LocalExecutor
from ablations.runner import run_grid, status_table
from ablations.spec import load_spec
from run_ablations import main
from sigprop import data
from sigprop.data import load_dataset
from sigprop.errors import UserError
from sigprop.train import train
from tests.helpers import ROOT, InlineExecutor, wait_for, write_spec
from tests.test_data import cifar_entry, write_cifar10
from tests.test_train import TINY_MODEL

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux launcher")
NOBODY = 65534
SPP_SMALL = ["--model", "nf_resnet26", "--set", "width_mult=0.125", "--set", "stem=cifar",
             "--set", "depths=[2,2]", "--set", "widths=[256,512]", "--input-shape", "4,3,32,32",
             "--seeds", "1"]

# What the runner used to write to, and exec from, <tmp>/sigprop-launcher-<uid>-<digest>
OLD_LAUNCHER = """#!{python} -SE
import ctypes, os, signal, sys
ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if str(os.getppid()) != os.environ.get("SIGPROP_RUNNER_PID"):
    os._exit(1)  # the runner died before the line above
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


@pytest.fixture
def shared_temp_folder() -> Iterator[Path]:
    """A world-writable sticky folder, like /tmp, that another user can reach (pytest's
    tmp_path is inside a folder private to us)."""
    folder = Path(tempfile.mkdtemp(prefix="sigprop-shared-", dir=tempfile.gettempdir()))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


def as_nobody(action) -> bool:
    """Call ``action()`` in a forked child running as uid 65534; False where that is not
    possible (not root). A fork, not a new interpreter: uid 65534 may not reach ours."""
    if os.getuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker could not write its file"
    return True


@linux_only
@pytest.mark.slow  # a real worker process imports torch
@pytest.mark.parametrize("plant", ["file", "symlink"])
def test_a_launcher_planted_in_the_shared_temp_folder_never_runs(
        tmp_path, monkeypatch, shared_temp_folder, plant):
    shared = shared_temp_folder
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.setenv("TMPDIR", str(shared))
    expected = OLD_LAUNCHER.format(python=sys.executable)
    digest = hashlib.sha256(expected.encode()).hexdigest()[:12]
    path = shared / f"sigprop-launcher-{os.getuid()}-{digest}"
    target = shared / "attacker-owned" if plant == "symlink" else path
    marker = shared / "planted-code-ran"
    payload = f'#!/bin/sh\nid -u > {marker}\nexec {sys.executable} "$@"\n'

    def write_as_attacker(text: str) -> None:
        def write() -> None:
            target.write_text(text)
            target.chmod(0o777)

        if not as_nobody(write):  # not root: the attacker's file, at least, is not ours
            write()

    write_as_attacker(expected)  # planted before the runner starts, with the content it checks
    if plant == "symlink":
        path.symlink_to(target)
    assert os.lstat(path).st_uid in (NOBODY, os.getuid())
    rewrites = []

    class AttackerRewritesAfterTheCheck(ProcessPoolExecutor):
        # workers start at the first submit, after any check the runner made of the launcher
        def submit(self, *args, **kwargs):
            write_as_attacker(payload)
            rewrites.append(True)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(executors, "ProcessPoolExecutor", AttackerRewritesAfterTheCheck)
    spec = load_spec(write_spec(tmp_path, steps=1, seeds="[0]"))
    stream = io.StringIO()
    outcome = run_grid(spec, tmp_path / "out", LocalExecutor(1, "cpu"), stream=stream)
    assert rewrites and outcome.counts == {"completed": 1}, stream.getvalue()
    assert not marker.exists(), f"planted code ran as uid {marker.read_text().strip()}"
    # and sigprop wrote nothing there to exec (torch may keep its compile cache there)
    written = {p.name for p in shared.iterdir()} - {path.name, target.name}
    assert not [name for name in written if name.startswith("sigprop")], written


def parent_death_signal(results) -> None:
    """In a worker: the parent-death signal it runs under (PR_GET_PDEATHSIG)."""
    import ctypes

    value = ctypes.c_int(0)
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(value))
    results.put(value.value)


@linux_only
@pytest.mark.slow
def test_workers_start_with_the_parent_death_signal_set_inline():
    cmd = executors.deathsig_command_line(["python", "-c", "print(1)", "--multiprocessing-fork"])
    assert cmd[0] == "python" and cmd[1] == "-c" and cmd[3] == "--multiprocessing-fork"
    assert "prctl(1, " in cmd[2] and cmd[2].endswith("print(1)")
    assert f"!= {os.getpid()}" in cmd[2]  # the runner's pid, not an environment variable
    ctx = executors.worker_context()
    assert ctx.get_start_method() == "spawn"
    results = ctx.Queue()
    proc = ctx.Process(target=parent_death_signal, args=(results,))
    proc.start()
    assert results.get(timeout=60) == signal.SIGKILL
    proc.join(timeout=60)
    assert proc.exitcode == 0


# ----------------------------------------------------------------------------- CIFAR batches
class RunsACommand:
    """Unpickling this runs ``touch MARKER``: what a hostile data_batch_1 can hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_batch(data_dir: Path, entry, name: str = "data_batch_1", per_batch: int = 4) -> Path:
    """A CIFAR-10 folder in the exact on-disk format, with ``name`` replaced by ``entry``
    (pickled) or, for bytes, by those bytes."""
    write_cifar10(data_dir, per_batch=per_batch)
    path = data_dir / "cifar-10-batches-py" / name
    path.write_bytes(entry if isinstance(entry, bytes) else pickle.dumps(entry))
    return path


def hostile(marker: Path) -> dict:
    return {b"data": RunsACommand(marker), b"labels": [0, 1, 2, 3]}


def one_line_naming(message: str, path: Path) -> None:
    assert "\n" not in message and str(path) in message, message


def test_a_batch_whose_unpickling_runs_a_command_does_not_run_it_in_train(tmp_path):
    marker = tmp_path / "command-ran"
    path = plant_batch(tmp_path / "data", hostile(marker))
    config = {"data": "cifar10", "data_dir": str(tmp_path / "data"), "model": TINY_MODEL,
              "train_size": 8, "test_size": 2, "batch_size": 4, "steps": 1, "eval_every": 0}
    with pytest.raises(UserError, match="refusing to load posix.system") as info:
        train(config)
    assert not marker.exists()
    one_line_naming(str(info.value), path)


def test_a_batch_whose_unpickling_runs_a_command_does_not_run_it_in_a_grid_run(tmp_path):
    marker = tmp_path / "command-ran"
    path = plant_batch(tmp_path / "data", hostile(marker))
    spec = load_spec(write_spec(tmp_path, steps=1, seeds="[0]"),
                     ["data=cifar10", f"data_dir={tmp_path / 'data'}", "train_size=16",
                      "test_size=2"])
    outcome = run_grid(spec, tmp_path / "out", InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"failed": 1} and not marker.exists()
    one_line_naming(status_table(tmp_path / "out")["error"][0], path)


def test_a_batch_whose_unpickling_runs_a_command_does_not_run_it_in_spp(tmp_path, capsys):
    marker = tmp_path / "command-ran"
    path = plant_batch(tmp_path / "data", hostile(marker))
    rc = main(["spp", "--input", "cifar10", "--data-dir", str(tmp_path / "data"), *SPP_SMALL,
               "--out", str(tmp_path / "spp")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists(), err
    assert err.startswith("sigprop: error: ") and "Traceback" not in err
    one_line_naming(err.strip(), path)


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING opcodes), as the official batches hold."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


@pytest.mark.parametrize("style", ["python2, numpy 1", "protocol 2", "protocol 5"])
def test_the_restricted_unpickler_reads_the_official_format(tmp_path, style):
    entry = cifar_entry(6, b"labels", 10, 3)
    if style == "python2, numpy 1":  # how cPickle wrote the official files
        out = io.BytesIO()
        Python2Pickler(out, protocol=2).dump(entry)
        raw = out.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    else:
        raw = pickle.dumps(entry, protocol=int(style[-1]))
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    x, y = data.read_cifar_batch(path, b"labels", 10)
    assert x.dtype == np.uint8 and x.shape == (6, 3, 32, 32)
    assert np.array_equal(x.reshape(6, -1), entry[b"data"])
    assert y.tolist() == entry[b"labels"]


class Unknown:
    """A class no CIFAR batch holds (its module is importable: plain pickle would build it)."""


def good_entry(n: int = 4) -> dict:
    return cifar_entry(n, b"labels", 10, 1)


MALFORMED = {
    "a list": ([1, 2, 3], "holds a list, not a dict"),
    "None": (None, "holds None, not a dict"),
    "no data": ({b"labels": [0]}, "has no 'data' entry"),
    "None data": ({**good_entry(), b"data": None}, "its data is None"),
    "list data": ({**good_entry(), b"data": [[0] * 3072] * 4}, "its data is a list"),
    "an unknown class": ({**good_entry(), b"data": Unknown()},
                         "refusing to load tests.test_security.Unknown"),
    "float data": ({**good_entry(), b"data": np.zeros((4, 3072))}, "dtype float64"),
    "wrong shape": ({**good_entry(), b"data": np.zeros((4, 100), np.uint8)},
                    r"shape \(4, 100\), not \(N, 3072\)"),
    "pixels over 255": ({**good_entry(), b"data": np.full((4, 3072), 300, np.int64)},
                        r"outside \[0, 255\]"),
    "label out of range": ({**good_entry(), b"labels": [0, 1, 10, 2]},
                           r"label 10 \(sample 2\) is outside \[0, 10\)"),
    "negative label": ({**good_entry(), b"labels": [0, -1, 1, 2]}, "label -1"),
    "None labels": ({**good_entry(), b"labels": None}, "its labels are None"),
    "labels of strings": ({**good_entry(), b"labels": ["a", "b", "c", "d"]},
                          "not a flat list of integer"),
    "labels with None": ({**good_entry(), b"labels": [0, None, 1, 2]},
                         "not a flat list of integer"),
    "fewer labels": ({**good_entry(), b"labels": [0, 1]}, "4 images but 2 labels"),
    "not a pickle": (b"not a pickle", "not a CIFAR python batch"),
    "truncated": (pickle.dumps(good_entry())[:500], "not a CIFAR python batch"),
    "empty": (b"", "not a CIFAR python batch"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_batch_is_one_line_naming_the_file_and_the_fault(tmp_path, case):
    entry, fault = MALFORMED[case]
    path = plant_batch(tmp_path, entry)
    with pytest.raises(UserError, match=fault) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    one_line_naming(str(info.value), path)
    assert str(info.value).startswith(f"cannot read CIFAR batch {path}: ")
    assert "not the published file" in str(info.value)  # its md5 is not data_batch_1's


@pytest.mark.parametrize("case", ["a list", "None data", "an unknown class",
                                  "label out of range", "wrong shape"])
def test_spp_names_a_malformed_batch_in_one_line(tmp_path, capsys, case):
    path = plant_batch(tmp_path / "data", MALFORMED[case][0], per_batch=103)  # spp takes 512
    rc = main(["spp", "--input", "cifar10", "--data-dir", str(tmp_path / "data"), *SPP_SMALL,
               "--out", str(tmp_path / "spp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sigprop: error: cannot read CIFAR batch"), err
    one_line_naming(err.strip(), path)


def test_a_malformed_test_batch_is_named_in_a_grid_run(tmp_path):
    path = plant_batch(tmp_path / "data", MALFORMED["label out of range"][0], "test_batch")
    spec = load_spec(write_spec(tmp_path, steps=1, seeds="[0, 1]"),
                     ["data=cifar10", f"data_dir={tmp_path / 'data'}", "train_size=16",
                      "test_size=2"])
    outcome = run_grid(spec, tmp_path / "out", InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"failed": 2}
    for error in status_table(tmp_path / "out")["error"]:
        one_line_naming(error, path)
        assert "label 10 (sample 2)" in error


def test_the_published_per_file_md5s_are_the_ones_checked():
    assert data.SOURCES["cifar10"].file_md5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert data.SOURCES["cifar10"].file_md5["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert data.SOURCES["cifar100"].file_md5["train"] == "16019d7e3df5f24257cddd939b257f8d"
    assert set(data.SOURCES["cifar10"].file_md5) == {
        *data.SOURCES["cifar10"].train_files, *data.SOURCES["cifar10"].test_files,
        "batches.meta"}


# ----------------------------------------------------------------------------- tarballs
@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Every download attempt is recorded (and fails, as offline)."""
    tried: list[str] = []

    def urlopen(url, *args, **kwargs):
        tried.append(str(url))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


def corrupt_tarball(data_dir: Path) -> tuple[Path, bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(b"a partial download of the user's own")
    return archive, archive.read_bytes()


def cifar_grid(tmp_path: Path, data_dir: Path, seeds: str = "[0, 1]") -> Path:
    spec = write_spec(tmp_path, steps=1, seeds=seeds)
    spec.write_text(spec.read_text().replace(
        'data = "synthetic"', f'data = "cifar10"\ndata_dir = "{data_dir}"'))
    return spec


@pytest.mark.parametrize("download", [False, True])
def test_a_corrupt_tarball_stops_the_grid_in_one_line_and_stays(
        tmp_path, capsys, no_network, download):
    archive, content = corrupt_tarball(tmp_path / "data")
    args = ["--download"] if download else []
    rc = main(["run", str(cifar_grid(tmp_path, tmp_path / "data")), "--out",
               str(tmp_path / "out"), "--device", "cpu", "--no-report", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"checksum mismatch for {archive}" in err and "left in place" in err
    assert archive.read_bytes() == content  # not ours: never deleted
    assert no_network == []  # and nothing downloaded in its place
    assert not (tmp_path / "out" / "tiny" / "runs").exists()  # stopped before any run


def test_runs_spp_and_the_library_never_download_unless_asked(tmp_path, capsys, no_network):
    config = {"data": "cifar10", "data_dir": str(tmp_path / "none"), "model": TINY_MODEL,
              "steps": 1}
    with pytest.raises(UserError, match="download is off"):
        train(config)
    with pytest.raises(UserError, match="download is off"):
        load_dataset("cifar10", data_dir=tmp_path / "none")
    rc = main(["spp", "--input", "cifar10", "--data-dir", str(tmp_path / "none"), *SPP_SMALL,
               "--out", str(tmp_path / "spp")])
    assert rc == 2 and "download is off" in capsys.readouterr().err
    archive, content = corrupt_tarball(tmp_path / "data")
    with pytest.raises(UserError, match="checksum mismatch"):
        train({**config, "data_dir": str(tmp_path / "data")})
    assert archive.read_bytes() == content
    assert no_network == []


def tarball_of(tmp_path: Path, per_batch: int = 4) -> tuple[Path, dict[str, str]]:
    """A tarball of CIFAR-10 batches in the exact format, and the md5 of each of its files."""
    staging = tmp_path / "staging"
    write_cifar10(staging, per_batch=per_batch)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    files = {p.name: data.md5_of(p) for p in (staging / "cifar-10-batches-py").iterdir()}
    return archive, files


def test_extracted_files_must_match_the_published_md5s(tmp_path, monkeypatch, no_network):
    archive, _ = tarball_of(tmp_path)
    # the tarball passes its own check; its files are not the published ones
    source = data.SOURCES["cifar10"]
    monkeypatch.setitem(data.SOURCES, "cifar10",
                        dataclasses.replace(source, md5=data.md5_of(archive)))
    with pytest.raises(UserError, match="data_batch_1 in .* has md5 .*, not the published "
                                        "c99cafc152244af753f735de768cd75f") as info:
        load_dataset("cifar10", data_dir=tmp_path / "data")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-python.tar.gz"]


@pytest.mark.slow
def test_a_good_tarball_in_data_dir_is_extracted_once_before_the_grid_runs(
        tmp_path, monkeypatch, no_network):
    archive, files = tarball_of(tmp_path)
    source = data.SOURCES["cifar10"]
    monkeypatch.setitem(data.SOURCES, "cifar10", dataclasses.replace(
        source, md5=data.md5_of(archive), file_md5=files))
    spec = load_spec(cifar_grid(tmp_path, tmp_path / "data"), ["train_size=16", "test_size=2"])
    extracted = []
    real = data._extract
    monkeypatch.setattr(data, "_extract", lambda *a: (extracted.append(a), real(*a)))
    outcome = run_grid(spec, tmp_path / "out", InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"completed": 2} and len(extracted) == 1
    folder = tmp_path / "data" / "cifar-10-batches-py"
    assert {p.name: data.md5_of(p) for p in folder.iterdir()} == files
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no staging folder left
    assert no_network == []


# ----------------------------------------------------------------------------- Ray head
@linux_only
@pytest.mark.slow
@pytest.mark.ray
def test_losing_the_ray_head_ends_the_grid_in_one_line_and_a_rerun_finishes_it(
        tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray._common import utils as common_utils
    from ray._private import utils as private_utils
    from ray.cluster_utils import Cluster

    from ablations.store import GridStore, load_results

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # not published in /tmp/ray/ray_current_cluster (see test_faults_processes' Ray test)
    monkeypatch.setattr(private_utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(common_utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                            "include_dashboard": False})
    try:
        spec, out = write_spec(tmp_path, steps=20, seeds="[0, 1]"), tmp_path / "out"
        runner = subprocess.Popen(
            [sys.executable, str(ROOT / "run_ablations.py"), "run", str(spec), "--out",
             str(out), "--device", "cpu", "--no-report", "--executor", "ray"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RAY_ADDRESS": cluster.address})
        store = GridStore(out, "tiny")

        def both_training() -> bool:
            try:
                return all(store.status(rid).get("state") == "running"
                           and (store.run_dir(rid) / "checkpoint.pt").exists()
                           for rid in store.run_ids()) and len(store.run_ids()) == 2
            except Exception:  # noqa: BLE001 - polled while being written
                return False

        wait_for(both_training, timeout=120)
        cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
        killed = time.monotonic()
        _, stderr = runner.communicate(timeout=60)
        assert time.monotonic() - killed < executors.HEAD_GRACE_S + 15  # not Ray's 60 s
    finally:
        cluster.shutdown()
    assert runner.returncode == 2, stderr
    # Ray's own C++ log may precede it ("Failed to push error to driver for task ...")
    lines = stderr.splitlines()
    assert lines[-1].startswith("sigprop: error: lost the Ray head at "), stderr
    assert stderr.count("sigprop:") == 1 and "Traceback" not in stderr, stderr
    assert "2 unfinished run(s) queued again" in lines[-1]
    assert [store.state(rid) for rid in store.run_ids()] == ["queued", "queued"]
    assert not any(store.is_locked(rid) for rid in store.run_ids())

    outcome = run_grid(load_spec(spec), out, InlineExecutor(), stream=io.StringIO())
    assert outcome.counts == {"completed": 2}
    steps = load_results(out).metrics.dropna(subset=["loss"]).groupby("run_id")["step"]
    assert [list(s) for _, s in steps] == [list(range(20))] * 2  # resumed, every step once

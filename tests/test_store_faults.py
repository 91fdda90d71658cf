"""Readers that never crash (issue 24): a store this process cannot write, and stored JSON that
parses but holds the wrong types."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from ablations.runner import status_table
from ablations.store import DamagedFile, GridStore, load_results
from run_ablations import main
from tests.helpers import ROOT, rerun_repairs, run_dirs, store_finished_grid


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return store_finished_grid(tmp_path_factory.mktemp("finished"))


@pytest.fixture
def grid(finished, tmp_path) -> Path:
    """A fresh copy of the finished grid folder (spec at tmp_path/tiny.toml)."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out" / "tiny"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def interrupt(run_dir: Path) -> None:
    """Make a finished run look like one whose process died mid-way (its lock is free)."""
    edit_json(run_dir / "status.json", lambda s: s.update(state="running", pid=999999))
    assert (run_dir / ".lock").is_file()


# ----------------------------------------------------------------------------- read-only stores

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture
def read_only(monkeypatch):
    """Every os.open for writing under the given folder fails with EROFS, as on a read-only
    mount (the store's lock files and atomic writes both go through os.open)."""
    real_open = os.open

    def arm(folder: Path) -> None:
        def guarded(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS and str(Path(path).resolve()).startswith(str(folder)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", guarded)

    return arm


@pytest.mark.slow
def test_readers_of_a_read_only_store_with_an_interrupted_run(grid, read_only, tmp_path,
                                                               capsys):
    interrupted, done = run_dirs(grid)
    interrupt(interrupted)
    read_only(grid.resolve())

    runs = load_results(grid).runs.set_index("run_id")
    assert runs.loc[interrupted.name, "status"] == "interrupted"
    assert runs.loc[done.name, "status"] == "completed"
    table = status_table(grid).set_index("run_id")
    assert table.loc[interrupted.name, "status"] == "interrupted"
    assert main(["status", str(grid)]) == 0
    out = capsys.readouterr()
    assert "1 completed, 1 interrupted" in out.out and "Traceback" not in out.err

    report = tmp_path / "elsewhere" / "report.html"
    assert main(["report", str(grid), "--out", str(report)]) == 0
    assert report.is_file() and (report.parent / "report.md").is_file()
    assert main(["export", "tensorboard", str(grid), "--out", str(tmp_path / "tb")]) == 0
    out = capsys.readouterr()
    assert "sigprop: error" not in out.err
    assert not list(grid.rglob("*.tmp")) and not (grid / "report.html").exists()


def test_a_lock_that_cannot_be_checked_is_said_not_guessed(grid, monkeypatch):
    running, _ = run_dirs(grid)
    interrupt(running)
    real_open = os.open

    def no_lock(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_lock)
    row = load_results(grid).runs.set_index("run_id").loc[running.name]
    assert row["status"] == "running"
    assert row["error"] == (".lock cannot be opened (Permission denied): shown as running, it "
                            "may have been interrupted")


def test_a_held_lock_still_reads_as_running(grid):
    running, _ = run_dirs(grid)
    interrupt(running)
    lock = GridStore(grid.parent, grid.name).lock(running.name)
    assert lock.acquire()
    try:
        assert load_results(grid).runs.set_index("run_id").loc[running.name, "status"] \
            == "running"
    finally:
        lock.release()


# Everything the readers import is imported before dropping root: the interpreter may live in a
# folder only root can read (~/.pyenv).
READER = """
import os, sys
sys.path.insert(0, {root!r})
import argparse, tomllib, html, json, base64, io, re, textwrap, warnings
import pandas, pyarrow.parquet, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import ablations.runner, ablations.store, reports.build
import sigprop.data, sigprop.recorder, sigprop.train  # torch: the store's readers load it lazily
from run_ablations import main
from tests.helpers import ROOT, run_dirs, run_inline, store_finished_grid
os.setgid(65534)
os.setuid(65534)
code = main(sys.argv[1:])
print("exit", code)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another user")
def test_readers_as_another_user_on_a_store_they_cannot_write(grid):
    """Root ignores file modes: a reader running as nobody meets a real read-only store."""
    interrupted, _ = run_dirs(grid)
    interrupt(interrupted)
    (interrupted / ".lock").chmod(0o000)  # and one lock it may not even read
    shared = Path(tempfile.mkdtemp(prefix="sigprop-ro-"))
    try:
        shared.chmod(0o755)
        store = shared / "tiny"
        shutil.copytree(grid, store)
        subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
        out = shared / "out"
        out.mkdir()
        os.chown(out, 65534, 65534)
        env = {**os.environ, "MPLCONFIGDIR": str(out / "mpl"), "HOME": str(out),
               "PYTHONPATH": str(ROOT)}

        def reader(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", READER.format(root=str(ROOT)), *args],
                                  capture_output=True, text=True, env=env, timeout=120)

        status = reader("status", str(store))
        assert "Traceback" not in status.stderr, status.stderr
        assert status.stdout.strip().endswith("exit 0")
        assert "1 completed, 1 running" in status.stdout
        assert ".lock cannot be opened (Permission denied)" in status.stdout
        report = reader("report", str(store), "--out", str(out / "report.html"))
        assert "Traceback" not in report.stderr and report.stdout.strip().endswith("exit 0")
        assert (out / "report.html").is_file()
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(shared)], check=True)
        shutil.rmtree(shared)


# ----------------------------------------------------------------------------- wrong JSON types

STATUS_CASES = {
    "summary a list": ({"summary": []}, "field 'summary' holds a list, not an object or null"),
    "summary a string": ({"summary": "good"}, "field 'summary' holds a string"),
    "attempts a string": ({"attempts": "3"}, "field 'attempts' holds a string, not an integer"),
    "state a list": ({"state": ["completed"]}, "field 'state' holds a list, not a string"),
    "state unknown": ({"state": "finished"}, "field 'state' is 'finished', not one of"),
    "warnings a string": ({"warnings": "w"}, "field 'warnings' holds a string"),
    "warnings of numbers": ({"warnings": [1]}, "field 'warnings[0]' holds an integer"),
    "environment a list": ({"environment": []}, "field 'environment' holds a list"),
    "final_acc a string": ({"summary": {"final_acc": "0.9"}},
                           "field 'summary.final_acc' holds a string, not a number or null"),
    "error an object": ({"error": {}}, "field 'error' holds an object, not a string or null"),
    "duration a string": ({"duration_s": "fast"}, "field 'duration_s' holds a string"),
    "threads a string": ({"environment": {"threads": "2"}},
                         "field 'environment.threads' holds a string"),
}
CONFIG_CASES = {
    "axes a list": (lambda c: c.update(axes=[]), "field 'axes' holds a list, not an object"),
    "label a number": (lambda c: c.update(label=5), "field 'label' holds an integer"),
    "departures a list": (lambda c: c.update(model_departures=[]),
                          "field 'model_departures' holds a list"),
    "effective lr a string": (lambda c: c["effective"].update(lr="fast"),
                              "field 'effective.lr' holds a string, not a number or null"),
    "batch_size a string": (lambda c: c["config"].update(batch_size="16"),
                            "field 'config.batch_size' holds a string, not an integer"),
    "clip a string": (lambda c: c["config"].update(clip="agc"),
                      "field 'config.clip' holds a string, not an object"),
    "clip threshold a list": (lambda c: c["config"]["clip"].update(threshold=[1]),
                              "field 'config.clip.threshold' holds a list"),
    "model name a number": (lambda c: c["config"]["model"].update(name=5),
                            "field 'config.model.name' holds an integer, not a string"),
}


def corrupt(run_dir: Path, case: str) -> tuple[str, str]:
    """Apply a case; returns the file name and the reason it must be reported with."""
    if case in STATUS_CASES:
        fields, reason = STATUS_CASES[case]
        edit_json(run_dir / "status.json", lambda s: s.update(fields))
        return "status.json", reason
    change, reason = CONFIG_CASES[case]
    edit_json(run_dir / "config.json", change)
    return "config.json", reason


@pytest.mark.parametrize("case", [*STATUS_CASES, *CONFIG_CASES])
def test_a_wrong_type_makes_the_run_damaged_in_every_reader(grid, case, capsys):
    bad, good = run_dirs(grid)
    name, reason = corrupt(bad, case)
    store = GridStore(grid.parent, grid.name)

    with pytest.raises(DamagedFile) as err:
        store.config(bad.name) if name == "config.json" else store.state(bad.name)
    assert err.value.path == bad / name and err.value.reason.startswith(reason)
    if name == "status.json":
        with pytest.raises(DamagedFile):
            store.status(bad.name)
    assert store.damage(bad.name).path == bad / name

    runs = load_results(grid).runs.set_index("run_id")
    assert runs.loc[bad.name, "status"] == "damaged"
    assert runs.loc[bad.name, "error"].startswith(f"{name}: {reason}")
    assert runs.loc[good.name, "status"] == "completed"
    assert main(["status", str(grid)]) == 0
    out = capsys.readouterr()
    assert "1 completed, 1 damaged" in out.out and "Traceback" not in out.err


@pytest.mark.parametrize("case", ["summary a list", "state unknown", "axes a list",
                                  "batch_size a string"])
@pytest.mark.slow
def test_a_run_repairs_a_run_with_a_wrong_type(grid, case):
    bad, _ = run_dirs(grid)
    expected = pd.read_parquet(bad / "metrics.parquet").drop(columns="step_time")
    name, reason = corrupt(bad, case)
    broken = (bad / name).read_bytes()
    rerun_repairs(grid, bad, name, broken, f"run {bad.name}: {name} was damaged ({reason}")
    pd.testing.assert_frame_equal(
        pd.read_parquet(bad / "metrics.parquet").drop(columns="step_time"), expected)


def test_the_report_and_export_show_a_wrong_type_as_damaged(grid, tmp_path, capsys):
    bad, good = run_dirs(grid)
    corrupt(bad, "summary a list")
    corrupt(good, "axes a list")
    assert main(["report", str(grid)]) == 0
    text = (grid / "report.md").read_text()
    assert "## Damaged runs" in text and "field 'summary' holds a list" in text
    assert "field 'axes' holds a list" in text
    assert main(["export", "tensorboard", str(grid), "--out", str(tmp_path / "tb")]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_progress_record_of_the_wrong_type_reads_as_none(grid):
    run, _ = run_dirs(grid)
    (run / "progress.json").write_text(json.dumps({"step": "3", "total": 6}))
    assert GridStore(grid.parent, grid.name).progress(run.name) is None
    interrupt(run)
    assert status_table(grid).set_index("run_id").loc[run.name, "status"] == "interrupted"

"""Fault campaign (issue #13): damaged stores, non-finite values, unreadable specs, huge grids,
missing data, full disks and stale debris, the console against the store, and the shipped
grids under the run limit. Signals, killed runners and workers, broken pools and Ray over
several nodes are in test_faults_processes.py.

Most tests run a tiny grid in this process (``tests.helpers.InlineExecutor``).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import math
import os
import shutil
import typing
from pathlib import Path

import pandas as pd
import pytest
import tomllib

from ablations.runner import Progress, status_table
from ablations.shipped import GRIDS_DIR, shipped_grids
from ablations.spec import MAX_RUNS, GridSpec, expand, grid_size, load_spec, spec_from_dict
from ablations.store import GridStore, load_results
from ablations.worker import execute_run
from reports.build import build_report
from run_ablations import main
from sigprop.clipping import ClipConfig
from sigprop.errors import UserError
from sigprop.models import model_spec, resolve_config
from sigprop.train import TrainConfig
from tests.helpers import (
    ROOT,
    rerun_repairs,
    run_dirs,
    run_inline,
    shipped_runs,
    store_finished_grid,
    write_spec,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An output root holding the tiny grid, both runs completed."""
    return store_finished_grid(tmp_path_factory.mktemp("finished")) / "out"


@pytest.fixture
def grid(finished, tmp_path) -> Path:
    """A fresh copy of the finished grid folder."""
    shutil.copytree(finished, tmp_path / "out")
    write_spec(tmp_path)
    return tmp_path / "out" / "tiny"


DAMAGE = {
    "status.json cut in half": ("status.json", lambda b: b[: len(b) // 2]),
    "status.json random bytes": ("status.json", lambda b: os.urandom(len(b)) + b"\xff"),
    "config.json garbled": ("config.json", lambda b: b.replace(b"{", b"[", 1)),
    "config.json without config": ("config.json", lambda b: b'{"run_id": "x"}'),
    "metrics.parquet truncated": ("metrics.parquet", lambda b: b[: len(b) // 2]),
    "blocks.parquet truncated": ("blocks.parquet", lambda b: b[:100]),
}


def damage(run_dir: Path, name: str, how) -> bytes:
    path = run_dir / name
    bad = how(path.read_bytes())
    path.write_bytes(bad)
    return bad


# ----------------------------------------------------------------------------- damaged store


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.slow
def test_damaged_file_shows_in_status_and_report_and_rerun_repairs_it(grid, case, capsys):
    name, how = DAMAGE[case]
    bad_dir, good_dir = run_dirs(grid)
    expected = pd.read_parquet(bad_dir / "metrics.parquet")
    bad = damage(bad_dir, name, how)

    table = status_table(grid).set_index("run_id")
    assert table.loc[bad_dir.name, "status"] == "damaged"
    assert table.loc[bad_dir.name, "error"].startswith(f"{name}: ")
    assert table.loc[good_dir.name, "status"] == "completed"
    assert main(["status", str(grid)]) == 0
    assert "1 damaged" in capsys.readouterr().out

    if case in ("status.json cut in half", "metrics.parquet truncated"):  # ~3 s each
        report = build_report(grid)["md"].read_text()
        assert "## Damaged runs" in report and f"`{bad_dir.name}`: {name}" in report
    assert len(load_results(grid).metrics.groupby("run_id")) == 1  # the readable run

    rerun_repairs(grid, bad_dir, name, bad, f"run {bad_dir.name}: {name} was damaged")
    got = pd.read_parquet(bad_dir / "metrics.parquet")
    pd.testing.assert_frame_equal(got.drop(columns="step_time"),
                                  expected.drop(columns="step_time"))


@pytest.mark.slow
def test_damaged_checkpoint_restarts_the_run_from_step_0(grid):
    run_dir = run_dirs(grid)[0]
    expected = pd.read_parquet(run_dir / "metrics.parquet").drop(columns="step_time")
    store = GridStore(grid.parent, grid.name)
    store.update_status(run_dir.name, state="failed")
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")

    result = execute_run(str(grid.parent), grid.name, run_dir.name, "cpu", 1)
    assert result["state"] == "completed"
    status = store.status(run_dir.name)
    assert str(run_dir / "checkpoint.pt") in status["restarted"]
    assert "restarted from step 0" in status["restarted"]
    assert len(list(run_dir.glob("checkpoint.pt.damaged-*"))) == 1
    got = pd.read_parquet(run_dir / "metrics.parquet").drop(columns="step_time")
    pd.testing.assert_frame_equal(got, expected)


@pytest.mark.slow
def test_stale_temporaries_of_a_killed_save_are_removed_on_resume(grid):
    run_dir = run_dirs(grid)[0]
    GridStore(grid.parent, grid.name).update_status(run_dir.name, state="queued")
    stale = run_dir / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"")
    execute_run(str(grid.parent), grid.name, run_dir.name, "cpu", 1)
    assert not list(run_dir.glob(".*.tmp"))


# ----------------------------------------------------------------------------- non-finite values


def float_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls)
            if float in (typing.get_args(hints[f.name]) or (hints[f.name],))]


NON_FINITE = [math.inf, -math.inf, math.nan]
MODELS = ["nf_resnet26", "nfnet_f0", "bn_resnet26_v2"]


@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_every_float_field_rejects_non_finite_values(value):
    fields = float_fields(TrainConfig)
    assert {"base_lr", "lr", "momentum", "weight_decay", "diverge_loss"} <= set(fields)
    for name in fields:
        with pytest.raises(UserError, match=rf"^{name} must be a finite number"):
            TrainConfig.from_dict({name: value})
    clip = float_fields(ClipConfig)
    assert {"threshold", "eps"} <= set(clip)
    for name in clip:
        with pytest.raises(UserError, match=rf"clip\.{name} must be a finite number"):
            TrainConfig.from_dict({"clip.mode": "agc", "clip.threshold": 0.1, f"clip.{name}":
                                   value})
    for model in MODELS:
        names = float_fields(model_spec(model).config_cls)
        assert "width_mult" in names
        for name in names:
            with pytest.raises(UserError, match=rf"{name} must be a finite number"):
                TrainConfig.from_dict({"model": {"name": model, name: value}})
            with pytest.raises(UserError, match=rf"{name} must be a finite number"):
                resolve_config(model, **{name: value})


def test_model_option_of_the_wrong_type_names_the_field():
    with pytest.raises(UserError, match=r"alpha must be a number, got 'abc'"):
        TrainConfig.from_dict({"model.alpha": "abc"})
    with pytest.raises(UserError, match=r"depth_mult must be a number, got 'x'"):
        resolve_config("nfnet_f0", depth_mult="x")
    with pytest.raises(UserError, match=r"use_se must be true/false"):
        resolve_config("nf_resnet26", use_se=1)


# ----------------------------------------------------------------------------- spec input


def test_non_utf8_spec_is_one_line_exit_2(tmp_path, capsys):
    spec = tmp_path / "latin1.toml"
    spec.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err and str(spec) in err
    assert not (tmp_path / "out").exists()


def test_unreadable_spec_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path)
    real = Path.read_bytes

    def denied(self):  # chmod 000 does not stop root: fake what a user would get
        if self == spec:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["run", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"sigprop: error: cannot read spec file {spec}: Permission denied\n"


HUGE = ["seed=" + ",".join(map(str, range(10))), "batch_size=" + ",".join(map(str, range(1, 11))),
        "steps=" + ",".join(map(str, range(1, 11))), "data_seed=" + ",".join(map(str, range(10))),
        "test_size=" + ",".join(map(str, range(1, 11))),
        "train_size=" + ",".join(map(str, range(16, 26))),
        "image_size=" + ",".join(map(str, range(32, 42)))]


def test_huge_grid_is_counted_first_and_refused_with_the_flag_to_raise_the_limit(
        tmp_path, capsys):
    spec = write_spec(tmp_path)
    args = ["run", str(spec), "--out", str(tmp_path / "out")]
    for item in HUGE:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "10,000,000 combinations" in err and "--max-runs 10000000" in err
    assert not (tmp_path / "out").exists()

    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "10,000,000 combinations" in out[0]
    assert len(out) == 1 + 1 + 50 + 1  # count, header, the first rows, the limit
    assert "--max-runs 10000000" in out[-1]


def test_grid_size_counts_ties_once_and_bounds_the_runs():
    spec = spec_from_dict({
        "base": {"steps": 1, "clip": {"mode": "agc", "threshold": 0.1}},
        "grid": {"clip.mode": ["none", "agc"], "clip.threshold": [0.1, 0.2], "seed": [0, 1, 2],
                 "batch_size": [16, 32], "base_lr": [0.1, 0.2]},
        "tie": {"batch": ["batch_size", "base_lr"]},
    })
    assert grid_size(spec) == 2 * 2 * 3 * 2
    assert len(expand(spec)) == (1 + 2) * 3 * 2  # no threshold for mode none
    with pytest.raises(UserError, match="24 combinations, over the limit of 23 runs"):
        expand(spec, max_runs=23)
    assert grid_size(GridSpec(name="g", base={}, grid={})) == 1


def test_missing_data_is_found_before_anything_runs(tmp_path, capsys):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    args = ["run", str(spec), "--out", str(out), "--set", "data=cifar10", "--set",
            f"data_dir={tmp_path / 'nodata'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"under {tmp_path / 'nodata'}" in err and "cifar-10-batches-py" in err
    assert "--download" in err
    assert not out.exists()


def test_spp_validates_before_it_creates_the_output_folder(tmp_path, capsys):
    out = tmp_path / "spp"
    assert main(["spp", "--model", "nf_resnet26", "--set", "width_mult=-1", "--out",
                 str(out)]) == 2
    assert "width_mult must be > 0" in capsys.readouterr().err
    assert main(["spp", "--model", "nf_resnet26:alpha=abc", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "alpha must be a number, got 'abc'" in err and "not supported" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------- console vs store


def test_runs_finished_by_another_runner_are_counted_apart(grid):
    store = GridStore(grid.parent, grid.name)
    results = [execute_run(str(grid.parent), grid.name, rid, "cpu", 1)
               for rid in store.run_ids()]
    assert all(r.get("elsewhere") for r in results)
    stream = io.StringIO()
    progress = Progress(2, 0, {}, 1, stream)
    for result in results:
        progress.result(result)
    assert progress.counts == {"done by another runner": 2}
    assert stream.getvalue().count("done by another runner") == 2


@pytest.mark.slow
def test_a_failed_status_write_is_said_on_the_console_and_shows_as_interrupted(
        tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GridStore, "write_results", full_disk)
    outcome, text = run_inline(write_spec(tmp_path, seeds="[0]"), tmp_path / "out")
    assert "the store could not record it: No space left on device" in text
    assert list(status_table(tmp_path / "out")["status"]) == ["interrupted"]


def test_a_full_disk_while_storing_the_grid_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from ablations import gridstore as store_module  # where GridStore finds write_json

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_json", full_disk)
    assert main(["run", str(write_spec(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("No space left on device\n")


@pytest.mark.slow
def test_a_changed_base_value_warns_first_and_shows_the_differing_key(grid):
    spec = grid.parent.parent / "tiny.toml"
    outcome, text = run_inline(spec, grid.parent, ["base_lr=0.2", "seed=0"])
    assert text.splitlines()[0].startswith(f"warning: {grid} already holds runs made with "
                                           f"another value of base_lr")
    table = status_table(grid)
    assert len(table) == 3 and sorted(table["base_lr"]) == [0.1, 0.1, 0.2]
    report = build_report(grid)["md"].read_text()
    header = next(line for line in report.splitlines() if line.startswith("| run_id"))
    assert "base_lr" in header



# ----------------------------------------------------------------------------- shipped grids


def test_the_grids_folder_holds_the_shipped_grids():
    # an empty or moved folder would leave the test below with no cases at all
    assert set(shipped_grids()) >= {"quickstart", "agc_batch", "frontier_batch"}
    assert shipped_grids() == sorted(p.stem for p in (ROOT / "ablations" / "grids").glob("*.toml"))


@pytest.mark.parametrize("name", shipped_grids())
def test_shipped_grids_stay_under_the_limit_and_count_their_runs_exactly(name):
    path = GRIDS_DIR / f"{name}.toml"
    spec = load_spec(path)
    # the bound, from the file itself: one factor per tie group, one per other axis
    raw = tomllib.loads(path.read_text())
    tied = list(raw.get("tie", {}).values())
    counted = math.prod(len(raw["grid"][keys[0]]) for keys in tied) * math.prod(
        len(values) for key, values in raw["grid"].items()
        if not any(key in keys for keys in tied))
    assert grid_size(spec) == counted <= MAX_RUNS
    # runs fall below the bound exactly when an axis was dropped from some run (an axis that
    # does not apply collapses its values into one run); otherwise every combination is a run
    runs = shipped_runs(name)
    full = [r for r in runs if set(r.axes) == set(spec.grid)]
    assert (len(runs) == counted) == (len(full) == len(runs))


def test_readme_documents_the_damaged_state_and_the_limit():
    text = (ROOT / "README.md").read_text()
    assert "`damaged`" in text and "--max-runs" in text and "10,000" in text


"""The stability frontier search (issue 15): bisection on a synthetic stability oracle, bad
[frontier] input, the edge cases at the bounds, resume after kill -9, frontier.parquet and
load_results, and the search on Ray. The oracles are in tests/frontier_helpers.py; claims over
frontier values and the figures in test_frontier_report.py; warm starts and the monotonicity
check in test_frontier_warm.py."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.frontier import FRONTIER_COLUMNS, FrontierSettings, lattice, run_frontier
from ablations.spec import load_spec
from ablations.store import GridStore, load_results
from run_ablations import main
from tests.frontier_helpers import SPEC, OracleExecutor, oracle_edge, search, write_spec
from tests.helpers import ROOT, kill_9


def test_lattice_spans_the_bounds_at_the_resolution():
    points = lattice(FrontierSettings(0.01, 10.0, 2 ** 0.25))
    assert points[0] == 0.01 and points[-1] == 10.0
    ratios = np.array(points[1:]) / np.array(points[:-1])
    assert np.all(ratios <= 2 ** 0.25 * (1 + 1e-5)) and np.all(ratios > 1)
    assert len(points) == math.ceil(math.log(1000) / math.log(2 ** 0.25)) + 1


@pytest.mark.slow
def test_bisection_finds_the_oracle_edge_within_the_resolution(tmp_path):
    outcome, executor, text = search(tmp_path)
    frame = outcome.frame
    assert len(frame) == 4 and set(frame["status"]) == {"found"}
    for _, row in frame.iterrows():
        edge = oracle_edge({"batch_size": row["batch_size"], "seed": row["seed"]})
        assert row["max_stable_lr"] <= edge < row["min_unstable_lr"]
        assert row["min_unstable_lr"] / row["max_stable_lr"] <= 2 ** 0.25 * (1 + 1e-5)
    # bisection: about log2 of the lattice size per cell, far below a full grid
    n_points = len(lattice(FrontierSettings(0.01, 10.0)))
    assert frame["n_probes"].max() <= math.ceil(math.log2(n_points + 1))
    assert len(executor.executed) == frame["n_probes"].sum() == outcome.probes_run
    assert outcome.full_grid == 4 * n_points
    # every probe is an ordinary run, its lr an axis; a line per finished cell
    runs = load_results(tmp_path / "out" / "edge").runs
    assert len(runs) == len(executor.executed)
    assert all("lr" in axes for axes in runs["axes"])
    assert text.count("max stable lr") == 4


@pytest.mark.parametrize("verbosity", [-1, 0, 1])
@pytest.mark.slow
def test_the_console_follows_quiet_and_verbose_and_beats_for_long_probes(tmp_path, verbosity):
    # a heartbeat interval shorter than a step: every step of every probe is "long"
    outcome, executor, text = search(tmp_path, verbosity=verbosity, heartbeat_s=1e-9)
    probes = len(executor.executed)
    lines = text.splitlines()
    started = [line for line in lines if " started " in line]
    ended = [line for line in lines if " completed " in line or " diverged " in line]
    beats = [line for line in lines if " running   step " in line]
    cells = [line for line in lines if "max stable lr" in line]
    if verbosity < 0:  # nothing failed: nothing to say
        assert text == ""
        return
    assert len(cells) == 4
    assert len(beats) == probes * 4  # a beat per step: the spec's probes train 4 steps
    assert all(" lr " in line for line in beats)  # the probe's lr names it
    if verbosity == 0:
        assert started == [] and ended == []
    else:
        assert len(started) == len(ended) == probes
        assert {line.split()[1] for line in started} == set(executor.executed)


@pytest.mark.slow
def test_a_rerun_reads_every_probe_back_and_runs_none(tmp_path):
    first, _, _ = search(tmp_path)
    again, executor, _ = search(tmp_path)
    assert executor.executed == [] and again.probes_run == 0
    assert again.probes_stored == first.probes_run
    pd.testing.assert_frame_equal(again.frame, first.frame)


@pytest.mark.slow
def test_unstable_at_lr_min_and_stable_to_lr_max_are_reported(tmp_path):
    edge = lambda config: 0.001 if config["batch_size"] == 16 else 100.0  # noqa: E731
    outcome, _, text = search(tmp_path, executor=OracleExecutor(edge))
    frame = outcome.frame.set_index(["batch_size", "seed"])
    low, high = frame.loc[(16, 0)], frame.loc[(64, 0)]
    assert low["status"] == "unstable_at_lr_min" and math.isnan(low["max_stable_lr"])
    assert low["min_unstable_lr"] == 0.01 and "lr_min" in low["reason"]
    assert low["reason"].endswith("(its probe diverged)")
    assert high["status"] == "stable_to_lr_max" and high["max_stable_lr"] == 10.0
    assert math.isnan(high["min_unstable_lr"]) and "stable up to lr_max" in high["reason"]
    assert "stable up to lr_max 10" in text


class FlatOracle(OracleExecutor):
    """A trainer whose probes never diverge and never learn: the loss stays at 2.3."""

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        store = GridStore(root, grid)
        for rid in run_ids:
            self.executed.append(rid)
            steps = np.arange(store.config(rid)["config"]["steps"])
            store.write_results(rid, pd.DataFrame({"step": steps, "loss": 2.3}), pd.DataFrame(),
                                state="completed", summary={"final_acc": 0.1},
                                finished_at=time.time())
            for follow_up in on_result({"run_id": rid, "state": "completed"}) or []:
                self.run(root, grid, [follow_up], on_result, on_step)


def test_a_probe_that_did_not_learn_is_told_apart_from_one_that_diverged(tmp_path):
    outcome, _, _ = search(tmp_path, executor=FlatOracle())
    assert set(outcome.frame["status"]) == {"unstable_at_lr_min"}
    assert all(reason.endswith("(its probe did not diverge, but its loss fell only to 1.00 of "
                               "the initial value (stable needs < 0.8): too short a probe to "
                               "learn, or lower frontier.lr_min)")
               for reason in outcome.frame["reason"])


def test_a_neighbour_censored_at_a_bound_is_no_warm_start(tmp_path):
    """(256, 8 steps) has a neighbour along steps with measured shifts, but that neighbour is
    unstable already at lr_min: its bound is no edge, so the cell bisects cold."""
    def edge(config: dict) -> float:
        if (config["batch_size"], config["steps"]) == (256, 4):
            return 0.001
        return 0.005 * config["batch_size"] * config["steps"] / 4

    outcome, _, _ = search(tmp_path, executor=OracleExecutor(edge),
                           overrides=["batch_size=16,64,256", "steps=4,8", "seed=0",
                                      "train_size=256"])
    frame = outcome.frame.set_index(["batch_size", "steps"])
    assert frame.loc[(256, 4), "status"] == "unstable_at_lr_min"
    assert frame.loc[(64, 8), "start_lr"] > 0  # warm: (64, 4) moved by the 16-batch shift
    cell = frame.loc[(256, 8)]
    assert math.isnan(cell["start_lr"]) and cell["status"] == "found"
    assert cell["max_stable_lr"] <= edge({"batch_size": 256, "steps": 8}) < cell["min_unstable_lr"]


@pytest.mark.slow
def test_probes_train_at_exactly_the_probe_lr_with_the_probe_steps(tmp_path):
    outcome, executor, _ = search(tmp_path, "steps = 3")
    store = GridStore(tmp_path / "out", "edge")
    for rid in executor.executed:
        config = store.config(rid)["config"]
        from sigprop.train import TrainConfig

        assert TrainConfig.from_dict(config).peak_lr() == config["lr"]
        assert config["steps"] == 3
    assert set(outcome.frame["probe_steps"]) == {3}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("frontier, message", [
    ("lr_min = 1.0\nlr_max = 0.5", "lr_min (1) must be below lr_max (0.5)"),
    ("lr_min = 0.0\nlr_max = 0.5", "frontier.lr_min must be a positive number, got 0.0"),
    ("lr_min = 0.1\nlr_max = -2", "frontier.lr_max must be a positive number, got -2"),
    ("lr_min = 0.1\nlr_max = 2\nresolution = 1.0", "frontier.resolution must be a ratio above 1"),
    ("lr_min = 0.1\nlr_max = 2\nresolution = 0.5", "frontier.resolution must be a ratio above 1"),
    ("lr_min = 0.1\nlr_max = 2\nmetric = \"accuracy\"",
     "frontier.metric: unknown metric 'accuracy'"),
    ("lr_min = 0.1\nlr_max = 2\nsteps = 0", "frontier.steps must be a positive integer"),
    ("lr_min = 0.1\nlr_max = 2\nthreshold = 3", "frontier: unknown key(s) threshold"),
    ("lr_max = 2", "frontier.lr_min is required"),
])
def test_bad_frontier_section_is_one_line_exit_2_before_anything_runs(tmp_path, capsys,
                                                                      frontier, message):
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.replace("lr_min = 0.01\nlr_max = 10.0\n{frontier}", frontier))
    out = tmp_path / "out"
    assert main(["frontier", str(path), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_set_override_reaches_the_frontier_settings_and_is_checked(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main(["frontier", str(spec), "--set", "frontier.resolution=1", "--dry-run"]) == 2
    assert "frontier.resolution must be a ratio above 1" in capsys.readouterr().err
    assert main(["frontier", str(spec), "--set", "frontier.resolution=2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "4 cells in grid edge" in printed and "11 rates" in printed  # 0.01 * 2**k, 10


def test_a_spec_without_frontier_section_is_refused_by_frontier(tmp_path, capsys):
    path = tmp_path / "plain.toml"
    path.write_text(SPEC.replace("[frontier]\nlr_min = 0.01\nlr_max = 10.0\n{frontier}", ""))
    assert main(["frontier", str(path), "--dry-run"]) == 2
    assert "has no [frontier] section" in capsys.readouterr().err


# ----------------------------------------------------------------------------- store


@pytest.mark.slow
def test_frontier_parquet_has_one_row_per_cell_and_load_results_exposes_it(tmp_path):
    outcome, _, _ = search(tmp_path)
    grid_dir = tmp_path / "out" / "edge"
    stored = pd.read_parquet(grid_dir / "frontier.parquet")
    assert set(FRONTIER_COLUMNS) <= set(stored.columns)
    assert {"model.name", "batch_size", "seed", "clip.mode"} <= set(stored.columns)
    assert "lr" not in stored.columns and stored["cell_id"].is_unique and len(stored) == 4
    results = load_results(grid_dir)
    assert len(results.frontier) == 4
    row = results.frontier.set_index(["batch_size", "seed"]).loc[(64, 1)]
    assert list(row["probe_lrs"]) == sorted(row["probe_lrs"])
    assert row["n_probes"] == len(row["probe_lrs"]) == len(row["probe_stable"])
    # the accuracy at the frontier is the stored probe's
    probes = results.runs.set_index("lr")
    at_edge = probes[(probes["batch_size"] == 64) & (probes["seed"] == 1)].loc[
        row["max_stable_lr"]]
    assert row["final_acc"] == pytest.approx(at_edge["final_acc"])
    plain = tmp_path / "plain"
    (plain / "g" / "runs").mkdir(parents=True)
    assert load_results(plain / "g").frontier is None


# ----------------------------------------------------------------------------- kill -9


def start_frontier(spec: Path, out: Path) -> subprocess.Popen:
    # two cells of four probes each (lattice 0.01 * 2**k up to 10): small enough to be quick
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_ablations.py"), "frontier", str(spec), "--out", str(out),
         "--device", "cpu", "--no-report", "--workers", "2", "--set", "seed=0",
         "--set", "frontier.resolution=2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished_probes(grid_dir: Path) -> dict[str, tuple[float, int]]:
    """Finished probe -> (finished_at, attempts)."""
    store = GridStore(grid_dir.parent, grid_dir.name)
    out = {}
    for rid in store.run_ids():
        status = store.status(rid)
        if status.get("state") in ("completed", "diverged"):
            out[rid] = (status["finished_at"], status["attempts"])
    return out


@pytest.mark.slow
def test_sigkill_mid_search_then_rerun_finishes_without_repeating_a_stored_probe(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(SPEC.format(frontier="steps = 6").replace(
        "eval_every = 0", "eval_every = 0\ncheckpoint_every = 1"))
    out = tmp_path / "out"
    grid_dir = out / "edge"
    runner = start_frontier(path, out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill once some probes are stored, mid-search
        if grid_dir.exists() and len(finished_probes(grid_dir)) >= 2:
            break
        assert runner.poll() is None, runner.communicate()
        time.sleep(0.05)
    kill_9(runner, GridStore(out, "edge"), deadline + 30)
    before = finished_probes(grid_dir)
    assert not (grid_dir / "frontier.parquet").exists()  # killed before the search ended

    rerun = start_frontier(path, out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    after = finished_probes(grid_dir)
    assert all(after[rid] == (at, 1) for rid, (at, _) in before.items())  # never run again
    frame = pd.read_parquet(grid_dir / "frontier.parquet")
    assert set(frame["status"]) <= {"found", "stable_to_lr_max", "unstable_at_lr_min"}
    assert frame["n_probes"].sum() == len(after)
    # the rerun executed only the probes not stored (those left running resume: attempt 2)
    assert f"{len(after) - len(before)} probe runs ({len(before)} read back" in stdout


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_the_search_on_ray_finds_what_the_local_executor_finds(tmp_path):
    """The follow-up probes go through the Ray executor too; training is deterministic, so
    both executors find the same frontier from the same probes."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from ablations.executors import LocalExecutor, RayExecutor

    spec = load_spec(write_spec(tmp_path), ["seed=0", "batch_size=16", "frontier.resolution=4"])
    local = run_frontier(spec, tmp_path / "local", LocalExecutor(workers=1, device="cpu"),
                         stream=io.StringIO())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = run_frontier(spec, tmp_path / "ray", RayExecutor(cpus_per_run=1),
                              stream=io.StringIO())
    finally:
        ray.shutdown()
    assert remote.probes_run == local.probes_run >= 2
    columns = ["cell_id", "status", "max_stable_lr", "min_unstable_lr", "n_probes", "final_acc"]
    pd.testing.assert_frame_equal(remote.frame[columns], local.frame[columns])


@pytest.mark.slow
def test_probes_stored_under_another_environment_are_said_first(tmp_path):
    import json

    from ablations.store import environment

    _, _, first = search(tmp_path)
    assert "warning: probes" not in first
    runs = sorted((tmp_path / "out" / "edge" / "runs").iterdir())
    for folder in runs:  # as the real worker records them: this machine, 1 thread
        path = folder / "status.json"
        status = json.loads(path.read_text())
        status["environment"] = {**environment("cpu"), "threads": 1, "deterministic": False}
        path.write_text(json.dumps(status))
    _, again, text = search(tmp_path)
    assert again.executed == [] and "warning: probes" not in text
    path = runs[0] / "status.json"
    status = json.loads(path.read_text())
    status["environment"]["threads"] = 2
    path.write_text(json.dumps(status))
    _, _, text = search(tmp_path)
    assert text.startswith("warning: probes: 1 run stored under a different environment: "
                           "threads 2 vs 1 (1 run); reused as stored")

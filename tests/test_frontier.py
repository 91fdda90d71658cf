"""The stability frontier search (issue 15): bisection on a synthetic stability oracle, bad
[frontier] input, the edge cases at the bounds, resume after kill -9, frontier.parquet and
load_results, claims over frontier values, and the frontier figures."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.claims import evaluate_claims, parse_claims
from ablations.frontier import FRONTIER_COLUMNS, FrontierSettings, lattice, run_frontier
from ablations.frontier_search import WarmSearch, start_index
from ablations.spec import load_spec
from ablations.store import GridStore, load_results
from run_ablations import main
from tests.helpers import kill_9, tiny_spec

ROOT = Path(__file__).resolve().parents[1]

# the tiny NF-ResNet over 2 batch sizes x 2 seeds; {frontier} takes more [frontier] lines
SPEC = tiny_spec("edge", train_size=64, test_size=32, steps=4,
                 grid="batch_size = [16, 64]\nseed = [0, 1]") + """[frontier]
lr_min = 0.01
lr_max = 10.0
{frontier}
"""


def write_spec(folder: Path, frontier: str = "", extra: str = "") -> Path:
    path = folder / "edge.toml"
    path.write_text(SPEC.format(frontier=textwrap.dedent(frontier)) + textwrap.dedent(extra))
    return path


def oracle_edge(config: dict) -> float:
    """The synthetic trainer's edge: stable up to 0.05 * batch_size (seed shifts it a bit)."""
    return 0.05 * config["batch_size"] * (1.1 if config["seed"] else 1.0)


class OracleExecutor:
    """A fake trainer: a probe diverges above its cell's known edge; below it the loss halves
    and more. Writes the same status and metrics files as the real worker."""

    def __init__(self, edge=oracle_edge):
        self.edge, self.executed = edge, []

    def slots(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> str:
        return "the stability oracle"

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        store = GridStore(root, grid)
        pending = list(run_ids)
        while pending:
            rid = pending.pop(0)
            self.executed.append(rid)
            config = store.config(rid)["config"]
            lr, edge = config["lr"], self.edge(config)
            steps = np.arange(config["steps"])
            if lr > edge:
                state, loss = "diverged", np.full(len(steps), math.inf)
                summary = {"final_acc": None, "diverged_step": 0}
            else:
                state, loss = "completed", 2.3 * 0.2 ** (steps / max(1, len(steps) - 1))
                summary = {"final_acc": 0.9 - 0.1 * (edge - lr) / edge}
            if on_step is not None:  # as the real workers report: a start, then steps
                on_step(0, rid, 0, 0)
                for step in steps:
                    on_step(0, rid, int(step) + 1, len(steps), float(loss[step]))
            metrics = pd.DataFrame({"step": steps, "loss": loss})
            store.write_results(rid, metrics, pd.DataFrame(), state=state, summary=summary,
                                finished_at=time.time())
            pending += on_result({"run_id": rid, "state": state, "summary": summary}) or []


def search(folder: Path, frontier: str = "", executor=None, overrides=None, **console):
    executor = executor or OracleExecutor()
    stream = io.StringIO()
    outcome = run_frontier(load_spec(write_spec(folder, frontier), overrides), folder / "out",
                           executor, stream=stream, **console)
    return outcome, executor, stream.getvalue()


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


# ----------------------------------------------------------------------------- claims


def frontier_frame(cells: dict[tuple, list]) -> pd.DataFrame:
    """{(clip mode, threshold, batch): [max stable lr per seed; None: unstable at lr_min]}."""
    rows = []
    for (mode, threshold, batch), values in cells.items():
        for seed, lr in enumerate(values):
            status = "unstable_at_lr_min" if lr is None else (
                "stable_to_lr_max" if lr == 10.0 else "found")
            rows.append({
                "grid": "g", "cell_id": f"{mode}{threshold}{batch}{seed}", "status": status,
                "model.name": "nf", "clip.mode": mode, "clip.threshold": threshold,
                "batch_size": batch, "seed": seed, "model.num_classes": 10,
                "axes": ("batch_size", "clip.mode", "clip.threshold", "seed"),
                "max_stable_lr": math.nan if lr is None else lr,
                "min_unstable_lr": 0.01 if lr is None else lr * 2 ** 0.25,
                "final_acc": 0.9, "lr_min": 0.01, "lr_max": 10.0, "resolution": 2 ** 0.25,
                "n_probes": 5, "probe_steps": 40,
            })
    return pd.DataFrame(rows)


def claim(check: str, **fields) -> dict:
    return {"text": "t", "source": "s", "check": check, "metric": "max_stable_lr", **fields}


AGC_BIG = {"clip.mode": "agc", "batch_size": "@max"}
NONE_BIG = {"clip.mode": "none", "batch_size": "@max"}


def test_compare_claim_over_frontier_values_uses_seed_ranges_on_a_log_scale():
    frame = frontier_frame({("agc", 0.02, 1024): [1.6, 2.0], ("none", None, 1024): [0.4, 0.5],
                            ("none", None, 32): [0.3, 0.3]})
    runs = pd.DataFrame({"status": []})  # frontier claims never read the runs
    verdict = evaluate_claims(parse_claims([claim("compare", a=AGC_BIG, b=NONE_BIG)]), runs,
                              frame)[0]
    assert verdict.verdict == "holds"
    assert "1.79 (1.6–2)" in verdict.evidence and "2 cells" in verdict.evidence
    assert "x4" in verdict.evidence  # the ratio of the geometric means
    # within one lattice step (the cells' resolution 2**0.25): 0.3 vs 0.4-0.5 is 0.42 to 0.74
    # doublings apart, more than the step's 0.25
    lattice = claim("compare", a={"clip.mode": "none", "batch_size": "@min"},
                    b={"clip.mode": "none", "batch_size": "@max"}, relation="within",
                    margin="lattice")
    lattice_verdict = evaluate_claims(parse_claims([lattice]), runs, frame)[0]
    assert "one step of the frontier's lr lattice" in lattice_verdict.evidence
    assert lattice_verdict.verdict == "does not hold"
    # a factor of 4 is not "by a margin of 3 doublings"
    strict = claim("compare", a=AGC_BIG, b=NONE_BIG, margin=3.0)
    assert evaluate_claims(parse_claims([strict]), runs, frame)[0].verdict == "does not hold"
    # within a factor of 2 at small batch: 0.3 vs 0.4-0.5 on log2 scale (0.74 doublings)
    near = claim("compare", a={"clip.mode": "none", "batch_size": "@min"},
                 b={"clip.mode": "none", "batch_size": "@max"}, relation="within", margin=1.0)
    assert evaluate_claims(parse_claims([near]), runs, frame)[0].verdict == "holds"
    # without a frontier the claim cannot be judged
    missing = evaluate_claims(parse_claims([claim("compare", a=AGC_BIG, b=NONE_BIG)]), runs)[0]
    assert missing.verdict == "inconclusive" and "frontier" in missing.reason


def test_censored_cells_count_at_lr_max_or_drop_out_and_the_evidence_says_so():
    frame = frontier_frame({("agc", 0.02, 1024): [10.0, 10.0], ("none", None, 1024): [None, 0.2]})
    verdict = evaluate_claims(parse_claims([claim("compare", a=AGC_BIG, b=NONE_BIG,
                                                  min_runs=1)]), pd.DataFrame(), frame)[0]
    assert verdict.verdict == "holds"
    assert "2 stable up to lr_max (counted at lr_max)" in verdict.evidence
    assert "1 unstable at lr_min (left out)" in verdict.evidence
    two = claim("compare", a=AGC_BIG, b=NONE_BIG)  # min_runs 2: one value of b is too few
    assert evaluate_claims(parse_claims([two]), pd.DataFrame(), frame)[0].verdict == \
        "inconclusive"


def test_spread_claim_compares_how_far_the_frontier_moves_with_the_threshold():
    # norm: 0.1 -> 3.2 (5 doublings) per seed and batch; agc: 1.6 -> 2.26 (0.5 doublings)
    cells = {}
    for batch in (32, 1024):
        cells[("norm", 0.1, batch)] = [0.1, 0.1]
        cells[("norm", 0.8, batch)] = [3.2, 3.2]
        cells[("agc", 0.02, batch)] = [1.6, 1.6]
        cells[("agc", 0.16, batch)] = [1.6 * 2 ** 0.5, 1.6 * 2 ** 0.5]
    frame = frontier_frame(cells)
    table = claim("spread", over="clip.threshold", a={"clip.mode": "norm"},
                  b={"clip.mode": "agc"})
    verdict = evaluate_claims(parse_claims([table]), pd.DataFrame(), frame)[0]
    assert verdict.verdict == "holds"
    assert "5.00 doublings" in verdict.evidence and "0.50 doublings" in verdict.evidence
    assert "4 group(s)" in verdict.evidence
    flipped = {**table, "a": {"clip.mode": "agc"}, "b": {"clip.mode": "norm"}}
    assert evaluate_claims(parse_claims([flipped]), pd.DataFrame(), frame)[0].verdict == \
        "does not hold"
    by_value = {**table, "b": None, "value": 6.0}
    by_value.pop("b")
    assert evaluate_claims(parse_claims([by_value]), pd.DataFrame(), frame)[0].verdict == \
        "does not hold"


def test_spread_claim_needs_over_and_two_values_of_it(tmp_path, capsys):
    from ablations.claims import ClaimError

    with pytest.raises(ClaimError, match="over must name a run key"):
        parse_claims([claim("spread", a={"clip.mode": "norm"}, b={"clip.mode": "agc"})])
    path = write_spec(tmp_path, extra="""
        [[claims]]
        text = "t"
        source = "s"
        check = "spread"
        metric = "max_stable_lr"
        over = "seed"
        a = { seed = 0 }
        value = 1.0
        """)
    assert main(["frontier", str(path), "--dry-run"]) == 2
    assert "a spread needs two or more values of seed" in capsys.readouterr().err


def test_the_shipped_frontier_spec_states_its_claims_and_expands():
    from ablations.frontier import cells_of
    from ablations.shipped import GRIDS_DIR

    spec = load_spec(GRIDS_DIR / "frontier_batch.toml")
    claims = parse_claims(spec.claims)
    assert [c.check for c in claims] == ["compare", "spread", "compare", "compare"]
    assert all(c.metric == "max_stable_lr" for c in claims)
    # F3 is one claim per AGC threshold, each within one lattice step (derived, not picked)
    assert [c.margin_rule for c in claims[2:]] == ["lattice", "lattice"]
    settings, cells = cells_of(spec)
    assert len(cells) == 36 and settings.steps == 40
    assert not any("lr" in cell.axes for cell in cells)


# ----------------------------------------------------------------------------- figures


@pytest.mark.slow
def test_frontier_figures_and_report_section_are_written(tmp_path):
    from reports.build import build_report
    from reports.figures.frontier import frontier_table, plot_frontier, plot_frontier_accuracy
    from reports.figures.style import figure_png

    search(tmp_path)
    grid_dir = tmp_path / "out" / "edge"
    frame = load_results(grid_dir).frontier
    for name, draw in (("frontier", plot_frontier), ("accuracy", plot_frontier_accuracy)):
        png = figure_png(draw(frame))
        (tmp_path / f"{name}.png").write_bytes(png)
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # the line of the frontier plot is the geometric mean over seeds at each batch size
    fig = plot_frontier(frame)
    line = fig.axes[0].get_lines()[0]
    by_batch = frame.groupby("batch_size")["max_stable_lr"].apply(
        lambda v: float(np.exp(np.log(v).mean())))
    assert list(line.get_xdata()) == list(by_batch.index)
    assert np.allclose(line.get_ydata(), by_batch.to_numpy())
    table = frontier_table(frame)
    assert list(table["batch size"]) == [16, 64] and set(table["cells"]) == {2}

    paths = build_report(grid_dir)
    text = paths["md"].read_text()
    assert "## Stability frontier" in text
    assert (grid_dir / "report_files" / "frontier.png").is_file()
    assert (grid_dir / "report_files" / "frontier-accuracy.png").is_file()


@pytest.mark.slow
def test_the_report_says_what_a_frontier_s_unfinished_probes_mean(tmp_path):
    """Probes left queued by a stopped search are continued by the same command; once every
    cell's search has ended, one left queued (a resumed search took another path) is needed by
    no cell, and running the grid again would not run it."""
    from ablations.frontier import cells_of, probe_run
    from reports.build import build_report

    outcome, _, _ = search(tmp_path, executor=StopAfter(3, oracle_edge))
    assert "incomplete" in set(outcome.frame["status"])
    grid_dir = tmp_path / "out" / "edge"
    text = build_report(grid_dir)["md"].read_text()
    assert "queued): run the same frontier command again to continue the search" in text

    outcome, _, _ = search(tmp_path)
    assert set(outcome.frame["status"]) == {"found"}
    store = GridStore(tmp_path / "out", "edge")
    settings, cells = cells_of(load_spec(write_spec(tmp_path)))
    orphan = probe_run(cells[0], 9.0, settings)  # 9 is no lattice rate: no search's probe
    store.add_runs([orphan])
    assert store.state(orphan.run_id) == "queued"
    text = build_report(grid_dir)["md"].read_text()
    assert "1 run(s) not finished yet (1 queued): probes no cell's search needs any more" in text
    assert "run the grid again" not in text and "frontier command again" not in text


def test_a_warmup_spike_does_not_pass_a_run_ending_at_chance_as_stable(tmp_path):
    """Measured on digits (AGC 0.02, batch 1024, lr 4.5): the loss spiked to 12 at step 2 and
    ended at 2.3, the initial loss; a mean over the first steps would call that stable."""
    from ablations.frontier import probe_stability

    store = GridStore(tmp_path, "g")
    settings = FrontierSettings(0.1, 10.0, steps=40)
    spike = np.r_[[2.31, 2.85, 12.38, 4.86], np.full(36, 2.3)]
    learnt = np.r_[[2.31, 2.85, 12.38, 4.86], np.linspace(2.2, 0.9, 36)]
    for rid, loss in (("spike", spike), ("learnt", learnt)):
        (store.run_dir(rid)).mkdir(parents=True)
        store.write_results(rid, pd.DataFrame({"step": np.arange(40), "loss": loss}),
                            pd.DataFrame(), state="completed")
    assert probe_stability(store, "spike", settings) is False
    assert probe_stability(store, "learnt", settings) is True
    assert probe_stability(store, "learnt", FrontierSettings(0.1, 10.0, max_ratio=0.3)) is False


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


# ----------------------------------------------------------------------------- warm starts

# frontier_batch's measured edges (BENCHMARKS.md, issue 15): per setting, per batch 32, 256,
# 1024, the two seeds' largest stable lrs; the oracle puts each cell's edge just above them
MEASURED = {
    ("nf_resnet26", "none", 0.01): [(0.141, 0.2), (0.238, 0.336), (0.141, 0.283)],
    ("bn_resnet26_v2", "none", 0.01): [(0.283, 0.336), (0.673, 0.8), (0.951, 0.951)],
    ("nf_resnet26", "norm", 0.1): [(2.69, 3.81), (6.4, 6.4), (7.61, 7.61)],
    ("nf_resnet26", "norm", 0.8): [(0.336, 0.4), (0.951, 0.951), (0.951, 0.951)],
    ("nf_resnet26", "agc", 0.02): [(0.951, 0.951), (2.26, 2.69), (2.26, 2.26)],
    ("nf_resnet26", "agc", 0.16): [(0.283, 0.336), (0.4, 0.673), (0.8, 0.8)],
}

# the issue-25 run of frontier_batch (BENCHMARKS.md), seed by seed: (seed 0, seed 1), for the
# same settings in MEASURED's order
MEASURED_BY_SEED = dict(zip(MEASURED, [
    [(0.2, 0.141421), (0.2, 0.336359), (0.282843, 0.4)],
    [(0.282843, 0.282843), (0.8, 0.8), (0.8, 0.951366)],
    [(2.69087, 3.80546), (6.4, 7.61093), (7.61093, 6.4)],
    [(0.4, 0.336359), (0.8, 1.13137), (0.951366, 0.8)],
    [(0.951366, 0.951366), (1.90273, 2.69087), (2.26274, 2.26274)],
    [(0.237841, 0.282843), (0.4, 1.13137), (0.8, 0.8)],
], strict=True))


def measured_edge(config: dict, table: dict = MEASURED) -> float:
    clip = config["clip"]
    threshold = clip["threshold"] if clip["mode"] != "none" else 0.01
    by_batch = table[(config["model"]["name"], clip["mode"], threshold)]
    return by_batch[[32, 256, 1024].index(config["batch_size"])][config["seed"]] * 1.05


def seed_ordered_edge(config: dict) -> float:
    return measured_edge(config, MEASURED_BY_SEED)


def batch_grid(folder: Path, frontier: str, edge=measured_edge) -> tuple:
    """frontier_batch's 36 cells and lattice on the oracle (nothing trains)."""
    from ablations.shipped import GRIDS_DIR

    overrides = [f"frontier.{item}" for item in frontier.split()]
    spec = load_spec(GRIDS_DIR / "frontier_batch.toml", overrides)
    executor = OracleExecutor(edge)
    outcome = run_frontier(spec, folder, executor, stream=io.StringIO())
    return outcome, executor


def by_cell(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index("cell_id").sort_index()


def smooth_edge(config: dict) -> float:
    """An additive edge in log-lr: each setting's batch-32 edge, x(B/32)**0.3, seed 1 x1.1."""
    clip = config["clip"]
    threshold = clip["threshold"] if clip["mode"] != "none" else 0.01
    base = MEASURED[(config["model"]["name"], clip["mode"], threshold)][0][0]
    return base * (config["batch_size"] / 32) ** 0.3 * (1.1 if config["seed"] else 1.0) * 1.05


def edge_of(row: pd.Series, edge) -> float:
    threshold = row["clip.threshold"]
    return edge({"model": {"name": row["model.name"]}, "batch_size": row["batch_size"],
                 "seed": row["seed"], "clip": {"mode": row["clip.mode"], "threshold": threshold}})


def probes_from(start: int, edge: int, n: int, check: bool) -> int:
    """A warm search's probes (and, with ``check``, its monotonicity probe) for a cell whose
    largest stable lattice index is ``edge``."""
    search, probed = WarmSearch(n, start), set()
    while (index := search.next_index()) is not None:
        search.record(index, index <= edge)
        probed.add(index)
    assert search.lo == edge
    return len(probed) + (check and edge + 2 not in probed)


@pytest.mark.parametrize("check", [False, True])
def test_a_warm_start_sits_where_the_predicted_edge_costs_fewest_probes(check):
    """The cheapest edges from a start: 2 probes at the start and one below it (no check), 3
    at the start and the two below it (check). The start is chosen so that the prediction lies
    in the middle of them, half-steps rounding up."""
    n = 33
    cheapest = 3 if check else 2
    for predicted in (6.0, 6.25, 6.5, 6.75, 7.0):
        start = start_index(predicted, check, n)
        costs = {edge: probes_from(start, edge, n, check) for edge in range(1, 14)}
        assert min(costs.values()) == cheapest
        low = [edge for edge, cost in costs.items() if cost == cheapest]
        assert low == list(range(start - len(low) + 1, start + 1))
        assert abs((low[0] + low[-1]) / 2 - predicted) <= 0.5
        assert (low[0] + low[-1]) / 2 >= predicted - 0.25 or predicted % 1 == 0.75
    assert start_index(-3.0, check, n) == 0 and start_index(40.0, check, n) == n - 1


@pytest.mark.parametrize("edge, most", [(measured_edge, 3.2), (seed_ordered_edge, 3.34),
                                        (smooth_edge, 2.67)])
@pytest.mark.slow
def test_warm_starts_find_the_cold_edges_in_fewer_probes_on_a_frontier_batch_grid(
        tmp_path, capsys, edge, most):
    """Measured: frontier_batch's own edges (issue 15's, each pair of seeds sorted, and issue
    25's seed by seed: seeds up to 6 lattice steps apart, batch trends that differ by
    setting); smooth: the same cells with an additive edge."""
    cold, cold_ran = batch_grid(tmp_path / "cold", "warm_start=false check_monotone=false", edge)
    warm, warm_ran = batch_grid(tmp_path / "warm", "check_monotone=false", edge)
    c, w = by_cell(cold.frame), by_cell(warm.frame)
    assert len(c) == 36 and list(c.index) == list(w.index)
    assert set(c["status"]) == set(w["status"]) == {"found"}
    for _, row in w.iterrows():  # the oracle's edge, bracketed to one lattice step
        assert row["max_stable_lr"] <= edge_of(row, edge) < row["min_unstable_lr"]
        assert row["min_unstable_lr"] / row["max_stable_lr"] <= 2 ** 0.25 * (1 + 1e-5)
    # so cold and warm agree in every cell (within one lattice step: here exactly)
    ratio = w["max_stable_lr"] / c["max_stable_lr"]
    assert (ratio.between(2 ** -0.25 * (1 - 1e-6), 2 ** 0.25 * (1 + 1e-6))).all()
    assert (c["max_stable_lr"] == w["max_stable_lr"]).all()
    cold_mean, warm_mean = c["n_probes"].mean(), w["n_probes"].mean()
    print(f"{edge.__name__}: probes per cell cold {cold_mean:.2f} ({len(cold_ran.executed)}), "
          f"warm {warm_mean:.2f} ({len(warm_ran.executed)})")
    assert cold_mean >= 4.5 and warm_mean <= most
    assert w["start_lr"].notna().sum() >= 24 and c["start_lr"].isna().all()
    assert len(warm_ran.executed) == w["n_probes"].sum() == warm.probes_run
    assert len(set(warm_ran.executed)) == len(warm_ran.executed)  # no probe ran twice
    # the benchmark compares the two stores the same way
    from benchmarks.frontier_cost import main as cost_main

    capsys.readouterr()
    assert cost_main([str(tmp_path / "cold" / "frontier_batch"),
                      str(tmp_path / "warm" / "frontier_batch")]) == 0
    printed = capsys.readouterr().out
    assert f"probes per cell {cold_mean:.2f} vs {warm_mean:.2f}" in printed
    assert "equal in 36, within one lattice step in 36 of 36 cells" in printed
    assert f"warm starts {int(w['start_lr'].notna().sum())} of 36 cells" in printed


class StopAfter(OracleExecutor):
    """The oracle, interrupted (as by Ctrl-C) once ``limit`` probes have run."""

    def __init__(self, limit: int, edge=measured_edge):
        super().__init__(edge)
        self.limit = limit

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        def stop_at_limit(result: dict) -> list[str]:
            follow_ups = on_result(result)
            if len(self.executed) >= self.limit:
                raise KeyboardInterrupt
            return follow_ups

        super().run(root, grid, run_ids, stop_at_limit, on_step)


@pytest.mark.parametrize("limit", [7, 40, 90])
@pytest.mark.slow
def test_a_warm_search_stopped_midway_resumes_without_repeating_a_probe(tmp_path, limit):
    from ablations.shipped import GRIDS_DIR

    spec = load_spec(GRIDS_DIR / "frontier_batch.toml")
    whole = run_frontier(spec, tmp_path / "whole", OracleExecutor(measured_edge),
                         stream=io.StringIO())
    first = StopAfter(limit)
    stopped = run_frontier(spec, tmp_path / "part", first, stream=io.StringIO())
    assert stopped.interrupted and "incomplete" in set(stopped.frame["status"])
    second = OracleExecutor(measured_edge)
    resumed = run_frontier(spec, tmp_path / "part", second, stream=io.StringIO())
    assert not set(first.executed) & set(second.executed)  # no stored probe runs again
    assert resumed.probes_stored == len(first.executed) == limit
    # the plan is fixed before anything runs: the same probes and edges as in one pass
    columns = ["status", "max_stable_lr", "min_unstable_lr", "n_probes", "start_lr",
               "non_monotone", "check_lr"]
    pd.testing.assert_frame_equal(by_cell(resumed.frame)[columns], by_cell(whole.frame)[columns])
    assert len(first.executed) + len(second.executed) == whole.probes_run
    rerun = OracleExecutor(measured_edge)
    run_frontier(spec, tmp_path / "part", rerun, stream=io.StringIO())
    assert rerun.executed == []


# ----------------------------------------------------------------------------- monotonicity


def bumpy_base(config: dict) -> float:
    # batch 64 at 2.5: neither the cold nor the warm search probes its stable-again point
    # before the edge is bracketed (at 3.2 the bisection would, and find the bump's top edge)
    return (2.5 if config["batch_size"] == 64 else 0.8) * (1.1 if config["seed"] else 1.0)


class BumpyOracle(OracleExecutor):
    """Unstable just above the edge and stable again two lattice steps above the largest
    stable rate, for the batch-64 cells (non-monotone); monotone for batch 16."""

    def __init__(self):
        def edge(config: dict) -> float:
            base, lr = bumpy_base(config), config["lr"]
            # the one lattice point two steps above the largest stable one (ratio 2**0.25)
            if config["batch_size"] == 64 and base * 2 ** 0.25 < lr <= base * 2 ** 0.5:
                return math.inf  # stable again here
            return base

        super().__init__(edge)


@pytest.mark.slow
def test_a_non_monotone_cell_is_flagged_and_counted_and_the_check_can_be_off(tmp_path):
    for warm in ("true", "false"):
        folder = tmp_path / warm
        folder.mkdir()
        outcome, executor, text = search(folder, f"warm_start = {warm}", BumpyOracle())
        frame = outcome.frame.set_index(["batch_size", "seed"]).sort_index()
        flagged = frame[frame["non_monotone"]]
        assert sorted(flagged.index) == [(64, 0), (64, 1)]
        assert outcome.non_monotone == 2
        for _, row in frame.iterrows():
            edge = bumpy_base({"batch_size": row.name[0], "seed": row.name[1]})
            assert row["max_stable_lr"] <= edge < row["min_unstable_lr"]  # the first edge
            # the check probes two lattice steps above the edge and is one of the cell's probes
            assert row["check_lr"] == pytest.approx(row["max_stable_lr"] * 2 ** 0.5, rel=1e-4)
            assert row["check_lr"] in list(row["probe_lrs"])
        assert (flagged["status"] == "found").all()
        assert flagged["reason"].str.contains("non-monotone: stable again").all()
        assert text.count("NON-MONOTONE") == 2
        stored = pd.read_parquet(folder / "out" / "edge" / "frontier.parquet")
        assert stored["non_monotone"].sum() == 2
    # the report's table counts them per row; a store from before the check has no column
    from reports.figures.frontier import frontier_table

    table = frontier_table(load_results(folder / "out" / "edge").frontier)
    assert dict(zip(table["batch size"], table["non-monotone"], strict=True)) == {16: 0, 64: 2}
    assert "non-monotone" not in frontier_table(stored.drop(columns="non_monotone")).columns
    # the report says how many, once
    from reports.build import frontier_sections

    text = " ".join(str(p) for p in frontier_sections(stored)[0].parts)
    assert "2 of 4 cells non-monotone (stable again above their edge)" in text
    # off: no check probe, nothing flagged, fewer probes
    (tmp_path / "off").mkdir()
    off, executor_off, _ = search(tmp_path / "off", "check_monotone = false", BumpyOracle())
    assert not off.frame["non_monotone"].any() and off.frame["check_lr"].isna().all()
    assert off.frame["n_probes"].sum() < outcome.frame["n_probes"].sum()


@pytest.mark.slow
def test_a_monotone_cell_is_not_flagged_and_a_probed_check_rate_is_reused(tmp_path):
    outcome, executor, _ = search(tmp_path, "warm_start = false")
    frame = outcome.frame
    assert not frame["non_monotone"].any() and frame["check_lr"].notna().all()
    (tmp_path / "off").mkdir()
    cold, _, _ = search(tmp_path / "off", "warm_start = false\ncheck_monotone = false")
    extra = frame["n_probes"].to_numpy() - cold.frame["n_probes"].to_numpy()
    # at most one probe more per cell; none where the bisection had probed that rate already
    assert set(extra) <= {0, 1}
    for (_, on), (_, off) in zip(frame.iterrows(), cold.frame.iterrows(), strict=True):
        assert (on["check_lr"] in list(off["probe_lrs"])) == (on["n_probes"] == off["n_probes"])


def test_the_warm_start_and_check_settings_are_checked(tmp_path, capsys):
    spec = write_spec(tmp_path)
    for key in ("warm_start", "check_monotone"):
        assert main(["frontier", str(spec), "--set", f"frontier.{key}=3", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"frontier.{key} must be true or false, got 3" in err and err.count("\n") == 1
    assert main(["frontier", str(spec), "--set", "frontier.warm_start=false", "--dry-run"]) == 0


@pytest.mark.slow
def test_the_console_summary_line_counts_non_monotone_cells(tmp_path, capsys, monkeypatch):
    import run_ablations

    monkeypatch.setattr(run_ablations, "make_executor", lambda args: BumpyOracle())
    spec = write_spec(tmp_path)
    assert main(["frontier", str(spec), "--out", str(tmp_path / "out"), "--no-report"]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("frontier edge done")]
    assert len(summary) == 1 and "(4 found; 2 non-monotone)" in summary[0]


def test_cells_that_differ_in_another_axis_are_never_pooled_into_one_line():
    """frontier_length: the probe length is an axis; one line per length, not a mean over
    the lengths (which put 20-, 40- and 160-step edges into one geometric mean)."""
    from reports.figures.frontier import frontier_table, plot_frontier

    rows = [{"cell_id": f"c{steps}{batch}{seed}", "model.name": "nf_resnet26",
             "clip.mode": "none", "clip.threshold": 0.01, "batch_size": batch, "seed": seed,
             "steps": steps, "axes": ["batch_size", "seed", "steps"], "status": "found",
             "max_stable_lr": 0.1 * steps * (1 + seed), "min_unstable_lr": 0.2 * steps,
             "final_acc": 0.5, "n_probes": 3, "lr_min": 0.1, "lr_max": 100.0,
             "resolution": 2 ** 0.25, "probe_steps": steps, "non_monotone": False}
            for steps in (20, 160) for batch in (32, 1024) for seed in (0, 1)]
    table = frontier_table(pd.DataFrame(rows))
    assert len(table) == 4
    assert {s.rsplit(", ", 1)[1] for s in table["setting"]} == {"20-step probes",
                                                                "160-step probes"}
    by_length = dict(zip(table["setting"].str.contains("160"), table["max stable lr"]))
    assert by_length[False].startswith("2.83 (2–4)") and by_length[True].startswith("22.6")
    labels = [t.get_text() for t in plot_frontier(pd.DataFrame(rows)).axes[0].get_legend()
              .get_texts()]
    assert sum("step probes" in label and "lr ∝ B" not in label for label in labels) == 2

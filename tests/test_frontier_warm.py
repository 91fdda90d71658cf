"""Warm starts of the frontier search from a neighbouring cell's edge, on oracles with
frontier_batch's measured edges (issue 25; the tables are in tests/frontier_helpers.py), and the
monotonicity check."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import pytest

from ablations.frontier import run_frontier
from ablations.frontier_search import WarmSearch, start_index
from ablations.spec import load_spec
from ablations.store import load_results
from run_ablations import main
from tests.frontier_helpers import (
    MEASURED,
    MEASURED_BY_SEED,
    OracleExecutor,
    StopAfter,
    measured_edge,
    search,
    write_spec,
)

# ----------------------------------------------------------------------------- warm starts


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

"""benchmarks.frontier_bound: the probes a warm search would take with starts it cannot have,
replayed on a cold store's edges."""

from __future__ import annotations

from benchmarks.frontier_bound import main
from tests.frontier_helpers import search


def test_the_bound_replays_the_cold_store_and_counts_two_probes_per_exact_start(tmp_path,
                                                                                 capsys):
    outcome, _, _ = search(tmp_path, "warm_start = false\ncheck_monotone = false")
    frame = outcome.frame
    assert len(frame) == 4 and set(frame["status"]) == {"found"}  # one setting: 2 batches x 2
    grid_dir = tmp_path / "out" / "edge"
    capsys.readouterr()
    assert main([str(grid_dir)]) == 0
    printed = capsys.readouterr().out
    cold = frame["n_probes"].mean()
    exact = (frame["n_probes"].iloc[0] + 2 * 3) / 4  # the first cell cold, the rest 2 each
    assert f"cold {cold:.2f}," in printed and f"at the exact edge {exact:.2f}" in printed
    # the oracle's seeds differ by x1.1 (under one lattice step of x2 here), so the seeds'
    # mean start costs at most one probe more than the exact one in each warm cell
    mean = float(printed.split("seeds' mean edge ")[1].split(",")[0])
    assert exact <= mean <= exact + 3 / 4


def test_the_bound_refuses_a_folder_without_a_found_frontier(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "needs a frontier.parquet" in capsys.readouterr().err

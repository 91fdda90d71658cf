"""What a frontier search cost against the full grid at the same resolution.

    python run_ablations.py frontier frontier_batch --workers 2 --out DIR
    python -m benchmarks.frontier_cost DIR/frontier_batch [OTHER_DIR/frontier_batch]

Reads a grid folder that ``frontier`` wrote (nothing runs): the probes it used and their
summed run time, against the full grid that resolves the same edge to the same resolution
(every cell at every lattice rate). The full grid's time is an estimate: each lattice rate of a
cell is costed at the measured duration of the cell's probe nearest to it in log-lr (diverged
probes end early, so a rate above the edge costs what the nearest diverged probe cost).
The wall time is from the first probe's start to the last one's end.

With a second grid folder (the same grid searched another way, e.g. cold with
``--set frontier.warm_start=false`` against warm), each is costed as above and their edges are
compared cell by cell: the ratio of the largest stable rates, how many cells agree exactly and
within one lattice step, and the probes per cell of each.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ablations.frontier import FrontierSettings, lattice
from ablations.store import GridStore, load_results


def same(a, b) -> bool:
    missing = [v is None or (isinstance(v, float) and math.isnan(v)) for v in (a, b)]
    return all(missing) or (not any(missing) and a == b)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m benchmarks.frontier_cost GRID_DIR [OTHER_GRID_DIR]",
              file=sys.stderr)
        return 2
    frames = []
    for folder in argv:
        # the bisection's rows (a store can hold a range test's too: frontier_methods compares)
        frontier = load_results(Path(folder)).frontier
        if frontier is not None and "method" in frontier:
            frontier = frontier[frontier["method"].fillna("bisect").eq("bisect")]
        if frontier is None or frontier.empty:
            print(f"{folder} has no frontier.parquet: run `run_ablations.py frontier` first",
                  file=sys.stderr)
            return 2
        if len(argv) == 2:
            print(f"== {folder}")
        cost(Path(folder), frontier)
        frames.append(frontier)
    if len(frames) == 2:
        compare(*frames)
    return 0


def compare(a, b) -> None:
    """The edges of two searches of the same cells, cell by cell."""
    a, b = a.set_index("cell_id"), b.set_index("cell_id")
    both = a.index.intersection(b.index)
    step = math.log(float(a["resolution"].iloc[0]))
    ratio = (b.loc[both, "max_stable_lr"] / a.loc[both, "max_stable_lr"]).astype(float)
    steps = np.log(ratio.to_numpy()) / step
    missing = np.isnan(steps)
    agree_missing = sum(same(a.loc[c, "max_stable_lr"], b.loc[c, "max_stable_lr"])
                        for c in both[missing])
    found = steps[~missing]
    print(f"== compared: {len(both)} cells in both ({len(a)} and {len(b)})")
    print(f"probes per cell {a.loc[both, 'n_probes'].mean():.2f} vs "
          f"{b.loc[both, 'n_probes'].mean():.2f}")
    if len(found):
        print(f"max stable lr, second / first: {np.exp(found * step).min():.3g} to "
              f"{np.exp(found * step).max():.3g}; equal in {int((np.abs(found) < 1e-3).sum())}, "
              f"within one lattice step in {int((np.abs(found) <= 1 + 1e-3).sum())} of "
              f"{len(found)} cells with an edge in both")
    print(f"no stable rate in both: {agree_missing}; in one only: "
          f"{int(missing.sum()) - agree_missing}")
    status = (a.loc[both, "status"] != b.loc[both, "status"]).sum()
    print(f"cells whose search ended otherwise: {int(status)}")


def cost(grid_dir: Path, frontier) -> None:
    results = load_results(grid_dir)
    first = frontier.iloc[0]
    points = lattice(FrontierSettings(first["lr_min"], first["lr_max"], first["resolution"]))
    runs = results.runs.set_index("run_id")
    store = GridStore(grid_dir.parent, grid_dir.name)
    starts, ends = [], []
    for rid in runs.index:
        status = store.status(rid)
        if status.get("started_at") and status.get("finished_at"):
            starts.append(status["started_at"])
            ends.append(status["finished_at"])
    durations = runs["duration_s"].astype(float)
    used, full_estimate = 0.0, 0.0
    for _, cell in frontier.iterrows():
        mask = runs["lr"].isin(list(cell["probe_lrs"]))
        for key in cell["axes"]:  # the cell's own probes: equal in every axis of the cell
            mask &= runs[key].map(lambda v, c=cell[key]: same(v, c))
        probes = runs[mask]
        if probes.empty:
            continue
        lrs = probes["lr"].to_numpy(dtype=float)
        costs = durations[probes.index].to_numpy(dtype=float)
        used += costs.sum()
        for lr in points:
            full_estimate += costs[np.argmin(np.abs(np.log(lrs) - math.log(lr)))]
    n_probes = int(frontier["n_probes"].sum())
    full = len(frontier) * len(points)
    print(f"cells {len(frontier)}; lattice {len(points)} rates from {points[0]:g} to "
          f"{points[-1]:g} (x{first['resolution']:.4g})")
    print(f"probes {n_probes} ({n_probes / len(frontier):.1f} per cell, most "
          f"{int(frontier['n_probes'].max())}); full grid {full} runs: "
          f"{full / n_probes:.1f}x the runs")
    print(f"probe run time {used:.0f} s summed; full grid estimated {full_estimate:.0f} s "
          f"summed ({full_estimate / max(used, 1e-9):.1f}x)")
    if starts:
        print(f"wall (first probe start to last probe end) {max(ends) - min(starts):.0f} s")
    print("cells by status: " + ", ".join(f"{n} {s}" for s, n in
                                          frontier["status"].value_counts().items()))
    if "start_lr" in frontier.columns:  # stores from before warm starts and the check lack them
        warm = int(frontier["start_lr"].notna().sum())
        checked = int(frontier["check_lr"].notna().sum())
        flagged = int(sum(v is True or v is np.True_ for v in frontier["non_monotone"]))
        print(f"warm starts {warm} of {len(frontier)} cells; monotonicity checked in "
              f"{checked} cells, {flagged} non-monotone")


if __name__ == "__main__":
    sys.exit(main())

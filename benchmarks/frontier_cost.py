"""What a frontier search cost against the full grid at the same resolution.

    python run_ablations.py frontier frontier_batch --workers 2 --out DIR
    python -m benchmarks.frontier_cost DIR/frontier_batch

Reads a grid folder that ``frontier`` wrote (nothing runs): the probes it used and their
summed run time, against the full grid that resolves the same edge to the same resolution
(every cell at every lattice rate). The full grid's time is an estimate: each lattice rate of a
cell is costed at the measured duration of the cell's probe nearest to it in log-lr (diverged
probes end early, so a rate above the edge costs what the nearest diverged probe cost).
The wall time is from the first probe's start to the last one's end.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ablations.frontier import lattice
from ablations.spec import FrontierSettings
from ablations.store import GridStore, load_results


def same(a, b) -> bool:
    missing = [v is None or (isinstance(v, float) and math.isnan(v)) for v in (a, b)]
    return all(missing) or (not any(missing) and a == b)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.frontier_cost GRID_DIR", file=sys.stderr)
        return 2
    grid_dir = Path(argv[0])
    results = load_results(grid_dir)
    frontier = results.frontier
    if frontier is None:
        print(f"{grid_dir} has no frontier.parquet: run `run_ablations.py frontier` first",
              file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

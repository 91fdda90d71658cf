"""How few probes a warm search could take on a grid's measured edges, if it knew more than
a search can.

    python run_ablations.py frontier frontier_batch --out DIR --set frontier.warm_start=false \
        --set frontier.check_monotone=false
    python -m benchmarks.frontier_bound DIR/frontier_batch

Reads a cold search's frontier.parquet (nothing runs) and replays :class:`WarmSearch` on its
edges with stability taken as monotone (stable at and below the edge's lattice index), in the
cells' order, with two starts no real search has:

- *seed mean*: every cell but the first of its setting (its axes but ``batch_size`` and
  ``seed``) starts at :func:`start_index` of the mean edge of its setting and batch over the
  seeds, as if the seeds' noise were the only thing left to guess; the first bisects cold;
- *exact*: the same cells start at their own edge (2 probes each, the floor of any start).

The search's own starts on the same edges are in ``tests/test_frontier_warm.py``'s oracle test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from ablations.frontier import FrontierSettings, lattice
from ablations.frontier_search import BisectSearch, WarmSearch, start_index
from ablations.store import read_frontier

SHIFT_AXES = ("batch_size", "seed")


def probes(search: BisectSearch, edge: int) -> int:
    count = 0
    while (index := search.next_index()) is not None:
        search.record(index, index <= edge)
        count += 1
    return count


def replay(frame: pd.DataFrame, n: int, start) -> float:
    """Mean probes per cell when ``start(row)`` gives each cell's start (None: cold)."""
    seen: set[str] = set()
    total = 0
    for _, row in frame.iterrows():
        first = row["setting"] not in seen
        seen.add(row["setting"])
        guess = None if first else start(row)
        search = BisectSearch(n) if guess is None else WarmSearch(n, guess)
        total += probes(search, int(row["edge"]))
    return total / len(frame)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.frontier_bound COLD_GRID_DIR", file=sys.stderr)
        return 2
    frame = read_frontier(Path(argv[0]))
    if frame is None or frame.empty or not frame["status"].eq("found").all():
        print(f"{argv[0]}: needs a frontier.parquet whose every cell found an edge",
              file=sys.stderr)
        return 2
    first = frame.iloc[0]
    points = lattice(FrontierSettings(first["lr_min"], first["lr_max"], first["resolution"]))
    frame = frame.assign(edge=[min(range(len(points)), key=lambda i: abs(math.log(
        points[i] / lr))) for lr in frame["max_stable_lr"]])
    axes = sorted({k for cell_axes in frame["axes"] for k in cell_axes} - set(SHIFT_AXES))
    frame = frame.assign(setting=[repr(tuple(row[k] for k in axes)) for _, row in
                                  frame.iterrows()])
    frame["seed_mean"] = frame.groupby(["setting", "batch_size"])["edge"].transform("mean")
    n = len(points)
    cold = replay(frame, n, lambda row: None)
    mean = replay(frame, n, lambda row: start_index(row["seed_mean"], False, n))
    exact = replay(frame, n, lambda row: int(row["edge"]))
    print(f"{len(frame)} cells, {n} lattice rates; probes per cell (no monotonicity check): "
          f"cold {cold:.2f}, started at the seeds' mean edge {mean:.2f}, at the exact edge "
          f"{exact:.2f} (first cell of each setting cold)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

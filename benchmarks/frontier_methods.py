"""Bisection against the learning-rate range test on the same cells: cost and agreement.

    python run_ablations.py frontier frontier_batch --out DIR_A
    python run_ablations.py frontier frontier_batch --method range-test --out DIR_B
    python -m benchmarks.frontier_methods DIR_A/frontier_batch DIR_B/frontier_batch

Reads two grid folders that ``frontier`` wrote (nothing runs; one folder twice when both
methods ran in the same store): the bisection's rows of the first, the range test's of the
second. Cost per method: runs, steps trained (independent of the machine's load), summed run
time and wall time (first run's start to last run's end) of the method's runs (a range-test run
is one with ``schedule = "exponential"``). Agreement per cell (the same ``cell_id``): the ratio
of the range test's edge to the bisection's, in lattice steps, for the snapped edge
(``max_stable_lr``) and the ramp's own (``ramp_edge_lr``), and Spearman's rank correlation of
the edges across cells.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ablations.store import GridStore, load_results


def method_rows(frontier: pd.DataFrame | None, method: str) -> pd.DataFrame:
    if frontier is None:
        return pd.DataFrame()
    return frontier[frontier["method"].fillna("bisect").eq(method)].set_index("cell_id")


def cost(grid_dir: Path, ramp: bool) -> dict:
    """Runs, steps, summed and wall time of one method's runs in a grid folder."""
    runs = load_results(grid_dir, with_frames=False).runs
    schedule = runs["schedule"] if "schedule" in runs else pd.Series(None, index=runs.index)
    mine = runs[schedule.eq("exponential") == ramp]
    store = GridStore(grid_dir.parent, grid_dir.name)
    starts, ends = [], []
    for rid in mine["run_id"]:
        status = store.status(rid)
        if status.get("started_at") and status.get("finished_at"):
            starts.append(status["started_at"])
            ends.append(status["finished_at"])
    return {"runs": len(mine),
            "steps": int(pd.to_numeric(mine["steps_done"], errors="coerce").sum()),
            "run_s": float(pd.to_numeric(mine["duration_s"], errors="coerce").sum()),
            "wall_s": max(ends) - min(starts) if starts else math.nan}


def setting(row: pd.Series) -> str:
    if row.get("model.name") != "nf_resnet26":
        return str(row.get("model.name"))
    mode = row.get("clip.mode")
    return "none" if mode == "none" else f"{mode} {row.get('clip.threshold'):g}"


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import spearmanr

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.frontier_methods BISECT_GRID_DIR RANGE_TEST_GRID_DIR",
              file=sys.stderr)
        return 2
    folders = [Path(a) for a in argv]
    a = method_rows(load_results(folders[0], with_frames=False).frontier, "bisect")
    b = method_rows(load_results(folders[1], with_frames=False).frontier, "range-test")
    for folder, rows, name in ((folders[0], a, "bisect"), (folders[1], b, "range-test")):
        if rows.empty:
            print(f"{folder} has no {name} rows in frontier.parquet: run `run_ablations.py "
                  f"frontier{' --method range-test' if name != 'bisect' else ''}` first",
                  file=sys.stderr)
            return 2
    print(f"{'method':11s} {'cells':>5s} {'runs':>5s} {'steps':>6s} {'run s':>7s} "
          f"{'wall s':>7s}  statuses")
    for folder, rows, name in ((folders[0], a, "bisect"), (folders[1], b, "range-test")):
        c = cost(folder, name == "range-test")
        statuses = ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items())
        print(f"{name:11s} {len(rows):5d} {c['runs']:5d} {c['steps']:6d} {c['run_s']:7.0f} "
              f"{c['wall_s']:7.0f}  {statuses}")
    both = a.index.intersection(b.index)
    step = math.log(float(a["resolution"].iloc[0]))
    table = pd.DataFrame({
        "setting": [setting(a.loc[c]) for c in both],
        "batch": [int(a.loc[c, "batch_size"]) for c in both],
        "seed": [int(a.loc[c, "seed"]) for c in both],
        "bisect": a.loc[both, "max_stable_lr"].astype(float).to_numpy(),
        "range": b.loc[both, "max_stable_lr"].astype(float).to_numpy(),
        "ramp": b.loc[both, "ramp_edge_lr"].astype(float).to_numpy(),
        # censored: stable to lr_max (the edge lies higher; the ratio is a lower bound)
        "censored": [">=" if "stable_to_lr_max" in (a.loc[c, "status"], b.loc[c, "status"])
                     else "" for c in both],
    })
    table["ratio"] = table["range"] / table["bisect"]
    table["steps"] = np.round(np.log(table["ratio"]) / step).astype("Int64")
    print(f"\n{len(both)} cells in both; edge = max_stable_lr (range: snapped down to the "
          f"lattice; ramp: before snapping); steps = log(ratio) / log(resolution)")
    with pd.option_context("display.width", 120):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    ok = table.dropna(subset=["bisect", "range"])
    ratio = ok.loc[ok["censored"].eq(""), "ratio"].to_numpy(dtype=float)
    print(f"\nover the {len(ratio)} cells with an edge found by both (censored ones left "
          f"out); ratio range / bisect: median {np.median(ratio):.3g}, geometric mean "
          f"{math.exp(np.log(ratio).mean()):.3g}, min {ratio.min():.3g}, max {ratio.max():.3g}")
    within = np.abs(np.log(ratio) / step)
    print(f"within one lattice step: {int((within <= 1 + 1e-3).sum())} of {len(ratio)}; within "
          f"a factor 2: {int((np.abs(np.log2(ratio)) <= 1 + 1e-9).sum())} of {len(ratio)}")
    for column in ("range", "ramp"):
        rho, p = spearmanr(ok["bisect"], ok[column])
        print(f"Spearman rank correlation bisect vs {column}: {rho:.3f} (p {p:.2g}, "
              f"{len(ok)} cells, censored ones at lr_max)")
    means = ok.assign(log_b=np.log(ok["bisect"]), log_r=np.log(ok["range"])) \
        .groupby(["setting", "batch"], sort=False)[["log_b", "log_r"]].mean()
    rho, p = spearmanr(means["log_b"], means["log_r"])
    print(f"Spearman over the {len(means)} settings x batch sizes (geometric mean of the "
          f"seeds): {rho:.3f} (p {p:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

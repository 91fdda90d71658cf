"""Runs: one row per run, its varied settings and summary metrics, a diverged run's accuracy
shown (and sorted) at chance."""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.document import RUN_HEADERS, Section, Table
from reports.figures.frames import sort_frame, varied_axes
from reports.figures.style import fmt_value, is_number

SUMMARY_METRICS = ["final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
                   "steps_done", "duration_s"]


def runs_section(frame: pd.DataFrame) -> Section:
    axes = [a for a in varied_axes(frame) if a in frame]
    columns = ["run_id", "status", *axes, *[m for m in SUMMARY_METRICS if m in frame]]
    if "model.name" in axes and "model" in frame:  # the model as built, not its registry name
        columns[columns.index("model.name")] = "model"
    ordered = sort_frame(frame, axes)
    table = ordered[columns].copy()
    if "final_acc" in table:
        table["final_acc"] = [final_acc_cell(r) for _, r in ordered.iterrows()]
    for column in ("best_acc", "clip_fraction"):
        if column in table:
            table[column] = [f"{v:.1%}" if np.isfinite(v) else "" for v in table[column]]
    for column in ("diverged_step", "steps_done"):
        if column in table:
            table[column] = [f"{int(v)}" if np.isfinite(v) else "" for v in table[column]]
    if "max_grad_norm" in table:
        table["max_grad_norm"] = [f"{v:.3g}" if np.isfinite(v) else ""
                                  for v in table["max_grad_norm"]]
    if "duration_s" in table:
        table["duration_s"] = [f"{v:.0f}" if np.isfinite(v) else "" for v in table["duration_s"]]
    run_axes = sort_frame(frame, axes)["axes"] if "axes" in frame else None
    for axis in axes:
        if axis not in table:
            continue
        # a value the run's config holds but its grid point does not set (the threshold of an
        # unclipped run) is not applicable to it
        table[axis] = [
            fmt_value(v) if not (isinstance(v, float) and np.isnan(v))
            and (run_axes is None or axis in tuple(a)) else ""
            for v, a in zip(table[axis], run_axes if run_axes is not None else table[axis])
        ]
    table = table.rename(columns=RUN_HEADERS)
    return Section("Runs", [f"{len(table)} runs; blank cells: not applicable or not recorded; "
                            "final acc ✗: diverged, shown (and sorted) at chance.",
                            Table(table)])


def final_acc_cell(row: pd.Series) -> str:
    """A run's final accuracy as the runs table shows it: a diverged run at chance with its
    mark, so that sorting the column puts it where it counts (at chance), not last both
    ways."""
    if row["status"] == "diverged":
        step = row.get("diverged_step")
        when = f" at step {int(step)}" if is_number(step) and np.isfinite(step) else ""
        chance = row.get("acc_chance")
        return (f"{chance:.1%} ✗ diverged{when} (at chance)"
                if is_number(chance) and np.isfinite(chance) else f"✗ diverged{when}")
    value = row.get("final_acc")
    return f"{value:.1%}" if is_number(value) and np.isfinite(value) else ""

"""Divergence forensics: block x step timeline of one statistic over the steps kept before a
run diverged (its ``flight.parquet``), with the divergence and the diagnosis marked.

The flight frame is tidy like the blocks frame: grid, run_id, step, block, stage, index, stat,
value, for the diverged runs only; per-step rows of block ``"run"`` hold the loss and the lr.
The runs frame gives each run's ``diverged_step`` and, where the store holds a diagnosis,
``diverged_first_step`` (the first step a statistic left its early range) and
``diverged_block`` (where).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from reports.figures.frames import require, run_title, with_derived
from reports.figures.heatmap import draw_blocks, log_colourbar, log_scale, zero_handle
from reports.figures.style import (
    MISSING_COLOUR,
    block_name,
    divergence_handle,
    draw_divergence,
    is_number,
    label,
    panel_figure,
    styled,
)
from sigprop.errors import UserError

RUN_BLOCK = "run"  # the flight's per-step rows (loss, lr), not a block of the network
TIMELINE_STATS = ("grad_norm", "var")  # the default statistic, first found
FIRST_OUT_LINE = "#E69F00"  # orange: distinct from the sky-blue divergence line on magma
GAP_COLOUR = "white"
MAX_TICKS = 12


def timeline_stat(flight: pd.DataFrame, stat: str | None = None) -> str:
    """``stat``, or the first of :data:`TIMELINE_STATS` the flight frame holds."""
    have = set(flight["stat"].unique()) if "stat" in flight else set()
    if stat is not None:
        if stat not in have:
            raise UserError(f"the flight record has no {stat!r} rows; have {sorted(have)}")
        return stat
    found = next((s for s in TIMELINE_STATS if s in have), None)
    if found is None:
        raise UserError(f"the flight record has none of {', '.join(TIMELINE_STATS)}; "
                        f"have {sorted(have)}")
    return found


def step_position(steps: np.ndarray, step: float) -> float:
    """Where ``step`` sits on the positional x axis (column i: the i-th kept step): its
    column, or half a column past the last kept step before it when it was not kept."""
    exact = np.flatnonzero(steps == step)
    if len(exact):
        return float(exact[0])
    before = np.flatnonzero(steps < step)
    return float(before[-1]) + 0.5 if len(before) else -0.5


def tick_steps(steps: np.ndarray, marks: Sequence[float]) -> list[int]:
    """Column positions to label: every one when few, else the marked steps, the first step
    after each gap, the first and the last, then an even spread, each kept only when it does
    not crowd a label already chosen."""
    n = len(steps)
    if n <= MAX_TICKS:
        return list(range(n))
    gaps = np.flatnonzero(np.diff(steps) > 1)
    marked = [int(p) for p in (step_position(steps, m) for m in marks)
              if float(p).is_integer() and 0 <= p < n]
    spread = range(0, n, max(1, n // (MAX_TICKS - 4)))
    apart = max(2.0, n / (MAX_TICKS * 1.5))
    chosen: list[int] = []
    for pos in [*marked, *(gaps + 1), 0, n - 1, *gaps, *spread]:
        if all(abs(int(pos) - c) >= apart for c in chosen):
            chosen.append(int(pos))
    return sorted(chosen)


@styled
def plot_divergence_timeline(
    flight: pd.DataFrame,
    runs: pd.DataFrame,
    run_ids: Sequence[str] | None = None,
    stat: str | None = None,
    max_panels: int = 6,
) -> Figure:
    """Block (rows, input at the top) x kept step (columns, in order; a white line where the
    recorder kept no steps) of ``stat`` (default: ``grad_norm``, else ``var``) on a log colour
    scale, one panel per run of ``run_ids`` (default: every run in ``flight``, at most
    ``max_panels``). The divergence step is a dashed line; the diagnosis' first out-of-range
    step a dotted line, with a ring on the block where it happened."""
    require(flight, ["run_id", "step", "block", "index", "stat", "value"], "the divergence "
            "timeline")
    stat = timeline_stat(flight, stat)
    rows = flight[(flight["stat"] == stat) & (flight["block"] != RUN_BLOCK)]
    if "param" in rows:
        rows = rows[rows["param"].isna()]
    have = list(dict.fromkeys(rows["run_id"]))
    if run_ids is None:
        run_ids = have[:max_panels]
    missing = [r for r in run_ids if r not in have]
    if missing:
        raise UserError(f"no flight record of {stat!r} for run(s) {', '.join(missing)}")
    if not run_ids:
        raise UserError(f"the flight record has no {stat!r} rows of any block")
    frame = with_derived(runs).drop_duplicates("run_id").set_index("run_id", drop=False)
    norm, cmap = log_scale(rows.loc[rows["run_id"].isin(run_ids), "value"], stat)

    n_blocks = rows["block"].nunique()
    fig, axes = panel_figure(len(run_ids), 1, 9.0, 2.0,
                             max(3.4, 0.24 * n_blocks + 1.9) * len(run_ids))
    mesh = None
    flags = {"zero": False, "missing": False, "gap": False, "first": False, "block": False}
    for ax, run_id in zip(axes[:, 0], run_ids):
        part = rows[rows["run_id"] == run_id]
        # the blocks this run has, at every kept step; a non-finite value stays (masked)
        table = (part.assign(value=pd.to_numeric(part["value"], errors="coerce"))
                 .groupby(["index", "block", "step"])["value"].mean()
                 .unstack("step").sort_index(level="index"))
        steps = table.columns.to_numpy(dtype=float)
        data = table.to_numpy(dtype=float)
        flags["zero"] |= bool((data <= 0).any())
        # not finite (the breakdown itself) or not kept
        flags["missing"] |= bool((~np.isfinite(data)).any())
        mesh = draw_blocks(ax, table, np.arange(len(steps) + 1) - 0.5, norm, cmap,
                           [block_name(b) for b in table.index.get_level_values("block")])
        for gap in np.flatnonzero(np.diff(steps) > 1):  # the recorder kept no steps between
            ax.axvline(gap + 0.5, color=GAP_COLOUR, linewidth=3, gid="gap")
            flags["gap"] = True
        info = frame.loc[run_id] if run_id in frame.index else pd.Series(dtype=object)
        diverged = info.get("diverged_step")
        first = info.get("diverged_first_step")
        block = info.get("diverged_block")
        # the first out-of-range step is labelled before the divergence (the last step)
        marks = [m for m in (first, diverged) if is_number(m) and np.isfinite(m)]
        right = len(steps) - 0.5
        if is_number(diverged) and np.isfinite(diverged):
            at = step_position(steps, float(diverged))
            draw_divergence(ax, at)
            right = max(right, at + 0.5)
        if is_number(first) and np.isfinite(first):
            at = step_position(steps, float(first))
            ax.axvline(at, color=FIRST_OUT_LINE, linestyle=":", linewidth=2.5,
                       gid="first-out-of-range")
            flags["first"] = True
            where = [i for i, b in enumerate(table.index.get_level_values("block"))
                     if isinstance(block, str) and b == block]
            if where:
                ax.plot([at], where[:1], marker="o", markersize=13, markerfacecolor="none",
                        markeredgecolor=FIRST_OUT_LINE, markeredgewidth=2.5, linestyle="none",
                        gid="first-block")
                flags["block"] = True
        ax.set_xlim(-0.5, right)
        ticks = tick_steps(steps, marks)
        ax.set_xticks(ticks, [f"{steps[t]:g}" for t in ticks])
        ax.set_xlabel(label("step"))
        ax.set_ylabel("block (input → output)")
        title = run_title(frame, run_id) if run_id in frame.index else run_id
        ax.set_title(f"{run_id}: " + title.replace("\n", ", "), fontsize=10.5)
    log_colourbar(fig, axes, mesh, norm, f"{label(stat)}\n(log scale)")  # fits a short panel
    keys: list[Any] = [divergence_handle()]
    if flags["first"]:
        keys.append(Line2D([], [], color=FIRST_OUT_LINE, linestyle=":", linewidth=2.5,
                           label="first statistic out of range (diagnosis)"))
    if flags["block"]:
        keys.append(Line2D([], [], marker="o", markersize=10, markerfacecolor="none",
                           markeredgecolor=FIRST_OUT_LINE, markeredgewidth=2, linestyle="none",
                           label="block where it left its range"))
    if flags["missing"]:
        keys.append(Patch(facecolor=MISSING_COLOUR, edgecolor="grey",
                          label="not finite or not recorded"))
    if flags["zero"]:
        keys.append(zero_handle())
    if flags["gap"]:
        keys.append(Line2D([], [], color="grey", linewidth=3, label="steps not kept (gap)"))
    fig.legend(handles=keys, loc="outside lower center", ncols=min(len(keys), 3),
               frameon=False)
    fig.suptitle(f"Before the divergence: {stat.replace('_', ' ')} per block at every kept "
                 "step", fontsize=12)
    return fig

"""Gradient propagation: block x step heatmap of gradient norms, one panel per run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from reports.figures.frames import (
    block_rows,
    run_title,
    selected_panels,
    with_derived,
)
from reports.figures.heatmap import draw_blocks, log_colourbar, log_scale, zero_handle
from reports.figures.style import (
    HEAD_LABEL,
    MISSING_COLOUR,
    block_name,
    divergence_handle,
    draw_divergence,
    gids_of,
    is_number,
    label,
    panel_figure,
    styled,
)
from sigprop.errors import UserError

HEAD_NOTE = f"{HEAD_LABEL}: the classifier and any layer after the last block"


def step_edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


def with_flight(rows: pd.DataFrame, flight: pd.DataFrame | None, stat: str) -> pd.DataFrame:
    """``rows`` (one statistic of the blocks frame) plus the flight record's rows of ``stat``
    at the steps the probes did not record, for the runs the flight record holds."""
    if flight is None or flight.empty or not {"run_id", "step", "block", "index", "stat",
                                              "value"} <= set(flight):
        return rows
    extra = flight[(flight["stat"] == stat) & (flight["block"] != "run")]
    if "param" in extra:
        extra = extra[extra["param"].isna()]
    if extra.empty:
        return rows
    have = set(zip(rows["run_id"], rows["step"]))
    extra = extra[[(r, s) not in have for r, s in zip(extra["run_id"], extra["step"])]]
    columns = [c for c in rows.columns if c in extra.columns]
    return pd.concat([rows, extra[columns]], ignore_index=True)


def step_span(rows: pd.DataFrame, run_id: str) -> tuple[float, float]:
    steps = rows.loc[rows["run_id"] == run_id, "step"].astype(float)
    return (float(steps.min()), float(steps.max())) if len(steps) else (np.nan, np.nan)


@styled
def plot_gradient_heatmap(
    blocks: pd.DataFrame,
    runs: pd.DataFrame,
    run_ids: Sequence[str] | None = None,
    col: str | None = None,
    stat: str = "grad_norm",
    max_panels: int = 4,
    row: str | None = None,
    flight: pd.DataFrame | None = None,
) -> Figure:
    """Block (rows, input at the top, the head last) x recorded step (columns) of ``stat`` on
    a log colour scale, one panel per run: ``run_ids`` in one row, or a grid of one run per
    ``row`` (default: the model, normalizer-free first, when several were run) and ``col``
    (default: clipping) at the largest batch size (:func:`pick_panels`). A diverged run's
    divergence step is a dashed line, what follows it is hatched grey; with its ``flight``
    record (the steps kept before the divergence, ``reports.figures.forensics``) its panel
    shows every kept step, not only the probes' every-N-steps record."""
    rows = with_flight(block_rows(blocks, stat), flight, stat)
    if rows.empty:
        raise UserError(f"the blocks frame has no {stat!r} rows")
    grid = selected_panels(rows, runs, run_ids, col, row, max_panels)
    norm, cmap = log_scale(rows.loc[rows["run_id"].isin(grid.run_ids), "value"], stat)
    frame = with_derived(runs)
    has_zero = has_missing = has_head = has_after = has_infinite = False
    spans = {run_id: step_span(rows, run_id) for run_id in grid.run_ids}
    differ = len(set(spans.values())) > 1  # then each panel says its own steps

    n_blocks = rows["block"].nunique()
    n_rows, n_cols = len(grid.cells), len(grid.col_values)
    fig, axes = panel_figure(n_rows, n_cols, 3.6, 1.6,
                             max(3.6, 0.24 * n_blocks + 1.9) * n_rows - 0.6 * (n_rows - 1))
    mesh = None
    previous_blocks: dict[int, list[str]] = {}  # per panel row
    for r, ax, run_id in grid.panels(axes):
        part = rows[rows["run_id"] == run_id]
        table = part.pivot_table(index=["index", "block"], columns="step", values="value",
                                 aggfunc="mean").sort_index(level="index")
        steps = table.columns.to_numpy(dtype=float)
        values = table.to_numpy(dtype=float)
        has_zero |= bool((values <= 0).any())
        has_missing |= bool(np.isnan(values).any())
        has_infinite |= bool(np.isinf(values).any())  # a diverged step's statistics
        names = [block_name(b) for b in table.index.get_level_values("block")]
        has_head |= HEAD_LABEL in names
        # repeated block names along a row are noise; different models keep their own
        mesh = draw_blocks(ax, table, step_edges(steps), norm, cmap,
                           names if names != previous_blocks.get(r) else [])
        previous_blocks[r] = names
        if len(steps) <= 8:
            ax.set_xticks(steps, [f"{s:g}" for s in steps])
        ax.set_xlabel(label("step"))
        title = run_title(frame, run_id, grid)
        if differ:
            low, high = spans[run_id]
            title += f"\nsteps {low:g}–{high:g} recorded"
        ax.set_title(title, fontsize=10.5)
        info = frame.loc[frame["run_id"] == run_id]
        if len(info) and info.iloc[0]["status"] == "diverged" and is_number(
                info.iloc[0].get("diverged_step")):
            at = float(info.iloc[0]["diverged_step"])
            draw_divergence(ax, at)
            # what follows the divergence: at least half a column, so the line never
            # sits on the panel's edge
            half = (steps[-1] - steps[-2]) / 2 if len(steps) > 1 else 0.5
            right = max(ax.get_xlim()[1], at + half)
            ax.axvspan(at, right, facecolor=MISSING_COLOUR, edgecolor="#969696",
                       hatch="//", linewidth=0, zorder=0.5, gid="after-divergence")
            ax.set_xlim(ax.get_xlim()[0], right)
            has_after = True
    grid.label_rows(axes, "block (input → output)")
    log_colourbar(fig, axes, mesh, norm, f"{label(stat)} (log scale)")
    keys = []
    if has_missing or has_infinite:
        keys.append(Patch(facecolor=MISSING_COLOUR, edgecolor="grey", label=(
            "not recorded" if not has_infinite else "not finite" if not has_missing
            else "not recorded or not finite")))
    if has_zero:
        keys.append(zero_handle())
    if gids_of(fig, "diverged"):
        keys.append(divergence_handle())
    if has_after:
        keys.append(Patch(facecolor=MISSING_COLOUR, edgecolor="#969696", hatch="//",
                          label="after divergence"))
    if has_head:
        keys.append(Line2D([], [], linestyle="none", label=HEAD_NOTE))
    if keys:
        # three a row: the head note is long, four entries overflow a two-panel figure
        fig.legend(handles=keys, loc="outside lower center", ncols=min(len(keys), 3),
                   frameon=False)
    # the configured length is not what a panel that diverged shows: leave it to the panels
    shared = (grid.shared_settings(frame, exclude=("steps", "epochs") if differ else ())
              if run_ids is None else "")
    fig.suptitle(f"Gradient propagation during training: {stat.replace('_', ' ')} per block"
                 + (f"\n(every panel: {shared})" if shared else ""), fontsize=12)
    return fig

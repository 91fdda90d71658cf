"""Coordinate-check figure (mup's ``plot_coord_data``) of the frame of ``sigprop.coordcheck``."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from reports.figures.spp import _plain_log_labels
from reports.figures.style import SEQUENTIAL, fmt_value, pretty_model, styled

STAT_NAMES = {"l1": "l1 = mean |x|", "rms": "rms = sqrt(mean x²)"}
HEAD_COLOUR = "#000000"  # the logits, apart from the depth colours of the blocks
CAPTION_CHARS = 150


def _step_title(step: int) -> str:
    return "step 0 (init)" if step == 0 else f"step {step} (after {step} update" + \
        ("s)" if step > 1 else ")")


def _block_colours(points: pd.DataFrame) -> dict:
    """Viridis by depth (stem first, last block lightest); the head in black."""
    import matplotlib

    cmap = matplotlib.colormaps[SEQUENTIAL]
    body = points[points["block"] != "head"].sort_values("depth_index")
    n = len(body)
    colours = {b: cmap(x) for b, x in zip(body["block"], np.linspace(0.0, 0.9, max(n, 1)))}
    colours["head"] = HEAD_COLOUR
    return colours


@styled
def plot_coord_data(
    frame: pd.DataFrame,
    y: str = "l1",
    *,
    x: str = "width",
    models: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """mup's coordinate-check plot: one panel per step (columns) and per model (rows), ``x``
    (default the width) on a log2 axis, ``y`` (``l1`` or ``rms``) on a log axis shared along a
    row, one line per block coloured by depth (viridis, stem darkest), the head (logits) black
    and dashed. Lines that stay flat across widths mean activations of a width-independent
    size; a slope of 1 on these axes means growth proportional to width.

    ``frame``: the frame of :func:`sigprop.coordcheck.coord_check` (one row per model, width,
    step and block; a per-seed frame is averaged here). Values that are not positive (a
    zero-initialised classifier's logits at init) cannot sit on a log axis: they are left out
    and the caption says where. ``title`` defaults to the run's lr, data and seed count, from
    the frame; "" for none.
    """
    if y not in frame:
        raise ValueError(f"the frame has no column {y!r}; columns: {', '.join(frame.columns)}")
    keys = ["model", x, "step", "block", "depth_index"]
    data = frame.groupby(keys, sort=False)[y].mean().reset_index()
    names = list(models) if models is not None else list(dict.fromkeys(data["model"]))
    step_list = list(steps) if steps is not None else sorted(data["step"].unique())
    widths = sorted(data[x].unique())
    fig = Figure(figsize=(3.3 * len(step_list) + 2.6, 2.9 * len(names) + 0.9),
                 layout="constrained")
    axes = fig.subplots(len(names), len(step_list), squeeze=False, sharey="row")
    left_out: dict[str, list[str]] = {"zero": [], "not finite": []}
    for row, name in enumerate(names):
        sub = data[data["model"] == name]
        points = sub.drop_duplicates("block")[["block", "depth_index"]]
        colours = _block_colours(points)
        order = points.sort_values("depth_index")["block"].tolist()
        values = sub[y].to_numpy(dtype=float)
        positive = values[np.isfinite(values) & (values > 0)]
        for col, step in enumerate(step_list):
            ax = axes[row, col]
            rows = sub[sub["step"] == step]
            for block in order:
                line = rows[rows["block"] == block].sort_values(x)
                values = line[y].to_numpy(dtype=float)
                finite = np.isfinite(values)
                shown = np.where(finite & (values > 0), values, np.nan)
                where = f"{pretty_model(name)} {block} at step {step}"
                if (finite & (values <= 0)).any():
                    left_out["zero"].append(where)
                if not finite.all():
                    left_out["not finite"].append(where)
                head = block == "head"
                ax.plot(line[x].to_numpy(dtype=float), shown, color=colours[block],
                        lw=1.8 if head else 1.4, ls="--" if head else "-", marker="o", ms=3.5,
                        label="head (logits)" if head else block)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator([float(w) for w in widths]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([fmt_value(w) for w in widths])
            ax.set_title(_step_title(int(step)) if row == 0 else "", fontsize="medium")
            if row == len(names) - 1:
                ax.set_xlabel("width (stage-0 channels, log₂)" if x == "width" else x)
            if col == 0:
                ax.set_ylabel(f"{pretty_model(name)}\n{STAT_NAMES.get(y, y)}")
            ax.grid(alpha=0.3, lw=0.5)
        if len(positive):
            axes[row, 0].set_yscale("log")
            low, high = float(positive.min()), float(positive.max())
            pad = max(high / low, 1.5) ** 0.06
            axes[row, 0].set_ylim(low / pad, high * pad)
            _plain_log_labels(axes[row, 0], low, high)
        handles, labels = axes[row, 0].get_legend_handles_labels()
        axes[row, -1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5),
                             fontsize="small", frameon=False, title="block",
                             title_fontsize="small")
    if title is None:
        title = _default_title(frame, y)
    if title:
        fig.suptitle(title)
    notes = []
    if left_out["zero"]:
        notes.append("Not drawn (value 0, not on a log axis): " + "; ".join(left_out["zero"]))
    if left_out["not finite"]:
        notes.append("Not drawn (not finite: the run diverged): "
                     + "; ".join(left_out["not finite"]))
    if notes:
        text = "\n".join(textwrap.fill(note + ".", CAPTION_CHARS, break_on_hyphens=False)
                         for note in notes)
        fig.supxlabel(text, fontsize="small", ha="left", x=0.01)
    return fig


def _default_title(frame: pd.DataFrame, y: str) -> str:
    parts = [f"Coordinate check: {STAT_NAMES.get(y, y)} of each block's output"]
    if "lr" in frame and frame["lr"].notna().any():
        parts.append(f"plain SGD lr={fmt_value(float(frame['lr'].iloc[0]))}")
    if "data" in frame:
        shape = frame["batch"].iloc[0] if "batch" in frame else ""
        parts.append(f"one fixed {frame['data'].iloc[0]} batch" + (f" ({shape})" if shape
                                                                   else ""))
    seeds = int(frame["seeds"].max()) if "seeds" in frame else (
        frame["seed"].nunique() if "seed" in frame else 1)
    if not math.isnan(seeds):
        parts.append(f"mean over {seeds} init seed{'s' if seeds > 1 else ''}")
    return ", ".join(parts)

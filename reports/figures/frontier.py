"""Stability-frontier figures: functions of the frontier frame (``load_results(...).frontier``,
one row per cell; ``ablations.frontier``), each returning a matplotlib Figure.

- :func:`plot_frontier`: the largest stable learning rate against batch size on log-log axes,
  a line per model and clipping setting and per value of any other axis of the grid (a probe
  length: :data:`LINE_AXES`; geometric mean over seeds, band from the lowest to the highest
  seed), with the linear-scaling reference lr ∝ B dashed.
- :func:`plot_frontier_accuracy`: the final test accuracy of the probe at the largest stable
  learning rate, against batch size, with chance level.
- :func:`frontier_table`: the same numbers as a table (one row per setting and batch size).

A cell stable up to ``lr_max`` is drawn at ``lr_max`` with an upward triangle (its edge lies
higher); a cell unstable already at ``lr_min`` has no stable rate and is drawn as a downward
triangle at ``lr_min`` (its edge lies lower), out of the line and the band.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from reports.figures.frames import chance_level
from reports.figures.style import (
    chance_handle,
    clipping_label,
    draw_chance,
    pretty_model,
)

SETTING = "setting"


def model_name(row: pd.Series) -> str:
    label = row.get("model_label")
    if isinstance(label, str) and label:
        return label
    return pretty_model(row.get("model.name", "model"))


def clipping_name(row: pd.Series) -> str:
    return clipping_label(row.get("clip.mode"), row.get("clip.threshold"))


# axes a line is drawn along or over; any other axis of the grid (a probe length, an alpha)
# splits the lines, so cells that differ in it are never pooled into one geometric mean
LINE_AXES = {"model.name", "clip.mode", "clip.threshold", "batch_size", "seed", "lr", "base_lr"}


def other_axes(frame: pd.DataFrame) -> list[str]:
    """The grid's axes besides those of a line, that the frame has as columns, in order."""
    names: list[str] = []
    for axes in frame["axes"] if "axes" in frame else []:
        for name in (list(axes) if isinstance(axes, list | tuple | np.ndarray) else []):
            if isinstance(name, str) and name not in LINE_AXES and name in frame \
                    and name not in names:
                names.append(name)
    return names


def axis_label(name: str, value: Any) -> str:
    if name == "steps":
        return f"{value:g}-step probes" if isinstance(value, int | float) else f"steps {value}"
    return f"{name}={value:g}" if isinstance(value, int | float) else f"{name}={value}"


def with_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame plus ``setting``: 'model, clipping' and any other axis of the grid (the line
    a cell belongs to)."""
    out = frame.copy()
    extra = other_axes(out)
    out[SETTING] = [", ".join([model_name(row), clipping_name(row)]
                              + [axis_label(name, row[name]) for name in extra])
                    for _, row in out.iterrows()]
    for column in ("max_stable_lr", "min_unstable_lr", "final_acc", "batch_size"):
        if column in out:
            out[column] = pd.to_numeric(out[column], errors="coerce")
    return out


def setting_order(frame: pd.DataFrame) -> list[str]:
    """Settings in a stable order: model, then no clipping, global norm, AGC, by threshold."""
    modes = {"none": 0, "norm": 1, "agc": 2}
    keys = {}
    extra = other_axes(frame)
    for _, row in frame.iterrows():
        threshold = pd.to_numeric(pd.Series([row.get("clip.threshold")]), errors="coerce")[0]
        keys[row[SETTING]] = (model_name(row), modes.get(row.get("clip.mode"), 3),
                              0.0 if np.isnan(threshold) else threshold,
                              *((0, row[name]) if isinstance(row[name], int | float)
                                else (1, str(row[name])) for name in extra))
    return sorted(keys, key=keys.get)


def colours(settings: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(settings)}


def seed_stats(cells: pd.DataFrame, value: str, log: bool) -> pd.DataFrame:
    """Per batch size: centre (geometric mean when ``log``), min, max and count of ``value``."""
    rows = []
    for batch, group in cells.groupby("batch_size"):
        values = group[value].dropna().to_numpy(dtype=float)
        values = values[values > 0] if log else values
        if not len(values):
            continue
        centre = float(np.exp(np.log(values).mean())) if log else float(values.mean())
        rows.append({"batch_size": batch, "centre": centre, "low": values.min(),
                     "high": values.max(), "n": len(values)})
    return pd.DataFrame(rows, columns=["batch_size", "centre", "low", "high", "n"])


def batch_axis(ax: Any, batches: list[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{b:g}" for b in batches])
    ax.set_xlabel("batch size")


def legend(ax: Any, handles: list, labels: list[str]) -> None:
    """Right of the plot; below it when the labels are long (a grid with more axes than model
    and clipping), so they do not squeeze the plot to a strip."""
    if max(map(len, labels), default=0) > 48:
        ax.figure.set_size_inches(7.5, ax.figure.get_size_inches()[1] + 0.2 * len(labels))
        ax.legend(handles, labels, fontsize=7, loc="upper center", ncol=1,
                  bbox_to_anchor=(0.5, -0.14))
    else:
        ax.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def setting_figure(frontier: pd.DataFrame, column: str, missing: str, height: float
                    ) -> tuple[pd.DataFrame, list[str], dict[str, Any], Any, list]:
    """The frame with its settings, their order and colours, one axes of a new figure and the
    batch sizes, for a figure of ``column`` against batch size; ``missing`` names what the
    frame lacks when it has no ``column``."""
    frame = with_setting(frontier)
    if frame.empty or column not in frame:
        raise ValueError(f"the frontier frame has no {missing}")
    order = setting_order(frame)
    fig = Figure(figsize=(7.5, height), layout="constrained")
    return (frame, order, colours(order), fig.add_subplot(),
            sorted(frame["batch_size"].dropna().unique()))


def seed_line(ax: Any, stats: pd.DataFrame, colour: Any, setting: str) -> None:
    """A setting's centre over its seeds against batch size, its seeds' spread as a band."""
    ax.plot(stats["batch_size"], stats["centre"], "o-", color=colour, label=setting, lw=1.8,
            ms=4)
    ax.fill_between(stats["batch_size"], stats["low"], stats["high"], color=colour, alpha=0.15,
                    lw=0)


def plot_frontier(frontier: pd.DataFrame, reference: str | None = None) -> Figure:
    """Largest stable learning rate vs batch size, log-log; see the module docstring.

    ``reference``: the setting the dashed lr ∝ B line starts from (at its smallest batch);
    default: the first setting with an unclipped NF model, else the first setting.
    """
    frame, order, palette, ax, batches = setting_figure(
        frontier, "batch_size", "cells with a batch size", 4.8)
    lines = {}  # setting -> its seed_stats, for the lr ∝ B line's start below
    for setting in order:
        cells = frame[frame[SETTING] == setting]
        stats = lines[setting] = seed_stats(cells, "max_stable_lr", log=True)
        colour = palette[setting]
        if len(stats):
            seed_line(ax, stats, colour, setting)
        capped = cells[cells["status"] == "stable_to_lr_max"]
        ax.plot(capped["batch_size"], capped["max_stable_lr"], "^", color=colour, ms=7,
                ls="none")
        floor = cells[cells["status"] == "unstable_at_lr_min"]
        ax.plot(floor["batch_size"], floor["min_unstable_lr"], "v", color=colour, ms=7,
                ls="none", label=None if len(stats) else setting)
    # from a setting with an edge at the smallest batch, so the line starts where lr ∝ B does
    starts = [s for s in order if batches and batches[0] in set(lines[s]["batch_size"])] or order
    anchor = reference or next((s for s in starts if "no clipping" in s and "NF" in s),
                               starts[0])
    stats = lines[anchor] if anchor in lines else seed_stats(
        frame[frame[SETTING] == anchor], "max_stable_lr", log=True)
    if len(stats):
        b0, lr0 = stats["batch_size"].iloc[0], stats["centre"].iloc[0]
        xs = np.array(batches, dtype=float)
        ax.plot(xs, lr0 * xs / b0, "--", color="0.35", lw=1.2,
                label=f"lr ∝ B (from {anchor} at B={b0:g})")
    for bound in ("lr_min", "lr_max"):
        if bound in frame and frame[bound].notna().any():
            ax.axhline(float(frame[bound].iloc[0]), color="0.6", ls=":", lw=1)
    ax.set_yscale("log")
    batch_axis(ax, batches)
    ax.set_ylabel("largest stable peak learning rate")
    lo, hi = frame["lr_min"].min(), frame["lr_max"].max()
    if np.isfinite(lo) and np.isfinite(hi):
        ax.set_ylim(lo / 1.5, hi * 1.5)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="^", ls="none", color="0.3"),
                Line2D([], [], marker="v", ls="none", color="0.3")]
    labels += ["stable up to lr_max (edge higher)", "unstable at lr_min (edge lower)"]
    legend(ax, handles, labels)
    resolution = frame["resolution"].iloc[0] if "resolution" in frame else float("nan")
    ax.set_title(f"Stability frontier (resolution x{resolution:.3g})", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    return ax.figure


def plot_frontier_accuracy(frontier: pd.DataFrame) -> Figure:
    """Final test accuracy at the largest stable learning rate vs batch size."""
    frame, order, palette, ax, batches = setting_figure(frontier, "final_acc", "accuracies",
                                                         4.4)
    for setting in order:
        stats = seed_stats(frame[frame[SETTING] == setting], "final_acc", log=False)
        if len(stats):
            seed_line(ax, stats, palette[setting], setting)
    chance = chance_level(frame)
    draw_chance(ax, chance)
    batch_axis(ax, batches)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("final test accuracy at the frontier")
    handles, labels = ax.get_legend_handles_labels()
    if chance is not None:
        handles.append(chance_handle(chance))
        labels.append(handles[-1].get_label())
    legend(ax, handles, labels)
    steps = frame["probe_steps"].dropna().unique() if "probe_steps" in frame else []
    length = f", {int(steps[0])}-step probes" if len(steps) == 1 else ""
    ax.set_title(f"Accuracy at the largest stable learning rate{length}", fontsize=9)
    ax.grid(True, alpha=0.3)
    return ax.figure


def frontier_table(frontier: pd.DataFrame) -> pd.DataFrame:
    """One row per setting and batch size: the largest stable lr over seeds (geometric mean
    and range), accuracy there, probes, and how the searches ended; with the monotonicity
    check (stores written before it lack the column), the cells found stable again two
    lattice steps above their edge."""
    frame = with_setting(frontier)
    checked = "non_monotone" in frame.columns
    rows = []
    for setting in setting_order(frame):
        cells = frame[frame[SETTING] == setting]
        for batch, group in cells.groupby("batch_size"):
            lrs = group["max_stable_lr"].dropna().to_numpy(dtype=float)
            lr_text = "none stable"
            if len(lrs):
                centre = float(np.exp(np.log(lrs).mean()))
                lr_text = f"{centre:.3g}" + (f" ({lrs.min():.3g}–{lrs.max():.3g})"
                                             if len(lrs) > 1 else "")
            acc = group["final_acc"].dropna()
            statuses = group["status"].value_counts()
            row = {
                "setting": setting, "batch size": int(batch), "max stable lr": lr_text,
                "acc there": f"{100 * acc.mean():.1f}%" if len(acc) else "",
                "probes": int(group["n_probes"].sum()), "cells": len(group),
                "searches": ", ".join(f"{n} {s.replace('_', ' ')}"
                                      for s, n in statuses.items()),
            }
            if checked:
                row["non-monotone"] = non_monotone_count(group)
            rows.append(row)
    return pd.DataFrame(rows)


def non_monotone_count(frontier: pd.DataFrame) -> int:
    """Cells marked non_monotone; a value that is not a plain true (an old or damaged store)
    does not count."""
    if "non_monotone" not in frontier.columns:
        return 0
    return int(sum(value is True or value is np.True_ for value in frontier["non_monotone"]))

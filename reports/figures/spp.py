"""Signal-propagation figure (paper A, Figure 1 style) of the SPP frame of ``sigprop.spp``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FuncFormatter,
    MaxNLocator,
)

from reports.figures.style import PALETTE

SPP_PANELS = (
    ("sq_mean", "Average channel squared mean"),
    ("var", "Average channel variance"),
    ("res_var", "Residual average channel variance"),
)
LOG_SPAN = 10.0  # a panel whose positive values span more than this factor gets a log axis


def _value_column(frame: pd.DataFrame) -> str:
    if "value" in frame:
        return "value"
    if "mean" in frame:
        return "mean"
    raise ValueError("the frame needs a 'value' (raw) or 'mean' (summary) column")


def _spans_decades(values: np.ndarray) -> bool:
    positive = values[np.isfinite(values) & (values > 0)]
    return len(positive) > 1 and positive.max() / positive.min() > LOG_SPAN


def _plain_log_labels(ax, values: np.ndarray) -> None:
    """Tick labels like 0.4, 1, 2 instead of 4x10^-1 on log axes; a few minor ticks labelled
    when the axis spans under three decades."""
    positive = values[np.isfinite(values) & (values > 0)]
    decades = math.log10(positive.max() / positive.min())
    labelled = {2, 3, 4, 6} if decades < 1.5 else ({2, 5} if decades < 2.5 else set())

    def minor(tick: float, _position) -> str:
        if tick <= 0:
            return ""
        mantissa = round(tick / 10 ** math.floor(math.log10(tick) + 1e-9))
        return f"{tick:g}" if mantissa in labelled else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda tick, _position: f"{tick:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _stage_starts(sub: pd.DataFrame) -> tuple[float, ...]:
    """x positions (index + 1) of the first block of every stage after the first."""
    blocks = sub[sub["stage"] >= 0].drop_duplicates("index").sort_values("index")
    changes = blocks["stage"].to_numpy()
    starts = blocks["index"].to_numpy()[1:][changes[1:] != changes[:-1]]
    return tuple(float(i + 1) for i in starts)


SPP_CAPTION_CHARS = 190  # caption line length that fits the three-panel figure's width


def plot_spp(
    frame: pd.DataFrame,
    *,
    hue: str = "model",
    title: str | None = None,
    band: bool = True,
    theory: bool = True,
    models: Sequence[str] | None = None,
    caption: str | None = None,
) -> Figure:
    """Signal-propagation plot in the style of paper A's Figure 1.

    Three panels (average channel squared mean, average channel variance, residual average
    channel variance) against block position (0 = stem, block i at i + 1), one solid line per
    ``hue`` value (the mean over seeds, with a min-max band when there are several seeds and
    ``band``), dotted vertical lines at stage transitions, a log y axis on every panel whose
    values span more than a decade, and on the variance panel each family's expected variance
    dashed, from the first block on, only where the frame has one (one black line when all
    models share it, else one per model in its colour).

    ``frame``: the raw frame of :func:`sigprop.spp.signal_propagation` (or its summary, with a
    ``mean`` column): columns ``hue, index, stage, stat`` and ``value``, optionally
    ``expected_var``, ``input``, ``tiny_map``, ``map_size`` and ``pool_factor``. Blocks on tiny
    feature maps are shaded grey; a caption under the panels says which input was used, where
    maps are tiny and where the expectation is left out and why, then ``caption``. ``title``
    defaults to :func:`spp_title` (input, input shape and seeds, from the frame); "" for none.
    """
    value = _value_column(frame)
    names = list(models) if models is not None else list(dict.fromkeys(frame[hue]))
    colours = dict(zip(names, sns.color_palette(PALETTE, max(len(names), 1))))
    fig = Figure(figsize=(5.0 * len(SPP_PANELS), 4.2), layout="constrained")
    axes = fig.subplots(1, len(SPP_PANELS))

    boundaries = {name: _stage_starts(frame[frame[hue] == name]) for name in names}
    shared_boundaries = len(set(boundaries.values())) <= 1
    spans = {name: _tiny_span(frame[frame[hue] == name]) for name in names}
    spans = {name: span for name, span in spans.items() if span is not None}

    for ax, (stat, heading) in zip(axes, SPP_PANELS):
        rows = frame[frame["stat"] == stat]
        for name in names:
            sub = rows[rows[hue] == name]
            if sub.empty:
                continue
            per_block = sub.groupby("index")[value].agg(["mean", "min", "max", "count"])
            x = per_block.index.to_numpy() + 1
            ax.plot(x, per_block["mean"], color=colours[name], lw=1.6, label=str(name))
            if band and per_block["count"].max() > 1:
                ax.fill_between(x, per_block["min"], per_block["max"], color=colours[name],
                                alpha=0.2, lw=0)
        if stat == "var" and theory and "expected_var" in rows:
            _plot_theory(ax, rows, hue, names, colours)
        for name in names:
            colour = "0.5" if shared_boundaries else colours[name]
            for x in boundaries[name]:
                ax.axvline(x - 0.5, color=colour, ls=":", lw=1.0, alpha=0.8, zorder=0)
            if shared_boundaries:
                break
        side = _tiny_threshold()
        shared_span = len(set(spans.values())) == 1 and shared_boundaries
        for name, (start, stop) in spans.items():
            # grey when every model has the same tiny blocks, else in the model's colour
            colour, alpha = ("0.85", 0.5) if shared_span else (colours[name], 0.12)
            text = f"tiny maps (< {side}x{side})"
            ax.axvspan(start - 0.5, stop + 0.5, color=colour, alpha=alpha, lw=0, zorder=0,
                       label=text if shared_span else f"{name}: {text}")
            if shared_span:
                break
        values = rows[value].to_numpy(dtype=float)
        if _spans_decades(values):
            ax.set_yscale("log")
            _plain_log_labels(ax, values)
        ax.set_title(heading)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
        ax.set_xlabel("block (0 = stem)")
        ax.set_ylabel(heading.lower())
        ax.grid(alpha=0.3, lw=0.5)
    axes[1].legend(fontsize="small", frameon=False)
    title = spp_title(frame) if title is None else title
    if title:
        fig.suptitle(title)
    text = spp_caption(frame, hue, names) + ([caption] if caption else [])
    if text:
        import textwrap

        wrapped = [textwrap.fill(line, SPP_CAPTION_CHARS) for line in text]
        fig.supxlabel("\n".join(wrapped), fontsize="small", ha="left", x=0.01, ma="left")
    return fig


def spp_title(frame: pd.DataFrame) -> str | None:
    """"Signal propagation at init on i.i.d. N(0,1) noise, input 8x3x128x128, 3 seeds (band:
    min-max)" from what the frame holds; None when it holds none of it (older frames)."""
    parts = []
    if "input" in frame and frame["input"].notna().any():
        from sigprop.spp import INPUT_TITLES

        kinds = [INPUT_TITLES.get(k, str(k)) for k in dict.fromkeys(frame["input"].dropna())]
        parts.append(f"Signal propagation at init on {', '.join(kinds)}")
    if "input_shape" in frame and frame["input_shape"].notna().any():
        parts.append(f"input {', '.join(map(str, dict.fromkeys(frame['input_shape'].dropna())))}")
    if "seed" in frame and frame["seed"].nunique() > 1:
        parts.append(f"{frame['seed'].nunique()} seeds (band: min-max)")
    elif "seed" in frame and frame["seed"].nunique() == 1:
        parts.append("1 seed")
    if not parts:
        return None
    if not parts[0].startswith("Signal"):
        parts.insert(0, "Signal propagation at init")
    return ", ".join(parts)


def _tiny_threshold() -> int:
    from sigprop.spp import TINY_MAP

    return TINY_MAP


def _tiny_span(frame: pd.DataFrame) -> tuple[float, float] | None:
    """x of the first and last tiny-map block of one model (maps only shrink, so every
    block between is tiny too), or None."""
    if "tiny_map" not in frame:
        return None
    tiny = frame[frame["tiny_map"].eq(True) & (frame["index"] >= 0)]
    if tiny.empty:
        return None
    return float(tiny["index"].min() + 1), float(tiny["index"].max() + 1)


def spp_caption(frame: pd.DataFrame, hue: str = "model", names: Sequence | None = None) -> list:
    """Caption lines of an SPP plot: the input, tiny feature maps, and every model whose
    expectation is left out somewhere, with the reason."""
    names = list(dict.fromkeys(frame[hue])) if names is None else list(names)
    lines = []
    if "input" in frame:
        from sigprop.spp import INPUT_TITLES

        kinds = [INPUT_TITLES.get(k, str(k)) for k in dict.fromkeys(frame["input"])]
        lines.append(f"Input: {', '.join(kinds)}.")
    if _tiny_span(frame) is not None:
        tiny = frame[frame["tiny_map"].eq(True) & (frame["index"] >= 0)]
        smallest = int(tiny["map_size"].min())
        lines.append(
            f"Shaded: feature maps under {_tiny_threshold()}x{_tiny_threshold()} (down to "
            f"{smallest}x{smallest}); zero padding is a large part of each 3x3 window there, so "
            "the residual variance falls below 1 and the variance below the expectation."
        )
    if "expected_var" in frame and "pool_factor" in frame:
        blocks = frame[(frame["stat"] == "var") & (frame["index"] >= 0)]
        for name in names:
            sub = blocks[blocks[hue] == name]
            known = sub["expected_var"].notna()
            factors = sub["pool_factor"].dropna()
            if known.all() or factors.empty:
                continue
            first = sub.loc[~known, "index"].min() + 1
            low, high = f"{factors.min():.2f}", f"{factors.max():.2f}"
            lines.append(
                f"{name}: no expectation from block {first} on: its 2x2 avg-pool shortcuts "
                f"keep {low if low == high else low + '-' + high} of the variance on this "
                "input (the bookkeeping assumes about 1, true only for spatially smooth input); "
                "the blocks after see a smaller variance than their beta assumes."
            )
    return lines


def _plot_theory(ax, rows: pd.DataFrame, hue: str, names: list, colours: dict) -> None:
    curves = {}
    for name in names:
        sub = rows[(rows[hue] == name) & (rows["index"] >= 0)]
        if sub["expected_var"].notna().sum() == 0:
            continue
        # NaN (no expectation) stays NaN, so the line breaks there
        expected = sub.groupby("index")["expected_var"].agg(lambda v: v.mean(skipna=False))
        curves[name] = (tuple(expected.index + 1), tuple(expected.to_numpy()))
    if not curves:
        return
    def marker(y: tuple) -> str | None:  # a line of one or two points would be invisible
        return "_" if np.isfinite(np.asarray(y, dtype=float)).sum() <= 2 else None

    if len(set(curves.values())) == 1:
        x, y = next(iter(curves.values()))
        ax.plot(x, y, color="black", ls="--", lw=1.2, marker=marker(y), ms=10,
                label="expected 1 + k\u00b7\u03b1\u00b2")
        return
    for name, (x, y) in curves.items():
        ax.plot(x, y, color=colours[name], ls="--", lw=1.2, marker=marker(y), ms=10,
                label=f"{name} expected")

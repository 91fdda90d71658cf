"""Signal-propagation figure (paper A, Figure 1 style) of the SPP frame of ``sigprop.spp``.

Paper A: Brock, De and Smith, "Characterizing signal propagation to close the performance gap
in unnormalized ResNets", ICLR 2021, arXiv 2101.08692.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FuncFormatter,
    MaxNLocator,
)

SPP_PANELS = (
    ("sq_mean", "Average channel squared mean"),
    ("var", "Average channel variance"),
    ("res_var", "Residual average channel variance"),
)
# Every panel of every model gets a log axis (the statistics are positive and the interesting
# changes are factors), and a window spanning at least MIN_SPAN: a profile flat to 0.1%
# (a custom MLP's 0.3381-0.3386) then looks flat instead of filling the panel, while a 10%
# deviation still moves the line by a tenth of the panel.
MIN_SPAN = 3.0
# The one rule of the caption's deviation list: the mean over seeds off its expectation by
# more than this (the variance against the dashed line, the residual variance against 1).
DEVIATION_TOLERANCE = 0.10
# Okabe & Ito's colour-blind safe palette, ordered so the first four hues differ most (orange
# and vermilion, alike for most readers, meet only from six models on); each model also gets
# its own marker, a second cue that survives greyscale printing.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000",
             "#F0E442")
SPP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MARKS_PER_LINE = 12  # markers along one line, so a 600-block line is not a row of symbols


def _value_column(frame: pd.DataFrame) -> str:
    if "value" in frame:
        return "value"
    if "mean" in frame:
        return "mean"
    raise ValueError("the frame needs a 'value' (raw) or 'mean' (summary) column")


def _log_axis(ax, values: np.ndarray) -> None:
    """A log y axis whose window spans at least ``MIN_SPAN`` around ``values`` (centred on
    their geometric middle); linear only when some value is not positive."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or (finite <= 0).any():
        return
    ax.set_yscale("log")
    low, high = float(finite.min()), float(finite.max())
    if high / low < MIN_SPAN:
        middle, half = math.sqrt(low * high), math.sqrt(MIN_SPAN)
        low, high = middle / half, middle * half
        ax.set_ylim(low, high)
    _plain_log_labels(ax, low, high)


def _plain_log_labels(ax, low: float, high: float) -> None:
    """Tick labels like 0.4, 1, 2 instead of 4x10^-1 on log axes; minor ticks labelled when
    the axis spans under three decades (all of them under one, where majors are scarce)."""
    decades = math.log10(high / low)
    labelled = (set(range(2, 10)) if decades < 0.7 else {2, 3, 4, 6} if decades < 1.5
                else {2, 5} if decades < 2.5 else set())

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
    ``hue`` value in its Okabe-Ito colour and marker (the mean over seeds, with a min-max band
    when there are several seeds that differ and ``band``), dotted vertical lines at stage
    transitions, a log y axis on every panel spanning at least ``MIN_SPAN`` (the same scale
    for every model, so a flat profile looks flat), and on the variance panel each family's
    expected variance dashed, from the first block on, only where the frame has one (one
    black line when all models share it, else one per model in its colour). The legend sits
    right of the panels, over no data.

    ``frame``: the raw frame of :func:`sigprop.spp.signal_propagation` (or its summary, with a
    ``mean`` column): columns ``hue, index, stage, stat`` and ``value``, optionally
    ``expected_var``, ``input``, ``tiny_map``, ``map_size`` and ``pool_factor``. Blocks on tiny
    feature maps are shaded grey; a caption under the panels says which input was used, where
    maps are tiny, where the expectation is left out and why, every block off the theory by
    more than ``DEVIATION_TOLERANCE`` (:func:`spp_deviations`), then ``caption``. ``title``
    defaults to :func:`spp_title` (input, input shape and what the seeds varied, from the
    frame); "" for none.
    """
    value = _value_column(frame)
    names = list(models) if models is not None else list(dict.fromkeys(frame[hue]))
    colours = {name: OKABE_ITO[i % len(OKABE_ITO)] for i, name in enumerate(names)}
    markers = {name: SPP_MARKERS[i % len(SPP_MARKERS)] for i, name in enumerate(names)}
    fig = Figure(figsize=(5.0 * len(SPP_PANELS) + 2.2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(SPP_PANELS))

    boundaries = {name: _stage_starts(frame[frame[hue] == name]) for name in names}
    shared_boundaries = len(set(boundaries.values())) <= 1
    spans = {name: _tiny_span(frame[frame[hue] == name]) for name in names}
    spans = {name: span for name, span in spans.items() if span is not None}
    legend: dict[str, object] = {}

    for ax, (stat, heading) in zip(axes, SPP_PANELS):
        rows = frame[frame["stat"] == stat]
        drawn = [rows[value].to_numpy(dtype=float)]
        for name in names:
            sub = rows[rows[hue] == name]
            if sub.empty:
                continue
            per_block = sub.groupby("index")[value].agg(["mean", "min", "max", "count"])
            x = per_block.index.to_numpy() + 1
            ax.plot(x, per_block["mean"], color=colours[name], lw=1.6, label=str(name),
                    marker=markers[name], ms=4.5, markevery=max(1, len(x) // MARKS_PER_LINE))
            # seeds that change nothing (a fixed module and batch) would draw a band of width 0
            spread = (per_block["max"] - per_block["min"]).abs().max() > 0
            if band and per_block["count"].max() > 1 and spread:
                ax.fill_between(x, per_block["min"], per_block["max"], color=colours[name],
                                alpha=0.2, lw=0)
        if stat == "var" and theory and "expected_var" in rows:
            _plot_theory(ax, rows, hue, names, colours)
            drawn.append(rows.loc[rows["index"] >= 0, "expected_var"].to_numpy(dtype=float))
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
        _log_axis(ax, np.concatenate(drawn))
        ax.set_title(heading)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
        ax.set_xlabel("block (0 = stem)")
        ax.set_ylabel(heading.lower())
        ax.grid(alpha=0.3, lw=0.5)
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    if legend:
        # beside the panels, not in one: a 600-block profile leaves no empty corner
        fig.legend(list(legend.values()), list(legend), loc="outside right upper",
                   fontsize="small", frameon=False)
    title = spp_title(frame) if title is None else title
    if title:
        fig.suptitle(title)
    text = spp_caption(frame, hue, names) + ([caption] if caption else [])
    if text:
        import textwrap

        wrapped = [textwrap.fill(line, SPP_CAPTION_CHARS, break_on_hyphens=False)
                   for line in text]
        fig.supxlabel("\n".join(wrapped), fontsize="small", ha="left", x=0.01, ma="left")
    return fig


# What a frame's seeds changed, from ``frame.attrs["seeds_vary"]`` (set by
# ``sigprop.spp.signal_propagation``); frames without it (older files) say only the count.
SEEDS_VARY = {
    "init and input": "{n} seeds, each a fresh init and input batch (band: min-max)",
    "init": "{n} seeds vary only the init (band: min-max)",
    "input": "{n} seeds vary only the input (band: min-max)",
    "nothing": "{n} seeds, identical values: the seeds vary nothing",
}


def _seeds_identical(frame: pd.DataFrame) -> bool:
    """Whether every (model, block, stat) has the same value under every seed."""
    value = _value_column(frame)
    keys = [k for k in ("model", "index", "stat") if k in frame]
    spread = frame.groupby(keys, dropna=False)[value].agg(lambda v: v.max() - v.min())
    return bool(len(spread)) and bool((spread.fillna(0) == 0).all())


def spp_title(frame: pd.DataFrame) -> str | None:
    """"Signal propagation at init on i.i.d. N(0,1) noise, input 8x3x128x128, 3 seeds, each a
    fresh init and input batch (band: min-max)" from what the frame holds; "on a fixed batch"
    and "seeds vary only the init" when the caller gave the batch, "the seeds vary nothing"
    when every seed measured the same; None when it holds none of it (older frames)."""
    parts = []
    varied = frame.attrs.get("seeds_vary")
    if varied in ("init", "nothing"):
        parts.append("Signal propagation at init on a fixed batch")
    elif "input" in frame and frame["input"].notna().any():
        from sigprop.spp import INPUT_TITLES

        kinds = [INPUT_TITLES.get(k, str(k)) for k in dict.fromkeys(frame["input"].dropna())]
        parts.append(f"Signal propagation at init on {', '.join(kinds)}")
    if "input_shape" in frame and frame["input_shape"].notna().any():
        parts.append(f"input {', '.join(map(str, dict.fromkeys(frame['input_shape'].dropna())))}")
    if "seed" in frame and frame["seed"].nunique() > 1:
        n = frame["seed"].nunique()
        if _seeds_identical(frame):
            varied = "nothing"
        parts.append(SEEDS_VARY[varied].format(n=n) if varied in SEEDS_VARY
                     else f"{n} seeds (band: min-max)")
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
    return lines + spp_deviations(frame, hue, names)


MAX_RUNS = 4  # more runs of consecutive deviating blocks than this: summarised per stage


def _runs(xs: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for x in sorted(xs):
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return runs


def _run_count(xs: Sequence[int]) -> int:
    return len(_runs([int(x) for x in xs]))


def _block_ranges(xs: Sequence[int]) -> str:
    """"block 1", "blocks 1-3, 6": runs of consecutive block positions."""
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in _runs(xs))
    return ("block " if len(xs) == 1 else "blocks ") + text


def _span(values: Sequence[float], fmt: str) -> str:
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low} to {high}" if fmt.endswith("%") else f"{low}-{high}"


def spp_deviations(frame: pd.DataFrame, hue: str = "model",
                   names: Sequence | None = None) -> list[str]:
    """Caption lines for every block off the theory, by one rule: at each block where the
    expectation is drawn (``expected_var`` known), the mean over seeds of the variance is off
    ``expected_var``, or that of the residual variance off 1, by more than
    ``DEVIATION_TOLERANCE``. One line stating the rule, then one per model that has any (block
    positions as on the x axis, stem = 0); nothing when all blocks hold."""
    if "expected_var" not in frame or "index" not in frame:
        return []
    value = _value_column(frame)
    names = list(dict.fromkeys(frame[hue])) if names is None else list(names)
    blocks = frame[(frame["index"] >= 0) & frame["stat"].isin(("var", "res_var"))]
    found = []
    for name in names:
        sub = blocks[blocks[hue] == name]
        var = sub[sub["stat"] == "var"]
        expected = var.groupby("index")["expected_var"].agg(lambda v: v.mean(skipna=False))
        expected = expected[expected.notna() & (expected > 0)]
        if expected.empty:
            continue
        means = sub.groupby(["stat", "index"])[value].mean()
        tiny = (set(sub.loc[sub["tiny_map"].eq(True), "index"]) if "tiny_map" in sub
                else set())
        parts, shaded = [], set()
        for stat, words, reference in (("var", "variance", expected),
                                       ("res_var", "residual variance", None)):
            if stat not in means.index.get_level_values(0):
                continue
            measured = means[stat].reindex(expected.index).dropna()
            rel = measured / (expected.loc[measured.index] if reference is not None else 1) - 1
            off = rel[rel.abs() > DEVIATION_TOLERANCE]
            if off.empty:
                continue
            shown = off if stat == "var" else measured[off.index]
            fmt = "+.0%" if stat == "var" else ".2f"
            if _run_count(off.index) <= MAX_RUNS:
                parts.append(f"{words} {_span(shown.tolist(), fmt)} at "
                             f"{_block_ranges([int(i) + 1 for i in off.index])}")
            else:  # scattered (a noisy single seed, a 600-block net): per stage
                stage = (var.groupby("index")["stage"].first() if "stage" in var
                         else pd.Series(0, index=expected.index))
                pieces = []
                for number, in_stage in shown.groupby(stage.reindex(shown.index)):
                    blocks = stage.index[stage == number] + 1
                    pieces.append(f"stage {int(number)} (blocks {blocks.min()}-{blocks.max()}) "
                                  f"{len(in_stage)} at {_span(in_stage.tolist(), fmt)}")
                parts.append(f"{words} off at {len(off)} blocks: {', '.join(pieces)}")
            shaded |= set(off.index) & tiny
        if parts:
            note = f" ({len(shaded)} of them shaded)" if shaded else ""
            found.append(f"{name}: {'; '.join(parts)}{note}.")
    if not found:
        return []
    rule = (f"Off the theory (the mean over seeds more than {DEVIATION_TOLERANCE:.0%} from "
            "it at a block with a dashed expectation: the variance from the dashed line, the "
            "residual variance from 1):")
    return [rule, *found]


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

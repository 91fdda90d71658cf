"""Shared look of the report figures: labels, palettes, axes helpers and the figure style.

Every figure module draws with these, so that one setting reads the same everywhere:
``label`` gives a column's axis label with its unit, ``clipping_label`` and ``pretty_model``
the names of settings ("AGC λ=0.01", "NF-ResNet-26"), ``palette_for`` the colours (seaborn's
colour-blind-safe "colorblind" palette for categories, viridis for ordered numbers),
``LINESTYLES``/``MARKERS`` the second grouping (so no figure relies on colour alone), and
``styled`` the font sizes. Accuracy is a fraction in [0, 1] drawn as a percentage
(``CompactPercent``); diverged runs are crosses (``mark_diverged``, ``diverged_handle``).

Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot: no global figure
state, nothing to close, and ``fig.savefig`` renders with the Agg backend whatever backend the
session uses.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    NullLocator,
    PercentFormatter,
)

# the project's one "is a number" test; its default (finite only) is what a figure or a table
# wants, and the report modules take it from here
from ablations.claims import is_number

PALETTE = "colorblind"
SEQUENTIAL = "viridis"  # perceptually uniform and colour-blind safe, for ordered values
GRADIENT_CMAP = "magma"
DIVERGED_MARK = "X"
DIVERGED_GREY = "#bdbdbd"
DIVERGED_LINE = "#56B4E9"  # sky blue: stands out on every colour of magma
ZERO_COLOUR = "#009E73"  # bluish green, likewise
MISSING_COLOUR = "#e0e0e0"
CHANCE_COLOUR = "#636363"
CHANCE_STYLE = (0, (1.5, 2.5))  # dotted, distinct from the dashed second grouping
HEAD_LABEL = "head"  # the probe's "other" group: classifier and final layers after the blocks
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
FRACTION_COLUMNS = ("final_acc", "best_acc", "test_acc")
LABELS = {
    "batch_size": "batch size (examples)",
    "clip.threshold": "clipping threshold λ",
    "clip.mode": "clipping mode",
    "clipping": "clipping",
    "clip.clip_classifier": "classifier clipped",
    "model.name": "model",
    "model": "model",
    "model.alpha": "α (variance added per block)",
    "model.skipinit_gain": "SkipInit gain at init",
    "seed": "seed",
    "lr": "learning rate",
    "base_lr": "base learning rate (per 256 examples)",
    "final_acc": "final test accuracy",
    "best_acc": "best test accuracy",
    "test_acc": "test accuracy",
    "step": "training step (updates)",
    "epoch": "epoch",
    "loss": "training loss",
    "max_grad_norm": "max gradient norm",
    "clip_fraction": "clipped fraction",
    "grad_norm": "parameter gradient norm",
    "grad_out_norm": "output gradient norm",
}
MODE_NAMES = {"none": "no clipping", "norm": "global norm", "agc": "AGC"}


STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "legend.title_fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
}


def styled(func: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the report style without touching the caller's rcParams."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return func(*args, **kwargs)

    return wrapper


class CompactPercent(PercentFormatter):
    """Fractions as percentages with only the decimals a tick needs: 46%, 45.5%, 44.25%."""

    def __init__(self) -> None:
        super().__init__(xmax=1.0)

    def format_pct(self, x: float, display_range: float) -> str:
        text = f"{self.convert_to_pct(x):.2f}".rstrip("0").rstrip(".")
        return f"{'0' if text == '-0' else text}%"


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (the form the report embeds)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def label(key: str) -> str:
    """Axis label of a column, with its unit where it has one."""
    if key in LABELS:
        return LABELS[key]
    return key.removeprefix("model.").replace("_", " ").replace(".", " ")


def pretty_model(name: Any) -> str:
    """'nf_resnet26' -> 'NF-ResNet-26', 'bn_resnet50_v2' -> 'BN-ResNet-50 v2'."""
    text = str(name)
    match = re.fullmatch(r"(nf|bn)_resnet(\d+)(?:_(v\d))?", text)
    if match:
        family, depth, version = match.groups()
        return f"{family.upper()}-ResNet-{depth}" + (f" {version}" if version else "")
    match = re.fullmatch(r"nfnet_f(\d+)", text)
    return f"NFNet-F{match.group(1)}" if match else text


def clipping_label(mode: Any, threshold: Any) -> str:
    """'AGC λ=0.01', 'global norm λ=1', 'no clipping'."""
    if not isinstance(mode, str) or mode == "none":
        return MODE_NAMES["none"]
    name = MODE_NAMES.get(mode, mode)
    return f"{name} λ={threshold:g}" if is_number(threshold) else name


def fmt_value(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if is_number(value):
        return f"{value:g}"
    return str(value)


def palette_for(values: Sequence) -> dict:
    """Ordered numbers get a sequential palette (the order is the message), else colorblind."""
    if len(values) >= 4 and all(is_number(v) for v in values):
        cmap = matplotlib.colormaps[SEQUENTIAL]
        colours = [cmap(x) for x in np.linspace(0.0, 0.85, len(values))]
    else:
        colours = sns.color_palette(PALETTE, max(len(values), 1))
    return dict(zip(values, colours))


def positions(values: Sequence) -> tuple[Callable[[Any], float], str]:
    """Map x values to plot positions: log2 for spread positive numbers, else categorical."""
    numeric = all(is_number(v) for v in values)
    if numeric and values and min(values) > 0 and max(values) / min(values) >= 4:
        return float, "log2"
    if numeric:
        return float, "linear"
    index = {v: i for i, v in enumerate(values)}
    return lambda v: float(index[v]), "category"


def set_x_axis(ax: Any, values: Sequence, scale: str, key: str) -> None:
    if scale == "log2":
        ax.set_xscale("log", base=2)
    if scale == "category":
        ax.xaxis.set_major_locator(FixedLocator(list(range(len(values)))))
    else:
        ax.xaxis.set_major_locator(FixedLocator([float(v) for v in values]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([fmt_value(v) for v in values])
    ax.set_xlabel(label_with(key, "log₂ scale") if scale == "log2" else label(key))


def label_with(key: str, note: str) -> str:
    """The label with a note in its parentheses: "batch size (examples, log₂ scale)", not
    "batch size (examples) (log₂ scale)"."""
    text = label(key)
    if text.endswith(")") and "(" in text:
        return f"{text[:-1]}, {note})"
    return f"{text} ({note})"


def draw_chance(ax: Any, chance: float | None) -> None:
    """A dotted grey line at chance accuracy, on an accuracy axis that starts at 0."""
    if chance is None:
        return
    ax.axhline(chance, color=CHANCE_COLOUR, linestyle=CHANCE_STYLE, linewidth=1.3, zorder=1,
               gid="chance")


def chance_handle(chance: float) -> Line2D:
    return Line2D([], [], color=CHANCE_COLOUR, linestyle=CHANCE_STYLE, linewidth=1.3,
                  label=f"chance ({chance:.0%})" if chance * 100 == round(chance * 100)
                  else f"chance ({chance:.1%})")


def value_limits(ax: Any, value: str, chance: float | None, highest: float,
                 margin: float) -> None:
    """The limits of a ``value`` axis: an accuracy's from 0 to just above ``highest``, with
    chance dotted; any other's with a ``margin``."""
    if value in FRACTION_COLUMNS:
        draw_chance(ax, chance)
        accuracy_limits(ax, highest)
    else:
        ax.margins(y=margin)


def chance_handles(value: str, chance: float | None) -> list[Line2D]:
    """The legend entry of the chance line :func:`value_limits` draws, if it draws one."""
    return [chance_handle(chance)] if chance is not None and value in FRACTION_COLUMNS else []


def accuracy_limits(ax: Any, highest: float | None = None) -> None:
    """An accuracy axis from 0 (so gaps read as proportions) to just above the best value."""
    top = 1.0 if highest is None or not np.isfinite(highest) else min(1.0, highest * 1.08)
    ax.set_ylim(0.0, max(top, 0.1) + 0.02)


def log_ticks(vmin: float, vmax: float) -> list[float]:
    """At least three readable ticks on a log scale: decades when it spans three or more,
    else 1-2-5 steps, else evenly spaced values rounded to two significant digits."""
    low, high = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax))
    for mantissas in ((1.0,), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
        ticks = [m * 10.0**e for e in range(low, high + 1) for m in mantissas]
        ticks = [v for v in ticks if vmin <= v <= vmax]
        if len(ticks) >= 3:
            return ticks if len(ticks) <= 8 else ticks[:: math.ceil(len(ticks) / 8)]
    return sorted({float(f"{v:.2g}") for v in np.geomspace(vmin, vmax, 4)})


def fmt_tick(value: float) -> str:
    """0.001, 0.02, 1.5, 20, 3e+04: plain numbers where they stay short."""
    return f"{value:g}"


def block_name(block: Any) -> str:
    """The probe's "other" group holds the parameters after the last block: the head."""
    return HEAD_LABEL if block == "other" else str(block)


def set_value_axis(ax: Any, value: str, axis: str = "y") -> None:
    target = ax.yaxis if axis == "y" else ax.xaxis
    if value in FRACTION_COLUMNS:
        target.set_major_formatter(CompactPercent())
        target.set_label_text(f"{label(value)} (%)")
    else:
        target.set_label_text(label(value))


def mark_diverged(ax: Any, x: float, count: int, colour: Any, where: str = "bottom") -> None:
    """A cross at data x, pinned to the bottom (accuracy) or top (loss) of the axes."""
    y = 0.035 if where == "bottom" else 0.965
    transform = ax.get_xaxis_transform()
    ax.plot([x], [y], marker=DIVERGED_MARK, markersize=10, color=colour, markeredgecolor="black",
            markeredgewidth=0.6, linestyle="none", transform=transform, clip_on=False,
            gid="diverged", zorder=5)
    if count > 1:
        ax.annotate(f"{count}", (x, y), xycoords=transform, xytext=(6, 2 if where == "bottom"
                    else -10), textcoords="offset points", fontsize=9, color="black")


def draw_divergence(ax: Any, step: float) -> None:
    """The dashed line at the step a run diverged, on a step axis."""
    ax.axvline(step, color=DIVERGED_LINE, linestyle="--", linewidth=2.5, gid="diverged")


def divergence_handle() -> Line2D:
    return Line2D([], [], color=DIVERGED_LINE, linestyle="--", linewidth=2.5,
                  label="divergence step")


def diverged_handle() -> Line2D:
    return Line2D([], [], marker=DIVERGED_MARK, color="grey", markeredgecolor="black",
                  markeredgewidth=0.6, linestyle="none", markersize=9, label="diverged run")


def new_figure(nrows: int, ncols: int, width: float, height: float,
               sharey: bool | str = False, sharex: bool | str = False) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey, sharex=sharex)
    return fig, axes


def panel_width(n: int, each: float, legend: float = 2.4) -> float:
    return min(max(each * n + legend, 7.0), 15.0)


def panel_figure(nrows: int, ncols: int, each: float, legend: float, height: float,
                 sharey: bool | str = False, sharex: bool | str = False,
                 ) -> tuple[Figure, np.ndarray]:
    """:func:`new_figure` of ``ncols`` panels ``each`` inches wide beside a ``legend`` inches
    wide (:func:`panel_width`), ``height`` inches tall in all."""
    return new_figure(nrows, ncols, panel_width(ncols, each, legend), height, sharey=sharey,
                      sharex=sharex)


def gids_of(fig: Figure, gid: str) -> list:
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]

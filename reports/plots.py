"""Plot functions of sigprop's tidy frames; each returns a matplotlib Figure.

Signal propagation (``plot_spp``, from the SPP frame of ``sigprop.spp``) and the figures of
an ablation grid, drawn only from the frames of ``ablations.store.load_results``.

Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot: no global figure
state, nothing to close, and ``fig.savefig`` renders with the Agg backend whatever backend the
session uses. Colours come from seaborn's colour-blind-safe palette.

The grid figures take the documented frames (``runs``, ``metrics``, ``blocks``). Defaults come
from what the grid varied (the ``axes`` column): the clipping mode and threshold are shown
together as one "clipping" setting ("AGC λ=0.01"), model names are shown by family
("NF-ResNet-26"), and any varied axis a figure does not map to x, hue or style becomes a panel
column, so seeds are the only thing ever averaged over. Every function also takes explicit
x / hue / col choices: raw dotted keys (``clip.threshold``) or the derived ``clipping`` and
``model`` columns.

Accuracy is a fraction in [0, 1] and is drawn as a percentage. Means are over the completed
seeds of a setting; the band spans their min to max. Diverged runs are never averaged in: they
are drawn as crosses and counted (a strip under the accuracy plot, the top of loss axes, hatched
heatmap cells).

Colours: seaborn's "colorblind" palette for categories, viridis for ordered numbers (thresholds,
alphas, block depth) and accuracy, magma for gradient norms; line styles and markers carry the
second grouping, so no figure relies on colour alone.
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
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
    PercentFormatter,
)

from ablations.spec import THRESHOLD_MODES
from sigprop.errors import UserError

PALETTE = "colorblind"
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
    maps are tiny and where the expectation is left out and why, then ``caption``.
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
        ax.set_xlabel("block (0 = stem)")
        ax.set_ylabel(heading.lower())
        ax.grid(alpha=0.3, lw=0.5)
    axes[1].legend(fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    text = spp_caption(frame, hue, names) + ([caption] if caption else [])
    if text:
        import textwrap

        wrapped = [textwrap.fill(line, SPP_CAPTION_CHARS) for line in text]
        fig.supxlabel("\n".join(wrapped), fontsize="small", ha="left", x=0.01, ma="left")
    return fig


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


# ----------------------------------------------------------------------------- grid figures

PENDING = ("queued", "running", "interrupted")
SEQUENTIAL = "viridis"  # perceptually uniform and colour-blind safe, for ordered values
GRADIENT_CMAP = "magma"
DIVERGED_MARK = "X"
DIVERGED_GREY = "#bdbdbd"
DIVERGED_LINE = "#56B4E9"  # sky blue: stands out on every colour of magma
ZERO_COLOUR = "#009E73"  # bluish green, likewise
MISSING_COLOUR = "#e0e0e0"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
FRACTION_COLUMNS = ("final_acc", "best_acc", "test_acc")
# Axes listed first are the ones a reader looks for first; the rest follow alphabetically.
AXIS_PRIORITY = (
    "batch_size", "clip.mode", "clip.threshold", "model.name", "model.alpha",
    "clip.clip_classifier", "lr", "base_lr", "data", "epochs", "seed",
)
DERIVED_FROM = {"clipping": ("clip.mode", "clip.threshold"), "model": ("model.name",)}
LABELS = {
    "batch_size": "batch size (examples)",
    "clip.threshold": "clipping threshold λ",
    "clip.mode": "clipping mode",
    "clipping": "clipping",
    "clip.clip_classifier": "classifier clipped",
    "model.name": "model",
    "model": "model",
    "model.alpha": "α (variance added per block)",
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
MODE_RANK = {"none": 0, "norm": 1, "agc": 2}
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


# ----------------------------------------------------------------------------- columns


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


def is_number(value: Any) -> bool:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool | np.bool_) and math.isfinite(value))


def fmt_value(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if is_number(value):
        return f"{value:g}"
    return str(value)


def with_derived(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``clipping`` and ``model`` columns and numeric summary metrics."""
    frame = runs.copy()
    if "clip.mode" in frame:
        thresholds = frame["clip.threshold"] if "clip.threshold" in frame else [None] * len(frame)
        frame["clipping"] = [clipping_label(m, t) for m, t in zip(frame["clip.mode"], thresholds)]
    if "model.name" in frame:
        names = frame["model.name"].map(pretty_model)
        if "model_label" in frame:  # the model as built (a shape when overridden)
            names = frame["model_label"].where(frame["model_label"].notna(), names)
        frame["model"] = names
    for column in ("final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
                   "steps_done", "duration_s"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    if "status" not in frame:
        frame["status"] = "completed"
    return frame


def varied_axes(runs: pd.DataFrame) -> list[str]:
    """The dotted keys the grid varied (union of the ``axes`` column), most telling first."""
    found: set[str] = set()
    if "axes" in runs:
        for axes in runs["axes"]:
            if isinstance(axes, list | tuple | np.ndarray):
                found.update(str(a) for a in axes)
    rank = {key: i for i, key in enumerate(AXIS_PRIORITY)}
    return sorted(found, key=lambda k: (rank.get(k, len(rank)), k))


def setting_axes(runs: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """Varied axes other than the seed, as shown: clip mode/threshold -> ``clipping``,
    ``model.name`` -> ``model``, unless a raw key is excluded (then the other stays raw)."""
    excluded = set(exclude)
    for derived, raw in DERIVED_FROM.items():
        if derived in excluded:
            excluded.update(raw)
    out: list[str] = []
    for key in varied_axes(runs):
        if key == "seed" or key in excluded:
            continue
        shown = key
        for derived, raw in DERIVED_FROM.items():
            if key in raw and not excluded & set(raw):
                shown = derived
        if shown not in out and shown not in excluded and shown in runs:
            out.append(shown)
    return out


def sort_key(column: str) -> Callable[[Any], Any]:
    if column == "clipping":
        def clipping_rank(text: Any) -> tuple:
            text = str(text)
            mode = next((m for m, name in MODE_NAMES.items() if text.startswith(name)), text)
            threshold = re.search(r"λ=([0-9.eE+-]+)", text)
            return MODE_RANK.get(mode, 9), float(threshold.group(1)) if threshold else 0.0
        return clipping_rank
    if column == "clip.mode":
        return lambda v: (MODE_RANK.get(v, 9), 0.0, str(v))
    return lambda v: (0, float(v), "") if is_number(v) else (1, 0.0, str(v))


def ordered_values(frame: pd.DataFrame, column: str) -> list:
    values = [v for v in frame[column].dropna().unique()] if column in frame else []
    return sorted(values, key=sort_key(column))


def palette_for(values: Sequence) -> dict:
    """Ordered numbers get a sequential palette (the order is the message), else colorblind."""
    if len(values) >= 4 and all(is_number(v) for v in values):
        cmap = matplotlib.colormaps[SEQUENTIAL]
        colours = [cmap(x) for x in np.linspace(0.0, 0.85, len(values))]
    else:
        colours = sns.color_palette(PALETTE, max(len(values), 1))
    return dict(zip(values, colours))


def dependent_on(frame: pd.DataFrame, chosen: Sequence[str], candidates: Sequence[str]) -> list:
    """Candidates that still vary once the chosen columns are fixed (tied axes drop out)."""
    chosen = [c for c in chosen if c in frame]
    out = []
    for column in candidates:
        if column in chosen or column not in frame:
            continue
        if chosen:
            spread = frame.groupby(chosen, dropna=False)[column].nunique(dropna=False).max()
        else:
            spread = frame[column].nunique(dropna=False)
        if spread > 1:
            out.append(column)
    return out


def add_panel_column(frame: pd.DataFrame, col: str | Sequence[str] | None) -> list:
    """Adds ``_panel`` (the label of each row's panel); returns the panel labels in order."""
    columns = [col] if isinstance(col, str) else list(col or [])
    if not columns:
        frame["_panel"] = ""
        return [""]
    for column in columns:
        if column not in frame:
            raise UserError(f"no column {column!r} to split panels by; have {sorted(frame)}")

    def panel_label(row: pd.Series) -> str:
        return ", ".join(
            f"{label(c)} = {fmt_value(row[c])}" if c not in ("clipping", "model")
            else fmt_value(row[c]) for c in columns
        )

    if frame.empty:
        frame["_panel"] = ""
        return [""]
    frame["_panel"] = frame.apply(panel_label, axis=1)
    return list(dict.fromkeys(sort_frame(frame, columns)["_panel"]))


def sort_frame(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows ordered by ``columns`` with :func:`sort_key` (numbers numerically, clipping by
    mode then threshold), stable, with a fresh index."""
    if not columns or frame.empty:
        return frame.reset_index(drop=True)
    keys = [tuple(sort_key(c)(v) for c, v in zip(columns, row))
            for row in frame[list(columns)].itertuples(index=False)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)


def require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame]
    if missing:
        raise UserError(f"{what} needs the column(s) {', '.join(missing)}; have {sorted(frame)}")


def seed_summary(runs: pd.DataFrame, keys: Sequence[str], value: str = "final_acc") -> pd.DataFrame:
    """Per setting (``keys``): mean/low/high of ``value`` over completed runs, and counts.

    Columns: keys, mean, low, high, n_runs, n_completed, n_diverged, n_failed, n_pending.
    """
    frame = with_derived(runs)
    keys = list(keys)
    require(frame, [*keys, value], "a seed summary")
    rows = []
    groups = frame.groupby(keys, dropna=False, sort=False) if keys else [((), frame)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        ok = group.loc[group["status"].eq("completed"), value].astype(float)
        ok = ok[np.isfinite(ok)]
        rows.append({
            **dict(zip(keys, key)),
            "mean": ok.mean() if len(ok) else np.nan,
            "low": ok.min() if len(ok) else np.nan,
            "high": ok.max() if len(ok) else np.nan,
            "n_runs": len(group),
            "n_completed": int(group["status"].eq("completed").sum()),
            "n_diverged": int(group["status"].eq("diverged").sum()),
            "n_failed": int(group["status"].eq("failed").sum()),
            "n_pending": int(group["status"].isin(PENDING).sum()),
        })
    return sort_frame(pd.DataFrame(rows), keys)


# ----------------------------------------------------------------------------- axes helpers


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
    ax.set_xlabel(label(key) + (" (log₂ scale)" if scale == "log2" else ""))


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


# ----------------------------------------------------------------------------- heatmap


@styled
def plot_stability_heatmap(
    runs: pd.DataFrame,
    x: str = "batch_size",
    y: str = "clip.threshold",
    value: str = "final_acc",
    col: str | Sequence[str] | None = None,
) -> Figure:
    """Threshold x batch size, coloured by ``value`` averaged over completed seeds.

    Cells whose runs all diverged are hatched grey; any diverged runs are counted in the cell
    ("×2/3"). The best y per x column is boxed: the fewest diverged runs, then the highest mean.
    Runs not finished yet leave their cell empty, labelled with their state. With the default
    y (``clip.threshold``) unclipped runs are left out, each clipping mode gets its own panel
    (global-norm and AGC thresholds are different scales) and, when some mode sweeps two or
    more thresholds, modes with a single one are left out.
    """
    frame = with_derived(runs)
    require(frame, [x, y, value], "the stability heatmap")
    by_mode = y == "clip.threshold" and "clip.mode" in frame
    if by_mode:
        frame = frame[frame["clip.mode"].isin(THRESHOLD_MODES)].copy()
        spread = frame.groupby("clip.mode")[y].nunique()
        if (spread >= 2).any():  # a single threshold is no sweep; the accuracy plot shows it
            frame = frame[frame["clip.mode"].isin(spread.index[spread >= 2])].copy()
    frame = frame[frame[x].notna() & frame[y].notna()].copy()
    if frame.empty:
        raise UserError(f"no runs with both {x} and {y} to draw the stability heatmap")
    if col is None:
        col = dependent_on(frame, [x, y], setting_axes(frame, exclude=[x, y]))
        if by_mode and frame["clip.mode"].nunique() > 1 and "clip.mode" not in col:
            col = ["clip.mode", *col]  # thresholds of different modes are different scales
    panels = add_panel_column(frame, col)
    xs, ys = ordered_values(frame, x), ordered_values(frame, y)
    summary = seed_summary(frame, ["_panel", x, y], value)
    finite = summary["mean"].dropna()
    norm = Normalize(finite.min() if len(finite) else 0.0, finite.max() if len(finite) else 1.0)
    if norm.vmin == norm.vmax:
        norm = Normalize(norm.vmin - 0.01, norm.vmax + 0.01)
    cmap = matplotlib.colormaps[SEQUENTIAL]

    cell = 0.95 if len(xs) <= 5 else 0.75
    fig, axes = new_figure(1, len(panels), panel_width(len(panels), cell * len(xs) + 1.3, 1.6),
                           max(3.4, 0.55 * len(ys) + 2.2))
    image = None
    for ax, panel in zip(axes[0], panels):
        part = summary[summary["_panel"] == panel]
        lookup = {(r[x], r[y]): r for _, r in part.iterrows()}
        grid = np.full((len(ys), len(xs)), np.nan)
        for (xv, yv), row in lookup.items():
            grid[ys.index(yv), xs.index(xv)] = row["mean"]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower",
                          aspect="auto")
        ax.set_facecolor("white")
        ax.grid(False)
        for j, xv in enumerate(xs):
            best = None
            for i, yv in enumerate(ys):
                row = lookup.get((xv, yv))
                if row is None:
                    continue
                annotate_cell(ax, i, j, row, norm, cmap, value)
                if np.isfinite(row["mean"]):
                    rank = (row["n_diverged"], -row["mean"])
                    if best is None or rank < best[0]:
                        best = (rank, i)
            if best is not None:
                ax.add_patch(Rectangle((j - 0.5, best[1] - 0.5), 1, 1, fill=False,
                                       edgecolor="black", linewidth=3, gid="best", zorder=4))
        ax.set_xticks(range(len(xs)), [fmt_value(v) for v in xs])
        ax.set_yticks(range(len(ys)), [fmt_value(v) for v in ys])
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y))
        for spine in ax.spines.values():
            spine.set_visible(False)
        n_div = int(part["n_diverged"].sum())
        n_done = int((part["n_completed"] + part["n_diverged"]).sum())
        ax.set_title((f"{panel}\n" if panel else "") + f"diverged: {n_div} of {n_done} runs")
    colourbar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9)
    colourbar.set_label(f"{label(value)}, mean over seeds"
                        + (" (%)" if value in FRACTION_COLUMNS else ""))
    if value in FRACTION_COLUMNS:
        colourbar.formatter = CompactPercent()
        colourbar.update_ticks()
    fig.suptitle(f"Stability: {label(value)} by {label(y).split(' (')[0]} and "
                 f"{label(x).split(' (')[0]}\n□ best per column   ×k/n: k of n runs diverged "
                 "(hatched: all)", fontsize=11.5)
    return fig


def annotate_cell(ax: Any, i: int, j: int, row: pd.Series, norm: Normalize, cmap: Any,
                  value: str) -> None:
    done = int(row["n_completed"] + row["n_diverged"])
    diverged = int(row["n_diverged"])
    if np.isfinite(row["mean"]):
        text = f"{row['mean']:.1%}" if value in FRACTION_COLUMNS else f"{row['mean']:.3g}"
        if diverged:
            text += f"\n×{diverged}/{done}"
        r, g, b, _ = cmap(norm(row["mean"]))
        colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, text, ha="center", va="center", fontsize=10, color=colour,
                gid="diverged-count" if diverged else "value")
    elif diverged:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=DIVERGED_GREY,
                               edgecolor="#636363", hatch="xx", linewidth=0, gid="diverged-cell"))
        ax.text(j, i, f"×{diverged}/{done}\ndiverged", ha="center", va="center", fontsize=10,
                color="black", gid="diverged-count",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5, "alpha": 0.85})
    else:
        states = []
        for key, name in (("n_failed", "failed"), ("n_pending", "not run")):
            if row[key]:
                states.append(f"{int(row[key])} {name}")
        ax.text(j, i, "\n".join(states) or "no result", ha="center", va="center", fontsize=9,
                color="#525252", gid="missing")


# ----------------------------------------------------------------------------- accuracy


@styled
def plot_accuracy_vs_batch(
    runs: pd.DataFrame,
    x: str = "batch_size",
    y: str = "final_acc",
    hue: str | None = None,
    style: str | None = None,
    col: str | Sequence[str] | None = None,
) -> Figure:
    """``y`` against ``x`` (log2 axis for spread positive numbers): one line per ``hue`` value
    (default: clipping) and ``style`` value (default: model family), the mean over completed
    seeds with a min-max band. Diverged runs get a strip under the plot: one row per line
    that has any, a cross at each x where runs diverged, labelled "k/n" (k of n finished)."""
    frame = with_derived(runs)
    require(frame, [x, y], "the accuracy plot")
    frame = frame[frame[x].notna()].copy()
    fixed = [col] if isinstance(col, str) else list(col or [])
    settings = [c for c in setting_axes(frame, exclude=[x]) if c not in fixed]
    if hue is None:
        hue = next(iter(dependent_on(frame, [x, *fixed], settings)), None)
    if style is None:
        rest = dependent_on(frame, [x, *fixed, *filter(None, [hue])], settings)
        style = "model" if "model" in rest else (rest[0] if len(rest) > 1 else None)
    chosen = [c for c in (x, hue, style) if c]
    require(frame, chosen, "the accuracy plot")
    if col is None:
        col = dependent_on(frame, chosen, setting_axes(frame, exclude=chosen))
    panels = add_panel_column(frame, col)
    xs = ordered_values(frame, x)
    to_pos, scale = positions(xs)
    hues = ordered_values(frame, hue) if hue else [None]
    styles = ordered_values(frame, style) if style else [None]
    colours = palette_for(hues)
    keys = ["_panel", *[c for c in (hue, style) if c], x]
    summary = seed_summary(frame, keys, y)
    lines = [(h, s) for h in hues for s in styles]

    def select(part: pd.DataFrame, hv: Any, sv: Any) -> pd.DataFrame:
        if hue:
            part = part[part[hue] == hv]
        return part[part[style] == sv] if style else part

    strip_rows = [(h, s) for h, s in lines if select(summary, h, s)["n_diverged"].sum()]
    width = panel_width(len(panels), 5.2, 3.0)
    if strip_rows:
        fig = Figure(figsize=(width, 4.4 + 0.26 * len(strip_rows) + 0.3), layout="constrained")
        grid = fig.subplots(2, len(panels), squeeze=False, sharex="col", sharey="row",
                            gridspec_kw={"height_ratios": [4.4, 0.26 * len(strip_rows) + 0.3]})
        axes, strips = grid[:1], grid[1]
    else:
        fig, axes = new_figure(1, len(panels), width, 4.6, sharey=True)
        strips = [None] * len(panels)
    for ax, strip, panel in zip(axes[0], strips, panels):
        part = summary[summary["_panel"] == panel]
        for h_index, hv in enumerate(hues):
            # nudge the hues apart on x so markers and bands do not hide each other
            shift = 0.04 * (h_index - (len(hues) - 1) / 2)
            for s_index, sv in enumerate(styles):
                line = select(part, hv, sv)
                if line.empty:
                    continue
                px = np.array([to_pos(v) for v in line[x]])
                px = px * 2**shift if scale == "log2" else px + shift
                colour = colours.get(hv, "black")
                ax.plot(px, line["mean"], color=colour, linestyle=LINESTYLES[s_index % 4],
                        marker=MARKERS[s_index % len(MARKERS)], linewidth=2, markersize=6,
                        gid="mean")
                ax.fill_between(px, line["low"], line["high"], color=colour, alpha=0.18,
                                linewidth=0, gid="band")
        set_value_axis(ax, y)
        ax.margins(y=0.1)
        if panel:
            ax.set_title(panel)
        if ax is not axes[0][0]:
            ax.set_ylabel("")
        bottom = strip if strip is not None else ax
        if strip is not None:
            draw_diverged_strip(strip, part, strip_rows, select, x, to_pos, colours, styles)
            if strip is not strips[0]:
                strip.set_ylabel("")
        set_x_axis(bottom, xs, scale, x)
        if strip is not None:
            ax.tick_params(labelbottom=False)
    drawn = summary[summary["n_completed"] > 0]
    handles = [Line2D([], [], color=colours[h], linewidth=2.5, label=fmt_value(h))
               for h in hues if h is not None and (drawn[hue] == h).any()]
    if style:
        handles += [Line2D([], [], color="black", linestyle=LINESTYLES[i % 4],
                           marker=MARKERS[i % len(MARKERS)], label=fmt_value(s))
                    for i, s in enumerate(styles) if (drawn[style] == s).any()]
    if (summary["n_completed"] > 1).any():
        handles.append(Patch(facecolor="grey", alpha=0.3, label="min–max over seeds"))
    if strip_rows:
        handles.append(diverged_handle())
    title = " / ".join(label(c) for c in (hue, style) if c) or None
    fig.legend(handles=handles, loc="outside right upper", title=title, frameon=False)
    fig.suptitle(f"{label(y).capitalize()} vs {label(x)}", fontsize=12)
    return fig


def draw_diverged_strip(strip: Any, part: pd.DataFrame, rows: list[tuple], select: Callable,
                        x: str, to_pos: Callable, colours: dict, styles: list) -> None:
    """One row per line with divergences: a cross and "k/n" wherever runs diverged."""
    for r, (hv, sv) in enumerate(rows):
        line = select(part, hv, sv)
        for value, diverged, completed in zip(line[x], line["n_diverged"], line["n_completed"]):
            if not diverged:
                continue
            strip.plot([to_pos(value)], [r], marker=DIVERGED_MARK, markersize=10,
                       color=colours.get(hv, "black"), markeredgecolor="black",
                       markeredgewidth=0.6, linestyle="none", gid="diverged")
            strip.annotate(f"{int(diverged)}/{int(diverged + completed)}", (to_pos(value), r),
                           xytext=(8, 0), textcoords="offset points", va="center", fontsize=9,
                           gid="diverged-count")
    names = [", ".join(fmt_value(v) for v in (hv, sv) if v is not None) or "all"
             for hv, sv in rows]
    strip.set_yticks(range(len(rows)), names, fontsize=9)
    strip.set_ylim(len(rows) - 0.5, -0.5)
    strip.grid(False, axis="y")
    strip.set_ylabel("diverged", fontsize=10)
    strip.spines["left"].set_visible(False)
    strip.tick_params(axis="y", length=0)


# ----------------------------------------------------------------------------- curves


def smoothed(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean() if window > 1 else values


@styled
def plot_training_curves(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    hue: str | None = None,
    col: str | Sequence[str] | None = None,
    style: str | None = None,
    x: str = "step",
    smooth: int | None = None,
) -> Figure:
    """Training loss (top, log scale, rolling mean) and test accuracy (bottom) against ``x``,
    one line per run coloured by ``hue`` (default: clipping), panels by ``col`` (default: batch
    size, whose step counts differ). A diverged run ends in a cross at its divergence step."""
    require(metrics, ["run_id", x], "the training curves")
    frame = with_derived(runs)
    join = [k for k in ("grid", "run_id") if k in metrics and k in frame]
    data = metrics.merge(frame.drop(columns=[c for c in metrics if c not in join and c in frame]),
                         on=join, how="inner")
    if data.empty:
        raise UserError("no metrics rows match the runs frame (join on grid, run_id)")
    run_frame = frame[frame["run_id"].isin(data["run_id"])].copy()
    settings = setting_axes(run_frame)
    if col is None:
        col = ["batch_size"] if "batch_size" in settings and hue != "batch_size" else []
    cols = [col] if isinstance(col, str) else list(col)
    if hue is None:
        hue = next(iter(dependent_on(run_frame, cols, settings)), None)
    if style is None:
        rest = dependent_on(run_frame, [*cols, *filter(None, [hue])], settings)
        style = "model" if "model" in rest else None
    panels = add_panel_column(run_frame, cols)
    panel_of = dict(zip(run_frame["run_id"], run_frame["_panel"]))
    hues = ordered_values(frame, hue) if hue else [None]
    styles = ordered_values(frame, style) if style else [None]
    colours = palette_for(hues)
    rows = [m for m in ("loss", "test_acc") if m in data and data[m].notna().any()]
    if not rows:
        raise UserError("the metrics have neither loss nor test_acc values to draw")

    fig, axes = new_figure(len(rows), len(panels), panel_width(len(panels), 4.4, 3.0),
                           2.9 * len(rows) + 0.6, sharey="row", sharex="col")
    plotted_loss: list[np.ndarray] = []
    for run_id, run in data.groupby("run_id", sort=False):
        info = run_frame.loc[run_frame["run_id"] == run_id].iloc[0]
        column = panels.index(panel_of[run_id])
        colour = colours.get(info[hue], "black") if hue else "black"
        linestyle = LINESTYLES[styles.index(info[style]) % 4] if style else "-"
        run = run.sort_values(x)
        diverged_at = info.get("diverged_step")
        diverged = info["status"] == "diverged"
        if diverged and not is_number(diverged_at):
            diverged_at = run["step"].max()
        for r, metric in enumerate(rows):
            ax = axes[r][column]
            series = run[list(dict.fromkeys([x, "step", metric]))].dropna()
            if diverged:
                # the diverging step's loss is unbounded; it is shown as the cross instead
                series = series[series["step"] < diverged_at]
            series = series[np.isfinite(series[metric].astype(float))]
            if metric == "loss":
                window = smooth or max(1, len(run) // 40)
                plotted_loss.append(smoothed(series[metric], window).to_numpy(dtype=float))
                ax.plot(series[x], plotted_loss[-1], color=colour,
                        linestyle=linestyle, linewidth=1.6, alpha=0.9, gid="curve")
            else:
                points = series[[x, metric]]
                final = info.get("final_acc")
                steps = info.get("steps_done")
                # the last evaluation runs after the last update, so it may have no metrics row
                if x == "step" and is_number(final) and is_number(steps) and (
                        points.empty or points[x].max() < steps):
                    points = pd.concat([points, pd.DataFrame({x: [steps], metric: [final]})])
                ax.plot(points[x], points[metric], color=colour, linestyle=linestyle,
                        marker=".", markersize=5, linewidth=1.6, alpha=0.9, gid="curve")
            if diverged:
                at = run.loc[run["step"] >= diverged_at, x]
                where = at.iloc[0] if len(at) else diverged_at
                mark_diverged(ax, where, 1, colour, "top" if metric == "loss" else "bottom")
    shown = np.concatenate(plotted_loss) if plotted_loss else np.zeros(0)
    # a log axis only pays when the loss spans a decade (a blow-up before divergence)
    log_loss = bool(len(shown)) and shown.min() > 0 and shown.max() / shown.min() > 10
    for r, metric in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            if metric == "loss" and log_loss:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            if c == 0:
                set_value_axis(ax, metric)
                if metric == "loss":
                    ax.set_ylabel("training loss\n(rolling mean" + (", log scale)" if log_loss
                                                                   else ")"))
            if r == len(rows) - 1:
                ax.set_xlabel(label(x))
            if r == 0 and panel:
                ax.set_title(panel)
            if metric != "loss":
                ax.margins(y=0.12)
    drawn = run_frame[run_frame["run_id"].isin(data["run_id"])]
    handles = [Line2D([], [], color=colours[h], linewidth=2.5, label=fmt_value(h))
               for h in hues if h is not None and (drawn[hue] == h).any()]
    if style:
        handles += [Line2D([], [], color="black", linestyle=LINESTYLES[i % 4], label=fmt_value(s))
                    for i, s in enumerate(styles) if (drawn[style] == s).any()]
    if gids_of(fig, "diverged"):
        handles.append(diverged_handle())
    title = " / ".join(label(c) for c in (hue, style) if c) or None
    fig.legend(handles=handles, loc="outside right upper", title=title, frameon=False)
    fig.suptitle("Training curves (one line per run)", fontsize=12)
    return fig


# ----------------------------------------------------------------------------- gradients


def block_rows(blocks: pd.DataFrame, stat: str, level: str = "block") -> pd.DataFrame:
    """Rows of one statistic: block-level rows, or per-parameter rows for ``level="param"``."""
    require(blocks, ["run_id", "step", "block", "index", "stat", "value"], "block statistics")
    rows = blocks[blocks["stat"] == stat]
    if "param" in rows:
        rows = rows[rows["param"].notna()] if level == "param" else rows[rows["param"].isna()]
    elif level == "param":
        raise UserError("the blocks frame has no per-parameter rows (no 'param' column)")
    return rows


def pick_runs(runs: pd.DataFrame, candidates: Sequence[str], col: str | None,
              max_panels: int) -> list[str]:
    """One run per value of ``col`` (default: the first non-batch setting), so that panels
    differ in ``col`` only: the other settings are those of the preferred run, which has the
    largest batch size (where clipping matters most), a normalizer-free model (what AGC is
    for) and the lowest seed."""
    frame = with_derived(runs)
    frame = frame[frame["run_id"].isin(candidates)].copy()
    if frame.empty:
        return []
    if col is None:
        col = next(iter(setting_axes(frame, exclude=["batch_size"])), None)
    frame["_batch"] = -frame["batch_size"] if "batch_size" in frame else 0
    frame["_bn"] = (frame["model.name"].astype(str).str.startswith("bn_")
                    if "model.name" in frame else False)
    frame = frame.sort_values([c for c in ("_batch", "_bn", "seed") if c in frame],
                              kind="stable")
    if not col or col not in frame:
        return list(frame["run_id"][:max_panels])
    others = [c for c in setting_axes(frame, exclude=[col]) if c in frame]
    preferred = frame.iloc[0]
    chosen = []
    for value in ordered_values(frame, col):
        matching = frame[frame[col] == value]
        alike = matching
        for other in others:
            alike = alike[alike[other] == preferred[other]]
        chosen.append((alike if len(alike) else matching)["run_id"].iloc[0])
    return chosen[:max_panels]


def run_title(runs: pd.DataFrame, run_id: str) -> str:
    frame = with_derived(runs)
    row = frame.loc[frame["run_id"] == run_id].iloc[0]
    def part(column: str) -> str:
        if column in ("clipping", "model"):
            return fmt_value(row[column])
        return f"{label(column).split(' (')[0]} {fmt_value(row[column])}"

    # settings on the first line, where the run sits in the grid on the second
    where = [c for c in ("batch_size", "seed") if c in row]
    lines = [", ".join(part(c) for c in setting_axes(frame, exclude=where) if c in row),
             ", ".join(part(c) for c in where)]
    if row["status"] == "diverged" and is_number(row.get("diverged_step")):
        lines.append(f"diverged at step {int(row['diverged_step'])}")
    return "\n".join(line for line in lines if line) or run_id


def selected_runs(blocks: pd.DataFrame, runs: pd.DataFrame, run_ids: Sequence[str] | None,
                  col: str | None, max_panels: int) -> list[str]:
    have = list(dict.fromkeys(blocks["run_id"]))
    if run_ids is not None:
        missing = [r for r in run_ids if r not in have]
        if missing:
            raise UserError(f"no block statistics for run(s) {', '.join(missing)}")
        return list(run_ids)
    chosen = pick_runs(runs, have, col, max_panels)
    if not chosen:
        raise UserError("no run in the runs frame has block statistics")
    return chosen


def gids_of(fig: Figure, gid: str) -> list:
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def step_edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


@styled
def plot_gradient_heatmap(
    blocks: pd.DataFrame,
    runs: pd.DataFrame,
    run_ids: Sequence[str] | None = None,
    col: str | None = None,
    stat: str = "grad_norm",
    max_panels: int = 4,
) -> Figure:
    """Block (rows, input at the top) x recorded step (columns) of ``stat`` on a log colour
    scale, one panel per run: ``run_ids``, or one per value of ``col`` (default: clipping) at
    the largest batch size. A diverged run's divergence step is a dashed line."""
    rows = block_rows(blocks, stat)
    if rows.empty:
        raise UserError(f"the blocks frame has no {stat!r} rows")
    chosen = selected_runs(rows, runs, run_ids, col, max_panels)
    positive = rows.loc[rows["run_id"].isin(chosen) & (rows["value"] > 0), "value"]
    positive = positive[np.isfinite(positive)]
    if positive.empty:
        raise UserError(f"no positive finite {stat!r} values to draw on a log scale")
    norm = LogNorm(positive.min(), max(positive.max(), positive.min() * 1.01))
    # zeros (e.g. every gradient behind a zero-initialised classifier at step 0) have no place
    # on a log scale: they get the "under" colour, distinct from steps never recorded
    cmap = matplotlib.colormaps[GRADIENT_CMAP].with_extremes(under=ZERO_COLOUR)
    frame = with_derived(runs)
    has_zero = has_missing = False

    n_blocks = rows["block"].nunique()
    fig, axes = new_figure(1, len(chosen), panel_width(len(chosen), 3.6, 1.6),
                           max(3.6, 0.24 * n_blocks + 1.9))
    mesh = None
    previous_blocks = None
    for ax, run_id in zip(axes[0], chosen):
        part = rows[rows["run_id"] == run_id]
        table = part.pivot_table(index=["index", "block"], columns="step", values="value",
                                 aggfunc="mean").sort_index(level="index")
        steps = table.columns.to_numpy(dtype=float)
        values = table.to_numpy(dtype=float)
        zero = values <= 0
        has_zero |= bool(zero.any())
        has_missing |= bool(np.isnan(values).any())
        values = np.where(zero, norm.vmin / 10, values)
        mesh = ax.pcolormesh(step_edges(steps), np.arange(len(table) + 1) - 0.5,
                             np.ma.masked_invalid(values), norm=norm, cmap=cmap, shading="flat")
        ax.set_facecolor(MISSING_COLOUR)  # steps a block was not recorded at
        ax.grid(False)
        names = [str(b) for b in table.index.get_level_values("block")]
        # repeated block names on every panel are noise; different models keep their own
        ax.set_yticks(range(len(table)), names if names != previous_blocks else [],
                      fontsize=8 if len(table) > 12 else 9)
        previous_blocks = names
        ax.set_ylim(len(table) - 0.5, -0.5)
        if len(steps) <= 8:
            ax.set_xticks(steps, [f"{s:g}" for s in steps])
        ax.set_xlabel(label("step"))
        ax.set_title(run_title(frame, run_id), fontsize=10.5)
        info = frame.loc[frame["run_id"] == run_id]
        if len(info) and info.iloc[0]["status"] == "diverged" and is_number(
                info.iloc[0].get("diverged_step")):
            ax.axvline(info.iloc[0]["diverged_step"], color=DIVERGED_LINE, linestyle="--",
                       linewidth=2.5, gid="diverged")
    axes[0][0].set_ylabel("block (input → output)")
    colourbar = fig.colorbar(mesh, ax=list(axes[0]), shrink=0.9)
    colourbar.set_label(f"{label(stat)} (log scale)")
    keys = []
    if has_missing:
        keys.append(Patch(facecolor=MISSING_COLOUR, edgecolor="grey", label="not recorded"))
    if has_zero:
        keys.append(Patch(facecolor=ZERO_COLOUR, edgecolor="grey", label="exactly zero"))
    if gids_of(fig, "diverged"):
        keys.append(Line2D([], [], color=DIVERGED_LINE, linestyle="--", linewidth=2.5,
                           label="divergence step"))
    if keys:
        fig.legend(handles=keys, loc="outside lower center", ncols=len(keys), frameon=False)
    fig.suptitle(f"Gradient propagation during training: {stat.replace('_', ' ')} per block",
                 fontsize=12)
    return fig


@styled
def plot_agc_clip_fraction(
    blocks: pd.DataFrame,
    runs: pd.DataFrame,
    run_ids: Sequence[str] | None = None,
    col: str | None = None,
    level: str = "block",
    max_panels: int = 4,
) -> Figure:
    """``agc_frac_above`` (the fraction of units whose ‖G‖/‖W‖ exceeds the probe's λ, i.e. the
    units AGC would clip) over steps: one line per block (``level="param"``: per parameter),
    coloured by depth, plus the mean over them; panels as in :func:`plot_gradient_heatmap`."""
    if level not in ("block", "param"):
        raise UserError(f"level must be 'block' or 'param', got {level!r}")
    rows = block_rows(blocks, "agc_frac_above", level)
    if rows.empty:
        raise UserError("the blocks frame has no 'agc_frac_above' rows")
    chosen = selected_runs(rows, runs, run_ids, col, max_panels)
    depth = Normalize(rows["index"].min(), max(rows["index"].max(), rows["index"].min() + 1))
    cmap = matplotlib.colormaps[SEQUENTIAL]
    frame = with_derived(runs)
    unit = "param" if level == "param" else "block"

    fig, axes = new_figure(1, len(chosen), panel_width(len(chosen), 3.8, 1.6), 4.0, sharey=True)
    for ax, run_id in zip(axes[0], chosen):
        part = rows[rows["run_id"] == run_id]
        for _, series in part.groupby([unit, "index"], sort=False):
            series = series.sort_values("step")
            ax.plot(series["step"], series["value"], color=cmap(depth(series["index"].iloc[0])),
                    linewidth=1.1, alpha=0.8, gid="unit-line")
        mean = part.groupby("step")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), color="black", linestyle="--", linewidth=2,
                gid="mean")
        ax.yaxis.set_major_formatter(CompactPercent())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(label("step"))
        ax.set_title(run_title(frame, run_id), fontsize=10.5)
    axes[0][0].set_ylabel("units with ‖G‖/‖W‖ > λ (%)")
    mappable = ScalarMappable(norm=depth, cmap=cmap)
    colourbar = fig.colorbar(mappable, ax=list(axes[0]), shrink=0.9)
    colourbar.set_label("block index (−1: stem; last: classifier)")
    fig.legend(handles=[Line2D([], [], color="black", linestyle="--", linewidth=2,
                               label=f"mean over {unit}s")], loc="outside lower center",
               frameon=False)
    fig.suptitle(f"AGC clip fraction per {'parameter' if level == 'param' else 'block'}",
                 fontsize=12)
    return fig


# ----------------------------------------------------------------------------- alpha


def spp_slopes(blocks: pd.DataFrame, runs: pd.DataFrame, alpha: str = "model.alpha",
               stat: str = "var") -> pd.DataFrame:
    """Within-stage least-squares slope of ``stat`` against block index at each run's first
    recorded step. Columns: run_id, ``alpha``, stage, slope, expected_slope (the same fit of
    ``expected_var``; NaN where absent). Stages with fewer than two blocks have no slope."""
    rows = block_rows(blocks, stat)
    frame = with_derived(runs)
    require(frame, ["run_id", alpha], "the SPP slopes")
    rows = rows[rows["stage"] >= 0] if "stage" in rows else rows
    rows = rows.merge(frame[["run_id", alpha]], on="run_id")
    rows = rows[rows["step"] == rows.groupby("run_id")["step"].transform("min")]
    out = []
    for (run_id, stage), part in rows.groupby(["run_id", "stage"], sort=True):
        part = part.sort_values("index")
        if part["index"].nunique() < 2:
            continue
        slope = np.polyfit(part["index"].astype(float), part["value"].astype(float), 1)[0]
        expected = np.nan
        if "expected_var" in part and part["expected_var"].notna().all():
            expected = np.polyfit(part["index"].astype(float),
                                  part["expected_var"].astype(float), 1)[0]
        out.append({"run_id": run_id, alpha: part[alpha].iloc[0], "stage": int(stage),
                    "slope": float(slope), "expected_slope": float(expected)})
    return pd.DataFrame(out, columns=["run_id", alpha, "stage", "slope", "expected_slope"])


@styled
def plot_alpha_sweep(
    runs: pd.DataFrame,
    blocks: pd.DataFrame | None = None,
    x: str = "model.alpha",
    y: str = "final_acc",
    hue: str | None = None,
) -> Figure:
    """Three panels when block statistics exist: the variance profile at the first recorded
    step per alpha (measured solid, expected 1 + k·α² dashed), the within-stage variance slope
    against alpha (measured vs expected α²), and ``y`` against alpha (mean over completed
    seeds, min-max band, diverged crosses). Only the last panel without block statistics."""
    frame = with_derived(runs)
    require(frame, [x, y], "the alpha sweep")
    frame = frame[frame[x].notna()].copy()
    if frame.empty:
        raise UserError(f"no runs have {x} (it only exists for NF models)")
    if hue is None:
        hue = next(iter(dependent_on(frame, [x], setting_axes(frame, exclude=[x]))), None)
    has_var = (blocks is not None and not blocks.empty and "stat" in blocks
               and not block_rows(blocks, "var").empty
               and block_rows(blocks, "var")["run_id"].isin(frame["run_id"]).any())
    alphas = ordered_values(frame, x)
    alpha_colours = palette_for(alphas)
    hues = ordered_values(frame, hue) if hue else [None]
    hue_colours = palette_for(hues)
    n_panels = 3 if has_var else 1
    fig, axes = new_figure(1, n_panels, 15.0 if has_var else 7.5, 4.4)
    to_pos, scale = positions(alphas)

    if has_var:
        profile_ax, slope_ax = axes[0][0], axes[0][1]
        rows = block_rows(blocks, "var").merge(frame[["run_id", x, *filter(None, [hue])]],
                                               on="run_id")
        rows = rows[rows["step"] == rows.groupby("run_id")["step"].transform("min")]
        for h_index, hv in enumerate(hues):
            part = rows if hue is None else rows[rows[hue] == hv]
            for av in alphas:
                curve = part[part[x] == av].groupby("index")[["value", "expected_var"]].mean()
                if curve.empty:
                    continue
                profile_ax.plot(curve.index, curve["value"], color=alpha_colours[av],
                                linestyle=LINESTYLES[h_index % 4], marker="o", markersize=3.5,
                                linewidth=1.8, gid="profile")
                if curve["expected_var"].notna().any():
                    profile_ax.plot(curve.index, curve["expected_var"], color=alpha_colours[av],
                                    linestyle=":", linewidth=1.2, gid="expected")
        if "stage" in rows:
            firsts = rows[rows["stage"] >= 0].groupby("stage")["index"].min().iloc[1:]
            for boundary in firsts:
                profile_ax.axvline(boundary - 0.5, color="grey", linewidth=0.8, alpha=0.6)
        profile_ax.set_xlabel("block index (grey lines: stage transitions)")
        profile_ax.set_ylabel("activation variance (channel mean)")
        profile_ax.set_title("Variance at the first recorded step")
        profile_ax.legend(
            handles=[Line2D([], [], color=alpha_colours[a], linewidth=2, label=f"α={a:g}")
                     for a in alphas if (rows[x] == a).any()]
            + [Line2D([], [], color="black", linestyle=":", label="expected 1 + k·α²")],
            fontsize=9, frameon=False,
        )

        slopes = spp_slopes(blocks, frame, x)
        slopes = slopes.merge(frame[["run_id", *filter(None, [hue])]], on="run_id")
        for hv in hues:
            part = slopes if hue is None else slopes[slopes[hue] == hv]
            stats = part.groupby(x)["slope"].agg(["mean", "std"]).reindex(
                [a for a in alphas if a in set(part[x])])
            colour = hue_colours.get(hv, "black") if hue else sns.color_palette(PALETTE)[0]
            slope_ax.errorbar([to_pos(a) for a in stats.index], stats["mean"],
                              yerr=stats["std"].fillna(0), color=colour, marker="o",
                              linewidth=2, capsize=3, label="measured" if hue is None
                              else fmt_value(hv), gid="slope")
        expected = slopes.groupby(x)["expected_slope"].mean().dropna()
        if expected.empty:
            expected = pd.Series({a: a**2 for a in alphas if is_number(a)})
        slope_ax.plot([to_pos(a) for a in expected.index], expected.to_numpy(), color="black",
                      linestyle="--", linewidth=1.5, label="expected α²", gid="expected")
        if (slopes["slope"] > 0).all() and len(slopes):
            slope_ax.set_yscale("log")
        set_x_axis(slope_ax, alphas, scale, x)
        slope_ax.set_ylabel("variance gained per block\n(within-stage slope)")
        slope_ax.set_title("Variance growth within a stage")
        slope_ax.legend(fontsize=9, frameon=False)

    acc_ax = axes[0][-1]
    keys = [k for k in (hue, x) if k]
    summary = seed_summary(frame, keys, y)
    for hv in hues:
        line = summary if hue is None else summary[summary[hue] == hv]
        colour = hue_colours.get(hv, "black") if hue else sns.color_palette(PALETTE)[0]
        px = np.array([to_pos(v) for v in line[x]])
        acc_ax.plot(px, line["mean"], color=colour, marker="o", linewidth=2,
                    label=fmt_value(hv) if hue else "mean over seeds", gid="mean")
        acc_ax.fill_between(px, line["low"], line["high"], color=colour, alpha=0.18,
                            linewidth=0, gid="band")
        for pos, count in zip(px, line["n_diverged"]):
            if count:
                mark_diverged(acc_ax, pos, int(count), colour)
    set_x_axis(acc_ax, alphas, scale, x)
    set_value_axis(acc_ax, y)
    acc_ax.margins(y=0.15)
    acc_ax.set_title(f"{label(y).capitalize()} vs α")
    extra = [diverged_handle()] if summary["n_diverged"].any() else []
    acc_ax.legend(handles=[*acc_ax.get_legend_handles_labels()[0], *extra], fontsize=9,
                  frameon=False)
    fig.suptitle("Alpha sweep", fontsize=12)
    return fig


# ----------------------------------------------------------------------------- gains

GAIN_PREFIX = "gain:"  # blocks.parquet stat of a block's 0-d parameter (sigprop.probes)


@styled
def plot_gains(blocks: pd.DataFrame, runs: pd.DataFrame, col: str | None = None) -> Figure:
    """Scalar gains (SkipInit ``gain:skip_gain`` and any other 0-d block parameter) over
    training: the mean |gain| over a run's blocks, one line per run, coloured by the clipping
    setting, a panel per ``col`` (default: batch size); crosses mark diverged runs."""
    if blocks.empty or "stat" not in blocks:
        raise UserError("the blocks frame has no gain rows")
    rows = blocks[blocks["stat"].astype(str).str.startswith(GAIN_PREFIX)]
    if rows.empty:
        raise UserError("the blocks frame has no gain rows")
    frame = with_derived(runs)
    frame = frame[frame["run_id"].isin(rows["run_id"].unique())]
    if col is None:
        col = "batch_size" if "batch_size" in frame and frame["batch_size"].nunique() > 1 \
            else None
    panels = ordered_values(frame, col) if col else [None]
    hue = "clipping" if "clipping" in frame else None
    hues = ordered_values(frame, hue) if hue else [None]
    colours = palette_for(hues)
    per_run = (rows.assign(value=rows["value"].abs())
               .groupby(["run_id", "step"])["value"].mean().reset_index())
    fig, axes = new_figure(1, len(panels), panel_width(len(panels), 4.2, 2.6), 3.8, sharey=True)
    for ax, panel in zip(axes[0], panels):
        members = frame if panel is None else frame[frame[col] == panel]
        for _, run in sort_frame(members, [hue] if hue else []).iterrows():
            series = per_run[per_run["run_id"] == run["run_id"]].sort_values("step")
            if series.empty:
                continue
            colour = colours[run[hue]] if hue else "black"
            ax.plot(series["step"], series["value"], color=colour, linewidth=1.3, alpha=0.8,
                    gid="gain-line")
            if run.get("status") == "diverged":
                ax.plot(series["step"].iloc[-1], series["value"].iloc[-1], DIVERGED_MARK,
                        color=colour, markersize=8)
        ax.set_xlabel(label("step"))
        ax.set_title(f"{label(col)} = {fmt_value(panel)}" if col else "all runs", fontsize=10.5)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("mean |gain| over blocks")
    if hue:
        handles = [Line2D([], [], color=colours[h], linewidth=2, label=fmt_value(h))
                   for h in hues]
        fig.legend(handles=handles, title=label(hue), loc="outside right center", frameon=False)
    fig.suptitle("Scalar (SkipInit) gains over training, one line per run", fontsize=12)
    return fig

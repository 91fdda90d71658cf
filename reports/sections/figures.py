"""The figure table: for each figure of the report its file name, title, caption, when it
applies and what draws it. The grid's figures (:data:`FIGURES`) each get a section, in this
order, when they apply; the summary says why each of the others is not drawn. The frontier's
figures (:data:`FRONTIER_FIGURES`) and the divergence timeline (:data:`TIMELINE`) sit inside
their own sections (``reports.sections.frontier``, ``reports.sections.problems``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from ablations.store import FINISHED
from reports.document import Plot, Section
from reports.figures import frontier as ff
from reports.figures.accuracy import plot_accuracy_vs_batch
from reports.figures.alpha import plot_alpha_sweep
from reports.figures.clipping import plot_agc_clip_fraction
from reports.figures.curves import plot_training_curves
from reports.figures.forensics import plot_divergence_timeline
from reports.figures.frames import setting_axes, varied_axes
from reports.figures.gains import GAIN_PREFIX, plot_gains
from reports.figures.gradients import plot_gradient_heatmap
from reports.figures.stability import plot_stability_heatmap
from reports.figures.style import figure_png, is_number, label
from sigprop.constants import THRESHOLD_MODES


@dataclass
class GridData:
    """What the grid's figures are drawn from."""

    grid_dir: Path
    frame: pd.DataFrame  # the runs, with_derived
    metrics: pd.DataFrame
    blocks: pd.DataFrame
    flight: pd.DataFrame | None = None
    axes: list[str] = field(init=False)
    finished: pd.DataFrame = field(init=False)
    stats: set = field(init=False)  # the block statistics the probes recorded

    def __post_init__(self) -> None:
        self.axes = varied_axes(self.frame)
        self.finished = self.frame[self.frame["status"].isin(FINISHED)]
        blocks = self.blocks
        self.stats = set(blocks["stat"].unique()) if not blocks.empty and "stat" in blocks \
            else set()

    @property
    def spp_file(self) -> Path:
        return self.grid_dir / "spp" / "spp.parquet"


@dataclass(frozen=True)
class FigureEntry:
    name: str  # the PNG's file stem
    title: str | Callable[[Any], str]  # the section's title
    caption: str
    draw: Callable[..., Any]  # a matplotlib figure, from what its section passes
    # whether the grid has what it needs (GridData); None: whenever its section is shown
    applies: Callable[[Any], bool] | None = None
    # the summary's "Figures not drawn" line when it does not apply; None: nothing to say
    not_drawn: str | Callable[[Any], str | None] | None = None
    label: str | None = None  # how a failure to draw names it; default: the title


class FigureUnavailable(Exception):
    """A figure whose drawing code cannot be loaded; the message is the summary's line."""


def failure_line(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or ["error"])[0]


def figure_bytes(fig: Any) -> bytes:
    png = figure_png(fig)
    if not isinstance(fig, Figure) or fig.canvas.manager is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)  # a pyplot figure stays registered (and in memory) until closed
    return png


def by_batch(g: GridData) -> bool:
    batch_sizes = g.finished["batch_size"].nunique() if "batch_size" in g.finished else 0
    return "batch_size" in g.axes and batch_sizes >= 2


def accuracy_axes(g: GridData) -> list[str]:
    """The settings an accuracy-by-setting plot can take as its x axis."""
    return [a for a in setting_axes(g.finished) if a != "model.alpha"]


def accuracy_x(g: GridData) -> str:
    """The first numeric setting, else the first setting."""
    others = accuracy_axes(g)
    return next((a for a in others if all(is_number(v) for v in
                                          g.finished[a].dropna().unique())), others[0])


def heatmap_fits(finished: pd.DataFrame) -> bool:
    """Two or more thresholds of one clipping mode at two or more batch sizes; with one
    threshold per mode (a tied mode/threshold axis) the accuracy plot already says it all."""
    if not {"clip.threshold", "batch_size"} <= set(finished):
        return False
    clipped = finished
    if "clip.mode" in finished:
        clipped = finished[finished["clip.mode"].isin(THRESHOLD_MODES)]
    if clipped.empty:
        return False
    modes = clipped.groupby("clip.mode") if "clip.mode" in clipped else [(None, clipped)]
    return clipped["batch_size"].nunique() >= 2 and any(
        part["clip.threshold"].nunique() >= 2 for _, part in modes)


def draw_spp(g: GridData) -> Any:
    try:  # imported when drawn: the module may be replaced, or missing from an old install
        from reports.figures.spp import plot_spp
    except ImportError as err:
        raise FigureUnavailable("signal propagation plot: reports.figures.spp.plot_spp "
                                f"unavailable ({err})") from None
    drawn = plot_spp(pd.read_parquet(g.spp_file))
    return getattr(drawn, "figure", drawn)  # a seaborn grid carries its figure


FIGURES = [
    FigureEntry(
        "accuracy-vs-batch", "Accuracy vs batch size",
        "Mean final test accuracy over finished seeds, a diverged seed at chance (band: "
        "min to max; the title gives the seed count), on an axis from 0 with chance level "
        "dotted. Lines with diverged runs get a row in a strip under the plot: a cross "
        "where k of n finished runs diverged.",
        applies=by_batch, draw=lambda g: plot_accuracy_vs_batch(g.frame)),
    FigureEntry(
        "accuracy-by-setting", lambda g: f"Accuracy by {label(accuracy_x(g))}",
        "Mean final test accuracy over finished seeds, a diverged seed at chance (band: "
        "min to max), on an axis from 0 with chance level dotted; the strip below marks "
        "where runs diverged (k of n).",
        applies=lambda g: not by_batch(g) and bool(accuracy_axes(g)),
        draw=lambda g: plot_accuracy_vs_batch(g.frame, x=accuracy_x(g)),
        # with model.alpha varied the alpha sweep plots the accuracy
        not_drawn=lambda g: None if by_batch(g) or "model.alpha" in g.axes
        else "accuracy plot: no axis other than the seed varied"),
    FigureEntry(
        "stability-heatmap", "Stability: clipping threshold × batch size",
        "Mean final accuracy per clipping threshold λ and batch size, a diverged seed at "
        "chance; hatched cells: every seed diverged; ×k/n: k of n runs diverged; boxed: the "
        "best λ for each batch size.",
        applies=lambda g: {"clip.threshold", "batch_size"} <= set(g.axes)
        and heatmap_fits(g.finished),
        draw=lambda g: plot_stability_heatmap(g.frame),
        not_drawn="stability heatmap: needs at least two clipping thresholds of one "
        "clipping mode, and two batch sizes, among finished runs"),
    FigureEntry(
        "alpha-sweep", "Alpha sweep",
        "Left: variance of each block's output at the first recorded step (dotted: the "
        "expected 1 + k·α², drawn only for runs whose SkipInit gains start non-zero). "
        "Middle, when some stage has two or more blocks: variance gained per block within "
        "a stage against α. Right: final accuracy against α (chance dotted).",
        applies=lambda g: "model.alpha" in g.axes,
        draw=lambda g: plot_alpha_sweep(g.frame, g.blocks),
        not_drawn="alpha sweep: model.alpha was not varied"),
    FigureEntry(
        "training-curves", "Training curves",
        "Training loss (centred rolling mean; the note under the figure gives the window) "
        "and test accuracy at each evaluation (chance dotted): one line per setting, the "
        "mean over its completed seeds with a min–max band; each diverged run is drawn "
        "alone and ends in a cross. Curves identical to another are dashed and named.",
        applies=lambda g: not g.metrics.empty and "loss" in g.metrics,
        draw=lambda g: plot_training_curves(g.metrics, g.frame),
        not_drawn="training curves: no run has stored metrics yet"),
    FigureEntry(
        "gradient-heatmap", "Gradient propagation",
        "Gradient norm of each block's parameters over training (log colour scale): a row "
        "per model (normalizer-free first, then BN where the grid has it), a column per "
        "clipping setting, each the lowest seed at the largest batch size. `head`: the "
        "classifier and any layer after the last block. A dashed line marks divergence, "
        "hatched grey what follows it; a diverged run's panel shows every step kept before "
        "its divergence where the store has them.",
        applies=lambda g: "grad_norm" in g.stats,
        draw=lambda g: plot_gradient_heatmap(g.blocks, g.frame, flight=g.flight),
        not_drawn="gradient propagation: no block gradient statistics were recorded "
        "(probe_every = 0)"),
    FigureEntry(
        "gains", "Scalar gains",
        "Mean |gain| over each run's blocks (SkipInit gains and other 0-d block parameters), "
        "as recorded by the probe every probe_every steps. A gain that stays at its start "
        "value 0 leaves its residual branch switched off.",
        applies=lambda g: any(str(stat).startswith(GAIN_PREFIX) for stat in g.stats),
        draw=lambda g: plot_gains(g.blocks, g.frame)),
    FigureEntry(
        "agc-clip-fraction", "AGC clip fraction",
        "Fraction of each block's units whose gradient-to-weight norm ratio exceeds the "
        "probe's λ (the units AGC at that λ clips), over training, one colour per block; "
        "dashed: the mean over blocks. The probe's λ is the run's AGC threshold, or 0.01 "
        "for runs without AGC; the panel titles give the run's own clipping. Panels as in "
        "Gradient propagation.",
        applies=lambda g: "agc_frac_above" in g.stats,
        draw=lambda g: plot_agc_clip_fraction(g.blocks, g.frame)),
    FigureEntry(
        "spp", "Signal propagation at initialization",
        "Average channel squared mean, variance and residual variance per block; the "
        "title gives the input, its shape and the seeds (band: min to max over seeds) "
        "(from spp/spp.parquet).",
        applies=lambda g: g.spp_file.is_file(), draw=draw_spp,
        label="signal propagation plot"),
]

# drawn from the frontier frame, inside the "Stability frontier" section
FRONTIER_FIGURES = [
    FigureEntry(
        "frontier", "Stability frontier",
        "Largest stable learning rate against batch size (log-log): a line per "
        "model and clipping setting, and per value of any other axis of the grid such as the "
        "probe length (geometric mean over seeds, band: min to max); dashed: "
        "linear scaling lr ∝ B; triangles: the edge lies beyond the searched range.",
        draw=ff.plot_frontier),
    FigureEntry(
        "frontier-accuracy", "Stability frontier",
        "Final test accuracy of the probe at the largest stable "
        "learning rate, against batch size (band: min to max over seeds); dotted: chance.",
        draw=ff.plot_frontier_accuracy),
]

# drawn from the flight records of the diverged runs the section lists, inside "Diverged and
# failed runs"; the caption's {stat} is the figure's colour scale, {more} says how many drawn
TIMELINE = FigureEntry(
    "divergence-timeline", "Diverged and failed runs",
    "{stat} of each block at every step kept before the divergence "
    "(log colour scale), one panel per diverged run (one per setting whose seeds "
    "agree); dashed: the divergence step; dotted and ringed: the first step and "
    "block out of range (the diagnosis); a white line: steps the recorder did not "
    "keep.{more}",
    draw=plot_divergence_timeline)


def figure_sections(grid_dir: Path, frame: pd.DataFrame, metrics: pd.DataFrame,
                    blocks: pd.DataFrame, flight: pd.DataFrame | None = None
                    ) -> tuple[list[Section], list[str]]:
    """A section for each figure of :data:`FIGURES` that fits this grid, and one line per
    figure that does not, saying why."""
    grid = GridData(grid_dir, frame, metrics, blocks, flight)
    if grid.finished.empty:
        return [], ["every figure: no run has finished yet"]
    sections: list[Section] = []
    skipped: list[str] = []
    for entry in FIGURES:
        if entry.applies is not None and not entry.applies(grid):
            line = entry.not_drawn(grid) if callable(entry.not_drawn) else entry.not_drawn
            if line:
                skipped.append(line)
            continue
        title = entry.title(grid) if callable(entry.title) else entry.title
        try:
            png = figure_bytes(entry.draw(grid))
        except FigureUnavailable as err:
            skipped.append(str(err))
            continue
        except Exception as err:  # one figure failing must not cost the whole report
            line = failure_line(err)
            warnings.warn(f"report figure {entry.name} failed: {line}", stacklevel=2)
            skipped.append(f"{entry.label or title}: drawing failed ({line})")
            continue
        sections.append(Section(title, [Plot(entry.name, entry.caption, png)]))
    return sections, skipped

"""AGC clip fraction: the share of units AGC clips, per block, over training."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reports.figures.frames import block_rows, run_title, selected_runs, with_derived
from reports.figures.style import SEQUENTIAL, CompactPercent, label, new_figure, panel_width, styled
from sigprop.errors import UserError


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

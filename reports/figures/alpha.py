"""Alpha sweep: variance growth per block against alpha, and accuracy against alpha."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reports.figures.frames import (
    block_rows,
    dependent_on,
    ordered_values,
    require,
    seed_summary,
    setting_axes,
    with_derived,
)
from reports.figures.style import (
    LINESTYLES,
    PALETTE,
    diverged_handle,
    fmt_value,
    is_number,
    label,
    mark_diverged,
    new_figure,
    palette_for,
    positions,
    set_value_axis,
    set_x_axis,
    styled,
)
from sigprop.errors import UserError


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

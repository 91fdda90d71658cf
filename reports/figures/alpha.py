"""Alpha sweep: variance growth per block against alpha, and accuracy against alpha."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from reports.figures import frames
from reports.figures.style import (
    LINESTYLES,
    PALETTE,
    chance_handles,
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
    value_limits,
)
from sigprop.errors import UserError


def spp_slopes(blocks: pd.DataFrame, runs: pd.DataFrame, alpha: str = "model.alpha",
               stat: str = "var") -> pd.DataFrame:
    """Within-stage least-squares slope of ``stat`` against block index at each run's first
    recorded step. Columns: run_id, ``alpha``, stage, slope, expected_slope (the same fit of
    ``expected_var``; NaN where absent). Stages with fewer than two blocks have no slope."""
    rows = frames.block_rows(blocks, stat)
    frame = frames.with_derived(runs)
    frames.require(frame, ["run_id", alpha], "the SPP slopes")
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


GAIN_KEY = "model.skipinit_gain"


def theory_applies(runs: pd.DataFrame) -> pd.Series:
    """Per run: does the expected variance 1 + k·α² hold at initialization? Not with SkipInit
    gains that start at 0: the residual branches add nothing until the gains move."""
    if GAIN_KEY not in runs:
        return pd.Series(True, index=runs.index)
    gains = pd.to_numeric(runs[GAIN_KEY], errors="coerce")
    return gains.isna() | (gains != 0)


@styled
def plot_alpha_sweep(
    runs: pd.DataFrame,
    blocks: pd.DataFrame | None = None,
    x: str = "model.alpha",
    y: str = "final_acc",
    hue: str | None = None,
) -> Figure:
    """Up to three panels: the variance profile at the first recorded step per alpha
    (measured solid, expected 1 + k·α² dotted), the within-stage variance slope against alpha
    (measured vs expected α²; only when some stage has two or more blocks), and ``y`` against
    alpha (mean over completed seeds, min-max band, diverged crosses, chance dotted). The
    expectation is drawn only for runs it applies to: not for SkipInit gains starting at 0."""
    frame = frames.with_derived(runs)
    frames.require(frame, [x, y], "the alpha sweep")
    frame = frame[frame[x].notna()].copy()
    if frame.empty:
        raise UserError(f"no runs have {x} (it only exists for NF models)")
    if hue is None:
        settings = frames.setting_axes(frame, exclude=[x])
        hue = next(iter(frames.dependent_on(frame, [x], settings)), None)
    frame["_theory"] = theory_applies(frame)
    has_var = (blocks is not None and not blocks.empty and "stat" in blocks
               and not frames.block_rows(blocks, "var").empty
               and frames.block_rows(blocks, "var")["run_id"].isin(frame["run_id"]).any())
    slopes = spp_slopes(blocks, frame, x) if has_var else pd.DataFrame()
    has_slopes = not slopes.empty  # one block per stage leaves no within-stage slope
    alphas = frames.ordered_values(frame, x)
    alpha_colours = palette_for(alphas)
    hues = frames.ordered_values(frame, hue) if hue else [None]
    hue_colours = palette_for(hues)
    n_panels = 1 + has_var + has_slopes
    fig, axes = new_figure(1, n_panels, 5.0 * n_panels + (0.5 if n_panels == 1 else 0), 4.6)
    to_pos, scale = positions(alphas)
    hue_title = label(hue) if hue else None

    if has_var:
        profile_ax = axes[0][0]
        rows = frames.block_rows(blocks, "var").merge(
            frame[["run_id", x, "_theory", *filter(None, [hue])]], on="run_id")
        rows = rows[rows["step"] == rows.groupby("run_id")["step"].transform("min")]
        drawn_theory = False
        for h_index, hv in enumerate(hues):
            part = rows if hue is None else rows[rows[hue] == hv]
            for av in alphas:
                runs_at = part[part[x] == av]
                curve = runs_at.groupby("index")["value"].mean()
                if curve.empty:
                    continue
                profile_ax.plot(curve.index + 1, curve.to_numpy(), color=alpha_colours[av],
                                linestyle=LINESTYLES[h_index % 4], marker="o", markersize=3.5,
                                linewidth=1.8, gid="profile")
                expected = runs_at[runs_at["_theory"]].groupby("index")["expected_var"].mean()
                if expected.notna().any():
                    profile_ax.plot(expected.index + 1, expected.to_numpy(),
                                    color=alpha_colours[av], linestyle=":", linewidth=1.2,
                                    gid="expected")
                    drawn_theory = True
        if "stage" in rows:
            firsts = rows[rows["stage"] >= 0].groupby("stage")["index"].min().iloc[1:]
            for boundary in firsts:
                profile_ax.axvline(boundary + 0.5, color="grey", linewidth=0.8, alpha=0.6)
        profile_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        profile_ax.set_xlabel("block (0 = stem; grey lines: stage transitions)")
        profile_ax.set_ylabel("activation variance (channel mean)")
        profile_ax.set_title("Variance at the first recorded step")
        keys = [Line2D([], [], color=alpha_colours[a], linewidth=2, label=f"α={a:g}")
                for a in alphas if (rows[x] == a).any()]
        if hue:
            keys += [Line2D([], [], color="black", linestyle=LINESTYLES[i % 4],
                            label=f"{hue_title}: {fmt_value(hv)}")
                     for i, hv in enumerate(hues) if (rows[hue] == hv).any()]
        if drawn_theory:
            keys.append(Line2D([], [], color="black", linestyle=":", label="expected 1 + k·α²"))
        if not frame["_theory"].all():
            keys.append(Line2D([], [], linestyle="none", label="no expectation for SkipInit "
                               "gain 0:\nits branches add no variance at init"))
        profile_ax.legend(handles=keys, fontsize=9, frameon=False)

    if has_slopes:
        slope_ax = axes[0][1]
        slopes = slopes.merge(frame[["run_id", "_theory", *filter(None, [hue])]], on="run_id")
        for hv in hues:
            part = slopes if hue is None else slopes[slopes[hue] == hv]
            stats = part.groupby(x)["slope"].agg(["mean", "std"]).reindex(
                [a for a in alphas if a in set(part[x])])
            colour = hue_colours.get(hv, "black") if hue else sns.color_palette(PALETTE)[0]
            slope_ax.errorbar([to_pos(a) for a in stats.index], stats["mean"],
                              yerr=stats["std"].fillna(0), color=colour, marker="o",
                              linewidth=2, capsize=3, label="measured" if hue is None
                              else fmt_value(hv), gid="slope")
        applies = slopes[slopes["_theory"]]
        expected = applies.groupby(x)["expected_slope"].mean().dropna()
        if expected.empty and len(applies):
            expected = pd.Series({a: a**2 for a in sorted(set(applies[x])) if is_number(a)})
        if len(expected):
            slope_ax.plot([to_pos(a) for a in expected.index], expected.to_numpy(),
                          color="black", linestyle="--", linewidth=1.5, label="expected α²",
                          gid="expected")
        if (slopes["slope"] > 0).all() and len(slopes):
            slope_ax.set_yscale("log")
        set_x_axis(slope_ax, alphas, scale, x)
        slope_ax.set_ylabel("variance gained per block\n(within-stage slope)")
        slope_ax.set_title("Variance growth within a stage")
        slope_ax.legend(fontsize=9, frameon=False, title=hue_title)

    acc_ax = axes[0][-1]
    keys = [k for k in (hue, x) if k]
    summary = frames.seed_summary(frame, keys, y)
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
    chance = frames.chance_level(frame)
    value_limits(acc_ax, y, chance, summary["high"].max(), margin=0.15)
    acc_ax.set_title(f"{label(y).capitalize()} vs α")
    extra = [diverged_handle()] if summary["n_diverged"].any() else []
    extra += chance_handles(y, chance)
    acc_ax.legend(handles=[*acc_ax.get_legend_handles_labels()[0], *extra], fontsize=9,
                  frameon=False, title=hue_title)
    seeds = frames.seeds_text(frame)
    fig.suptitle("Alpha sweep" + (f" ({seeds} per setting)" if seeds else ""), fontsize=12)
    return fig

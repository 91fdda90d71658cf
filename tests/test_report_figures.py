"""Grid figures (reports.figures): the columns they read, and each figure drawn from frames
built in the documented ``load_results`` schema (tests/report_helpers.py), so nothing here
depends on the trainer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from reports.figures.accuracy import plot_accuracy_vs_batch
from reports.figures.alpha import plot_alpha_sweep, spp_slopes
from reports.figures.clipping import plot_agc_clip_fraction
from reports.figures.curves import plot_training_curves, smoothed, smoothing_window
from reports.figures.frames import (
    ordered_values,
    seed_summary,
    setting_axes,
    varied_axes,
    with_derived,
)
from reports.figures.gradients import HEAD_NOTE, plot_gradient_heatmap
from reports.figures.stability import plot_stability_heatmap
from reports.figures.style import (
    figure_png,
    fmt_tick,
    label_with,
    log_ticks,
    palette_for,
    pretty_model,
)
from sigprop.errors import UserError
from tests.report_helpers import (
    BLOCKS,
    PNG_MAGIC,
    agc_batch_runs,
    fake_blocks,
    fake_metrics,
    gids,
    lambda_batch_runs,
    run_row,
)


def data_axes(fig: Figure) -> list:
    """Plot axes, without colour bars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def strip_names(strip) -> list[str]:
    """The row names of a diverged-runs strip, top row first."""
    return [t.get_text() for t in strip.texts if t.get_gid() == "diverged-row-name"]


def assert_png(fig: Figure) -> None:
    png = figure_png(fig)
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


# ----------------------------------------------------------------------------- columns


def test_defaults_come_from_the_varied_axes():
    runs = agc_batch_runs()
    assert varied_axes(runs) == ["batch_size", "clip.mode", "clip.threshold", "model.name",
                                    "seed"]
    derived = with_derived(runs)
    assert setting_axes(derived) == ["batch_size", "clipping", "model"]
    # a raw threshold axis keeps the mode raw too
    assert setting_axes(derived, exclude=["clip.threshold"]) == [
        "batch_size", "clip.mode", "model"]
    assert set(derived["clipping"]) == {"no clipping", "global norm λ=1", "AGC λ=0.01"}
    assert pretty_model("bn_resnet50_v2") == "BN-ResNet-50 v2"
    assert pretty_model("nfnet_f3") == "NFNet-F3"
    assert ordered_values(derived, "clipping") == ["no clipping", "global norm λ=1",
                                                      "AGC λ=0.01"]


def test_seed_summary_averages_completed_runs_and_counts_the_rest():
    runs = lambda_batch_runs()
    summary = seed_summary(runs, ["clip.threshold", "batch_size"])
    cell = summary[(summary["clip.threshold"] == 0.04) & (summary["batch_size"] == 4096)].iloc[0]
    assert (cell["n_completed"], cell["n_diverged"], cell["n_runs"]) == (1, 1, 2)
    # the final accuracy counts the diverged seed at chance (synthetic data: 10 classes)
    assert cell["mean"] == pytest.approx((0.9 - 0.2 - 0.04 + 0.1) / 2)
    assert cell["n_at_chance"] == 1
    # any other metric averages the completed seeds only
    grad = seed_summary(runs, ["clip.threshold", "batch_size"], "max_grad_norm")
    assert grad["mean"].tolist()[:8] == [3.0] * 8 and np.isnan(grad["mean"].iloc[8])
    assert not grad["n_at_chance"].any()
    assert list(summary["batch_size"][:3]) == [256, 1024, 4096]  # numeric order


# ----------------------------------------------------------------------------- figures


def test_stability_heatmap_marks_divergence_and_the_best_threshold():
    fig = plot_stability_heatmap(lambda_batch_runs())
    (ax,) = data_axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "1024", "4096"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.01", "0.04", "0.16"]
    image = ax.get_images()[0].get_array()
    assert image.shape == (3, 3)
    assert image[0, 0] == pytest.approx(0.9 - 0.01 + 0.005)  # mean of seeds 0 and 1
    assert image[2, 2] == pytest.approx(0.1)  # every seed diverged: at chance, hatched
    assert image[1, 2] == pytest.approx((0.9 - 0.2 - 0.04 + 0.1) / 2)  # one of two at chance
    hatched = gids(fig, "diverged-cell")
    assert len(hatched) == 1 and hatched[0].get_xy() == (1.5, 1.5)
    counts = sorted(t.get_text() for t in gids(fig, "diverged-count"))
    assert counts == ["10.0%\n×2/2 diverged", f"{(0.9 - 0.2 - 0.04 + 0.1) / 2:.1%}\n×1/2"]
    best = gids(fig, "best")
    assert len(best) == 3  # one per batch size: the smallest lambda wins everywhere here
    assert sorted(r.get_xy() for r in best) == [(-0.5, -0.5), (0.5, -0.5), (1.5, -0.5)]
    assert "diverged: 3 of 18 runs" in ax.get_title()
    assert_png(fig)


def test_heatmap_best_box_prefers_fewer_divergences_and_shows_missing_cells():
    runs = lambda_batch_runs()
    # make lambda=0.04 the most accurate at 4096 although one seed diverged: it must not win
    runs.loc[runs["run_id"] == "t0.04-b4096-s0", "final_acc"] = 0.99
    runs.loc[runs["run_id"] == "t0.01-b256-s0", "status"] = "queued"
    runs.loc[runs["run_id"] == "t0.01-b256-s1", "status"] = "failed"
    fig = plot_stability_heatmap(runs)
    best = {r.get_xy()[0]: r.get_xy()[1] for r in gids(fig, "best")}
    assert best[1.5] == -0.5  # lambda 0.01 at batch 4096, not the more accurate 0.04
    assert best[-0.5] == 0.5  # lambda 0.04 at batch 256: the 0.01 cell has no result
    missing = [t.get_text() for t in gids(fig, "missing")]
    assert missing == ["1 failed\n1 not run"]


def test_heatmap_explicit_columns_make_panels():
    runs = pd.concat([lambda_batch_runs().assign(**{"model.name": name},
                                                 run_id=lambda f, n=name: f["run_id"] + n)
                      for name in ("nf_resnet26", "nf_resnet50")], ignore_index=True)
    runs["axes"] = [tuple(sorted({*a, "model.name"})) for a in runs["axes"]]
    fig = plot_stability_heatmap(runs)  # the model varies too: one panel per model
    titles = [ax.get_title().splitlines()[0] for ax in data_axes(fig)]
    assert titles == ["NF-ResNet-26", "NF-ResNet-50"]
    fig = plot_stability_heatmap(runs, x="clip.threshold", y="batch_size", col="model.name")
    ax = data_axes(fig)[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["256", "1024", "4096"]
    assert data_axes(fig)[1].get_title().startswith("model = nf_resnet50")


def test_accuracy_vs_batch_lines_bands_and_diverged_marks():
    runs = agc_batch_runs()
    fig = plot_accuracy_vs_batch(runs)
    ax, strip = data_axes(fig)  # the accuracy panel and the diverged-runs strip under it
    lines = gids(fig, "mean")
    assert len(lines) == 4  # NF none / norm / AGC and BN unclipped
    assert len(gids(fig, "band")) == 4
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert [t.get_text() for t in strip.get_xticklabels()] == ["64", "256", "1024", "4096"]
    assert isinstance(ax.yaxis.get_major_formatter(), PercentFormatter)
    percent = ax.yaxis.get_major_formatter()
    assert [percent(v) for v in (0.46, 0.455, 0.4425, 0.0)] == ["46%", "45.5%", "44.25%", "0%"]
    assert "batch size" in strip.get_xlabel() and "(%)" in ax.get_ylabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["no clipping", "global norm λ=1", "AGC λ=0.01"]
    assert {"NF-ResNet-26", "BN-ResNet-26 v2", "diverged run"} <= set(legend)
    # unclipped NF has no completed run at 4096: its line ends there at chance (every seed
    # diverged), global norm's counts its one diverged seed at chance
    assert sorted(ln.get_ydata()[-1] for ln in lines) == pytest.approx(
        [0.1, (0.75 + 0.76 + 0.1) / 3, 0.76, 0.81])
    # one strip row per line with divergences: NF unclipped (3 of 3) and global norm (1 of 3)
    assert strip_names(strip) == ["no clipping, NF-ResNet-26", "global norm λ=1, NF-ResNet-26"]
    marks = gids(fig, "diverged")
    assert [(m.get_xdata()[0], m.get_ydata()[0]) for m in marks] == [(4096, 0), (4096, 1)]
    assert [t.get_text() for t in gids(fig, "diverged-count")] == ["3/3", "1/3"]
    agc = next(ln for ln in lines if np.allclose(
        ln.get_ydata(), [0.86 - 0.05 * np.log2(b / 64) / 6 for b in (64, 256, 1024, 4096)]))
    assert agc.get_color() == palette_for(
        ordered_values(with_derived(runs), "clipping"))["AGC λ=0.01"]
    assert_png(fig)
    # one seed and no divergence: no band key, no strip, no diverged key
    calm = runs[(runs["seed"] == 0) & (runs["batch_size"] < 4096)]
    fig = plot_accuracy_vs_batch(calm)
    assert len(data_axes(fig)) == 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "min–max over seeds" not in legend and "diverged run" not in legend


def test_accuracy_plot_takes_explicit_hue_and_facets_the_rest():
    fig = plot_accuracy_vs_batch(agc_batch_runs(), hue="model")
    titles = [ax.get_title() for ax in data_axes(fig)]
    assert titles == ["no clipping", "global norm λ=1", "AGC λ=0.01", "", "", ""]  # + strips
    assert len(gids(fig, "mean")) == 4  # BN only exists unclipped
    fig = plot_accuracy_vs_batch(agc_batch_runs(), x="clipping", hue="batch_size",
                                    col="model")
    main, _, first_strip, second_strip = data_axes(fig)
    assert main.get_xscale() == "linear"  # categorical x
    assert [t.get_text() for t in second_strip.get_xticklabels()] == [
        "no clipping", "global norm λ=1", "AGC λ=0.01"]
    assert strip_names(first_strip) == ["4096"]


@pytest.mark.slow
def test_training_curves_panels_per_batch_and_divergence_points():
    runs = pd.DataFrame([
        run_row("a", {"batch_size": 64, "clip.mode": "agc"}, acc=0.8),
        run_row("b", {"batch_size": 64, "clip.mode": "none"}, acc=0.7, **{"clip.mode": "none"}),
        run_row("c", {"batch_size": 1024, "clip.mode": "agc"}, acc=0.75),
        run_row("d", {"batch_size": 1024, "clip.mode": "none"}, status="diverged",
                diverged_step=30, **{"clip.mode": "none"}),
    ])
    runs.loc[:, "batch_size"] = [64, 64, 1024, 1024]
    metrics = pd.concat([fake_metrics("a", final_acc=0.8), fake_metrics("b", final_acc=0.7),
                         fake_metrics("c", final_acc=0.75),
                         fake_metrics("d", diverged_step=30)], ignore_index=True)
    fig = plot_training_curves(metrics, runs)
    axes = data_axes(fig)
    assert len(axes) == 4  # loss and accuracy rows x two batch sizes
    assert [axes[i].get_title() for i in (0, 1)] == ["batch size (examples) = 64",
                                                     "batch size (examples) = 1024"]
    assert axes[0].get_yscale() == "linear"  # the loss spans less than a decade
    assert axes[2].get_xlabel() == "training step (updates)"
    curves = gids(fig, "curve")
    assert len(curves) == 8
    loss_d = [ln for ln in axes[1].get_lines() if ln.get_gid() == "curve"]
    assert max(max(ln.get_xdata()) for ln in loss_d) == 39  # the completed run
    assert min(max(ln.get_xdata()) for ln in loss_d) == 29  # the diverged one stops before
    marks = gids(fig, "diverged")
    assert len(marks) == 2 and all(m.get_xdata()[0] == 30 for m in marks)
    # the accuracy curve ends on the final accuracy, evaluated after the last update
    acc_64 = [ln for ln in axes[2].get_lines() if ln.get_gid() == "curve"]
    assert [ln.get_xdata()[-1] for ln in acc_64] == [40, 40]
    assert sorted(ln.get_ydata()[-1] for ln in acc_64) == pytest.approx([0.7, 0.8])
    assert_png(fig)
    # a loss blowing up before the divergence step needs a log axis
    metrics.loc[(metrics["run_id"] == "d") & (metrics["step"] > 20), "loss"] *= 40
    fig = plot_training_curves(metrics, runs, hue="batch_size", x="epoch")
    assert data_axes(fig)[0].get_yscale() == "log"
    assert len(data_axes(fig)) == 2
    assert data_axes(fig)[1].get_xlabel() == "epoch"


@pytest.mark.slow
def test_gradient_heatmap_blocks_by_steps_on_a_log_scale():
    runs = pd.DataFrame([
        # listed first, but panels prefer the normalizer-free model
        run_row("bn", {"clip.mode": "none", "batch_size": 1024, "model.name": "bn_resnet26_v2"},
                batch_size=1024, **{"clip.mode": "none"}),
        run_row("agc", {"clip.mode": "agc", "batch_size": 1024}, batch_size=1024),
        run_row("none", {"clip.mode": "none", "batch_size": 1024}, status="diverged",
                diverged_step=25, batch_size=1024, **{"clip.mode": "none"}),
        run_row("agc-small", {"clip.mode": "agc", "batch_size": 64}, batch_size=64),
    ])
    blocks = pd.concat([fake_blocks(r) for r in runs["run_id"]], ignore_index=True)
    blocks.loc[(blocks["run_id"] == "agc") & (blocks["step"] == 0), "value"] = 0.0
    missing = (blocks["run_id"] == "none") & (blocks["step"] == 10) & (blocks["block"] == "stem")
    blocks = blocks[~missing]
    fig = plot_gradient_heatmap(blocks, runs)
    axes = data_axes(fig)
    # a row per model (NF first, BN too), a column per clipping, at the largest batch size;
    # BN was not run with AGC: that cell says so instead of drawing an empty frame
    assert len(axes) == 4
    assert axes[0].get_title().startswith("no clipping\nbatch size 1024, seed 0")
    assert axes[1].get_title().startswith("AGC λ=0.04\nbatch size 1024, seed 0")
    assert axes[2].get_title().startswith("no clipping\nbatch size 1024, seed 0")
    assert axes[0].get_ylabel().startswith("NF-ResNet-26\n")
    assert axes[2].get_ylabel().startswith("BN-ResNet-26 v2\n")
    assert not axes[3].axison and [t.get_text() for t in gids(fig, "no-run")] == [
        "no run of\nBN-ResNet-26 v2 with AGC λ=0.04"]
    # zero gradients sit below the colour scale (its "under" colour), named in the legend
    zero_column = axes[1].collections[0].get_array()[:, 0]
    assert (zero_column < axes[1].collections[0].norm.vmin).all()
    assert np.ma.is_masked(axes[0].collections[0].get_array()[0, 1])  # not recorded
    keys = [t.get_text() for t in fig.legends[0].get_texts()]
    assert keys == ["not recorded", "exactly zero", "divergence step", "after divergence",
                    HEAD_NOTE]
    mesh = axes[0].collections[0]
    assert mesh.get_array().shape == (len(BLOCKS), 4)
    assert isinstance(mesh.norm, LogNorm)
    # the probe's "other" group is the head, named so
    assert [t.get_text() for t in axes[0].get_yticklabels()] == [
        "head" if b == "other" else b for b, _, _ in BLOCKS]
    assert axes[1].get_yticklabels() == [] or not [
        t.get_text() for t in axes[1].get_yticklabels() if t.get_text()]
    # the colour bar has readable ticks across its whole range
    (colourbar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    ticks = [t for t in colourbar.get_yticks() if mesh.norm.vmin <= t <= mesh.norm.vmax]
    assert len(ticks) >= 3
    assert all(t.get_text() and "10^" not in t.get_text() for t in colourbar.get_yticklabels())
    diverged = gids(fig, "diverged")
    assert len(diverged) == 1 and diverged[0].get_xdata()[0] == 25
    assert mesh.get_array()[1, 2] == pytest.approx(0.1 * 2 * 21)  # stages.0.0 at step 20
    assert_png(fig)
    fig = plot_gradient_heatmap(blocks, runs, run_ids=["agc-small"])
    assert len(data_axes(fig)) == 1
    with pytest.raises(UserError, match="no block statistics for run"):
        plot_gradient_heatmap(blocks, runs, run_ids=["nope"])


def test_agc_clip_fraction_one_line_per_block_or_parameter():
    runs = pd.DataFrame([run_row("r", {"batch_size": 256})])
    blocks = fake_blocks("r", params=True)
    fig = plot_agc_clip_fraction(blocks, runs)
    (ax,) = data_axes(fig)
    assert len(gids(fig, "unit-line")) == len(BLOCKS)
    mean = gids(fig, "mean")[0]
    assert list(mean.get_xdata()) == [0, 10, 20, 30]
    assert isinstance(ax.yaxis.get_major_formatter(), PercentFormatter)
    assert "‖G‖/‖W‖" in ax.get_ylabel()
    assert_png(fig)
    fig = plot_agc_clip_fraction(blocks, runs, level="param")
    assert len(gids(fig, "unit-line")) == 2 * (len(BLOCKS) - 1)
    with pytest.raises(UserError, match="no per-parameter rows"):
        plot_agc_clip_fraction(fake_blocks("r"), runs, level="param")


def alpha_sweep_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, blocks = [], []
    for alpha in (0.1, 0.2, 0.4, 0.8):
        for seed in (0, 1):
            run_id = f"a{alpha}-s{seed}"
            diverged = alpha == 0.8 and seed == 1
            rows.append(run_row(run_id, {"model.alpha": alpha, "seed": seed},
                                status="diverged" if diverged else "completed",
                                acc=0.9 - alpha / 4, diverged_step=3 if diverged else None))
            blocks.append(fake_blocks(run_id, alpha=alpha, steps=(0, 50), noise=0.002,
                                      seed=seed))
    return pd.DataFrame(rows), pd.concat(blocks, ignore_index=True)


def test_spp_slopes_recover_alpha_squared():
    runs, blocks = alpha_sweep_frames()
    slopes = spp_slopes(blocks, runs)
    assert len(slopes) == 8 * 2  # runs x stages
    per_alpha = slopes.groupby("model.alpha")["slope"].mean()
    assert np.allclose(per_alpha.to_numpy(), [a**2 for a in per_alpha.index], rtol=0.1, atol=1e-3)
    assert np.allclose(slopes["expected_slope"], slopes["model.alpha"] ** 2)


@pytest.mark.slow
def test_alpha_sweep_three_panels():
    runs, blocks = alpha_sweep_frames()
    fig = plot_alpha_sweep(runs, blocks)
    profile, slope, acc = data_axes(fig)
    assert len(gids(fig, "profile")) == 4 and len(gids(fig, "expected")) == 5
    assert slope.get_xscale() == "log" and slope.get_yscale() == "log"
    assert [t.get_text() for t in acc.get_xticklabels()] == ["0.1", "0.2", "0.4", "0.8"]
    (mean,) = [ln for ln in acc.get_lines() if ln.get_gid() == "mean"]
    # alpha 0.8: one of its two seeds diverged and counts at chance
    assert np.allclose(mean.get_ydata(), [0.9 - a / 4 for a in (0.1, 0.2, 0.4)]
                       + [(0.9 - 0.8 / 4 + 0.1) / 2])
    assert len(gids(fig, "diverged")) == 1
    assert_png(fig)
    only_accuracy = plot_alpha_sweep(runs)
    assert len(data_axes(only_accuracy)) == 1


def test_plots_reject_frames_without_their_columns():
    runs = agc_batch_runs().drop(columns=["clip.threshold"])
    with pytest.raises(UserError, match="clip.threshold"):
        plot_stability_heatmap(runs)
    with pytest.raises(UserError, match="no 'agc_frac_above' rows"):
        plot_agc_clip_fraction(fake_blocks("r").query("stat != 'agc_frac_above'"),
                                  agc_batch_runs())


@pytest.mark.slow
def test_accuracy_axis_from_zero_with_chance_and_one_label():
    runs = agc_batch_runs().assign(**{"model.num_classes": 10})
    fig = plot_accuracy_vs_batch(runs)
    ax, strip = data_axes(fig)
    assert ax.get_ylim()[0] == 0  # gaps read as proportions
    (chance,) = [ln for ln in ax.get_lines() if ln.get_gid() == "chance"]
    assert list(chance.get_ydata()) == [0.1, 0.1]  # 1 / num_classes
    assert strip.get_xlabel() == "batch size (examples, log₂ scale)"  # no ") ("
    assert "chance (10%)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert "mean over 3 seeds" in fig.get_suptitle()
    # without a class count there is no known chance level, so no line
    assert not gids(plot_accuracy_vs_batch(agc_batch_runs()), "chance")
    assert label_with("seed", "x") == "seed (x)"


def test_training_curves_average_seeds_and_name_what_would_hide():
    runs, metrics = [], []
    for batch, steps in ((64, 40), (1024, 20)):
        for mode in ("none", "norm"):
            for seed in (0, 1):
                run_id = f"{mode}-b{batch}-s{seed}"
                runs.append(run_row(run_id, {"batch_size": batch, "clip.mode": mode,
                                             "seed": seed}, **{"clip.mode": mode}))
                frame = fake_metrics(run_id, steps=steps)
                frame["loss"] += 0.01 * seed  # seeds differ; the two clipping modes do not
                metrics.append(frame)
    runs = pd.DataFrame(runs).assign(**{"model.num_classes": 10})
    runs["batch_size"] = [int(r.split("-b")[1].split("-")[0]) for r in runs["run_id"]]
    runs["steps_done"] = np.where(runs["batch_size"] == 64, 40, 20)
    metrics = pd.concat(metrics, ignore_index=True)
    fig = plot_training_curves(metrics, runs)
    loss_64, loss_1024, acc_64, _ = data_axes(fig)
    curves = [ln for ln in loss_64.get_lines() if ln.get_gid() == "curve"]
    assert len(curves) == 2  # one per setting, not one per run
    assert len([c for c in loss_64.collections if c.get_gid() == "band"]) == 2
    # the line is the mean over seeds of each seed's centred rolling mean
    window = smoothing_window(39)
    assert (window, smoothing_window(100), smoothing_window(300), smoothing_window(8)) == (
        5, 7, 20, 1)
    seeds = [smoothed(m["loss"].reset_index(drop=True), window) for _, m in metrics[
        metrics["run_id"].isin(["none-b64-s0", "none-b64-s1"])].groupby("run_id")]
    assert np.allclose(curves[0].get_ydata(), (seeds[0] + seeds[1]) / 2)
    # the global-norm curve equals the unclipped one: dashed over it, and named
    assert [c.get_linestyle() for c in curves] == ["-", "--"]
    notes = fig._supxlabel.get_text()
    assert "Identical curves (dashed over each other): global norm λ=0.04 = no clipping " \
        "(batch size 64)" in notes
    assert "different step ranges: 40 steps (batch size 64), 20 steps (batch size 1024)" \
        in notes
    assert f"rolling mean over {window} steps" in notes
    assert acc_64.get_ylim()[0] == 0 and gids(fig, "chance")
    assert "2 seeds" in fig.get_suptitle()


@pytest.mark.parametrize("low, high", [(1e-4, 2.0), (0.2, 0.9), (0.41, 0.45), (3.0, 12.0)])
def test_log_ticks_are_three_or_more_readable_values(low, high):
    ticks = log_ticks(low, high)
    assert len(ticks) >= 3 and ticks == sorted(set(ticks))
    assert all(low * 0.99 <= t <= high * 1.01 for t in ticks)
    assert all(len(fmt_tick(t)) <= 6 for t in ticks)


def test_agc_clip_fraction_legend_per_block_and_the_probes_lambda():
    runs = pd.DataFrame([
        run_row("agc", {"clip.mode": "agc", "batch_size": 256}),
        run_row("norm", {"clip.mode": "norm", "batch_size": 256},
                **{"clip.mode": "norm", "clip.threshold": 1.0}),
    ])
    blocks = pd.concat([fake_blocks("agc"), fake_blocks("norm")], ignore_index=True)
    fig = plot_agc_clip_fraction(blocks, runs)
    norm_ax, agc_ax = data_axes(fig)
    # the run's clipping first, the probe's lambda on a line of its own
    assert norm_ax.get_title() == "global norm λ=1\nbatch size 256, seed 0\nprobe λ = 0.01"
    assert agc_ax.get_title() == "AGC λ=0.04\nbatch size 256, seed 0\nprobe λ = 0.04"
    assert "probe λ" in norm_ax.get_ylabel()
    names = ["head" if b == "other" else b for b, _, _ in BLOCKS]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()][:len(BLOCKS) + 1] == [
        *names, "mean over blocks"]
    # one categorical colour per block, the same in the legend and in every panel
    key_colours = [to_rgb(h.get_color()) for h in legend.legend_handles[:len(BLOCKS)]]
    assert len(set(key_colours)) == len(BLOCKS)
    for ax in (norm_ax, agc_ax):
        lines = [ln for ln in ax.get_lines() if ln.get_gid() == "unit-line"]
        assert [to_rgb(ln.get_color()) for ln in lines] == key_colours
    assert not [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_alpha_sweep_with_one_block_per_stage_and_gain_zero_runs():
    rows, blocks = [], []
    for alpha in (0.1, 0.4):
        for gain in (0.0, 1.0):
            run_id = f"a{alpha}-g{gain}"
            rows.append(run_row(run_id, {"model.alpha": alpha, "model.skipinit_gain": gain},
                                **{"model.skipinit_gain": gain}))
            frame = fake_blocks(run_id, alpha=alpha, steps=(0, 10))
            blocks.append(frame[frame["block"].isin(["stem", "stages.0.0", "stages.1.0",
                                                     "other"])])
    fig = plot_alpha_sweep(pd.DataFrame(rows), pd.concat(blocks, ignore_index=True))
    axes = data_axes(fig)
    assert len(axes) == 2 and all(ax.has_data() for ax in axes)  # no empty slope panel
    profile = axes[0]
    assert len(gids(fig, "profile")) == 4
    expected = gids(fig, "expected")  # for the two gain-1 runs only
    assert len(expected) == 2
    assert sorted(round(max(ln.get_ydata()), 4) for ln in expected) == [1.01, 1.16]
    assert all(float(t).is_integer() for t in profile.get_xticks())
    keys = [t.get_text() for t in profile.get_legend().get_texts()]
    assert any(k.startswith("no expectation for SkipInit gain 0") for k in keys)

"""Issue 22's papercuts: SPP figures that do not mislead, and the small API defects."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from torch import nn

from reports.figures.spp import DEVIATION_TOLERANCE, OKABE_ITO, plot_spp, spp_title
from run_ablations import main
from sigprop.spp import SPP_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def spp_frame(values: dict[str, dict[str, list[float]]], seeds: int = 2,
              expected: dict[str, list[float]] | None = None, jitter: float = 0.01,
              tiny_from: int | None = None) -> pd.DataFrame:
    """Stem + blocks per model: ``values[model][stat]`` lists the stem first for sq_mean and
    var, blocks only for res_var; ``expected[model]`` the blocks' expected variances."""
    rows = []
    for model, stats in values.items():
        n_blocks = len(stats["res_var"])
        for seed in range(seeds):
            scale = 1 + jitter * seed
            for index in range(-1, n_blocks):
                stage = -1 if index < 0 else index // 3
                exp = np.nan if index < 0 or expected is None else expected[model][index]
                tiny = tiny_from is not None and index >= tiny_from
                for stat, series in stats.items():
                    if stat == "res_var" and index < 0:
                        continue
                    value = series[index] if stat == "res_var" else series[index + 1]
                    rows.append({
                        "model": model, "input": "noise", "input_shape": "4x3x32x32",
                        "seed": seed, "block": "stem" if index < 0 else f"b{index}",
                        "stage": stage, "index": index, "stat": stat, "value": value * scale,
                        "expected_var": exp, "rel_dev": np.nan, "map_size": 4 if tiny else 32,
                        "tiny_map": tiny, "pool_factor": np.nan,
                    })
    return pd.DataFrame(rows, columns=SPP_COLUMNS)


def flat_mlp_frame() -> pd.DataFrame:
    """The researcher's custom MLP: a variance flat at 0.3381-0.3386, no theory."""
    var = [0.3381, 0.3383, 0.3386, 0.3384, 0.3382]
    return spp_frame({"MLP": {"sq_mean": [0.0021, 0.0022, 0.0021, 0.0023, 0.0022], "var": var,
                              "res_var": [0.3382, 0.3384, 0.3385, 0.3383]}}, seeds=1)


# ----------------------------------------------------------------------------- axis scale


def test_a_flat_profile_gets_a_log_axis_wide_enough_to_look_flat():
    fig = plot_spp(flat_mlp_frame())
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
    low, high = fig.axes[1].get_ylim()
    assert high / low >= 2.0  # 0.3381-0.3386 alone would fill the panel
    assert low < 0.3381 and high > 0.3386
    # the data sit in the middle of the window, not at an edge
    middle = np.sqrt(low * high)
    assert 0.3381 / 1.1 < middle < 0.3386 * 1.1


def test_every_model_gets_the_same_scale_as_a_registered_one():
    decades = {"sq_mean": [1e-3, 1e-2, 1e-1, 1, 10], "var": [1, 2, 40, 80, 160],
               "res_var": [1, 1, 1, 1]}
    registered = plot_spp(spp_frame({"nf_resnet26": decades}, seeds=1))
    custom = plot_spp(flat_mlp_frame())
    assert [ax.get_yscale() for ax in registered.axes] == [ax.get_yscale() for ax in custom.axes]


# ----------------------------------------------------------------------------- title


def test_title_says_the_seeds_vary_nothing_when_the_values_are_identical():
    frame = spp_frame({"MLP": {"sq_mean": [0.1] * 4, "var": [1.0] * 4, "res_var": [1.0] * 3}},
                      seeds=2, jitter=0.0)
    title = spp_title(frame)
    assert "seeds vary nothing" in title and "band" not in title
    fig = plot_spp(frame)
    assert not [c for ax in fig.axes for c in ax.collections]  # no band of width 0


def tiny_mlp() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.blocks_ = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks_(self.stem(x))

    return Net()


def test_title_says_what_varied_for_a_fixed_batch():
    from sigprop.spp import signal_propagation

    batch = torch.randn(4, 3, 16, 16)
    small = {"width_mult": 0.125, "stem": "cifar", "depths": (1, 1), "widths": (256, 512)}
    named = signal_propagation("nf_resnet26", batch=batch, seeds=2, overrides=small)
    title = spp_title(named)
    assert "fixed batch" in title and "vary only the init" in title
    assert "i.i.d." not in title  # the input was the caller's batch, not drawn noise

    torch.manual_seed(0)
    module = signal_propagation(tiny_mlp(), batch=batch, seeds=2,
                                probe_kwargs={"blocks": "blocks_.*", "stem": "stem"})
    assert "vary nothing" in spp_title(module)
    drawn = signal_propagation(tiny_mlp(), (4, 3, 8, 8), seeds=2,
                               probe_kwargs={"blocks": "blocks_.*", "stem": "stem"})
    assert "vary only the input" in spp_title(drawn)


# ----------------------------------------------------------------------------- deviations


def test_caption_lists_every_deviation_by_one_stated_rule():
    expected = {"nfnet_f0": [1.04, 1.08, 1.12, 1.04, 1.08, 1.12],
                "nf_resnet50": [1.04, 1.08, 1.12, 1.04, 1.08, 1.12]}
    f0_var = [1.0, 1.04 * 0.44, 1.08, 1.12, 1.04, 1.08, 1.12]  # first block -56%
    r50_var = [1.0, 1.04 * 1.17, 1.08 * 1.24, 1.12 * 1.2, 1.04, 1.08, 1.12 * 1.05]
    frame = spp_frame({
        "nfnet_f0": {"sq_mean": [0.1] * 7, "var": f0_var, "res_var": [1.0] * 6},
        "nf_resnet50": {"sq_mean": [0.1] * 7, "var": r50_var,
                        "res_var": [1.0, 1.0, 1.0, 0.85, 0.85, 0.86]},
    }, expected=expected, jitter=0.0)
    caption = plot_spp(frame)._supxlabel.get_text().replace("\n", " ")
    assert f"{DEVIATION_TOLERANCE:.0%}" in caption  # the rule is stated
    assert "nfnet_f0: variance -56% at block 1" in caption
    assert "nf_resnet50: variance +17% to +24% at blocks 1-3" in caption
    assert "residual variance 0.85-0.86 at blocks 4-6" in caption
    # within the tolerance (+5% at block 6) is no deviation
    assert "block 6:" not in caption and "blocks 1-3, 6" not in caption
    assert caption.count("nfnet_f0:") == 1


def test_no_deviation_line_when_the_theory_holds():
    exp = {"nf": [1.04, 1.08, 1.12]}
    frame = spp_frame({"nf": {"sq_mean": [0.1] * 4, "var": [1.0, 1.04, 1.08, 1.12],
                              "res_var": [1.0, 0.98, 1.01]}}, expected=exp)
    assert "Off the theory" not in plot_spp(frame)._supxlabel.get_text()


# ----------------------------------------------------------------------------- legend, colours


@pytest.mark.slow
def test_legend_is_outside_every_panel_and_the_colours_are_okabe_ito():
    names = ["NF-ResNet-600", "NF-ResNet-600 w/o WS", "BN act_bn_conv", "BN bn_act_conv"]
    frame = spp_frame({n: {"sq_mean": [0.1, 0.2, 0.3, 0.4], "var": [1, 2, 3, 4],
                           "res_var": [1.0, 1.0, 1.0]} for n in names})
    fig = plot_spp(frame)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
    colours = [to_hex(line.get_color()) for line in fig.axes[0].get_lines()
               if line.get_linestyle() == "-"]
    assert colours == [c.lower() for c in OKABE_ITO[:4]]
    assert not {"#e69f00", "#d55e00"} <= set(colours)  # orange and vermilion not together
    markers = {line.get_marker() for line in fig.axes[0].get_lines()
               if line.get_linestyle() == "-"}
    assert len(markers) == 4  # a second cue besides the hue


# ----------------------------------------------------------------------------- spp command


SMALL = ["--model", "nf_resnet26", "--set", "width_mult=0.125", "--set", "stem=cifar",
         "--set", "depths=[1,1]", "--set", "widths=[256,512]", "--input-shape", "4,3,16,16",
         "--seeds", "1"]


@pytest.mark.slow
def test_a_second_spp_warns_before_it_overwrites(tmp_path, capsys):
    out = tmp_path / "spp"
    assert main(["spp", *SMALL, "--out", str(out)]) == 0
    assert "overwriting" not in capsys.readouterr().err
    assert main(["spp", *SMALL, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "overwriting" in line]
    assert len(lines) == 1 and lines[0].startswith("sigprop: warning: overwriting")
    assert str(out) in lines[0]


@pytest.mark.slow
def test_models_columns_use_the_readme_words(capsys):
    assert main(["models", "--family", "nf_resnet"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["name", "family", "params", "depth", "px"]
    readme = (ROOT / "README.md").read_text()
    assert "name, family, params, depth, px" in readme


# ----------------------------------------------------------------------------- API


def test_count_parameters_takes_a_module_and_rejects_anything_else_in_one_line():
    import sigprop
    from sigprop.models import ModelError

    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    assert sigprop.count_parameters(net) == 3 * 5 + 5 + 5 * 2 + 2
    assert sigprop.count_parameters("bn_resnet50_v1") == 25_557_032
    with pytest.raises(ModelError) as err:
        sigprop.count_parameters(net, width_mult=0.5)
    assert "\n" not in str(err.value) and "Linear" not in str(err.value)
    with pytest.raises(ModelError) as err:
        sigprop.count_parameters(3.5)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


@pytest.mark.slow
def test_sigprop_exports_the_api_and_nothing_else_and_stays_light():
    import sigprop
    from sigprop.clipping import ClipConfig
    from sigprop.probes import Probe
    from sigprop.spp import signal_propagation
    from sigprop.train import TrainConfig, train

    names = dir(sigprop)
    assert "Any" not in names and "importlib" not in names
    for name, obj in [("train", train), ("TrainConfig", TrainConfig), ("Probe", Probe),
                      ("signal_propagation", signal_propagation), ("ClipConfig", ClipConfig)]:
        assert name in names and name in sigprop.__all__
        assert getattr(sigprop, name) is obj
    with pytest.raises(AttributeError):
        sigprop.no_such_thing  # noqa: B018
    script = textwrap.dedent("""
        import sys
        import sigprop, reports.figures
        print(sorted(m for m in ("torch", "pandas", "matplotlib") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reports_figures_exports_the_plot_functions_lazily():
    import reports.figures as figures
    from reports.figures import plot_spp as exported
    from reports.figures.accuracy import plot_accuracy_vs_batch
    from reports.figures.spp import plot_spp as defined

    assert exported is defined
    assert figures.plot_accuracy_vs_batch is plot_accuracy_vs_batch
    assert "plot_spp" in dir(figures)
    with pytest.raises(AttributeError):
        figures.plot_nothing  # noqa: B018


def test_accuracy_title_with_seed_on_x_says_no_seeds_were_averaged():
    from reports.figures.accuracy import plot_accuracy_vs_batch
    from tests.report_helpers import agc_batch_runs

    runs = agc_batch_runs()
    runs = runs[runs["batch_size"] == 64]
    title = plot_accuracy_vs_batch(runs, x="seed").get_suptitle()
    assert "mean over 3 seeds" not in title and "one run per point" in title
    assert "mean over 3 seeds" in plot_accuracy_vs_batch(runs).get_suptitle()


@pytest.mark.slow
def test_a_bad_spp_input_warns_of_no_overwrite_and_keeps_the_stored_one(tmp_path, capsys):
    out = tmp_path / "spp"
    assert main(["spp", *SMALL, "--out", str(out)]) == 0
    before = (out / "spp.parquet").read_bytes()
    capsys.readouterr()
    assert main(["spp", *SMALL, "--set", "alpah=0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "overwriting" not in err and err.count("\n") == 1
    assert (out / "spp.parquet").read_bytes() == before


def test_scattered_deviations_are_summarised_per_stage():
    # one noisy seed over two stages of six blocks: every other block off by 15%
    res = [0.85 if i % 2 else 1.0 for i in range(12)]
    exp = {"deep": [1.04] * 12}
    frame = spp_frame({"deep": {"sq_mean": [0.1] * 13, "var": [1.0] + [1.04] * 12,
                                "res_var": res}}, seeds=1, expected=exp)
    frame["stage"] = np.where(frame["index"] < 0, -1, frame["index"] // 6)
    caption = plot_spp(frame)._supxlabel.get_text().replace("\n", " ")
    assert ("deep: residual variance off at 6 blocks: stage 0 (blocks 1-6) 3 at 0.85, "
            "stage 1 (blocks 7-12) 3 at 0.85.") in caption

"""The SPP figure (three panels, one line per model, dashed theory) and the ``spp`` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from ablations.overrides import parse_value
from reports.figures.spp import OKABE_ITO, plot_spp, spp_title
from run_ablations import main
from sigprop.spp import SPP_COLUMNS


def synthetic_frame(models: dict[str, float | None], seeds: int = 2) -> pd.DataFrame:
    """Stem + two stages of three blocks; ``models`` maps name -> alpha (None: no theory).

    Squared means span three decades, variances and residual variances stay within a factor
    of 3, so only the first panel should get a log axis.
    """
    rows = []
    for name, alpha in models.items():
        for seed in range(seeds):
            jitter = 1 + 0.01 * seed
            expected = 1.0
            for index in range(-1, 6):
                stage = -1 if index < 0 else index // 3
                if alpha is None:
                    expected_var = np.nan
                else:
                    expected = expected if index < 0 else (
                        (1.0 if index % 3 == 0 else expected) + alpha**2
                    )
                    expected_var = expected
                block = "stem" if index < 0 else f"stages.{stage}.{index % 3}"
                var = (expected if alpha is not None else 1 + 0.5 * (index % 3 + 1)) * jitter
                stats = {"sq_mean": 10.0 ** (index - 3) * jitter, "var": var}
                if index >= 0:
                    stats["res_var"] = 0.9 * jitter
                for stat, value in stats.items():
                    rows.append({
                        "model": name, "input": "noise", "seed": seed, "block": block,
                        "stage": stage, "index": index, "stat": stat, "value": value,
                        "expected_var": np.nan if index < 0 else expected_var,
                        "rel_dev": np.nan, "map_size": 32 >> max(stage, 0),
                        "tiny_map": False, "pool_factor": np.nan,
                    })
    return pd.DataFrame(rows, columns=SPP_COLUMNS)


def lines(ax, style: str) -> list:
    return [line for line in ax.get_lines() if line.get_linestyle() == style]


def test_three_panels_one_line_per_model_and_a_dashed_theory_line():
    frame = synthetic_frame({"nf": 0.2, "bn": None})
    fig = plot_spp(frame, title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    sq_ax, var_ax, res_ax = fig.axes
    palette = [to_rgb(c) for c in OKABE_ITO[:2]]
    for ax in fig.axes:
        solid = lines(ax, "-")
        assert [line.get_label() for line in solid] == ["nf", "bn"]
        assert [to_rgb(line.get_color()) for line in solid] == palette
        assert len(ax.collections) == 2  # a min-max band per model (two seeds)
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        # the stage boundary between block index 2 and 3 (x = 3 and 4; stem at x = 0)
        boundaries = [line.get_xdata()[0] for line in lines(ax, ":")]
        assert boundaries == [3.5]
    nf_line = lines(sq_ax, "-")[0]
    assert list(nf_line.get_xdata()) == list(range(7))  # stem at 0, block i at i + 1
    np.testing.assert_allclose(nf_line.get_ydata(), 10.0 ** (np.arange(-1, 6) - 3) * 1.005)
    theory = lines(var_ax, "--")
    assert len(theory) == 1 and to_rgb(theory[0].get_color()) == (0.0, 0.0, 0.0)
    # from the first block on: the stem is no residual block and has no expectation
    assert list(theory[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(theory[0].get_ydata(), [1.04, 1.08, 1.12, 1.04, 1.08, 1.12])
    assert not lines(sq_ax, "--") and not lines(res_ax, "--")
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "log"]  # every panel
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"nf", "bn"}
    assert fig.get_suptitle() == "t"
    assert "Input: i.i.d. N(0,1) noise." in fig._supxlabel.get_text()
    assert not [p for ax in fig.axes for p in ax.patches]  # no tiny maps, nothing shaded


def test_different_expectations_get_one_dashed_line_per_model_in_its_colour():
    frame = synthetic_frame({"a02": 0.2, "a05": 0.5}, seeds=1)
    fig = plot_spp(frame)
    var_ax = fig.axes[1]
    solid, dashed = lines(var_ax, "-"), lines(var_ax, "--")
    assert len(solid) == 2 and len(dashed) == 2
    assert [to_rgb(d.get_color()) for d in dashed] == [to_rgb(s.get_color()) for s in solid]
    assert all(not ax.collections for ax in fig.axes)  # one seed: no band
    # a variance panel spanning more than a decade switches to log
    frame.loc[frame["stat"] == "var", "value"] *= np.where(
        frame.loc[frame["stat"] == "var", "index"] > 2, 30.0, 1.0
    )
    assert plot_spp(frame).axes[1].get_yscale() == "log"


@pytest.mark.slow
def test_plot_of_a_real_measurement(tmp_path):
    from sigprop.spp import signal_propagation

    frame = pd.concat([
        signal_propagation(name, (4, 3, 16, 16), seeds=1,
                           overrides={"width_mult": 0.125, "stem": "cifar", "depths": (2, 2),
                                      "widths": (256, 512)})
        for name in ("nf_resnet26", "bn_resnet26_v2")
    ])
    fig = plot_spp(frame)
    assert [len(lines(ax, "-")) for ax in fig.axes] == [2, 2, 2]
    assert len(lines(fig.axes[1], "--")) == 1
    fig.savefig(tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SMALL = ["--set", "width_mult=0.125", "--set", "stem=cifar", "--set", "depths=[2,2]",
         "--set", "widths=[256,512]", "--input-shape", "4,3,16,16"]


@pytest.mark.slow
def test_cli_writes_parquet_csv_and_png(tmp_path, capsys):
    out = tmp_path / "spp"
    rc = main(["spp", "--model", "nf_resnet26", "--model", "bn_resnet26_v2", *SMALL,
               "--set", "alpha=0.3", "--seeds", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("spp.parquet", "spp.csv", "spp_summary.csv", "spp.png"):
        assert (out / name).stat().st_size > 0 and name in printed
    frame = pd.read_parquet(out / "spp.parquet")
    assert list(frame.columns) == SPP_COLUMNS
    assert set(frame["input_shape"]) == {"4x3x16x16"}  # the title of every later plot says it
    assert set(frame["model"]) == {"nf_resnet26", "bn_resnet26_v2"}
    assert set(frame["seed"]) == {0, 1}
    assert frame["block"].nunique() == 5  # stem + 4 blocks
    nf_transition = frame[(frame["model"] == "nf_resnet26") & (frame["block"] == "stages.0.0")]
    assert nf_transition["expected_var"].iloc[0] == pytest.approx(1 + 0.3**2)  # --set alpha
    assert len(pd.read_csv(out / "spp.csv")) == len(frame)
    assert (out / "spp.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nf_resnet7"], "unknown model 'nf_resnet7'"),
        (["--model", "nf_resnet26", "--set", "alpah=0.1"], "unknown option(s) alpah"),
        (["--model", "nf_resnet26", "--set", "width_mult=-1"], "width_mult must be > 0"),
        (["--model", "nf_resnet26", "--set", "alpha"], "an override is key=value"),
        (["--model", "nf_resnet26:alpah=0.1"], "unknown option(s) alpah for model"),
        (["--model", "bn_resnet26_v2:alpha=0.1"], "unknown option(s) alpha for model"),
        (["--model", "nf_resnet26", "--model", "nf_resnet26"], "listed twice"),
        (["--model", "nf_resnet26", "--input-shape", "4,3,16"], "four positive integers"),
        (["--model", "nf_resnet26", "--input-shape", "4,3,a,16"], "N,C,H,W integers"),
        (["--model", "nf_resnet26", "--seeds", "0"], "seeds must be >= 1"),
        (["--model", "nf_resnet26", "--input", "imagenet"], "unknown input 'imagenet'"),
        (["--preset", "paper-a-fig9"], "unknown preset 'paper-a-fig9'"),
        (["--model", "nf_resnet26", "--set", "padding=valid"],
         "padding must be one of same, symmetric"),
        (["--model", "nf_resnet26:padding=SAME"], "padding must be one of same, symmetric"),
        (["--preset", "paper-a-fig1", "--model", "nf_resnet26"], "not both"),
        (["--model", "nf_resnet26", "--full-size"], "--full-size goes with --preset"),
        (["--model", "nf_resnet26", "--input", "synthetic", "--input-shape", "4,3,16,12"],
         "needs C=3 and H=W"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    rc = main(["spp", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("sigprop: error:") and message in err
    assert not (out / "spp.parquet").exists()


@pytest.mark.slow
def test_cli_per_model_overrides_make_separate_lines(tmp_path, capsys):
    out = tmp_path / "spp"
    rc = main(["spp", "--model", "nf_resnet26", "--model", "nf_resnet26:ws=False:alpha=0.5",
               *SMALL, "--seeds", "1", "--out", str(out)])
    assert rc == 0
    frame = pd.read_parquet(out / "spp.parquet")
    labels = ["nf_resnet26", "nf_resnet26 ws=False alpha=0.5"]  # legend text, no quoting
    assert list(dict.fromkeys(frame["model"])) == labels
    transition = frame[(frame["block"] == "stages.0.0") & (frame["stat"] == "var")]
    assert transition["expected_var"].tolist() == pytest.approx([1.04, 1.25])
    sq_mean = frame[frame["stat"] == "sq_mean"].groupby("model")["value"].mean()
    assert sq_mean[labels[1]] > 10 * sq_mean[labels[0]]  # the unstandardized one shifts


def test_cli_unwritable_out_dir_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc = main(["spp", "--model", "nf_resnet26", *SMALL, "--seeds", "1",
               "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot write to output directory" in err


def test_cli_missing_model_is_one_line_and_exit_2(capsys):
    assert main(["spp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name a model (--model NAME) or a preset" in err


def test_set_values_are_parsed_as_literals_or_strings():
    assert parse_value("0.5") == 0.5 and parse_value("3") == 3
    assert parse_value("[8, 8]") == [8, 8] and parse_value("(1,2)") == [1, 2]
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("cifar") == "cifar" and parse_value("'v2'") == "v2"


@pytest.mark.slow
def test_tiny_maps_are_shaded_captioned_and_warned_once(tmp_path, capsys):
    out = tmp_path / "tiny"
    rc = main(["spp", "--model", "nf_resnet26", "--set", "width_mult=0.125", "--set",
               "stem=cifar", "--input-shape", "4,3,16,16", "--seeds", "1", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sigprop: warning: feature maps down to 2x2")
    frame = pd.read_parquet(out / "spp.parquet")
    fig = plot_spp(frame)
    shaded = [p for p in fig.axes[1].patches]
    first_tiny = frame.loc[frame["tiny_map"] & (frame["index"] >= 0), "index"].min() + 1
    assert len(shaded) == 1 and shaded[0].get_x() == pytest.approx(first_tiny - 0.5)
    caption = fig._supxlabel.get_text()
    assert "feature maps under 8x8 (down to 2x2)" in caption


def test_nfnet_caption_says_why_the_expectation_is_left_out(tmp_path, capsys):
    from sigprop.spp import signal_propagation

    frame = signal_propagation("nfnet_f0", (4, 3, 32, 32), seeds=1,
                               overrides={"depths": (1, 1, 1, 1), "width_mult": 0.125,
                                          "stem": "cifar"})
    fig = plot_spp(frame)
    theory = lines(fig.axes[1], "--")
    assert len(theory) == 1 and np.isnan(theory[0].get_ydata()[1:]).all()  # stage 0 only
    caption = fig._supxlabel.get_text()
    assert "nfnet_f0: no expectation from block 2 on: its 2x2 avg-pool shortcuts keep 0.2" in \
        caption


@pytest.mark.slow
def test_preset_runs_four_models_with_a_caption(tmp_path, capsys):
    out = tmp_path / "preset"
    rc = main(["spp", "--preset", "paper-a-fig1", "--set", "depths=[1,1]", "--set",
               "widths=[256,512]", "--set", "width_mult=0.0625", "--input-shape", "2,3,33,33",
               "--seeds", "1", "--out", str(out)])
    assert rc == 0
    frame = pd.read_parquet(out / "spp.parquet")
    assert list(dict.fromkeys(frame["model"])) == [
        "nf_resnet600", "nf_resnet600 ws=False", "bn_resnet600_v2",
        "bn_resnet600_v2 order=act_bn_conv",
    ]
    assert frame["block"].nunique() == 3  # the --set depths replaced the preset's 50 x 4
    assert (out / "spp.png").stat().st_size > 0


def test_frames_stored_before_the_new_columns_still_plot():
    frame = synthetic_frame({"nf": 0.2}, seeds=1)
    old = frame[["model", "seed", "block", "stage", "index", "stat", "value", "expected_var",
                 "rel_dev"]]
    fig = plot_spp(old)
    assert len(fig.axes) == 3 and fig._supxlabel is None  # nothing to caption
    assert len(lines(fig.axes[1], "--")) == 1


@pytest.mark.slow
def test_title_comes_from_the_frame_so_the_report_keeps_it():
    frame = synthetic_frame({"nf": 0.2}, seeds=2)
    frame["input_shape"] = "4x3x16x16"
    assert plot_spp(frame).get_suptitle() == (
        "Signal propagation at init on i.i.d. N(0,1) noise, input 4x3x16x16, 2 seeds "
        "(band: min-max)")
    assert spp_title(frame[frame["seed"] == 0]).endswith("input 4x3x16x16, 1 seed")
    assert plot_spp(frame, title="").get_suptitle() == ""
    assert plot_spp(frame, title="t").get_suptitle() == "t"

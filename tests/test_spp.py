"""Signal propagation at init reproduces paper A's shapes (facts file sections 1 and 7).

Networks are deep but narrow: depths [8, 8, 8, 8] at width_mult 0.125 (bottleneck widths 8 to
64) with the CIFAR stem on 64x64 inputs, so the last stage still has 8x8 maps: on 2x2 or 4x4
maps the zero padding of the 3x3 convs removes a visible part of the branch variance and the
measurement drifts below 1 + k*alpha^2 for reasons that have nothing to do with the bookkeeping
(even 8x8 loses about 15% of the branch variance: the bookkeeping test allows for it there).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import sigprop
from sigprop.errors import UserError
from sigprop.spp import (
    SPP_COLUMNS,
    TINY_MAP,
    check_overrides,
    input_batches,
    model_label,
    signal_propagation,
    spp_overrides,
    summarize_spp,
)

DEEP = {"depths": (8, 8, 8, 8), "width_mult": 0.125, "stem": "cifar", "num_classes": 10}
SHAPE = (8, 3, 64, 64)
ALPHA = 0.2


def spp(name: str = "nf_resnet50", seeds: int = 2, **overrides) -> pd.DataFrame:
    """Mean over seeds, one row per block (stem excluded), stats as columns."""
    frame = summarize_spp(
        signal_propagation(name, SHAPE, seeds=seeds, overrides={**DEEP, **overrides})
    )
    blocks = frame[frame["block"] != "stem"]
    wide = blocks.pivot(index="index", columns="stat", values="mean")
    meta = blocks.drop_duplicates("index").set_index("index")[
        ["stage", "expected_var", "map_size"]
    ]
    return wide.join(meta)


@pytest.fixture(scope="module")
def nf_ws() -> pd.DataFrame:
    return spp()


def within_stage_slopes(table: pd.DataFrame, stat: str = "var") -> list[float]:
    """Least-squares slope of ``stat`` against the block's position in its stage."""
    slopes = []
    for _, stage in table.groupby("stage"):
        y = stage[stat].to_numpy()
        slopes.append(np.polyfit(np.arange(len(y)), y, 1)[0])
    return slopes


def test_frame_layout_and_relative_deviation():
    small = {"width_mult": 0.125, "stem": "cifar"}
    rng_state = torch.get_rng_state()
    frame = signal_propagation("nf_resnet26", (4, 3, 16, 16), seeds=[3, 5], overrides=small)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's generator untouched
    again = signal_propagation("nf_resnet26", (4, 3, 16, 16), seeds=[5], overrides=small)
    np.testing.assert_array_equal(again["value"], frame.loc[frame["seed"] == 5, "value"])
    assert list(frame.columns) == SPP_COLUMNS
    assert set(frame["stat"]) == {"sq_mean", "var", "res_var"}
    assert set(frame["seed"]) == {3, 5}
    assert set(frame["model"]) == {"nf_resnet26"}
    assert (frame.loc[frame["block"] == "stem", "index"] == -1).all()
    var = frame[frame["stat"] == "var"]
    want = (var["value"] - var["expected_var"]) / var["expected_var"]
    np.testing.assert_allclose(var["rel_dev"], want)
    assert frame.loc[frame["stat"] != "var", "rel_dev"].isna().all()
    # 8 blocks + stem, var and sq_mean everywhere, res_var on blocks, two seeds
    assert len(frame) == 2 * (9 * 2 + 8)
    summary = summarize_spp(frame)
    assert (summary["n"] == 2).all()
    one = summary[(summary["block"] == "stages.1.0") & (summary["stat"] == "var")]
    raw = var[var["block"] == "stages.1.0"]["value"]
    assert one["mean"].item() == pytest.approx(raw.mean())
    assert one["std"].item() == pytest.approx(raw.std())


def test_nf_resnet_with_scaled_ws_follows_the_bookkeeping(nf_ws):
    # measured within 8% of 1 + k*alpha^2 on maps of 16x16 and up (seeds spread about 5% at
    # this width), 11% on the 8x8 stage where zero padding takes its share; 10% / 15% would
    # still catch a missing reset (+24% by the end of a stage) or a wrong beta (compounding)
    rel_dev = (nf_ws["var"] - nf_ws["expected_var"]) / nf_ws["expected_var"]
    large = nf_ws["map_size"] >= 16
    assert rel_dev[large].abs().max() < 0.10
    assert rel_dev[~large].abs().max() < 0.15
    transitions = nf_ws.groupby("stage").head(1)
    assert transitions["var"].to_numpy() == pytest.approx(1 + ALPHA**2, rel=0.10)
    last = nf_ws.groupby("stage").tail(1)
    # 1 + 8 alpha^2 = 1.32 before each reset; measured 1.18-1.25 for these seeds (two seeds
    # of 8-channel bottlenecks spread about 5%, and zero padding costs a few % more), far
    # above the 1.04 a reset gives
    assert (last["var"].to_numpy() > 1.15).all()
    for slope in within_stage_slopes(nf_ws):
        assert slope == pytest.approx(ALPHA**2, rel=0.2)
    # a zero-padded 3x3 conv on an s x s map sees ((3s - 2) / 3s)^2 of its taps on average:
    # the residual variance is 1 times that (0.84 at 8x8 ... 0.98 at 64x64)
    padding_share = ((3 * nf_ws["map_size"] - 2) / (3 * nf_ws["map_size"])) ** 2
    assert (nf_ws["res_var"] / padding_share).mean() == pytest.approx(1.0, abs=0.06)
    assert nf_ws["res_var"].between(0.7, 1.35).all()
    assert (nf_ws["sq_mean"] < 0.05 * nf_ws["var"]).all()


@pytest.mark.slow
def test_nf_resnet_without_ws_shows_mean_shift(nf_ws):
    plain = spp(ws=False)
    # squared mean 1-2 orders of magnitude above the WS net's at every block
    assert (plain["sq_mean"] > 20 * nf_ws["sq_mean"]).all()
    # relative to the signal it grows with depth and ends up exceeding the variance
    ratio = plain["sq_mean"] / plain["var"]
    first, last = plain.groupby("stage").head(1).index, plain.groupby("stage").tail(1).index
    assert ratio.loc[last[-1]] > 1.0 > ratio.loc[first[0]]
    assert np.all(np.diff(ratio.loc[last].to_numpy()) > 0)
    assert all(s > 0 for s in within_stage_slopes(plain, "sq_mean"))
    assert plain["res_var"].mean() < 0.8  # residual variance below 1


def test_bn_resnet_v2_variance_grows_within_stages_and_resets():
    bn = spp("bn_resnet50_v2", seeds=1)
    for slope in within_stage_slopes(bn):
        assert slope > 0.4  # about 0.7 per block: each branch adds ~1 - 1/pi
    first = bn.groupby("stage").head(1)["var"].to_numpy()
    last = bn.groupby("stage").tail(1)["var"].to_numpy()
    assert (last > 3 * first).all()
    assert (first[1:] < 0.5 * last[:-1]).all()  # the transition resets
    assert bn["res_var"].mean() == pytest.approx(1 - 1 / np.pi, rel=0.1)


@pytest.mark.slow
def test_within_stage_slope_scales_as_alpha_squared(nf_ws):
    doubled = spp(alpha=2 * ALPHA)
    ratios = np.array(within_stage_slopes(doubled)) / np.array(within_stage_slopes(nf_ws))
    assert ratios.mean() == pytest.approx(4.0, rel=0.2)
    assert (ratios > 2.5).all()


def test_skip_gain_zero_gives_flat_variance_within_stages():
    flat = spp(seeds=1, skipinit_gain=0.0)
    for _, stage in flat.groupby("stage"):
        var = stage["var"].to_numpy()
        assert var == pytest.approx(np.full_like(var, var[0]), rel=1e-6)
    assert spp_overrides("nf_resnet50") == {"skipinit_gain": 1.0}
    assert spp_overrides("nf_resnet50", {"skipinit_gain": 0.0}) == {"skipinit_gain": 0.0}
    assert spp_overrides("bn_resnet50_v2", {"alpha": 0.5, "width_mult": 0.5}) == {
        "width_mult": 0.5
    }


def test_stochastic_depth_and_dropout_drop_nothing():
    shape, overrides = (4, 3, 16, 16), {"width_mult": 0.125, "stem": "cifar"}
    plain = signal_propagation("nf_resnet26", shape, seeds=1, overrides=overrides)
    dropping = signal_propagation(
        "nf_resnet26", shape, seeds=1,
        overrides={**overrides, "stochdepth_rate": 0.9, "drop_rate": 0.5},
    )
    pd.testing.assert_series_equal(plain["value"], dropping["value"])


def test_a_module_is_measured_as_is_and_left_as_it_was():
    torch.manual_seed(0)
    model = sigprop.create_model("bn_resnet26_v2", width_mult=0.125, stem="cifar").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frame = signal_propagation(model, (4, 3, 16, 16), seeds=2)
    assert set(frame["model"]) == {"BNResNet"}
    assert not model.training and all(not m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats restored
    # seeds vary only the batch here: the statistics differ a little, not the weights
    var = frame[frame["stat"] == "var"].pivot(index="block", columns="seed", values="value")
    assert not np.allclose(var[0], var[1]) and np.allclose(var[0], var[1], rtol=0.3)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="unknown model"):
        signal_propagation("nf_resnet7", (2, 3, 8, 8), seeds=1)
    with pytest.raises(UserError, match="four positive"):
        signal_propagation("nf_resnet26", (2, 3, 8), seeds=1)
    with pytest.raises(UserError, match="seeds"):
        signal_propagation("nf_resnet26", (2, 3, 8, 8), seeds=0)
    with pytest.raises(UserError, match="unknown option.*alpah"):
        check_overrides(["nf_resnet26", "bn_resnet26_v2"], {"alpah": 0.3})
    check_overrides(["nf_resnet26", "bn_resnet26_v2"], {"alpha": 0.3})  # one model has it


@pytest.mark.slow
def test_bn_resnet_orderings_of_paper_a_figure_1():
    # BN-ReLU-Conv: the ReLU's mean goes into the channel means, the branch variance is
    # 1 - 1/pi; ReLU-BN-Conv: BN hands the conv zero-mean unit-variance input, variance 1
    bn_relu = spp("bn_resnet50_v2", seeds=1)
    relu_bn = spp("bn_resnet50_v2", seeds=1, order="act_bn_conv")
    assert bn_relu["res_var"].mean() == pytest.approx(1 - 1 / np.pi, rel=0.1)
    assert relu_bn["res_var"].mean() == pytest.approx(1.0, rel=0.1)
    assert relu_bn["res_var"].mean() > 1.2 * bn_relu["res_var"].mean()
    assert bn_relu["expected_var"].isna().all() and relu_bn["expected_var"].isna().all()
    with pytest.raises(UserError, match="pre-activation"):
        signal_propagation("bn_resnet26_v1", (2, 3, 8, 8), seeds=1,
                           overrides={"order": "act_bn_conv"})


def test_nfnet_avg_pool_factor_is_measured_and_the_theory_left_out_where_it_fails():
    small = {"depths": (2, 2, 2, 1), "width_mult": 0.125, "stem": "cifar"}
    frame = signal_propagation("nfnet_f0", (8, 3, 32, 32), seeds=1, overrides=small)
    var = frame[frame["stat"] == "var"].set_index("block")
    strided = ["stages.1.0", "stages.2.0", "stages.3.0"]
    # 2x2 averaging of spatially uncorrelated activations keeps a quarter of the variance
    assert var.loc[strided, "pool_factor"].to_numpy() == pytest.approx(0.25, rel=0.15)
    assert var.drop(strided)["pool_factor"].isna().all()
    assert np.isnan(var.loc["stem", "expected_var"])  # theory starts at the first block
    assert var.loc[["stages.0.0", "stages.0.1"], "expected_var"].tolist() == pytest.approx(
        [1.04, 1.08])
    later = var[var["stage"] >= 1]
    assert later["expected_var"].isna().all() and later["rel_dev"].isna().all()
    # the measured variance does fall about 4x at each avg-pool transition
    assert var.loc["stages.1.0", "value"] < 0.4 * var.loc["stages.0.1", "value"]


def test_map_sizes_and_tiny_map_flags():
    frame = signal_propagation("nf_resnet26", (4, 3, 16, 16), seeds=1,
                               overrides={"width_mult": 0.125, "stem": "cifar"})
    sizes = frame.drop_duplicates("block").set_index("block")["map_size"]
    assert sizes["stem"] == 16
    assert [sizes[f"stages.{s}.0"] for s in range(4)] == [16, 8, 4, 2]
    tiny = frame.drop_duplicates("block").set_index("block")["tiny_map"]
    assert tiny[sizes < TINY_MAP].all() and not tiny[sizes >= TINY_MAP].any()


@pytest.mark.slow
def test_data_set_inputs_are_normalised_per_channel_and_drawn_per_seed():
    batches = input_batches("synthetic", (6, 3, 16, 16), [0, 1])
    for x in batches.values():
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
        assert torch.allclose(var, torch.ones(3), atol=1e-4)
        assert x.shape == (6, 3, 16, 16)
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(input_batches("synthetic", (6, 3, 16, 16), [1])[1], batches[1])
    noise = input_batches("noise", (2, 3, 4, 4), [7])[7]
    assert torch.equal(noise, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)))
    frame = signal_propagation("nf_resnet26", (6, 3, 16, 16), seeds=[0], input="synthetic",
                               overrides={"width_mult": 0.125, "stem": "cifar"})
    assert set(frame["input"]) == {"synthetic"}
    with pytest.raises(UserError, match="unknown input 'imagenet'; valid inputs: noise"):
        signal_propagation("nf_resnet26", (2, 3, 8, 8), seeds=1, input="imagenet")
    with pytest.raises(UserError, match="C=3 and H=W"):
        input_batches("synthetic", (2, 1, 8, 8), [0])


def test_model_labels_are_plain_text():
    assert model_label("nf_resnet50") == "nf_resnet50"
    assert model_label("nf_resnet50", {"activation": "gelu", "depths": [2, 2]}) == (
        "nf_resnet50 activation=gelu depths=[2,2]"
    )


@pytest.mark.parametrize(("seeds", "message"), [
    ([3, 3], "seeds listed twice"), (True, "a count or a list of seeds"),
    ([], "at least one seed"), (0, "seeds must be >= 1")])
def test_spp_seed_list_is_checked_as_coord_check_checks_it(seeds, message):
    """One seed-list rule (sigprop.fields.check_seeds) for spp and coord_check: a seed named
    twice would average a batch with itself, and True is no count."""
    with pytest.raises(UserError, match=message):
        signal_propagation("nf_resnet26", (4, 3, 16, 16), seeds=seeds)

"""sigprop.coordcheck (mup's coordinate check), its figure and the coord-check command."""

import re

import pandas as pd
import pytest
import torch
from torch import nn

from reports.figures import plot_coord_data
from run_ablations import build_parser, main
from sigprop import coordcheck
from sigprop.coordcheck import (
    COORD_COLUMNS,
    coord_check,
    coord_check_models,
    coord_data,
    family_overrides,
)
from sigprop.models import create_model
from sigprop.spp import prepare_for_spp

# A 2-block NF-ResNet and BN-ResNet: seconds for a whole check on CPU.
TINY = {"depths": [1, 1], "widths": [16, 32]}


def tiny_batch(n: int = 8, px: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, px, px, generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny_nf(mult: float):
    return lambda: create_model("nf_resnet26", stem="cifar", num_classes=10, skipinit_gain=1.0,
                                width_mult=mult, **TINY)


def test_frame_schema_and_one_row_per_model_width_step_and_block():
    frame = coord_check_models(["nf_resnet26", "bn_resnet26_v2"], [0.5, 1.0], overrides=TINY,
                               steps=2, seeds=1, batch_size=8)
    assert list(frame.columns) == COORD_COLUMNS
    points = ["stem", "stages.0.0", "stages.1.0", "head"]  # stem + 2 blocks + logits
    assert len(frame) == 2 * 2 * 2 * len(points)
    keys = frame[["model", "width", "step", "block"]]
    assert not keys.duplicated().any()
    assert set(frame["block"]) == set(points)
    assert sorted(frame["width"].unique()) == [8, 16]  # stage-1 channels at 0.5 and 1.0
    assert sorted(frame["width_mult"].unique()) == [0.5, 1.0]
    head = frame[frame["block"] == "head"]
    assert (head["depth_index"] == 2).all() and (frame.loc[frame.block == "stem",
                                                          "depth_index"] == -1).all()
    assert (frame["seeds"] == 1).all() and frame["l1_std"].isna().all()
    assert (frame["data"] == "digits").all() and (frame["lr"] == coordcheck.DEFAULT_LR).all()
    assert (frame["batch"] == "8x3x8x8").all()  # digits at their native 8 px
    assert (frame[["l1", "rms"]] > 0).all().all() or (
        frame.loc[frame["l1"] == 0, "block"] == "head").all()  # BN's zero-init classifier


def test_step_zero_is_a_direct_forward_of_the_same_init_exactly():
    x, y = tiny_batch()
    frame = coord_check([(16, tiny_nf(1.0))], (x, y), steps=2, seeds=[3])
    torch.manual_seed(3)
    model = tiny_nf(1.0)()
    prepare_for_spp(model)  # training mode with stochastic depth off, as the check runs
    direct = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _m, _a, out, name=name: direct.__setitem__(name, out.abs().mean().item()))
        for name in ("stem", "stages.0.0", "stages.1.0")]
    with torch.no_grad():
        direct["head"] = model(x).abs().mean().item()
    for handle in handles:
        handle.remove()
    step0 = frame[frame["step"] == 0].set_index("block")["l1"]
    assert step0.to_dict() == direct
    step1 = frame[frame["step"] == 1].set_index("block")["l1"]
    assert (step1 != step0).all()  # the SGD update changed every point


class Constant(nn.Module):
    """x -> Linear(d, width) -> Linear(width, k), every weight constant, no biases."""

    def __init__(self, width: int, d: int = 3, k: int = 2, a: float = 0.5, b: float = 0.25):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, width, bias=False), nn.Linear(width, k,
                                                                            bias=False))
        nn.init.constant_(self.body[0].weight, a)
        nn.init.constant_(self.body[1].weight, b)

    def forward(self, x):
        return self.body(x)


def test_linear_output_l1_is_hand_computable_and_grows_with_width():
    # rows of x sum to s, so hidden units are a*s and the outputs b*width*a*s: l1 of the
    # hidden layer is |a| mean|s|, of the output |a b| width mean|s|
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -3.0, 0.5]])  # s = 2, -2
    y = torch.tensor([0, 1])
    widths = [4, 16, 64]
    frame = coord_check([(w, lambda w=w: Constant(w)) for w in widths], (x, y), steps=1,
                        seeds=1, blocks="body.*")
    hidden = frame[frame["block"] == "body.0"].set_index("width")["l1"]
    out = frame[frame["block"] == "body.1"].set_index("width")["l1"]
    assert hidden.to_dict() == {w: 0.5 * 2.0 for w in widths}
    assert out.to_dict() == {w: 0.25 * 0.5 * w * 2.0 for w in widths}
    rms = frame[frame["block"] == "body.1"].set_index("width")["rms"]
    assert rms.to_dict() == out.to_dict()  # every output coordinate has the same size
    head = frame[frame["block"] == "head"].set_index("width")["l1"]
    assert head.equals(out)
    assert frame["width_mult"].tolist()[::3] == [w / 64 for w in widths]


def test_zero_lr_keeps_every_step_equal_to_init():
    x, y = tiny_batch()
    frame = coord_check([(16, tiny_nf(1.0))], (x, y), steps=3, seeds=1, lr=0.0)
    by_step = frame.pivot(index="block", columns="step", values="l1")
    assert (by_step[1] == by_step[0]).all() and (by_step[2] == by_step[0]).all()


def test_same_seed_same_frame_other_seed_other_frame():
    x, y = tiny_batch()
    models = [(8, tiny_nf(0.5)), (16, tiny_nf(1.0))]
    first = coord_data(models, (x, y), steps=2, seeds=[0, 1])
    again = coord_data(models, (x, y), steps=2, seeds=[0, 1])
    pd.testing.assert_frame_equal(first, again)
    seed0, seed1 = (first[first["seed"] == s].drop(columns="seed").reset_index(drop=True)
                    for s in (0, 1))
    assert not seed0["l1"].equals(seed1["l1"])
    # the mean over seeds is what the summary reports, with the spread
    summary = coord_check(models, (x, y), steps=2, seeds=[0, 1])
    assert summary["l1"].to_numpy() == pytest.approx((seed0["l1"] + seed1["l1"]) / 2)
    assert (summary["seeds"] == 2).all() and (summary["l1_std"] > 0).all()


def test_caller_rng_is_left_alone():
    x, y = tiny_batch()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    coord_data([(16, tiny_nf(1.0))], (x, y), steps=1, seeds=1)
    assert torch.equal(torch.rand(3), expected)


def test_family_defaults_cifar_stem_data_classes_and_skip_gain_one():
    assert family_overrides("nf_resnet26", 10) == {"stem": "cifar", "num_classes": 10,
                                                   "skipinit_gain": 1.0}
    assert family_overrides("bn_resnet26_v2", 10, {"stem": "imagenet"}) == {
        "stem": "imagenet", "num_classes": 10}


@pytest.mark.parametrize("kwargs, message", [
    ({"names": ["nf_resnet2"]}, "did you mean 'nf_resnet26'?"),
    ({"width_mults": [0.5, -1]}, "width multipliers must be finite numbers > 0"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"overrides": {"alhpa": 0.2}}, "unknown option(s) alhpa"),
    ({"overrides": {"width_mult": 2.0}}, "width_mult is what the check varies"),
    ({"data": "digitz"}, "unknown data set 'digitz'"),
    ({"batch_size": 1}, "batch size must be an integer >= 2"),
])
def test_bad_input_is_a_user_error_before_any_work(kwargs, message, monkeypatch):
    ran = []
    monkeypatch.setattr(coordcheck, "coord_data", lambda *a, **k: ran.append(1))
    with pytest.raises(coordcheck.UserError, match=re.escape(message)):
        coord_check_models(**kwargs)
    assert not ran


def test_cli_bad_model_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["coord-check", "--models", "nf_resnet26,bn_resnet26_v3", "--out",
                 str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("sigprop: error: unknown model 'bn_resnet26_v3'")
    assert "did you mean 'bn_resnet26_v2'?" in captured.err
    assert not out.exists()


def test_cli_writes_frame_and_figure_and_warns_before_overwriting(tmp_path, capsys):
    out = tmp_path / "cc"
    argv = ["coord-check", "--models", "nf_resnet26", "--widths", "0.5,1", "--steps", "2",
            "--seeds", "1", "--batch-size", "4", "--set", "depths=[1,1]", "--set",
            "widths=[16,32]", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    frame = pd.read_parquet(out / "coord.parquet")
    assert len(frame) == 2 * 2 * 4 and list(frame.columns) == COORD_COLUMNS
    assert (out / "coord.png").stat().st_size > 0 and (out / "coord_seeds.csv").exists()
    assert main(argv + ["-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "warning: overwriting the coordinate check in" in captured.err


def test_cli_help_states_the_library_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["coord-check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {','.join(coordcheck.DEFAULT_MODELS)})" in text
    assert f"(default: {','.join(f'{w:g}' for w in coordcheck.DEFAULT_WIDTH_MULTS)})" in text
    for flag, value in (("--steps", coordcheck.DEFAULT_STEPS), ("--lr", coordcheck.DEFAULT_LR),
                        ("--seeds", coordcheck.DEFAULT_SEEDS),
                        ("--data", coordcheck.DEFAULT_DATA),
                        ("--batch-size", coordcheck.DEFAULT_BATCH)):
        assert re.search(rf"{flag} \S+ [^-]*\(default: {value}\)", text), flag
    assert build_parser().parse_args(["coord-check"]).out == "runs/coord_check"


def test_plot_has_one_panel_per_step_and_model_and_log_axes():
    x, y = tiny_batch()
    nf = coord_check([(8, tiny_nf(0.5)), (16, tiny_nf(1.0))], (x, y), steps=3, seeds=1,
                     label="nf_resnet26")
    bn = coord_check(
        [(8, lambda: create_model("bn_resnet26_v2", stem="cifar", num_classes=10,
                                  width_mult=0.5, **TINY)),
         (16, lambda: create_model("bn_resnet26_v2", stem="cifar", num_classes=10, **TINY))],
        (x, y), steps=3, seeds=1, label="bn_resnet26_v2")
    fig = plot_coord_data(pd.concat([nf, bn]))
    assert len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == [
        "step 0 (init)", "step 1 (after 1 update)", "step 2 (after 2 updates)"]
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in fig.axes)
    assert fig.axes[0].get_ylabel().startswith("NF-ResNet-26")
    assert fig.axes[3].get_ylabel().startswith("BN-ResNet-26 v2")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["stem", "stages.0.0", "stages.1.0",
                                                    "head (logits)"]
    # BN-ResNet's classifier starts at zero: its head is not drawn at init, and said so
    assert "BN-ResNet-26 v2 head at step 0" in fig._supxlabel.get_text()


def test_plot_of_a_diverged_run_leaves_out_what_is_not_finite_and_says_so():
    x, y = tiny_batch()
    frame = coord_check([(8, tiny_nf(0.5)), (16, tiny_nf(1.0))], (x, y), steps=2, seeds=1,
                        label="nf_resnet26")
    late = frame["step"] == 1
    frame.loc[late & (frame["width"] == 16), "l1"] = float("inf")
    frame.loc[late & (frame["width"] == 8) & (frame["block"] == "head"), "l1"] = float("nan")
    fig = plot_coord_data(frame)
    low, high = fig.axes[0].get_ylim()
    assert 0 < low < high < float("inf")
    caption = fig._supxlabel.get_text()
    assert "not finite: the run diverged" in caption and "NF-ResNet-26 head at step 1" in caption


def test_mup_comparison_skips_in_one_line_without_mup(monkeypatch, capsys):
    import importlib.util

    from benchmarks import coordcheck_mup

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mup" else real(name, *a))
    assert coordcheck_mup.main([]) is None
    out = capsys.readouterr().out
    assert out == "coordcheck_mup: skipped, mup is not installed (pip install mup)\n"

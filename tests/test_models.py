import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sigprop
from run_ablations import main
from sigprop.layers import ScaledStdConv2d, StochasticDepth
from sigprop.models import (
    NFNet,
    NFResNet,
    count_parameters,
    create_model,
    list_models,
    model_options,
    resolve_config,
)
from sigprop.models.registry import ModelError

TINY = {"stem": "cifar", "width_mult": 0.125, "num_classes": 10}


@pytest.mark.parametrize(
    "name, paper_millions",
    [("nfnet_f0", 71.5), ("nfnet_f1", 132.6), ("nfnet_f2", 193.8), ("nf_resnet50", 25.56)],
)
def test_parameter_counts_match_the_papers(name, paper_millions):
    assert count_parameters(name) / 1e6 == pytest.approx(paper_millions, rel=1e-3)


def test_bn_resnet50_v1_matches_the_standard_resnet50_count():
    # torchvision's resnet50 has 25,557,032 parameters with the same layout
    assert count_parameters("bn_resnet50_v1") == 25_557_032


def test_registry_lists_every_family_and_named_depth():
    names = list_models()
    for depth in (26, 50, 101, 152, 200, 288, 600):
        assert f"nf_resnet{depth}" in names
        assert f"bn_resnet{depth}_v1" in names and f"bn_resnet{depth}_v2" in names
    assert [n for n in names if n.startswith("nfnet")] == [f"nfnet_f{k}" for k in range(8)]
    assert resolve_config("nf_resnet600").depths == (50, 50, 50, 50)
    assert resolve_config("nfnet_f3").depths == (4, 8, 24, 12)
    assert resolve_config("nfnet_f7").drop_rate == 0.5


# variants with more blocks take about a second each even on the meta device: they run in
# make test, the shallow ones in the fast lane too
DEEP_BLOCKS = 30


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if sum(resolve_config(n).depths) > DEEP_BLOCKS else n
    for n in list_models()])
def test_every_registered_model_shapes_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=7)
        out = model(torch.empty(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert len(model.blocks()) == sum(model.cfg.depths)


@pytest.mark.parametrize(
    "name", ["nf_resnet26", "nf_resnet50", "bn_resnet26_v1", "bn_resnet26_v2", "nfnet_f0"]
)
@pytest.mark.parametrize("stem, size", [("cifar", 16), ("imagenet", 64)])
def test_forward_backward_at_small_resolution(name, stem, size):
    torch.manual_seed(0)
    model = create_model(name, stem=stem, width_mult=0.25, num_classes=10, skipinit_gain=1.0) \
        if not name.startswith("bn") else create_model(name, stem=stem, width_mult=0.25,
                                                       num_classes=10)
    x = torch.randn(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 10)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.forward_features(x).dim() == 4


@pytest.mark.slow
def test_full_size_models_run_on_a_tiny_cpu_input():
    torch.manual_seed(0)
    for name in ("nf_resnet50", "nfnet_f0"):
        model = create_model(name)
        out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 1000)


def authors_expected_stds(depths, alpha):
    """The authors' bookkeeping loop (nfnets/nf_resnet.py), returning beta per block."""
    betas, expected_std = [], 1.0
    for depth in depths:
        for block_index in range(depth):
            betas.append(1.0 / expected_std)
            if block_index == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
    return betas, expected_std


@pytest.mark.parametrize("family", [NFResNet, NFNet])
@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_expected_variances_follow_the_reset_rule(family, alpha):
    depths = (2, 3, 4, 2)
    with torch.device("meta"):
        model = family(depths=depths, alpha=alpha, width_mult=0.125)
    blocks = model.blocks()
    betas, final_std = authors_expected_stds(depths, alpha)
    modules = [model.get_submodule(b.name) for b in blocks]
    assert [m.beta for m in modules] == pytest.approx(betas)
    k = 0
    for s, depth in enumerate(depths):
        for j in range(depth):
            b = blocks[k]
            assert (b.stage, b.index, b.transition) == (s, k, j == 0)
            # after a transition the variance is reset: 1 + (j+1) alpha^2 within a stage
            assert b.expected_var == pytest.approx(1 + (j + 1) * alpha**2)
            k += 1
    assert blocks[-1].expected_var == pytest.approx(final_std**2)


def test_probe_points_are_named_modules():
    model = create_model("nf_resnet26", **TINY)
    names = dict(model.named_modules())
    for b in model.blocks():
        assert isinstance(names[b.branch], nn.Identity)
        assert b.branch == f"{b.name}.branch_out"
    assert "stem" in names and model.get_classifier() is model.fc


def test_branch_point_sits_before_skip_gain_and_alpha():
    torch.manual_seed(0)
    model = create_model("nf_resnet26", **TINY, alpha=0.3, skipinit_gain=0.7, stochdepth_rate=0)
    block = model.get_submodule("stages.1.1")
    captured = {}
    block.branch_out.register_forward_hook(lambda m, i, o: captured.setdefault("branch", o))
    x = torch.randn(2, block.conv0.in_channels, 8, 8)
    out = block(x)
    torch.testing.assert_close(out, x + 0.3 * 0.7 * captured["branch"])


@pytest.mark.slow
def test_defaults_follow_the_authors():
    model = create_model("nf_resnet50")
    gains = [p.item() for n, p in model.named_parameters() if n.endswith("skip_gain")]
    assert gains == [0.0] * 16
    rates = [m.rate for m in model.modules() if isinstance(m, StochasticDepth)]
    assert rates == pytest.approx([0.1 * i / 16 for i in range(16)])
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert all(isinstance(m, ScaledStdConv2d) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d))
    f0 = create_model("nfnet_f0")
    assert f0.stages[0][0].conv1.groups == 1 and f0.stages[2][0].conv1.groups == 6
    assert f0.final_conv.out_channels == 3072


def test_ws_false_is_the_plain_he_init_control():
    model = create_model("nf_resnet26", **TINY, ws=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(isinstance(m, ScaledStdConv2d) for m in convs)
    assert model.stages[0][0].act.gamma == 1.0


def test_bn_resnet_norm_none_has_no_normalization():
    model = create_model("bn_resnet26_v2", **TINY, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert create_model("bn_resnet26_v1", **TINY).stem.bn.num_features == 8


def test_nfnet_scaled_down_member_is_small():
    cfg = resolve_config("nfnet_f0", width_mult=0.125, depth_mult=0.5)
    assert cfg.depths == (1, 1, 3, 2)  # half of (1, 2, 6, 3), at least one block
    assert count_parameters("nfnet_f0", width_mult=0.125, depth_mult=0.5) < 2e6


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="unknown model 'resnet9'.*nf_resnet50.*nfnet_f0"):
        create_model("resnet9")
    assert isinstance(ModelError("x"), ValueError)


def test_unknown_override_lists_valid_options():
    with pytest.raises(ModelError, match="unknown option.*alphaa.*valid options:.*alpha"):
        create_model("nf_resnet26", alphaa=0.1)
    assert "skipinit_gain" in model_options("nfnet_f0")


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("nf_resnet26", {"alpha": -0.1}, "alpha"),
        ("nf_resnet26", {"stem": "tiny"}, "stem"),
        ("nf_resnet26", {"activation": "swish"}, "activation"),
        ("nf_resnet26", {"depths": [2, 0, 2, 2]}, "depths"),
        ("nfnet_f0", {"variant": "F9"}, "variant"),
        ("bn_resnet50_v2", {"norm": "layer"}, "norm"),
        ("nf_resnet26", {"stochdepth_rate": 1.0}, "stochdepth_rate"),
    ],
)
def test_bad_override_values_name_the_field(name, override, message):
    with pytest.raises(ModelError, match=message):
        create_model(name, **override)


@pytest.mark.slow
def test_models_command_prints_the_table(capsys):
    assert main(["models", "--family", "nfnet"]) == 0
    out = capsys.readouterr().out
    assert "nfnet_f0" in out and "71.49" in out and "192/256" in out
    assert "nf_resnet50" not in out


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["models", "--family", "vit"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


def test_package_exports():
    assert sigprop.create_model is create_model


@pytest.mark.parametrize("name", ["nf_resnet26", "nfnet_f0", "bn_resnet26_v2", "bn_resnet26_v1"])
def test_every_family_lays_out_stages_alike(name):
    # five stages: the first block of each strided 1, 2, 2, 2, and 2 again past the fourth
    depths = (1, 2, 1, 1, 2)
    with torch.device("meta"):
        model = create_model(name, depths=depths, widths=(8, 16, 32, 32, 64),
                             **{**TINY, "width_mult": 1.0})
    strides = [model.get_submodule(b.name).conv1.stride[0] for b in model.blocks()]
    assert strides == [1, 2, 1, 2, 2, 2, 1]
    assert [b.transition for b in model.blocks()] == [True, True, False, True, True, True, False]
    assert [b.stage for b in model.blocks()] == [0, 1, 1, 2, 3, 4, 4]


def test_registry_is_complete_when_imported_alone():
    # the families register on import of sigprop.models, which any submodule import runs first
    code = ("from sigprop.models.registry import list_models, model_spec; names = list_models(); "
            "print(len(names), *dict.fromkeys(model_spec(n).family for n in names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["29", "nf_resnet", "bn_resnet", "nfnet"]

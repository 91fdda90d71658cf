import math

import pytest
import torch
import torch.nn.functional as F

from sigprop.layers import (
    ACTIVATIONS,
    GAMMA,
    ScaledStdConv2d,
    SqueezeExcite,
    StochasticDepth,
    estimate_gamma,
    get_activation,
)


@pytest.mark.parametrize("name", sorted(GAMMA))
def test_published_gamma_matches_estimate(name):
    estimate = estimate_gamma(ACTIVATIONS[name])
    assert GAMMA[name] == pytest.approx(estimate, rel=2e-3)


@pytest.mark.slow
def test_relu_gamma_is_close_to_analytic_value():
    analytic = math.sqrt(2 / (1 - 1 / math.pi))
    assert estimate_gamma(F.relu, samples=1 << 24) == pytest.approx(analytic, rel=1e-3)
    # the published constant is a sampling estimate slightly above the analytic value
    assert 0 < GAMMA["relu"] / analytic - 1 < 1e-3


def test_estimate_gamma_for_a_user_activation():
    # Var(2x) = 4, so gamma = 1/2 exactly up to sampling noise
    assert estimate_gamma(lambda x: 2 * x) == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "tanh", "elu", "softplus", "sigmoid"])
def test_scaled_activation_has_unit_variance(name):
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert get_activation(name)(x).var().item() == pytest.approx(1.0, rel=5e-3)


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-4, 4, 101)
    expected = F.gelu(x, approximate="tanh") * GAMMA["gelu"]
    torch.testing.assert_close(get_activation("gelu")(x), expected, rtol=0, atol=0)
    assert not torch.equal(get_activation("gelu")(x), F.gelu(x) * GAMMA["gelu"])


def test_unknown_activation_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown activation 'swishy'.*relu"):
        get_activation("swishy")


@pytest.mark.parametrize("groups", [1, 4])
def test_standardized_weight_has_zero_mean_and_inverse_fan_in_variance(groups):
    torch.manual_seed(0)
    conv = ScaledStdConv2d(16, 32, 3, groups=groups)
    with torch.no_grad():
        conv.weight.mul_(5).add_(3)  # standardization must undo any scale and shift
    w = conv.standardized_weight().double()
    fan_in = 16 // groups * 9
    assert conv.fan_in == fan_in
    var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-7, rtol=0)
    torch.testing.assert_close(var, torch.full_like(var, 1 / fan_in), rtol=1e-4, atol=0)


def test_gain_scales_each_output_channel():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 4, 1)
    base = conv.standardized_weight().clone()
    with torch.no_grad():
        conv.gain.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    torch.testing.assert_close(conv.standardized_weight(), base * conv.gain.view(-1, 1, 1, 1))


def test_eps_floor_on_degenerate_weights():
    conv = ScaledStdConv2d(2, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0 + 1e-4]).view(1, 2, 1, 1))
    w = conv.standardized_weight()
    # var*fan_in is far below eps=1e-4, so scale = rsqrt(1e-4) = 100
    torch.testing.assert_close(w.flatten(), torch.tensor([-0.005, 0.005]), rtol=1e-3, atol=1e-6)


def test_unit_variance_signal_is_preserved_through_activation_and_conv():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(64, 64, 3)
    x = torch.randn(64, 64, 16, 16)
    with torch.no_grad():
        out = conv(get_activation("relu")(x))
    per_channel = out[:, :, 1:-1, 1:-1].var(dim=(0, 2, 3))  # interior: no zero padding
    assert per_channel.mean().item() == pytest.approx(1.0, abs=0.05)
    assert per_channel.min().item() > 0.8 and per_channel.max().item() < 1.2


def test_standardization_runs_in_float32_for_bf16_inputs():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 8, 3)
    x = torch.randn(2, 8, 8, 8)
    ref = conv(x)
    conv_bf16 = ScaledStdConv2d(8, 8, 3).to(torch.bfloat16)
    conv_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in conv.state_dict().items()})
    assert conv_bf16.standardized_weight().dtype == torch.float32
    out = conv_bf16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.standardized_weight().dtype == torch.float32
        assert conv(x).dtype == torch.bfloat16


def test_squeeze_excite_is_twice_the_sigmoid_gate():
    torch.manual_seed(0)
    se = SqueezeExcite(8, 8, se_ratio=0.5)
    assert se.fc0.out_features == 4
    x = torch.randn(3, 8, 5, 5)
    gate = torch.sigmoid(se.fc1(F.relu(se.fc0(x.mean(dim=(2, 3))))))
    torch.testing.assert_close(se(x), 2 * gate[:, :, None, None] * x)


def test_stochastic_depth_drops_whole_examples():
    torch.manual_seed(0)
    sd = StochasticDepth(0.3)
    x = torch.ones(4000, 2, 3, 3)
    out = sd(x)
    per_example = out.flatten(1)
    kept = per_example.amax(dim=1)
    assert torch.equal(per_example.amin(dim=1), kept)  # all or nothing per example
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    assert kept.mean().item() == pytest.approx(0.7, abs=0.03)
    sd.eval()
    assert torch.equal(sd(x), x)


def test_stochastic_depth_scale_by_keep():
    torch.manual_seed(0)
    out = StochasticDepth(0.5, scale_by_keep=True)(torch.ones(1000, 1, 1, 1))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    with pytest.raises(ValueError, match="rate"):
        StochasticDepth(1.0)

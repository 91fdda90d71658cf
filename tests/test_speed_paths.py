"""Fast paths against their references: the fused scaled weight standardization and its eval
cache, gamma folded into the conv, the fused (compiled) AGC. Tests marked ``cuda`` need a GPU
(``python -m benchmarks.gpu`` runs them)."""

from __future__ import annotations

import copy

import pytest
import torch

from sigprop.clipping import adaptive_clip_grad_, fused_agc_available
from sigprop.layers import GAMMA, ScaledStdConv2d, get_activation, scaled_weight_standardization

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_ws(weight: torch.Tensor, gain: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The authors' formula, op by op (the layer's former implementation); float64 stays."""
    w = weight if weight.dtype == torch.float64 else weight.float()
    fan_in = w[0].numel()
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), unbiased=False, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    scale = scale * gain.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    return w * scale - mean * scale


def ws_pair(shape, seed=0, dtype=torch.float32, floor_rows=(), channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen, dtype=dtype) / shape[1] ** 0.5
    for row in floor_rows:  # var * fan_in below eps: the floor is active
        weight[row] = weight[row] * 1e-3
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    gain = 1 + 0.1 * torch.randn(shape[0], generator=gen, dtype=dtype)
    upstream = torch.randn(shape, generator=gen)
    return weight, gain, upstream


def grads_of(fn, weight, gain, upstream):
    w = weight.clone().requires_grad_(True)
    g = gain.clone().requires_grad_(True)
    out = fn(w, g)
    (out * upstream).sum().backward()
    return out.detach(), w.grad, g.grad


@pytest.mark.parametrize("shape, floor_rows, channels_last", [
    ((16, 8, 3, 3), (), False),
    ((16, 8, 3, 3), (), True),
    ((32, 64, 1, 1), (3, 17), False),  # rows on the eps floor take the no-var-gradient branch
    ((12, 4, 3, 3), (0,), True),
    ((10, 7), (), False),
])
def test_fused_ws_equals_reference_forward_and_backward(shape, floor_rows, channels_last):
    weight, gain, upstream = ws_pair(shape, floor_rows=floor_rows, channels_last=channels_last)
    ref = grads_of(reference_ws, weight, gain, upstream)
    fused = grads_of(scaled_weight_standardization, weight, gain, upstream)
    for mine, theirs in zip(fused, ref):
        assert mine.shape == theirs.shape
        scale = float(theirs.abs().max())
        assert float((mine - theirs).abs().max()) <= 1e-5 * max(scale, 1.0)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)


def test_fused_ws_float64_gradcheck():
    weight, gain, _ = ws_pair((6, 3, 3, 3), dtype=torch.float64, floor_rows=(2,))
    w = weight.clone().requires_grad_(True)
    g = gain.clone().requires_grad_(True)

    def fn(w, g):  # float64 end to end: scaled_weight_standardization casts to float32
        from sigprop.layers import _ScaledWeightStandardization

        return _ScaledWeightStandardization.apply(w, g, w[0].numel(), 1e-4)

    assert torch.autograd.gradcheck(fn, (w, g), eps=1e-6, atol=1e-6)


def test_layer_output_equals_reference_and_keeps_float32_stats_under_bf16():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 16, 3)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 9, 9)
    expected = torch.nn.functional.conv2d(x, reference_ws(conv.weight, conv.gain), conv.bias,
                                          padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = conv.standardized_weight()
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, reference_ws(conv.weight, conv.gain), rtol=0, atol=1e-6)


def test_gamma_folded_into_the_conv_equals_the_scaled_activation():
    torch.manual_seed(0)
    plain = ScaledStdConv2d(8, 16, 3)
    folded = copy.deepcopy(plain)
    folded.gamma = get_activation("relu").gamma
    x = torch.randn(2, 8, 9, 9)
    scaled_act, unscaled_act = get_activation("relu"), get_activation("relu", scaled=False)
    torch.testing.assert_close(folded(unscaled_act(x)), plain(scaled_act(x)),
                               rtol=1e-5, atol=1e-5)


def test_eval_cache_reuses_and_invalidates_on_in_place_updates():
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 8, 3).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        first = conv._weight_for(torch.float32)
        assert conv._weight_for(torch.float32) is first  # cached
        before = conv(x)
        conv.weight.mul_(2.0).add_(0.1)  # in place: the version counter moves
        after_weight = conv._weight_for(torch.float32)
        assert after_weight is not first
        torch.testing.assert_close(after_weight, reference_ws(conv.weight, conv.gain))
        conv.gain.mul_(3.0)
        torch.testing.assert_close(conv._weight_for(torch.float32),
                                   reference_ws(conv.weight, conv.gain))
        conv.load_state_dict({k: v.clone() * 0.5 if k == "gain" else v.clone()
                              for k, v in conv.state_dict().items()})
        torch.testing.assert_close(conv._weight_for(torch.float32),
                                   reference_ws(conv.weight, conv.gain))
        assert not torch.equal(conv(x), before)


def test_no_cache_in_training_or_when_recording_gradients():
    conv = ScaledStdConv2d(4, 8, 3)
    x = torch.randn(1, 4, 6, 6)
    conv(x).sum().backward()
    assert conv._cache is None and conv.weight.grad is not None
    conv.eval()
    conv(x).sum().backward()  # eval mode, grad enabled: gradients must still flow
    assert conv._cache is None


def agc_params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8, 3, 3), (16,), (), (10, 16), (32, 16, 1, 1), (10,), (24, 4, 3, 3)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 0.05).to(device)
        params.append(p)
    return params


def test_fused_agc_is_off_without_cuda():
    assert fused_agc_available(torch.device("cpu")) is False


def test_fused_agc_body_run_eagerly_equals_the_eager_path():
    # the function the CUDA path compiles, run as plain code: same clip, same statistics
    from sigprop.clipping import _agc_fused_body

    eager, body = agc_params(), agc_params()
    stats = adaptive_clip_grad_(eager, 0.05)
    sq_norm, clipped, fractions, units = _agc_fused_body(
        [p.detach() for p in body], [p.grad for p in body], 0.05, 1e-3)
    assert 0 < float(stats.clip_fraction) < 1  # some units clipped, some not
    for a, b in zip(eager, body):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sq_norm.sqrt(), stats.grad_norm)
    torch.testing.assert_close(clipped / units, stats.clip_fraction)
    torch.testing.assert_close(fractions, stats.param_fractions)


@cuda
@needs_cuda
def test_fused_agc_equals_eager_on_cuda():
    from sigprop.clipping import _agc_device_fused

    eager, fused = agc_params(device="cuda"), agc_params(device="cuda")
    stats = adaptive_clip_grad_(eager, 0.05, fused=False)
    fused_stats = _agc_device_fused(fused, 0.05, 1e-3)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b.grad, a.grad, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(fused_stats[0].sqrt(), stats.grad_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_stats[1] / fused_stats[3], stats.clip_fraction)


@cuda
@needs_cuda
def test_fused_ws_on_cuda_equals_reference_under_bf16():
    weight, gain, upstream = ws_pair((64, 32, 3, 3), floor_rows=(5,))
    weight, gain, upstream = weight.cuda(), gain.cuda(), upstream.cuda()
    ref = grads_of(reference_ws, weight, gain, upstream)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = grads_of(scaled_weight_standardization, weight, gain, upstream)
    for mine, theirs in zip(fused, ref):
        assert mine.dtype == torch.float32
        assert float((mine - theirs).abs().max()) <= 1e-5 * max(float(theirs.abs().max()), 1.0)


@pytest.mark.parametrize("name, overrides", [
    ("nf_resnet26", {"stem": "imagenet", "width_mult": 0.125, "depths": [1, 1, 1, 1]}),
    ("nfnet_f0", {"stem": "imagenet", "width_mult": 0.125, "depths": [1, 1, 1, 1]}),
    ("nf_resnet26", {"stem": "cifar", "width_mult": 0.125, "depths": [1, 2, 1, 1],
                     "activation": "silu"}),
])
def test_models_with_gamma_folded_match_the_activation_form(name, overrides):
    from sigprop import create_model

    common = {**overrides, "skipinit_gain": 1.0, "stochdepth_rate": 0.0, "drop_rate": 0.0,
              "num_classes": 10}
    torch.manual_seed(0)
    plain = create_model(name, **common)
    torch.manual_seed(0)
    folded = create_model(name, **common, fold_gamma=True)
    folded.load_state_dict(plain.state_dict())
    act_gamma = GAMMA[folded.cfg.activation]
    for block in (m for m in folded.modules() if hasattr(m, "skip_gain")):
        # the convs that read the block's input carry its beta too; the others gamma alone
        for conv in (block.conv0, block.conv_shortcut):
            if conv is not None:
                assert conv.gamma == pytest.approx(act_gamma * block.beta, rel=1e-12)
        assert block.conv2.gamma == act_gamma
    stem_conv = folded.stem[0]  # the image-reading stem conv keeps 1.0
    assert isinstance(stem_conv, ScaledStdConv2d) and stem_conv.gamma == 1.0
    x = torch.randn(2, 3, 33, 33)
    out_plain, out_folded = plain(x), folded(x)
    torch.testing.assert_close(out_folded, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().sum().backward()
    out_folded.square().sum().backward()
    for (n, a), b in zip(plain.named_parameters(), folded.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_fused_ws_is_accurate_when_the_row_mean_dwarfs_the_spread():
    # |mean| / std = 40 and a nearly constant floored row: the corrected two-pass statistics
    # keep forward and backward within 1e-5 of the float64 truth
    weight, gain, upstream = ws_pair((8, 16, 3, 3), seed=3)
    weight[:4] += 5.0
    weight[5] = 1.0
    weight[5, 0, 0, 0] = 1.0 + 1e-4
    truth = grads_of(reference_ws, weight.double(), gain.double(), upstream.double())
    fused = grads_of(scaled_weight_standardization, weight, gain, upstream)
    for mine, theirs in zip(fused, truth):
        scale = max(float(theirs.abs().max()), 1.0)
        assert float((mine.double() - theirs).abs().max()) <= 1e-5 * scale

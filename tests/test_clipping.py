"""Gradient clipping: AGC against a per-parameter reference of the formula, norm clipping
against torch, parameter selection and config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigprop import create_model
from sigprop.clipping import (
    ClipConfig,
    adaptive_clip_grad_,
    agc_parameters,
    clip_grad_norm_,
    find_classifier,
)
from sigprop.errors import UserError


def tiny_nfnet(seed: int = 0) -> nn.Module:
    """NFNet-F0 layout at toy size: grouped convs, SE linears, gains, biases, skip gains."""
    torch.manual_seed(seed)
    return create_model(
        "nfnet_f0", width_mult=0.125, depth_mult=0.34, stem="cifar", num_classes=10,
        skipinit_gain=1.0, stochdepth_rate=0.0, drop_rate=0.0,
    )


def backward(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def unit_norms(t: torch.Tensor) -> torch.Tensor:
    """Reference unit norms: rows along dim 0 over everything else; 0-d/1-d whole tensor."""
    if t.dim() <= 1:
        return t.detach().norm().reshape(1)
    return torch.stack([row.norm() for row in t.detach()])


def reference_agc(named, clip: float, eps: float = 1e-3) -> None:
    """The facts-file formula, one parameter and one unit at a time."""
    for _, p in named:
        w_norms, g_norms = unit_norms(p), unit_norms(p.grad)
        if p.grad.dim() <= 1:
            units = [p.grad]
        else:
            units = list(p.grad)
        for unit, w_norm, g_norm in zip(units, w_norms, g_norms):
            max_norm = clip * max(float(w_norm), eps)
            if float(g_norm) / max(float(w_norm), eps) > clip:
                unit.mul_(max_norm / max(float(g_norm), 1e-6))


def ratios(named) -> torch.Tensor:
    return torch.cat([unit_norms(p.grad) / unit_norms(p).clamp_min(1e-3) for _, p in named])


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_nfnet_has_every_kind_of_parameter():
    model = tiny_nfnet()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"ScaledStdConv2d", "Linear", "SqueezeExcite"} <= kinds
    assert any(m.groups > 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("skip_gain") for n in names)
    assert any(n.endswith(".gain") for n in names) and any(n.endswith(".bias") for n in names)


@pytest.mark.slow
def test_agc_matches_per_parameter_reference():
    model = tiny_nfnet()
    backward(model)
    named = agc_parameters(model)
    # lambda at the median unit ratio: about half the units clip, half do not
    clip = float(ratios(named).median())
    before = grads_of(model)

    reference = tiny_nfnet()
    reference.load_state_dict(model.state_dict())
    for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        q.grad = p.grad.clone()
    reference_agc(agc_parameters(reference), clip)

    stats = adaptive_clip_grad_(named, clip)
    changed = 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=name)
        changed += not torch.equal(p.grad, before[name])
    assert changed > 10  # the comparison is not vacuous

    all_ratios = torch.cat([unit_norms(before[n]) / unit_norms(p).clamp_min(1e-3)
                            for n, p in named])
    assert float(stats.clip_fraction) == pytest.approx(float((all_ratios > clip).float().mean()))
    assert 0.3 < float(stats.clip_fraction) < 0.7
    expected_norm = torch.cat([before[n].reshape(-1) for n, _ in named]).norm()
    torch.testing.assert_close(stats.grad_norm, expected_norm, rtol=1e-5, atol=0)
    assert stats.names == tuple(n for n, _ in named)
    for k, (name, p) in enumerate(named):
        r = unit_norms(before[name]) / unit_norms(p).clamp_min(1e-3)
        assert float(stats.param_fractions[k]) == pytest.approx(float((r > clip).float().mean()))


def test_agc_changes_only_units_above_lambda():
    model = tiny_nfnet()
    backward(model)
    named = agc_parameters(model)
    clip = float(ratios(named).quantile(0.7))
    before = grads_of(model)
    adaptive_clip_grad_(named, clip)
    seen_below = seen_above = 0
    for name, p in named:
        old = before[name]
        w_norms = unit_norms(p).clamp_min(1e-3)
        old_units = [old] if old.dim() <= 1 else list(old)
        new_units = [p.grad] if old.dim() <= 1 else list(p.grad)
        for o, n, w in zip(old_units, new_units, w_norms):
            if float(o.norm() / w) > clip:
                seen_above += 1
                # clipped exactly onto the boundary
                assert float(n.norm() / w) == pytest.approx(clip, rel=1e-5)
            else:
                seen_below += 1
                assert torch.equal(n, o), name  # bit-identical
    assert seen_below > 0 and seen_above > 0


def test_linear_units_are_rows_not_columns():
    layer = nn.Linear(3, 5)  # weight (out=5, in=3)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(15.0).reshape(5, 3) / 10 + 0.1)
    layer.weight.grad = torch.ones(5, 3)
    layer.bias.grad = torch.zeros(5)
    adaptive_clip_grad_([layer.weight], clip=0.1)
    row_norms = layer.weight.detach().norm(dim=1)
    torch.testing.assert_close(layer.weight.grad.norm(dim=1), 0.1 * row_norms)


def test_eps_floor_lets_zero_weights_move():
    gain = nn.Parameter(torch.zeros(4))
    gain.grad = torch.full((4,), 10.0)
    adaptive_clip_grad_([gain], clip=0.01, eps=1e-3)
    assert float(gain.grad.norm()) == pytest.approx(0.01 * 1e-3, rel=1e-5)


def test_classifier_weight_left_alone_by_default_and_clipped_on_request():
    model = tiny_nfnet()
    backward(model)
    head = find_classifier(model)
    assert head is model.get_classifier()
    before = grads_of(model)
    tiny = 1e-6  # every unit is above this, so anything AGC touches changes
    ClipConfig("agc", tiny).apply(model)
    assert torch.equal(head.weight.grad, before["fc.weight"])
    assert not torch.equal(head.bias.grad, before["fc.bias"])
    assert not torch.equal(model.stages[0][0].skip_gain.grad, before["stages.0.0.skip_gain"])

    backward(model)
    before = grads_of(model)
    stats = ClipConfig("agc", tiny, clip_classifier=True).apply(model)
    assert not torch.equal(head.weight.grad, before["fc.weight"])
    assert "fc.weight" in stats.names
    # the reported global norm covers every parameter, also unclipped ones
    full = torch.cat([g.reshape(-1) for g in before.values()]).norm()
    torch.testing.assert_close(stats.grad_norm, full, rtol=1e-5, atol=0)


def test_exclude_patterns_and_fallback_classifier():
    model = tiny_nfnet()
    names = [n for n, _ in agc_parameters(model, exclude=["*.skip_gain", "stem.*"])]
    assert not any(n.endswith("skip_gain") or n.startswith("stem.") for n in names)
    assert "fc.weight" not in names and "fc.bias" in names

    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # no get_classifier
    names = [n for n, _ in agc_parameters(plain)]
    assert names == ["0.weight", "0.bias", "2.bias"]

    backward(model)
    before = grads_of(model)
    ClipConfig("agc", 1e-6, exclude=("*.skip_gain",)).apply(model)
    assert torch.equal(model.stages[0][0].skip_gain.grad, before["stages.0.0.skip_gain"])


def test_plan_cache_serves_a_second_model_of_the_same_shapes():
    first, second = tiny_nfnet(0), tiny_nfnet(1)
    backward(first, 0)
    ClipConfig("agc", 0.05).apply(first)
    backward(second, 1)
    expected = tiny_nfnet(1)
    expected.load_state_dict(second.state_dict())
    for p, q in zip(second.parameters(), expected.parameters()):
        q.grad = p.grad.clone()
    reference_agc(agc_parameters(expected), 0.05)
    ClipConfig("agc", 0.05).apply(second)
    for p, q in zip(second.parameters(), expected.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float64, 1e-6)])
def test_agc_in_other_dtypes(dtype, tol):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4, 3, 3).to(dtype))
    b = nn.Parameter(torch.randn(6).to(dtype))
    w.grad, b.grad = torch.randn(6, 4, 3, 3).to(dtype), torch.randn(6).to(dtype)
    ref_w, ref_b = w.grad.double().clone(), b.grad.double().clone()
    adaptive_clip_grad_([w, b], clip=0.5)
    w_norms = w.detach().double().flatten(1).norm(dim=1).clamp_min(1e-3)
    g_norms = ref_w.flatten(1).norm(dim=1)
    factor = torch.where(g_norms / w_norms > 0.5, 0.5 * w_norms / g_norms, 1.0)
    torch.testing.assert_close(w.grad.double(), ref_w * factor[:, None, None, None],
                               rtol=tol, atol=tol * 1e-1)
    b_factor = min(1.0, 0.5 * float(b.detach().double().norm()) / float(ref_b.norm()))
    torch.testing.assert_close(b.grad.double(), ref_b * b_factor, rtol=tol, atol=tol * 1e-1)
    assert w.grad.dtype == dtype


@pytest.mark.parametrize("threshold", [0.05, 1e3])
def test_norm_clipping_equals_torch(threshold):
    model = tiny_nfnet()
    backward(model)
    twin = tiny_nfnet()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), threshold)
    stats = ClipConfig("norm", threshold).apply(model)
    torch.testing.assert_close(stats.grad_norm, expected_norm, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-10)
    assert float(stats.clip_fraction) == float(expected_norm > threshold)


def test_clip_grad_norm_function_clips_to_threshold():
    params = [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(5))]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    stats = clip_grad_norm_(params, 1.0)
    assert float(stats.grad_norm) == pytest.approx(2.0 * 11**0.5)
    total = torch.cat([p.grad.reshape(-1) for p in params]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)


def test_mode_none_leaves_gradients_and_reports_norm():
    model = tiny_nfnet()
    backward(model)
    before = grads_of(model)
    stats = ClipConfig().apply(model)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    full = torch.cat([g.reshape(-1) for g in before.values()]).norm()
    torch.testing.assert_close(stats.grad_norm, full, rtol=1e-5, atol=0)
    assert float(stats.clip_fraction) == 0.0
    assert set(stats.to_dict()) >= {"grad_norm", "clip_fraction", "clip_fraction/fc.weight"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "adaptive", "threshold": 0.01}, "clip.mode"),
        ({"mode": "agc"}, "clip.threshold"),
        ({"mode": "norm", "threshold": -1.0}, "clip.threshold"),
        ({"mode": "agc", "threshold": "0.01"}, "clip.threshold"),
        ({"mode": "agc", "threshold": 0.01, "eps": 0}, "clip.eps"),
        ({"mode": "agc", "threshold": 0.01, "exclude": [1]}, "clip.exclude"),
    ],
)
def test_clip_config_validation_names_the_field(kwargs, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")) as info:
        ClipConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_clip_config_dict_round_trip_and_unknown_key():
    config = ClipConfig.from_dict({"mode": "agc", "threshold": 0.02, "exclude": ["stem.*"]})
    assert config.exclude == ("stem.*",)
    assert ClipConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match=r"clip\.lambda.*valid: clip\.mode"):
        ClipConfig.from_dict({"mode": "agc", "lambda": 0.01})
    with pytest.raises(UserError, match=r"agc, norm, none"):
        ClipConfig(mode="clip", threshold=1.0)

"""Probe: statistics equal direct computations, hooks come and go cleanly, steps are honoured."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sigprop
from sigprop.errors import UserError
from sigprop.probes import Probe, channel_var_mean, find_points, match_name


def small_nf(**overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(
        depths=(2, 2), widths=(32, 64), width_mult=1.0, stem="cifar", num_classes=10,
        skipinit_gain=1.0, stochdepth_rate=0.0,
    )
    cfg.update(overrides)
    return sigprop.create_model("nf_resnet26", **cfg)


def batch(n: int = 8, px: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, px, px, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def probed_steps(steps: int, **probe_args) -> tuple[nn.Module, torch.Tensor, Probe]:
    """``small_nf`` trained ``steps`` steps (0, 1, ...) on one batch of 4 images of 8 px, each
    step started on a ``Probe(model, **probe_args)``: (model, the images, the probe, still
    attached)."""
    model = small_nf()
    x, y = batch(n=4, px=8)
    probe = Probe(model, **probe_args)
    for step in range(steps):
        probe.start_step(step)
        F.cross_entropy(model(x), y).backward()
    return model, x, probe


def capture_outputs(model: nn.Module, names: list[str]) -> tuple[dict, list]:
    """Our own forward hooks, independent of the probe: name -> output tensor."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(module, args, output, name=name):
            captured[name] = output
        handles.append(modules[name].register_forward_hook(hook))
    return captured, handles


def direct_stats(x: torch.Tensor) -> tuple[float, float]:
    x = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    var = ((x - x.mean(dim=dims, keepdim=True)) ** 2).mean(dim=dims)
    return float((mean**2).mean()), float(var.mean())


def value(frame, block: str, stat: str, step: int | None = None) -> float:
    rows = frame[(frame["block"] == block) & (frame["stat"] == stat)]
    if step is not None:
        rows = rows[rows["step"] == step]
    assert len(rows) == 1, (block, stat, len(rows))
    return float(rows["value"].iloc[0])


def agc_units(param: torch.Tensor) -> list[torch.Tensor]:
    """AGC units written out by hand: rows along dim 0 for >= 2-d, the whole tensor else."""
    if param.dim() <= 1:
        return [param.reshape(-1)]
    return [param[i].reshape(-1) for i in range(param.shape[0])]


def manual_agc(pairs: list[tuple[torch.Tensor, torch.Tensor]], lam: float) -> dict[str, float]:
    ratios, grad_sq = [], 0.0
    for weight, grad in pairs:
        grad_sq += float(grad.double().pow(2).sum())
        for w_unit, g_unit in zip(agc_units(weight.double()), agc_units(grad.double())):
            ratios.append(float(g_unit.norm() / max(float(w_unit.norm()), 1e-3)))
    return {
        "grad_norm": math.sqrt(grad_sq),
        "agc_ratio_max": max(ratios),
        "agc_ratio_mean": sum(ratios) / len(ratios),
        "agc_frac_above": sum(r > lam for r in ratios) / len(ratios),
    }


def test_activation_stats_equal_direct_computation():
    model = small_nf()
    x, _ = batch()
    blocks = model.blocks()
    names = ["stem"] + [b.name for b in blocks] + [b.branch for b in blocks]
    captured, handles = capture_outputs(model, names)
    with Probe(model) as probe:
        model(x)
    for h in handles:
        h.remove()
    frame = probe.records()
    assert set(frame["step"]) == {0}
    for b in blocks + [None]:
        name = "stem" if b is None else b.name
        sq_mean, var = direct_stats(captured[name])
        assert value(frame, name, "sq_mean") == pytest.approx(sq_mean, rel=1e-4, abs=1e-9)
        assert value(frame, name, "var") == pytest.approx(var, rel=1e-4)
        if b is not None:
            res_sq_mean, res_var = direct_stats(captured[b.branch])
            assert value(frame, name, "res_var") == pytest.approx(res_var, rel=1e-4)
            assert value(frame, name, "res_sq_mean") == pytest.approx(res_sq_mean, rel=1e-4)
    # the bookkeeping travels with the rows: 1 + alpha^2 after the transition block
    first = frame[frame["block"] == blocks[0].name]
    assert first["expected_var"].unique().tolist() == [pytest.approx(1.04)]
    assert frame.loc[frame["block"] == "stem", "index"].unique().tolist() == [-1]


@pytest.mark.parametrize("shift, rtol", [(0.0, 1e-5), (10.0, 3e-3)])
def test_channel_var_mean_stays_accurate_under_a_mean_shift(shift, rtol):
    # shift 10 with std 0.1: squared mean 1e4 x the variance, the documented ~0.1% regime
    gen = torch.Generator().manual_seed(0)
    x = shift + 0.1 * torch.randn(16, 8, 10, 10, generator=gen)
    var, mean = channel_var_mean(x)
    ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(var.double(), ref, rtol=rtol)
    assert torch.allclose(mean.double(), x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-7)


def test_gradient_stats_equal_manual_autograd():
    model = small_nf()
    x, y = batch()
    lam = 0.003  # between the conv rows' ratios, so the fractions are neither 0 nor 1
    blocks = model.blocks()
    captured, handles = capture_outputs(model, ["stem"] + [b.name for b in blocks])
    with Probe(model, agc_lambda=lam) as probe:
        out = model(x)
        for t in captured.values():
            t.retain_grad()
        F.cross_entropy(out, y).backward()
    for h in handles:
        h.remove()
    frame = probe.records()
    modules = dict(model.named_modules())
    for name, tensor in captured.items():
        assert value(frame, name, "grad_out_norm") == pytest.approx(
            float(tensor.grad.double().norm()), rel=1e-5
        )
        params = list(modules[name].parameters())
        expected = manual_agc([(p.detach(), p.grad) for p in params], lam)
        for stat, want in expected.items():
            assert value(frame, name, stat) == pytest.approx(want, rel=1e-4), (name, stat)
        if name != "stem":
            assert 0.1 < expected["agc_frac_above"] < 0.9  # the threshold matters here
    # parameters outside the stem and blocks: the classifier, rows over dim 1 of (out, in)
    fc = model.get_classifier()
    expected = manual_agc([(fc.weight.detach(), fc.weight.grad), (fc.bias.detach(), fc.bias.grad)],
                          lam)
    for stat, want in expected.items():
        assert value(frame, "other", stat) == pytest.approx(want, rel=1e-4)
    assert frame.loc[frame["block"] == "other", "index"].unique().tolist() == [len(blocks)]

    per_param = probe.param_records()
    fc_ratio_max = per_param[(per_param["param"] == "fc.weight")
                             & (per_param["stat"] == "agc_ratio_max")]["value"].item()
    row_ratios = fc.weight.grad.norm(dim=1) / fc.weight.detach().norm(dim=1).clamp_min(1e-3)
    assert fc_ratio_max == pytest.approx(float(row_ratios.max()), rel=1e-5)
    # the JAX-layout bug (norms over dim 0 of a PyTorch linear weight) gives another value
    wrong = fc.weight.grad.norm(dim=0) / fc.weight.detach().norm(dim=0).clamp_min(1e-3)
    assert fc_ratio_max != pytest.approx(float(wrong.max()), rel=1e-3)
    stem_conv = per_param[(per_param["param"] == "stem.conv.weight")
                          & (per_param["stat"] == "grad_norm")]["value"].item()
    assert stem_conv == pytest.approx(float(model.stem.conv.weight.grad.norm()), rel=1e-5)


def test_gradient_stats_are_those_of_the_accumulated_gradient():
    model = small_nf()
    (x1, y1), (x2, y2) = batch(seed=1), batch(seed=2)
    probe = Probe(model)
    probe.start_step(0)
    for x, y in ((x1, y1), (x2, y2)):  # two micro-batches of one step
        F.cross_entropy(model(x), y).backward()
    probe.remove()
    frame = probe.records()
    assert set(frame["step"]) == {0}
    assert frame.groupby(["block", "stat"]).size().max() == 1  # one row per (block, stat)
    name = model.blocks()[1].name
    params = list(dict(model.named_modules())[name].parameters())
    want = manual_agc([(p.detach(), p.grad) for p in params], 0.01)
    assert value(frame, name, "grad_norm") == pytest.approx(want["grad_norm"], rel=1e-4)


def test_removed_probe_leaves_outputs_and_gradients_bit_identical():
    model = small_nf()
    x, y = batch()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters()]

    out_before, grads_before = forward_backward()
    probe = Probe(model, every=1)
    out_probed, grads_probed = forward_backward()
    probe.remove()
    out_after, grads_after = forward_backward()
    assert torch.equal(out_before, out_probed) and torch.equal(out_before, out_after)
    for a, b, c in zip(grads_before, grads_probed, grads_after):
        assert torch.equal(a, b) and torch.equal(a, c)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for param in model.parameters():
        assert not param._post_accumulate_grad_hooks
    assert len(probe.records()) > 0  # what was recorded survives remove()


def test_steps_every_and_eligibility():
    model, x, probe = probed_steps(7, every=3)
    model.eval()
    with torch.no_grad():
        model(x)  # evaluation forwards are not training steps
    probe.remove()
    assert sorted(probe.records()["step"].unique()) == [0, 3, 6]

    counted = Probe(model.train(), every=2)  # no start_step: training forwards are counted
    for _ in range(5):
        model(x)
    with torch.no_grad():
        model(x)  # not counted: no grad
    counted.remove()
    assert sorted(counted.records()["step"].unique()) == [0, 2, 4]

    evaluating = Probe(model.eval(), record_eval=True)
    with torch.no_grad():
        model(x)
        model(x)
    evaluating.remove()
    frame = evaluating.records()
    assert sorted(frame["step"].unique()) == [0, 1]
    assert not frame["stat"].isin(["grad_norm", "grad_out_norm"]).any()


def test_hooks_are_registered_only_while_a_step_records():
    model = small_nf()
    x, y = batch(n=4, px=8)
    block = dict(model.named_modules())[model.blocks()[0].name]
    weight = model.stem.conv.weight
    probe = Probe(model, every=2)
    probe.start_step(1)
    model(x)
    assert not block._forward_hooks and not weight._post_accumulate_grad_hooks
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    probe.start_step(2)
    F.cross_entropy(model(x), y).backward()
    assert block._forward_hooks and weight._post_accumulate_grad_hooks
    probe.start_step(3)
    model(x)
    assert not block._forward_hooks and not weight._post_accumulate_grad_hooks
    probe.remove()
    assert sorted(probe.records()["step"].unique()) == [2]


def test_buffer_flushes_to_host_when_full():
    _, _, probe = probed_steps(5, buffer_steps=2)
    assert isinstance(probe._buffer, torch.Tensor) and probe._rows_used == 1  # 2 flushes done
    frame = probe.records()
    probe.remove()
    assert sorted(frame["step"].unique()) == [0, 1, 2, 3, 4]
    per_step = frame.groupby("step").size()
    assert per_step.nunique() == 1  # every step has the full set of rows


def test_bf16_autocast_gives_float32_statistics_close_to_float32_run():
    model = small_nf()
    x, y = batch(n=16, px=12)
    with Probe(model) as reference:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    with Probe(model) as probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        F.cross_entropy(out.float(), y).backward()
    ref, low = reference.records(), probe.records()
    assert len(ref) == len(low)
    merged = ref.merge(low, on=["block", "stat"], suffixes=("_32", "_16"))
    assert merged["value_16"].notna().all()
    for stat in ("var", "res_var", "grad_norm"):
        rows = merged[merged["stat"] == stat]
        rel = ((rows["value_16"] - rows["value_32"]) / rows["value_32"]).abs()
        assert rel.max() < 0.05, (stat, rel.max())


class PlainBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1)
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(
            cin, cout, 1, stride
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + 0.5 * self.branch(x)


class PlainNet(nn.Module):
    """A user's residual net with no blocks(): stem, two stages, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.stage1 = nn.Sequential(PlainBlock(8, 8), PlainBlock(8, 8))
        self.stage2 = nn.Sequential(OrderedDict(down=PlainBlock(8, 16, 2), more=PlainBlock(16, 16)))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_probe_on_a_plain_model_with_patterns():
    torch.manual_seed(0)
    model = PlainNet()
    x = torch.randn(6, 3, 10, 10)
    y = torch.randint(0, 5, (6,))
    names = ["stage1.0", "stage1.1", "stage2.down", "stage2.more"]
    captured, handles = capture_outputs(model, names + [n + ".branch" for n in names] + ["stem"])
    probe = Probe(model, blocks="stage*.*", branches="stage*.*.branch", stem="stem")
    out = model(x)
    for name in names:
        captured[name].retain_grad()
    F.cross_entropy(out, y).backward()
    probe.remove()
    for h in handles:
        h.remove()
    frame = probe.records()
    meta = frame.drop_duplicates("block").set_index("block")
    assert meta.loc[names, "stage"].tolist() == [0, 0, 1, 1]
    assert meta.loc[names, "index"].tolist() == [0, 1, 2, 3]
    assert frame["expected_var"].isna().all()
    for name in names:
        sq_mean, var = direct_stats(captured[name])
        assert value(frame, name, "var") == pytest.approx(var, rel=1e-4)
        assert value(frame, name, "sq_mean") == pytest.approx(sq_mean, rel=1e-4, abs=1e-9)
        assert value(frame, name, "res_var") == pytest.approx(
            direct_stats(captured[name + ".branch"])[1], rel=1e-4
        )
        assert value(frame, name, "grad_out_norm") == pytest.approx(
            float(captured[name].grad.norm()), rel=1e-5
        )
        params = list(dict(model.named_modules())[name].parameters())
        want = manual_agc([(p.detach(), p.grad) for p in params], 0.01)
        assert value(frame, name, "agc_ratio_mean") == pytest.approx(want["agc_ratio_mean"],
                                                                      rel=1e-4)
    assert value(frame, "stem", "var") == pytest.approx(direct_stats(captured["stem"])[1],
                                                        rel=1e-4)
    head = manual_agc([(model.head.weight.detach(), model.head.weight.grad),
                       (model.head.bias.detach(), model.head.bias.grad)], 0.01)
    assert value(frame, "other", "grad_norm") == pytest.approx(head["grad_norm"], rel=1e-4)


def test_patterns_match_segment_by_segment_and_bad_patterns_are_user_errors():
    assert match_name("layer1.0", "layer*.*")
    assert not match_name("layer1.0.conv1", "layer*.*")  # '*' never crosses a dot
    assert match_name("layer1.0.bn3", "layer*.*.bn3")
    model = PlainNet()
    with pytest.raises(UserError, match="no blocks"):
        Probe(model)
    with pytest.raises(UserError, match="no module matches block"):
        Probe(model, blocks="layer*.*")
    with pytest.raises(UserError, match="inside none of the blocks"):
        Probe(model, blocks="stage1.*", branches="stage2.*.branch")
    with pytest.raises(UserError, match="every"):
        Probe(model, every=0, blocks="stage*.*")
    points = find_points(model, blocks=["stage1.*", "stage2.*"])
    assert [p.block for p in points] == ["stage1.0", "stage1.1", "stage2.down", "stage2.more"]
    assert all(p.branch is None for p in points)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

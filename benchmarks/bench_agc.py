"""AGC cost on NFNet-F0's real parameter set: sigprop's AGC vs a per-parameter loop and the
bandwidth floor.

The parameters have F0's real shapes (71.5M values; built on the meta device, then materialized
with random weights and gradients, ~600 MB). Variants:

- ``foreach_mul_ floor``: one in-place ``torch._foreach_mul_`` over all gradients, the least
  any clipping that rewrites every gradient can cost;
- ``sigprop AGC``: :func:`sigprop.clipping.adaptive_clip_grad_`;
- ``per-param loop``: the straightforward implementation (timm's ``adaptive_clip_grad``: per
  parameter two norms, clamp, divide, ``where``, ``copy_``);
- ``stack by shape``: stack same-shaped tensors and reduce each group at once (the design the
  module docstring explains it did not take).

Variants take turns in a shuffled order every round, so load from other processes hits them
alike; the table gives each one's median over rounds and the ratios measured in this run.

    .venv/bin/python -m benchmarks.bench_agc [--rounds 9] [--warmup 3] [--threads 0] [--check]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

import sigprop
from benchmarks.timing import interleaved_rounds, timed, timing_parser
from sigprop.clipping import adaptive_clip_grad_

VARIANTS = ("foreach_mul_ floor", "sigprop AGC", "per-param loop", "stack by shape")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = timing_parser(
        __doc__, rounds=9, warmup=3, threads=0,
        warmup_help="untimed rounds first: fresh pages of big new tensors are slow to touch")
    p.add_argument("--model", default="nfnet_f0")
    p.add_argument("--clip", type=float, default=0.01)
    p.add_argument("--skip-stack", action="store_true", help="leave out 'stack by shape'")
    p.add_argument("--check", action="store_true",
                   help="first check sigprop AGC against the per-param loop (needs 2x memory)")
    return p.parse_args(argv)


def materialize(model_name: str, seed: int, device: str = "cpu") -> list[nn.Parameter]:
    """Parameters of ``model_name`` with realistic scales: weights N(0, 1/fan_in), gains 1,
    biases 0; gradients at about 1% of the weights, so AGC at 0.01 clips a good share."""
    with torch.device("meta"):
        model = sigprop.create_model(model_name)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for name, meta in model.named_parameters():
        shape = meta.shape
        if meta.dim() > 1:
            scale = meta[0].numel() ** -0.5
            weight = torch.randn(shape, generator=gen) * scale
        elif name.endswith("bias"):
            weight, scale = torch.zeros(shape), 1e-3
        else:
            weight, scale = torch.ones(shape), 1.0
        p = nn.Parameter(weight.to(device))
        p.grad = (torch.randn(shape, generator=gen) * (0.01 * scale)).to(device)
        params.append(p)
    return params


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def per_param_agc(params: list[nn.Parameter], clip: float, eps: float = 1e-3) -> None:
    """timm.utils.agc.adaptive_clip_grad, one parameter at a time."""
    for p in params:
        g = p.grad.detach()
        max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip)
        grad_norm = unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g, clipped))


def stacked_agc(params: list[nn.Parameter], groups: dict, clip: float, eps: float = 1e-3):
    """Stack each group of same-shaped tensors, reduce it in one kernel, one multiply."""
    scales: list[torch.Tensor] = [torch.ones(())] * len(params)
    for shape, idx in groups.items():
        rows = shape[0] if len(shape) > 1 else 1
        weights = torch.stack([params[i].detach() for i in idx]).reshape(len(idx), rows, -1)
        grads = torch.stack([params[i].grad for i in idx]).reshape(len(idx), rows, -1)
        w_norm = torch.linalg.vector_norm(weights, dim=-1)
        g_norm = torch.linalg.vector_norm(grads, dim=-1)
        max_norm = w_norm.clamp_min(eps) * clip
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0)
        for j, i in enumerate(idx):
            broadcast = (rows, *([1] * (len(shape) - 1))) if len(shape) > 1 else ()
            scales[i] = scale[j].reshape(broadcast)
    torch._foreach_mul_([p.grad for p in params], scales)


def synced(fn, device: torch.device):
    """``fn`` timed as a variant, synchronizing CUDA before and after."""
    if device.type != "cuda":
        return timed(fn)

    def run() -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def measure(
    params: list[nn.Parameter], clip: float, rounds: int, warmup: int, seed: int,
    stack: bool = True, fused: bool = False,
) -> dict[str, list[float]]:
    """Every variant's times (seconds, one per round), interleaved. ``fused`` adds the
    compiled CUDA path ("sigprop AGC fused"); its compile happens in the warm-up."""
    grads = [p.grad for p in params]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[tuple(p.shape)].append(i)
    variants = {
        "foreach_mul_ floor": lambda: torch._foreach_mul_(grads, 1.0),
        "sigprop AGC": lambda: adaptive_clip_grad_(params, clip, fused=False),
        "per-param loop": lambda: per_param_agc(params, clip),
        "stack by shape": lambda: stacked_agc(params, groups, clip),
    }
    if fused:
        variants["sigprop AGC fused"] = lambda: adaptive_clip_grad_(params, clip, fused=True)
    if not stack:
        variants.pop("stack by shape")
    device = params[0].device
    return interleaved_rounds({name: synced(fn, device) for name, fn in variants.items()},
                              rounds, max(1, warmup), seed)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = materialize(args.model, args.seed)
    if args.check:
        shadow = [nn.Parameter(p.detach().clone()) for p in params]
        for s, p in zip(shadow, params):
            s.grad = p.grad.clone()
        adaptive_clip_grad_(params, args.clip)
        per_param_agc(shadow, args.clip)
        worst = max(float((p.grad - s.grad).abs().max() / s.grad.abs().max())
                    for p, s in zip(params, shadow))
        print(f"check: largest relative difference to the per-param loop {worst:.2e}")
        del shadow

    # warm-up: allocator, plan cache, first touch of the pages
    times = measure(params, args.clip, args.rounds, args.warmup, args.seed,
                    stack=not args.skip_stack)
    variants = list(times)

    medians = {name: statistics.median(t) for name, t in times.items()}
    n_values = sum(p.numel() for p in params)
    print(f"{args.model}: {len(params)} tensors, {n_values / 1e6:.1f}M values, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds, lambda {args.clip}")
    print(f"{'variant':<20} {'median ms':>10} {'min ms':>9} {'x floor':>8} {'x AGC':>7}")
    for name in variants:
        print(f"{name:<20} {medians[name] * 1e3:>10.1f} {min(times[name]) * 1e3:>9.1f} "
              f"{medians[name] / medians['foreach_mul_ floor']:>8.2f} "
              f"{medians[name] / medians['sigprop AGC']:>7.2f}")
    speedup = medians["per-param loop"] / medians["sigprop AGC"]
    over_floor = medians["sigprop AGC"] / medians["foreach_mul_ floor"]
    print(f"sigprop AGC is {speedup:.2f}x faster than the per-param loop (target >= 5) and "
          f"{over_floor:.2f}x the foreach_mul_ floor (target <= 2.5)")
    return {"speedup_vs_loop": speedup, "ratio_to_floor": over_floor}


if __name__ == "__main__":
    main()

"""Scaled weight standardization alone: the fused layer maths against the op-by-op reference
and timm's batch-norm formulation, forward + backward over every conv weight of a model.

Variants (each standardizes all of the model's conv weights and backpropagates a fixed random
upstream gradient): ``op by op`` (var_mean, clamp, rsqrt, two multiplies: the layer's former
code), ``fused`` (:func:`sigprop.layers.scaled_weight_standardization`), ``batch_norm`` (timm's
``F.batch_norm`` over the weight viewed as (1, out, fan_in); eps 1e-5 added to the variance, so
not the authors' maths, here only as a speed reference). Interleaved rounds, medians.

    .venv/bin/python -m benchmarks.bench_ws [--model nf_resnet50] [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import sigprop
from benchmarks.timing import interleaved_rounds, timed, timing_parser
from sigprop.layers import ScaledStdConv2d, scaled_weight_standardization


def op_by_op(weight: torch.Tensor, gain: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    w = weight.float()
    var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=eps)) * gain.view(-1, 1, 1, 1)
    return w * scale - mean * scale


def batch_norm(weight: torch.Tensor, gain: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    scale = gain * weight[0].numel() ** -0.5
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=scale,
                        training=True, momentum=0.0, eps=eps).reshape_as(weight)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = timing_parser(__doc__, rounds=9, warmup=2, threads=1,
                      warmup_help="untimed calls per variant")
    p.add_argument("--model", default="nf_resnet50")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = sigprop.create_model(args.model)
    convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    upstream = [torch.randn_like(c.weight) for c in convs]

    def run(fn):
        def step() -> None:
            for conv, up in zip(convs, upstream):
                out = fn(conv.weight, conv.gain)
                out.backward(up)
            model.zero_grad(set_to_none=True)
        return step

    variants = {"op by op": run(op_by_op), "fused": run(scaled_weight_standardization),
                "batch_norm": run(batch_norm)}
    times = interleaved_rounds({k: timed(v) for k, v in variants.items()},
                               args.rounds, args.warmup, args.seed)
    medians = {k: statistics.median(v) for k, v in times.items()}
    n = sum(c.weight.numel() for c in convs)
    print(f"{args.model}: {len(convs)} conv weights, {n / 1e6:.1f}M values, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds, forward + backward")
    print(f"{'variant':<12} {'median ms':>10} {'x fused':>8}")
    for name, m in medians.items():
        print(f"{name:<12} {m * 1e3:>10.1f} {m / medians['fused']:>8.2f}")
    return {name: m / medians["fused"] for name, m in medians.items()}


if __name__ == "__main__":
    main()

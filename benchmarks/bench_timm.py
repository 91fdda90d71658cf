"""A full training step of sigprop's models against timm's of the same family.

The step: forward, cross-entropy, backward, AGC at lambda 0.01 (each library's own AGC, the
final classifier weight left out), Nesterov SGD; on a fixed random batch. Pairs:
nf_resnet26 / nf_resnet50 against timm's models of the same names, nfnet_f0 against timm's
dm_nfnet_f0, bn_resnet50_v1 against timm's resnet50. Stochastic depth and dropout are off on both
sides (their masks are random, and timm's defaults have them off); sigprop's NF models fold gamma
into the convs as timm's do (``fold_gamma=True``; ``--activation-gamma`` keeps the authors'
layout). The two models of a pair take
turns in blocks of ``--block`` steps, in a shuffled order every round; the ratio is paired per
round (sigprop's block time / timm's in the same round) and reported as the median with its
interquartile range, extremes and a 95% bootstrap interval of the median (a pair is at parity
when that interval holds 1).

sigprop does not depend on timm: run this with a Python that has timm, with the worktree on
PYTHONPATH (``bash shared/tools/timm_venv.sh`` builds a scratch venv and prints its python):

    PYTHONPATH=$PWD $(bash /work/shared/tools/timm_venv.sh) -m benchmarks.bench_timm \\
        [--pairs nf_resnet26,nf_resnet50,nfnet_f0,bn_resnet50] [--batch 16] [--px 64] ...

Without timm it prints one line and returns no figures (``python -m benchmarks`` runs it too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sigprop
from benchmarks.timing import interleaved_rounds, median_ci, timing_parser
from sigprop.clipping import adaptive_clip_grad_, agc_parameters

# label: (sigprop model, sigprop overrides, timm model, timm overrides)
PAIRS: dict[str, tuple[str, dict, str, dict]] = {
    "nf_resnet26": ("nf_resnet26", {"stochdepth_rate": 0.0}, "nf_resnet26", {}),
    "nf_resnet50": ("nf_resnet50", {"stochdepth_rate": 0.0}, "nf_resnet50", {}),
    "nfnet_f0": ("nfnet_f0", {"stochdepth_rate": 0.0, "drop_rate": 0.0}, "dm_nfnet_f0", {}),
    "bn_resnet50": ("bn_resnet50_v1", {}, "resnet50", {}),
}
AGC_LAMBDA = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = timing_parser(__doc__, rounds=9, block=2, warmup=1, threads=2)
    p.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated labels")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--activation-gamma", action="store_true",
                   help="keep gamma on the activations (sigprop's default layout) instead of "
                   "folding it into the convs as timm does")
    return p.parse_args(argv)


def import_timm():
    """timm, or None where it is not installed (sigprop never depends on it)."""
    try:
        import timm
        from timm.utils.agc import adaptive_clip_grad
    except ImportError:
        return None
    return timm, adaptive_clip_grad


@dataclass
class StepSettings:
    batch: int = 16
    px: int = 64
    device: str = "cpu"
    amp_dtype: torch.dtype | None = None  # None: float32
    channels_last: bool = False
    compile: bool = False
    clip: bool = True  # AGC at AGC_LAMBDA


def sigprop_model(name: str, overrides: dict) -> tuple[nn.Module, Callable[[], object]]:
    """The model and its AGC call (sigprop's, classifier weight left out)."""
    model = sigprop.create_model(name, **overrides)
    params = agc_parameters(model)
    return model, lambda: adaptive_clip_grad_(params, AGC_LAMBDA)


def timm_model(name: str, overrides: dict) -> tuple[nn.Module, Callable[[], object]]:
    """timm's model and timm's own AGC (head excluded as timm's train script does)."""
    timm, adaptive_clip_grad = import_timm()
    model = timm.create_model(name, num_classes=1000, drop_path_rate=0.0, drop_rate=0.0,
                              **overrides)
    head = model.get_classifier()
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    params = [p for p in model.parameters() if id(p) not in skip]
    return model, lambda: adaptive_clip_grad(params, AGC_LAMBDA)


def training_step(
    model: nn.Module, clip: Callable[[], object], settings: StepSettings, seed: int = 0
) -> Callable[[], None]:
    """One step closure: forward (autocast when asked), cross-entropy, backward, clip, Nesterov
    SGD; on a fixed random batch, on ``settings.device``."""
    device = torch.device(settings.device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(settings.batch, 3, settings.px, settings.px, generator=gen).to(device)
    y = torch.randint(0, 1000, (settings.batch,), generator=gen).to(device)
    model = model.to(device).train()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if settings.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    amp = settings.amp_dtype is not None

    def step() -> None:
        with torch.autocast(device.type, dtype=settings.amp_dtype or torch.float32,
                            enabled=amp):
            logits = forward(x)
        F.cross_entropy(logits.float(), y).backward()
        if settings.clip:
            clip()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def block_timer(step: Callable[[], None], block: int, device: str) -> Callable[[], float]:
    """Seconds per step over a block of ``block`` steps (synchronizing CUDA at both ends)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(block):
            step()
        sync()
        return (time.perf_counter() - start) / block

    return run


def spread(values: list[float]) -> tuple[float, float, float, float, float]:
    """min, first quartile, median, third quartile, max."""
    if len(values) < 2:
        v = values[0]
        return v, v, v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return min(values), q1, q2, q3, max(values)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if import_timm() is None:
        print("bench_timm: timm is not importable here; run it with the timm venv "
              "(see the module docstring)")
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = StepSettings(batch=args.batch, px=args.px)
    layout = "on the activations" if args.activation_gamma else "folded into the convs"
    print(f"batch {args.batch}, {args.px}px, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.block} steps, AGC {AGC_LAMBDA}, Nesterov SGD, "
          f"sigprop's gamma {layout}")
    print("| pair | sigprop ms/step | timm ms/step | sigprop / timm, median [IQR] (min-max) "
          "| 95% interval of the median |")
    print("|---|---|---|---|---|")
    ratios = {}
    for label in args.pairs.split(","):
        ours_name, ours_kw, theirs_name, theirs_kw = PAIRS[label]
        if not args.activation_gamma and not ours_name.startswith("bn_"):
            ours_kw = {**ours_kw, "fold_gamma": True}
        torch.manual_seed(args.seed)
        ours = training_step(*sigprop_model(ours_name, ours_kw), settings, args.seed)
        theirs = training_step(*timm_model(theirs_name, theirs_kw), settings, args.seed)
        times = interleaved_rounds(
            {"sigprop": block_timer(ours, args.block, "cpu"),
             "timm": block_timer(theirs, args.block, "cpu")},
            args.rounds, args.warmup, args.seed,
        )
        paired = [a / b for a, b in zip(times["sigprop"], times["timm"])]
        lo, q1, med, q3, hi = spread(paired)
        ci_lo, ci_hi = median_ci(paired) if len(paired) > 1 else (med, med)
        ratios[label] = med
        print(f"| {ours_name} vs {theirs_name} | {statistics.median(times['sigprop']) * 1e3:.1f} "
              f"| {statistics.median(times['timm']) * 1e3:.1f} | {med:.3f} [{q1:.3f}, {q3:.3f}] "
              f"({lo:.3f}-{hi:.3f}) | [{ci_lo:.3f}, {ci_hi:.3f}] |", flush=True)
    return ratios


if __name__ == "__main__":
    main()

"""Training-step time of a small NF-ResNet vs the same-shaped BN-ResNet, through the trainer.

Each variant is a real :mod:`sigprop.train` run (batch drawn and augmented on the device,
forward, backward, clipping, weight decay, SGD step, statistics); the step is
``_Run.train_step`` plus moving its statistics to the host. Variants take turns in blocks of
``--block`` steps, in a shuffled order every round, so load from other processes hits them
alike; each one's time is the median over rounds of its per-step time within a block.

    .venv/bin/python -m benchmarks.bench_train_step [--rounds 9] [--block 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.timing import interleaved_rounds, timing_parser
from sigprop.train import TrainConfig, _Run

VARIANTS = {
    "nf_resnet26 + AGC 0.01": ("nf_resnet26", {"mode": "agc", "threshold": 0.01}),
    "nf_resnet26, no clip": ("nf_resnet26", {"mode": "none"}),
    "bn_resnet26_v2, no clip": ("bn_resnet26_v2", {"mode": "none"}),
}
BASELINE = "bn_resnet26_v2, no clip"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = timing_parser(__doc__, rounds=9, block=5, warmup=1, threads=0)
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--px", type=int, default=32)
    return p.parse_args(argv)


def make_run(model: str, clip: dict, args: argparse.Namespace) -> _Run:
    steps = (args.warmup + args.rounds) * args.block
    config = TrainConfig.from_dict({
        "model": {"name": model, "stem": "cifar", "width_mult": args.width_mult},
        "clip": clip, "batch_size": args.batch, "image_size": args.px, "steps": steps,
        "train_size": 4 * args.batch, "test_size": 16, "device": "cpu", "seed": args.seed,
    })
    return _Run(config, probe=None, progress=None)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {name: make_run(model, clip, args) for name, (model, clip) in VARIANTS.items()}

    def run_block(run: _Run) -> float:
        start = time.perf_counter()
        for _ in range(args.block):
            run.train_step()
            run.flush()
        return (time.perf_counter() - start) / args.block

    times = interleaved_rounds(
        {name: lambda run=run: run_block(run) for name, run in runs.items()},
        args.rounds, args.warmup, args.seed,
    )

    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"width_mult {args.width_mult}, batch {args.batch}, {args.px}px, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.block} steps")
    print(f"{'variant':<26} {'params':>8} {'median ms/step':>15} {'x BN':>6}")
    for name, run in runs.items():
        n = sum(p.numel() for p in run.model.parameters())
        print(f"{name:<26} {n / 1e6:>7.2f}M {medians[name] * 1e3:>15.1f} "
              f"{medians[name] / medians[BASELINE]:>6.2f}")
    return {name: medians[name] / medians[BASELINE] for name in runs}


if __name__ == "__main__":
    main()

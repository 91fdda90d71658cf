"""Step-time cost of live tracking (ablations.tracking): a training run with and without the
live TensorBoard writer.

Each variant is a whole :func:`sigprop.train.train` run of the same small config (probe every
10 steps, as the shipped grids record), fed the tracker exactly as the worker feeds it; the
variants take turns in an order shuffled every round. The step time is the training loop's
time per step, from the progress callback at the first and the last step (model and data
set-up left out), in wall time and in the CPU time of this process (which counts the
writer's background thread too). A variant's ratio is the median over rounds of its step time
divided by the untracked run's of the same round.

Variants: ``off`` (no live sink), ``live`` (the default: rows every
:data:`~ablations.tracking.LIVE_INTERVAL_S` seconds) and ``live, no interval`` (interval 0:
updates as often as the cost cap lets them, :data:`~ablations.tracking.MAX_SHARE_INV`; an
upper bound). "the sink's own time" is the time the training thread spends in the sink's
calls, as a share of the step.

    .venv/bin/python -m benchmarks.bench_tracking [--rounds 8] [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ablations.tracking as tracking
from benchmarks.timing import interleaved_rounds, median_ci, timing_parser
from sigprop.train import TrainConfig, train

VARIANTS = ("off", "live", "live, no interval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = timing_parser(__doc__, rounds=8, warmup=1, threads=1,
                      warmup_help="untimed trainings per variant")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": "synthetic", "train_size": 512, "test_size": 64, "steps": args.steps,
        "batch_size": args.batch, "eval_every": 20, "checkpoint_every": 0, "probe_every": 10,
        "device": args.device, "seed": 0,
        "model": {"name": "nf_resnet26", "stem": "cifar", "width_mult": args.width_mult},
    })


class TimedTrackers(tracking.Trackers):
    """The worker's sink, timing in the training thread (perf_counter) its ``due()`` calls and
    every update, from ``due()`` saying yes (the trainer then gathers the rows) to the end of
    ``write``."""

    spent = 0.0

    def due(self) -> bool:
        start = time.perf_counter()
        yes = super().due()
        TimedTrackers.spent += time.perf_counter() - start
        self.asked_at = start
        return yes

    def write(self, update) -> None:
        try:
            super().write(update)
        finally:
            TimedTrackers.spent += time.perf_counter() - self.asked_at


def one_run(cfg: TrainConfig, folder: Path | None, interval: float) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the training loop."""
    marks: dict[str, tuple[float, float]] = {}

    def progress(step: int, total: int, loss: float | None) -> None:
        if step == 1 or step == total:
            if torch.cuda.is_available() and cfg.device != "cpu":
                torch.cuda.synchronize()
            marks[str(step == 1)] = (time.perf_counter(), time.process_time())

    live = None
    if folder is not None:
        tracking.LIVE_INTERVAL_S = interval
        live = TimedTrackers([tracking.LiveTensorBoard(
            folder, "bench", {"base_lr": 0.1}, {"base_lr": 0.1, "lr": 0.0125}, time.time())])
    train(cfg, progress=progress, live=live)
    if live is not None:
        live.finish("completed", {"final_acc": 0.1})
        assert not live.problems, live.problems
    (w0, c0), (w1, c1) = marks["True"], marks["False"]
    return (w1 - w0) / (cfg.steps - 1), (c1 - c0) / (cfg.steps - 1), TimedTrackers.spent


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args)
    default_interval = tracking.LIVE_INTERVAL_S
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))
        variants = {
            "off": lambda: one_run(cfg, None, default_interval),
            "live": lambda: one_run(cfg, Path(tmp) / f"live-{next(counter)}", default_interval),
            "live, no interval": lambda: one_run(cfg, Path(tmp) / f"every-{next(counter)}", 0.0),
        }
        def own(name: str):
            def run() -> tuple[float, float, float]:
                TimedTrackers.spent = 0.0
                return variants[name]()
            return run

        results = interleaved_rounds({n: own(n) for n in variants}, args.rounds, args.warmup,
                                     args.seed)
        written = sum(1 for _ in Path(tmp).rglob("events.out.tfevents.*"))
    tracking.LIVE_INTERVAL_S = default_interval
    print(f"live tracking: {args.rounds} rounds of {args.steps}-step runs, nf_resnet26 "
          f"x{args.width_mult} batch {args.batch}, {args.threads} thread(s), {args.device}; "
          f"{written} event files written")
    base_wall = [w for w, _, _ in results["off"]]
    base_cpu = [c for _, c, _ in results["off"]]
    out = {}
    for name in VARIANTS:
        wall = [w for w, _, _ in results[name]]
        cpu = [c for _, c, _ in results[name]]
        # the sink's own time in the training thread, per step, as a share of the step
        own_share = statistics.median(s / (args.steps - 1) / w for w, _, s in results[name])
        line = (f"  {name:16s} step {statistics.median(wall) * 1e3:7.2f} ms wall, "
                f"{statistics.median(cpu) * 1e3:7.2f} ms CPU")
        if name != "off":
            ratios = [a / b for a, b in zip(wall, base_wall)]
            cpu_ratios = [a / b for a, b in zip(cpu, base_cpu)]
            lo, hi = median_ci(cpu_ratios)
            out[name] = statistics.median(cpu_ratios)
            line += (f"; vs off: x{statistics.median(ratios):.3f} wall, "
                     f"x{out[name]:.3f} CPU (95% CI {lo:.3f}-{hi:.3f}); the sink's own "
                     f"time {own_share:.2%} of a step")
        print(line)
    return out


if __name__ == "__main__":
    main()

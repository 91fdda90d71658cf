"""Grid throughput with 1 and 2 local workers, the runner's overhead per run, and Ray's.

    python -m benchmarks.bench_runner [--runs 8] [--steps 30] [--no-ray]

Overhead per run = (grid wall time with 1 worker - sum of train() times for the same configs
called directly in this process) / runs: process start, store writes, checkpoint, status.
Ray: the same grid through a local Ray instance with 2 CPUs (1 CPU per run) against the local
executor with 2 workers; the Ray start-up is timed separately.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import torch

from ablations.executors import LocalExecutor
from ablations.runner import run_grid
from ablations.spec import expand, spec_from_dict
from sigprop.train import TrainConfig, train


def tiny_spec(runs: int, steps: int, name: str):
    return spec_from_dict({
        "name": name,
        "base": {
            "data": "synthetic", "train_size": 512, "test_size": 128, "steps": steps,
            "batch_size": 32, "eval_every": 0,
            "model": {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.125,
                      "depths": [1, 1, 1, 1]},
            "clip": {"mode": "agc", "threshold": 0.04},
        },
        "grid": {"seed": list(range(runs))},
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    args = parser.parse_args()

    spec = tiny_spec(args.runs, args.steps, "bench")
    torch.set_num_threads(2)
    direct = 0.0
    for run in expand(spec):
        start = time.perf_counter()
        train(TrainConfig.from_dict({**run.config, "device": "cpu"}))
        direct += time.perf_counter() - start

    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run_grid(spec, out, LocalExecutor(workers, "cpu"), stream=io.StringIO())
            wall = time.perf_counter() - start
        rows.append((workers, wall))

    print(f"{args.runs} runs x {args.steps} steps (nf_resnet26 tiny, synthetic, CPU)")
    print(f"direct train() calls, 2 threads: {direct:.1f}s")
    print("| workers | wall s | runs/hour | speed-up vs 1 worker |")
    print("|---|---|---|---|")
    for workers, wall in rows:
        print(f"| {workers} | {wall:.1f} | {3600 * args.runs / wall:.0f} | "
              f"{rows[0][1] / wall:.2f}x |")
    overhead = (rows[0][1] - direct) / args.runs
    print(f"runner overhead per run (1 worker vs direct): {overhead:.2f}s "
          f"({overhead / (direct / args.runs):.0%} of a {direct / args.runs:.1f}s run)")
    if not args.no_ray:
        ray_vs_local(spec, args.runs, rows[1][1])


def ray_vs_local(spec, runs: int, local_wall: float) -> None:
    try:
        import ray
    except ImportError:
        print("ray not installed: skipped the Ray executor")
        return
    from ablations.executors import RayExecutor

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    started = time.perf_counter() - start
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run_grid(spec, out, RayExecutor(cpus_per_run=1), stream=io.StringIO())
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    print(f"Ray executor (local instance, 2 CPUs, 1 CPU per run): {wall:.1f}s "
          f"({3600 * runs / wall:.0f} runs/hour); Ray start-up {started:.1f}s not included")
    print(f"Ray overhead per run vs local executor with 2 workers: "
          f"{(wall - local_wall) / runs:+.2f}s ({wall / local_wall:.2f}x the local wall time)")


if __name__ == "__main__":
    main()

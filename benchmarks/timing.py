"""The benchmarks' timing loop: interleaved rounds, so machine noise hits every variant alike."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

THREADS_HELP = "torch threads (0: torch's default)"


def timing_parser(doc: str, *, rounds: int, warmup: int, threads: int, block: int | None = None,
                  warmup_help: str = "untimed blocks per variant",
                  block_help: str = "steps per timed block",
                  threads_help: str = THREADS_HELP) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first line of its docstring ``doc``, with the
    options of :func:`interleaved_rounds`: ``--rounds``, ``--warmup``, ``--block`` (steps per
    call of a variant, for the benchmarks that time blocks of steps), ``--threads`` and
    ``--seed`` (the order of the rounds; the benchmark's own init seed where it has one)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=rounds)
    if block is not None:
        p.add_argument("--block", type=int, default=block, help=block_help)
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--seed", type=int, default=0)
    return p


def interleaved_rounds(
    variants: dict[str, Callable[[], T]], rounds: int, warmup: int, seed: int
) -> dict[str, list[T]]:
    """Call each variant ``warmup`` times untimed, then once per round in a freshly shuffled
    order; returns every variant's results, one per round (a timing, or what it measures)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    results: dict[str, list[T]] = {name: [] for name in variants}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            results[name].append(variants[name]())
    return results


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as a variant that returns its own wall time in seconds."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def median_ci(values: list[float], level: float = 0.95, resamples: int = 4000,
              seed: int = 0) -> tuple[float, float]:
    """A bootstrap confidence interval of the median (percentile method): how far the
    median of paired ratios could move on another run of the same length."""
    import statistics

    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]

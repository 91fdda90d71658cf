"""Command-line start-up: ``run --help`` against what every ``--help`` loaded before it parsed
its arguments (torch and pandas), and the bare interpreter as the floor.

Variants, each a fresh interpreter (subprocess): ``python`` (``-c pass``), ``run --help``
(``run_ablations.py run --help``), ``import torch, pandas``. Interleaved rounds, medians.

    .venv/bin/python -m benchmarks.bench_cli [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.timing import interleaved_rounds, timed

ROOT = Path(__file__).resolve().parents[1]


def command(*args: str):
    return lambda: subprocess.run([sys.executable, *args], cwd=ROOT, check=True,
                                  stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    variants = {
        "python -c pass": command("-c", "pass"),
        "run --help": command("run_ablations.py", "run", "--help"),
        "import torch, pandas": command("-c", "import torch, pandas"),
    }
    times = interleaved_rounds({k: timed(v) for k, v in variants.items()}, args.rounds,
                               warmup=1, seed=0)
    medians = {name: statistics.median(values) for name, values in times.items()}
    heavy = medians["import torch, pandas"]
    for name, median in medians.items():
        print(f"{name:<22} {median * 1000:7.0f} ms  ({median / heavy:.2f} x import torch, "
              f"pandas)")
    return medians


if __name__ == "__main__":
    main()

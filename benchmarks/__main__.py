"""Run every benchmark in turn: ``python -m benchmarks`` (the Makefile's ``make bench``)."""

import importlib
import pkgutil
import sys
from pathlib import Path

for module in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])):
    if module.startswith("bench_"):
        print(f"\n## {module}", flush=True)
        sys.argv = [module]
        importlib.import_module(f"benchmarks.{module}").main()

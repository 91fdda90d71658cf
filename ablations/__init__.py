"""Ablation grids: TOML specs, a crash-safe results store, executors and the runner."""

from ablations.executors import LocalExecutor
from ablations.spec import GridSpec, Run, SpecError, expand, load_spec
from ablations.store import GridStore, Results, load_results

__all__ = [
    "GridSpec", "GridStore", "LocalExecutor", "Results", "Run", "SpecError", "expand",
    "load_results", "load_spec",
]

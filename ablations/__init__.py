"""Ablation grids: TOML specs, a crash-safe results store, executors and the runner."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GridSpec": "ablations.spec", "Run": "ablations.spec", "SpecError": "ablations.errors",
    "expand": "ablations.spec", "load_spec": "ablations.spec",
    "GridStore": "ablations.store", "Results": "ablations.store",
    "load_results": "ablations.store",
    "Executor": "ablations.executors", "LocalExecutor": "ablations.executors",
    "RayExecutor": "ablations.executors",
    "run_grid": "ablations.runner", "run_frontier": "ablations.frontier",
    "FrontierSettings": "ablations.frontier",
    "evaluate_claims": "ablations.claims",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # imported on first use, so the command line's light paths (--help) skip torch and pandas
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ablations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

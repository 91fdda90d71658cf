"""Ablation grids: TOML specs, a crash-safe results store, executors and the runner."""

from __future__ import annotations

from sigprop.lazy import lazy_getattr

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
# imported on first use, so the command line's light paths (--help) skip torch and pandas
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""Picking a claim's runs out of the ``runs`` frame: key values matched with float tolerance,
``@min`` / ``@max`` resolved over the grid, frontier cells in the shape of runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ablations.constants import FINISHED, SEARCHED

EXTREMES = ("@min", "@max")


def is_number(value: Any, *, finite: bool = True) -> bool:
    """Whether ``value`` is a number (bools are not). ``finite``: inf and NaN are not either,
    as where a number is drawn or printed as a measurement; a run key's value (a clipping
    threshold of inf, say) is a number whatever it is, so selections pass ``finite=False``."""
    if not isinstance(value, int | float | np.integer | np.floating) \
            or isinstance(value, bool | np.bool_):
        return False
    return not finite or math.isfinite(value)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list | np.ndarray):
        a = tuple(a)
    if is_number(a, finite=False) and is_number(b, finite=False):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def select(frame: pd.DataFrame, selection: Mapping[str, list]) -> pd.DataFrame:
    """Rows of ``frame`` matching ``selection``; ``@min``/``@max`` resolve over all of
    ``frame`` (the grid's runs, whatever their state)."""
    mask = pd.Series(True, index=frame.index)
    for key, values in selection.items():
        if key not in frame:
            return frame.iloc[0:0]
        wanted = [resolve_extreme(frame, key, v) for v in values]
        mask &= frame[key].map(lambda v, w=wanted: any(same(v, x) for x in w))
    return frame[mask]


def resolve_extreme(grid: pd.DataFrame, key: str, value: Any) -> Any:
    if value not in EXTREMES:
        return value
    present = ([v for v in grid[key].dropna().unique() if is_number(v, finite=False)]
               if key in grid else [])
    if not present:
        return None
    return min(present) if value == "@min" else max(present)


def finished(runs: pd.DataFrame, selection: Mapping[str, list]) -> tuple[pd.DataFrame, int]:
    """The finished runs of ``selection`` and how many runs it selects in all."""
    chosen = select(runs, selection)
    done = chosen[chosen["status"].isin(FINISHED)] if "status" in chosen else chosen
    return done, len(chosen)


def cells_as_runs(frontier: pd.DataFrame) -> pd.DataFrame:
    """Frontier cells in the shape of runs: a searched cell is a finished "run"; its search
    status stays in ``frontier_status``."""
    cells = frontier.copy()
    cells["frontier_status"] = cells["status"]
    cells["status"] = np.where(cells["status"].isin(SEARCHED), "completed", "queued")
    return cells

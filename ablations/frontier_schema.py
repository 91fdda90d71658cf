"""The ``[frontier]`` section of a spec: :class:`FrontierSettings` and its parsing.

Its public home is :mod:`ablations.frontier`, which imports both names from here. They are
defined in this leaf module, not there, because the spec checks its ``[frontier]`` section
when it is loaded (a bad field fails ``load_spec`` and ``--set frontier.*``, before anything
runs), and ``ablations.frontier`` sits above ``ablations.spec`` (it expands specs and runs
grids): defining the schema there would make the spec import upwards.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ablations.errors import SpecError
from sigprop.errors import did_you_mean

# The stability criterion's metric: a per-step column of metrics.parquet (the training loss).
CRITERION_METRICS = ("loss",)


@dataclass(frozen=True)
class FrontierSettings:
    """``[frontier]``: where and how finely ``run_ablations.py frontier`` looks for the largest
    stable learning rate of each cell (README "Stability frontier", ``ablations.frontier``).

    The probes' learning rates are the lattice ``lr_min * resolution**k`` (the last point is
    ``lr_max``). ``steps``: updates per probe run (None: the cell's own length). A probe is
    stable when it did not diverge and the mean of ``metric`` over its last ``window`` steps
    (default: a tenth of the steps, 1 to 10) is below ``max_ratio`` times its first value, the
    loss at initialisation (step 0, before any update). Not a mean over the first steps: at a
    rate near the edge the loss spikes during warmup (12 at step 2 on digits), and a window
    mean over the spike once let a run that ended at chance pass as stable. The default 0.8
    asks that the loss fell by a fifth: a run stalled at chance keeps its initial loss (ratio
    about 1), while a short run at a small but healthy rate may not yet have halved it
    (digits, 40 steps: ratios 0.4 to 0.7), and a stricter ratio would call small rates
    unstable, against the search's assumption that stability only fails above an edge.

    ``warm_start``: a cell whose seed sibling or neighbour along a numeric axis has been
    searched starts from that edge (``ablations.frontier``); False: every cell bisects cold.
    ``check_monotone``: after the edge is found, one probe two lattice steps above it; a stable
    one marks the cell ``non_monotone``. False saves that probe.

    ``method``: "bisect" (the search above) or "range-test": one run per cell whose lr rises
    geometrically from ``lr_min`` to ``lr_max`` over ``steps`` updates, the edge read off where
    its smoothed loss blows up (``ablations.frontier.range_test_edge``; the stability
    criterion, ``warm_start`` and ``check_monotone`` are the search's and unused by it).
    """

    lr_min: float
    lr_max: float
    resolution: float = 2 ** 0.25
    steps: int | None = None
    metric: str = "loss"
    max_ratio: float = 0.8
    window: int | None = None
    warm_start: bool = True
    check_monotone: bool = True
    method: str = "bisect"


# How `frontier` finds each cell's edge: FrontierSettings.method
FRONTIER_METHODS = ("bisect", "range-test")
FRONTIER_KEYS = {f.name for f in dataclasses.fields(FrontierSettings)}


def parse_frontier(raw: Any, grid: str) -> FrontierSettings:
    """Grid ``grid``'s ``[frontier]`` section, checked: a :class:`SpecError` names the bad
    field (``ablations.frontier.frontier_settings`` reads it from a spec)."""
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"spec {grid} has no [frontier] section (lr_min, lr_max, ...); "
                        f"`frontier` needs one")
    unknown = sorted(set(raw) - FRONTIER_KEYS)
    if unknown:
        raise SpecError(f"frontier: unknown key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(sorted(FRONTIER_KEYS))}")

    def number(name: str, default: Any = None, integer: bool = False) -> Any:
        value = raw.get(name, default)
        if value is None:
            return None
        kind = int if integer else int | float
        if isinstance(value, bool) or not isinstance(value, kind) \
                or not math.isfinite(value) or value <= 0:
            what = "a positive integer" if integer else "a positive number"
            raise SpecError(f"frontier.{name} must be {what}, got {value!r}")
        return value

    for name in ("lr_min", "lr_max"):
        if name not in raw:
            raise SpecError(f"frontier.{name} is required (the learning rates searched lie "
                            f"between lr_min and lr_max)")
    lr_min, lr_max = float(number("lr_min")), float(number("lr_max"))
    if lr_min >= lr_max:
        raise SpecError(f"frontier: lr_min ({lr_min:g}) must be below lr_max ({lr_max:g})")
    resolution = number("resolution", 2 ** 0.25)
    if resolution <= 1:
        raise SpecError(f"frontier.resolution must be a ratio above 1 (e.g. 1.19 = 2**0.25), "
                        f"got {resolution!r}")
    steps, window = number("steps", integer=True), number("window", integer=True)
    metric = raw.get("metric", "loss")
    if metric not in CRITERION_METRICS:
        raise SpecError(f"frontier.metric: unknown metric {metric!r} for the stability "
                        f"criterion; known: {', '.join(CRITERION_METRICS)}")
    max_ratio = number("max_ratio", 0.8)
    if max_ratio > 1:
        raise SpecError(f"frontier.max_ratio is the final loss over the initial one that still "
                        f"counts as training, at most 1; got {max_ratio!r}")
    flags = {}
    for name in ("warm_start", "check_monotone"):
        flags[name] = raw.get(name, True)
        if not isinstance(flags[name], bool):
            raise SpecError(f"frontier.{name} must be true or false, got {flags[name]!r}")
    method = raw.get("method", "bisect")
    if method not in FRONTIER_METHODS:
        raise SpecError(f"frontier.method must be one of {', '.join(FRONTIER_METHODS)}, got "
                        f"{method!r}{did_you_mean(method, FRONTIER_METHODS)}")
    return FrontierSettings(lr_min, lr_max, float(resolution), steps, metric,
                            float(max_ratio), window, **flags, method=method)

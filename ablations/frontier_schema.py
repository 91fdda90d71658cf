"""The ``[frontier]`` section of a spec: :class:`FrontierSettings` and its parsing.

Its public home is :mod:`ablations.frontier`, which imports both names from here. They are
defined in this leaf module, not there, because the spec checks its ``[frontier]`` section
when it is loaded (a bad field fails ``load_spec`` and ``--set frontier.*``, before anything
runs), and ``ablations.frontier`` sits above ``ablations.spec`` (it expands specs and runs
grids): defining the schema there would make the spec import upwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ablations.errors import SpecError
from sigprop.fields import (
    REQUIRED,
    Rule,
    at_most,
    check_keys,
    checked,
    one_of,
    positive,
    required_fields,
    validate,
)

# The stability criterion's metric: a per-step column of metrics.parquet (the training loss).
CRITERION_METRICS = ("loss",)
# How `frontier` finds each cell's edge: FrontierSettings.method
FRONTIER_METHODS = ("bisect", "range-test")
POSITIVE_NUMBER = positive("a positive number")
POSITIVE_INTEGER = positive("a positive integer")
METRIC_TEMPLATE = ("{name}: unknown metric {value!r} for the stability criterion; "
                   "known: {choices}")
MAX_RATIO_TEMPLATE = ("{name} is the final loss over the initial one that still counts as "
                      "training, at most 1; got {value!r}")


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

    lr_min: float = checked(REQUIRED, POSITIVE_NUMBER, says="a positive number")
    lr_max: float = checked(REQUIRED, POSITIVE_NUMBER, says="a positive number")
    resolution: float = checked(2 ** 0.25, Rule(lambda v: v > 1,
                                                "a ratio above 1 (e.g. 1.19 = 2**0.25)"))
    steps: int | None = checked(None, POSITIVE_INTEGER, says="a positive integer")
    metric: str = checked("loss", one_of(CRITERION_METRICS, template=METRIC_TEMPLATE))
    max_ratio: float = checked(0.8, POSITIVE_NUMBER, at_most(1, template=MAX_RATIO_TEMPLATE),
                               says="a positive number")
    window: int | None = checked(None, POSITIVE_INTEGER, says="a positive integer")
    warm_start: bool = checked(True, says="true or false")
    check_monotone: bool = checked(True, says="true or false")
    method: str = checked("bisect", one_of(FRONTIER_METHODS))

    def __post_init__(self) -> None:
        validate(self, prefix="frontier.", error=SpecError)

    def check_together(self) -> str | None:
        if self.lr_min >= self.lr_max:
            return f"frontier: lr_min ({self.lr_min:g}) must be below lr_max ({self.lr_max:g})"
        return None


FRONTIER_KEYS = {f.name for f in dataclasses.fields(FrontierSettings)}


def parse_frontier(raw: Any, grid: str) -> FrontierSettings:
    """Grid ``grid``'s ``[frontier]`` section, checked: a :class:`SpecError` names the bad
    field (``ablations.frontier.frontier_settings`` reads it from a spec)."""
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"spec {grid} has no [frontier] section (lr_min, lr_max, ...); "
                        f"`frontier` needs one")
    check_keys(raw, sorted(FRONTIER_KEYS), where="frontier: ", error=SpecError,
               valid_label="allowed")
    for name in required_fields(FrontierSettings):
        if name not in raw:
            raise SpecError(f"frontier.{name} is required (the learning rates searched lie "
                            f"between lr_min and lr_max)")
    return FrontierSettings(**raw)

"""The frontier's search, with no store: the lattice of probe learning rates and the searches
over its indices, cold (:class:`BisectSearch`) or from a guessed edge (:class:`WarmSearch`,
planned by :func:`warm_plan`). :mod:`ablations.frontier` runs them over a grid's store.

A cell's learning rates lie on the lattice ``lr_min * resolution**k`` up to ``lr_max``
(:func:`lattice`), so a rerun probes the same rates and finds them stored.

Search, per cell, sequential: bisection on log-lr over the lattice, assuming stability is
monotone in the learning rate. The first probe is the geometric middle of [lr_min, lr_max],
the next ones halve the bracket (in log-lr) until the last stable and the first unstable rate
are neighbours on the lattice (a ratio of ``resolution``). lr_min and lr_max themselves are
probed only when the edge lies next to them: a cell unstable at lr_min ends with no stable
rate (status ``unstable_at_lr_min``), one stable at lr_max ends "stable up to lr_max"
(``stable_to_lr_max``).

Warm starts (``[frontier] warm_start``, default true): cells that differ only in seed, and
cells that differ in one numeric axis (batch size, threshold), start from what is known instead
of the lattice's middle (:class:`WarmSearch`): at the median of their neighbours' guesses. A
seed sibling's guess is its edge (seeds differ by noise); a neighbour along another numeric
axis guesses its edge moved by the median shift that already searched pairs of cells show
between the same two values of that axis (an additive model in log-lr). A neighbour with no
such pair yet is no guess, and a cell with no guess bisects cold: a neighbour's edge alone can
lie far off (12 lattice steps across global norm's 8x thresholds), and galloping there costs
more than bisecting. The search probes the start, then one lattice step above it (below, when
the start is unstable), and widens (offsets 1, 2, 3, 5, 9, ...) only when that does not bracket
the edge; once bracketed it bisects as before. Which cells a start reads is fixed before
anything runs (:func:`warm_plan`, from the cells' order), and a cell starts only when those
have finished, so the probes a search makes never depend on timing: a rerun or a resume after
kill -9 walks the same probes and finds them stored. At most as many cells search at once as
the executor has slots, in the grid's order, so the starting points exist early. ``warm_start =
false``: every cell bisects cold, all at once (the search before warm starts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ablations.frontier_schema import FrontierSettings
from ablations.keys import flatten
from ablations.spec import Run

# The learning-rate axes a cell drops (every probe sets its own lr)
LR_KEYS = ("lr", "base_lr")


def lattice(settings: FrontierSettings) -> list[float]:
    """The probe learning rates: ``lr_min * resolution**k`` below ``lr_max``, then ``lr_max``;
    rounded to 6 significant digits so stored configs read well and ids are stable."""
    span = math.log(settings.lr_max / settings.lr_min) / math.log(settings.resolution)
    count = math.ceil(span - 1e-9)
    points = [float(f"{settings.lr_min * settings.resolution ** k:.6g}") for k in range(count)]
    return [p for p in points if p < settings.lr_max * (1 - 1e-9)] + [settings.lr_max]


class BisectSearch:
    """Bisection over lattice indices 0..n-1: ``lo`` is the highest index known stable (-1:
    none), ``hi`` the lowest known unstable (n: none); done when they are neighbours."""

    def __init__(self, n: int):
        self.n, self.lo, self.hi = n, -1, n

    def next_index(self) -> int | None:
        return None if self.hi - self.lo <= 1 else (self.lo + self.hi) // 2

    def record(self, index: int, stable: bool) -> None:
        if stable:
            self.lo = max(self.lo, index)
        else:
            self.hi = min(self.hi, index)


class WarmSearch(BisectSearch):
    """A search from a guessed edge index: the guess, then one step above it while stable (or
    below while unstable); if that does not bracket the edge, it widens by single steps up to
    offset 3 and then by doubling steps (offsets 1, 2, 3, 5, 9, ... from the guess) until it
    does, then bisects the bracket. Why 3: on ``frontier_batch``'s measured edges over a quarter
    of the warm starts missed by 2 or 3 lattice steps, which single steps bracket in 4 probes
    and doubling after offset 2 in 5 (3.42 probes per cell against 3.56 on the issue-25
    edges, 3.50 against 3.72 on issue 15's; tests/test_frontier_warm.py; measured with the start
    at the rounded prediction, before :func:`start_index`).
    Bounds as in :class:`BisectSearch`: lr_min and lr_max are probed only when the widening
    reaches them."""

    def __init__(self, n: int, guess: int):
        super().__init__(n)
        self.guess = min(max(guess, 0), n - 1)
        self.widened = 0  # probes past the guess, in the one direction

    def step(self) -> int:
        return 1 if self.widened < 3 else 2 ** (self.widened - 2)

    def next_index(self) -> int | None:
        if self.hi - self.lo <= 1:
            return None
        if self.lo < 0 and self.hi == self.n:
            return self.guess
        if self.hi == self.n:
            return min(self.n - 1, self.lo + self.step())
        if self.lo < 0:
            return max(0, self.hi - self.step())
        return (self.lo + self.hi) // 2

    def record(self, index: int, stable: bool) -> None:
        up, down = self.hi == self.n and self.lo >= 0, self.lo < 0 and self.hi < self.n
        super().record(index, stable)
        if (stable and up) or (not stable and down):
            self.widened += 1


def start_index(predicted: float, check_monotone: bool, n: int) -> int:
    """The lattice index a warm search starts at, for a predicted edge index ``predicted``
    (fractional: a median of guesses). :class:`WarmSearch` ends in 2 probes when the edge is
    at its start or one below it (start, then one step above or below), so the start sits
    half a step above the prediction: ``round(predicted + 0.5)``. With the monotonicity check
    the probe two steps above the edge is part of the cost, and it is free when the search
    probed it on the way down: 3 probes for an edge at the start or one or two below, so the
    start sits a step above: ``round(predicted + 1)``. Halves round up. On frontier_batch's
    oracles (tests/test_frontier_warm.py; issue-15 edges, issue-25 edges seed by seed,
    smooth) this took 3.19, 3.33 and 2.67 probes per cell without the check (3.50, 3.42 and
    2.83 with the start at the rounded prediction), and 3.97, 4.06 and 3.61 with it (4.39,
    4.25, 3.78).
    Clamped to the lattice's indices 0..n-1."""
    return min(max(math.floor(predicted + (1.5 if check_monotone else 1.0)), 0), n - 1)


@dataclass
class WarmPlan:
    """What a cell's warm start reads: ``neighbours`` (cell, key, pairs), each a cell that
    differs in one numeric key (a seed sibling, a batch size, a threshold) with the pairs of
    cells that show the shift between the same two values of ``key`` (none for seed);
    ``deps`` all of them."""

    neighbours: list[tuple[int, str, list[tuple[int, int]]]] = field(default_factory=list)
    deps: set[int] = field(default_factory=set)


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warm_plan(cells: list[Run]) -> list[WarmPlan]:
    """Each cell's warm start, from the cells before it in the grid's order only (so the
    plan is the same on every invocation and its dependencies cannot cycle)."""
    configs = [{k: v for k, v in flatten(cell.config, hashable=True).items() if k not in LR_KEYS}
               for cell in cells]
    keys = sorted({k for cell in cells for k in cell.axes if k not in LR_KEYS})

    def without(i: int, key: str) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in configs[i].items() if k != key))

    buckets: dict[tuple, list[int]] = {}  # (key, config without key) -> cells, in order
    by_value: dict[str, dict[tuple, dict[str, list[int]]]] = {k: {} for k in keys}
    for i in range(len(cells)):
        for key in keys:
            rest = without(i, key)
            buckets.setdefault((key, rest), []).append(i)
            by_value[key].setdefault(rest, {}).setdefault(repr(configs[i].get(key)), []).append(i)
    plans = []
    for i in range(len(cells)):
        plan = WarmPlan()
        earlier = {key: [j for j in buckets[(key, without(i, key))] if j < i
                         and configs[j].get(key) != configs[i].get(key)] for key in keys}
        for key in keys:
            if not numeric(configs[i].get(key)):
                continue
            for j in earlier[key]:
                if not numeric(configs[j].get(key)):
                    continue
                if key == "seed":  # a sibling is a start as it is: seeds differ by noise
                    plan.neighbours.append((j, key, []))
                    plan.deps.add(j)
                    continue
                # pairs (q1, q2) before i, one-key neighbours along key, q1 at j's value
                # and q2 at i's: their edges' shift is the guess's correction; without one
                # the neighbour is no start (FrontierSearch.guess)
                va, vb = repr(configs[j].get(key)), repr(configs[i].get(key))
                pairs = [(q1, q2) for values in by_value[key].values()
                         for q1 in values.get(va, ()) if q1 < i
                         for q2 in values.get(vb, ()) if q2 < i]
                if pairs:
                    plan.neighbours.append((j, key, pairs))
                    plan.deps |= {j} | {q for pair in pairs for q in pair}
        plans.append(plan)
    return plans

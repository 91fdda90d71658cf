"""Stability frontier: the largest stable learning rate of every cell of a grid, by search.

A cell is one combination of the grid's axes (model, clipping mode and threshold, batch size,
seed, ...) without the learning rate: ``lr`` and ``base_lr`` axes are dropped, and with
``[frontier].steps`` set, so are ``steps`` and ``epochs`` (every probe runs that many steps).

The searched learning rate is the effective peak one: each probe is the cell's config with
``lr`` set to the probe's value, and a config with ``lr`` trains at exactly that rate (no
``base_lr * batch_size / 256`` scaling; warmup and cosine decay still shape it over the run).
Its learning rates lie on the lattice ``lr_min * resolution**k`` up to ``lr_max``
(:func:`lattice`), so a rerun probes the same rates and finds them stored.

Search, per cell, sequential: bisection on log-lr over the lattice, assuming stability is
monotone in the learning rate. The first probe is the geometric middle of [lr_min, lr_max],
the next ones halve the bracket (in log-lr) until the last stable and the first unstable rate
are neighbours on the lattice (a ratio of ``resolution``). lr_min and lr_max themselves are
probed only when the edge lies next to them: a cell unstable at lr_min ends with no stable
rate (status ``unstable_at_lr_min``), one stable at lr_max ends "stable up to lr_max"
(``stable_to_lr_max``). The cells search in parallel, one probe per cell at a time, through the
ordinary executors (local worker processes or Ray); ``on_result`` hands each cell's next
probe back to the executor as the previous one ends.

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

Monotonicity check (``check_monotone``, default true): once a cell's edge is bracketed, one
more probe two lattice steps above the largest stable rate (free when the search already
probed it). If that probe is stable, stability is not monotone in the learning rate there;
the cell keeps the edge the search found and is marked ``non_monotone``.

Stability criterion (``[frontier]`` ``metric``, ``max_ratio``, ``window``): a probe is stable
when it did not diverge (``TrainConfig.diverge_loss`` or a non-finite loss) and the mean
training loss (``loss``, per step) over its last ``window`` steps (default: a tenth of the
run, 1 to 10 steps) is below ``max_ratio`` (default 0.8: the loss fell by a fifth) times the
initial loss (step 0's, before any update). A run that neither diverged nor learned
counts as unstable; ``FrontierSettings`` says why 0.8.

Every probe is an ordinary run of the grid's store, with its own run id (its config holds its
lr): ``status``, ``report``, resume after kill -9 and reruns that read stored probes back work
as for ``run``. ``frontier.parquet`` in the grid folder holds one row per cell and method
(:data:`FRONTIER_COLUMNS`, ``ablations.store.load_results(...).frontier``); each method's
command replaces its own rows and keeps the other's.

Range test (``[frontier] method = "range-test"``, ``frontier --method range-test``): the
learning-rate range test of fastai's ``lr_find`` and Lightning's ``Tuner.lr_find`` instead of
the search. One run per cell (:func:`range_run`, an ordinary run of the store with its own id)
trains ``steps`` updates with the lr rising geometrically from ``lr_min`` at the first step to
``lr_max`` at the last (``TrainConfig.schedule = "exponential"``, no warmup, no decay); its
edge is read off the run's losses by fastai's stopping rule (:func:`range_test_edge`: the
lr of the step before the smoothed loss first exceeds 4x its running minimum, or before the
loss diverged), snapped down to the lattice so both methods' edges compare on it. It measures
instability during a ramp, not at a fixed rate: a rate is reached after a few steps at lower
ones and held for one step, so its edge says where the loss blows up while the rate rises,
not that a run at a rate below it trains stably.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Unpack

import numpy as np
import pandas as pd

from ablations.constants import FINISHED, LENGTH_KEYS, MAX_RUNS
from ablations.executors import Executor
from ablations.frontier_schema import FrontierSettings, parse_frontier
from ablations.keys import flatten
from ablations.runner import (
    HEARTBEAT_S,
    Invocation,
    Progress,
    RunOptions,
    check_data,
    describe_run,
    interruptible,
    mismatch_text,
    runs_to_execute,
)
from ablations.spec import GridSpec, Run, expand, run_id
from ablations.store import (
    FRONTIER_FILE,
    DamagedFile,
    GridStore,
    read_parquet,
    write_parquet,
)
from sigprop.errors import UserError

# A cell's status: ablations.constants.CELL_STATUSES (SEARCHED: the search ended with an answer)
# The columns every frontier.parquet row has besides the cell's flattened config (README).
FRONTIER_COLUMNS = [
    "grid", "cell_id", "model_label", "axes", "status", "reason", "max_stable_lr",
    "min_unstable_lr", "final_acc", "n_probes", "probe_lrs", "probe_stable", "lr_min", "lr_max",
    "resolution", "probe_steps", "non_monotone", "check_lr", "start_lr", "method",
]
LR_KEYS = ("lr", "base_lr")


def frontier_settings(spec: GridSpec) -> FrontierSettings:
    """The spec's ``[frontier]`` section, checked: a :class:`~ablations.errors.SpecError`
    names the bad field (the schema: :mod:`ablations.frontier_schema`)."""
    return parse_frontier(spec.frontier, spec.name)


def lattice(settings: FrontierSettings) -> list[float]:
    """The probe learning rates: ``lr_min * resolution**k`` below ``lr_max``, then ``lr_max``;
    rounded to 6 significant digits so stored configs read well and ids are stable."""
    span = math.log(settings.lr_max / settings.lr_min) / math.log(settings.resolution)
    count = math.ceil(span - 1e-9)
    points = [float(f"{settings.lr_min * settings.resolution ** k:.6g}") for k in range(count)]
    return [p for p in points if p < settings.lr_max * (1 - 1e-9)] + [settings.lr_max]


def cell_spec(spec: GridSpec, settings: FrontierSettings) -> GridSpec:
    """The spec whose runs are the cells: without the axes the probes set themselves."""
    cells = copy.deepcopy(spec)
    dropped = set(LR_KEYS) | (set(LENGTH_KEYS) if settings.steps else set())
    for key in dropped & set(cells.grid):
        cells.grid.pop(key)
        cells.when.pop(key, None)
    for group, keys in list(cells.tie.items()):
        kept = [k for k in keys if k not in dropped]
        if len(kept) < 2:
            cells.tie.pop(group)
        else:
            cells.tie[group] = kept
    return cells


def probe_run(cell: Run, lr: float, settings: FrontierSettings) -> Run:
    """The cell's config trained at peak learning rate ``lr`` (and ``steps``, when set)."""
    from sigprop.train import TrainConfig  # lazy: torch

    config = copy.deepcopy(cell.config)
    config["lr"] = lr
    if settings.steps:
        config["steps"], config["epochs"] = settings.steps, None
    canonical = TrainConfig.from_dict(config).to_dict()
    return Run(run_id(canonical), canonical, {**cell.axes, "lr": lr}, cell.label,
               cell.departures)


def probe_loss_ratio(store: GridStore, rid: str, settings: FrontierSettings) -> float:
    """A finished probe's final over initial ``metric`` (the criterion's ratio; module
    docstring); inf when it diverged or has no finite values."""
    if store.state(rid) == "diverged":
        return math.inf
    loss = pd.to_numeric(read_parquet(store.run_dir(rid) / "metrics.parquet")[settings.metric],
                         errors="coerce").dropna().to_numpy(dtype=float)
    if not len(loss) or not np.isfinite(loss).all():
        return math.inf
    window = settings.window or min(10, max(1, len(loss) // 10))
    initial, final = loss[0], loss[-window:].mean()  # FrontierSettings: why not a mean
    return float(final / initial)


def probe_stability(store: GridStore, rid: str, settings: FrontierSettings) -> bool:
    """Whether a finished probe is stable by the criterion (module docstring)."""
    return probe_loss_ratio(store, rid, settings) < settings.max_ratio


def why_unstable(store: GridStore, rid: str, settings: FrontierSettings) -> str:
    """Why a probe counts as unstable: it diverged, or it did not learn enough. The two differ
    (frontier_length: 20-step probes at batch 32 never diverged below lr 0.34, but their loss
    fell only to 0.87-0.97 of its initial value, so no rate passed)."""
    try:
        ratio = probe_loss_ratio(store, rid, settings)
    except (DamagedFile, OSError, KeyError):
        return "its probe could not be read"
    if not math.isfinite(ratio):
        return "its probe diverged"
    return (f"its probe did not diverge, but its loss fell only to {ratio:.2f} of the initial "
            f"value (stable needs < {settings.max_ratio:g}): too short a probe to learn, or "
            f"lower frontier.lr_min")


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
    edges, 3.50 against 3.72 on issue 15's; tests/test_frontier.py).
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


@dataclass
class Cell:
    run: Run  # the cell as the grid expands it (no probe lr)
    search: BisectSearch
    start: int | None = None  # the warm start's lattice index (None: cold or not started)
    started: bool = False
    check: tuple[int, bool] | None = None  # the monotonicity probe: (index, stable)
    probes: dict[int, tuple[str, bool]] = field(default_factory=dict)  # index -> (id, stable)
    pending: tuple[int, str] | None = None  # the probe out at an executor
    ran: int = 0  # probes executed by this invocation (the rest were read back)
    error: str = ""  # a failed probe ends the cell's search
    finished: bool = False


@dataclass
class FrontierOutcome:
    grid_dir: Path
    cells: int
    probes_run: int = 0  # executed by this invocation
    probes_stored: int = 0  # read back from the store
    full_grid: int = 0  # runs a grid over every lattice point would take
    counts: dict = field(default_factory=dict)  # cell status -> cells
    non_monotone: int = 0  # cells stable again two lattice steps above their edge
    interrupted: bool = False
    signal: str | None = None
    duration_s: float = 0.0
    frame: pd.DataFrame | None = None


class FrontierSearch:
    """The searches of every cell over one store; see the module docstring."""

    def __init__(self, spec: GridSpec, store: GridStore, cells: list[Run],
                 settings: FrontierSettings, retry_failed: bool, stream,
                 verbosity: int = 0, heartbeat_s: float = HEARTBEAT_S, slots: int = 1):
        self.spec, self.store, self.settings = spec, store, settings
        self.points = lattice(settings)
        self.cells = [Cell(run, BisectSearch(len(self.points))) for run in cells]
        # warm: the plan of every cell's start, and at most `slots` cells searching at once;
        # cold: every cell starts at once, as before warm starts
        self.plans = warm_plan(cells) if settings.warm_start else None
        self.slots = max(1, slots) if settings.warm_start else len(cells)
        self.queue = list(range(len(cells)))
        self.searching = 0
        self.by_probe: dict[str, list[Cell]] = {}  # probe out at the executor -> its cells
        self.retry_failed, self.stream, self.verbosity = retry_failed, stream, verbosity
        # the probes' own lines: failures always, start and end with -v, heartbeats
        self.progress = Progress(None, 0, {}, 0, stream, verbosity, heartbeat_s)
        self.done = 0
        self.executed = 0  # probes run by this invocation

    def start(self) -> list[str]:
        """The first probe to execute of every cell that can start (stored probes are read
        back first)."""
        return self.launch()

    def launch(self) -> list[str]:
        """Start queued cells whose warm start can be read, in order, while slots are free;
        the probes they need run."""
        todo = []
        while self.searching < self.slots:
            ready = next((i for i in self.queue if self.plans is None
                          or all(self.cells[j].finished for j in self.plans[i].deps)), None)
            if ready is None:
                break
            self.queue.remove(ready)
            cell = self.cells[ready]
            if self.plans is not None:
                cell.start = self.guess(self.plans[ready])
                if cell.start is not None:
                    cell.search = WarmSearch(len(self.points), cell.start)
            cell.started = True
            self.searching += 1
            if (rid := self.advance(cell)) is not None:
                todo.append(rid)
        return todo

    def edge_index(self, j: int, found_only: bool = False) -> int | None:
        """The lattice index of cell j's edge (its largest stable rate; lr_min's index when
        unstable there), None when its search gave none."""
        cell, search = self.cells[j], self.cells[j].search
        if cell.error or not cell.finished:
            return None
        if found_only and not (0 <= search.lo and search.hi == search.lo + 1 < search.n):
            return None
        return max(search.lo, 0)

    def guess(self, plan: WarmPlan) -> int | None:
        """Where a cell's warm search starts (module docstring); None: a cold bisection.
        A seed sibling with the other axes' guesses, not alone: on frontier_batch's edges the
        median of both took 3.42 probes per cell against 3.47 for the sibling's edge alone
        (tests/test_frontier.py, the issue-25 oracle)."""
        # a neighbour's edge with no measured shift is no start: along a threshold it lay 12
        # lattice steps off on frontier_batch's edges, and galloping that far costs more
        # probes than a cold bisection (tests/test_frontier.py, measured shapes)
        guesses = []
        for j, key, pairs in plan.neighbours:
            # a sibling censored at a bound is a start there; along another axis a censored
            # neighbour's bound says nothing of the edge (frontier_length: AGC's 20-step
            # cells unstable at lr_min sent the 40-step ones galloping up from it, 10 probes)
            if (edge := self.edge_index(j, found_only=key != "seed")) is None:
                continue
            shifts = [b - a for q1, q2 in pairs
                      if (a := self.edge_index(q1, True)) is not None
                      and (b := self.edge_index(q2, True)) is not None]
            if key == "seed":  # seeds differ by noise: no shift
                guesses.append(float(edge))
            elif shifts:
                guesses.append(edge + float(np.median(shifts)))
        return int(round(float(np.median(guesses)))) if guesses else None

    def check_index(self, cell: Cell) -> int | None:
        """The monotonicity probe still to run, if any: two lattice steps above the largest
        stable rate, once the edge is bracketed (reused when the search probed it)."""
        search = cell.search
        if not self.settings.check_monotone or cell.check is not None or cell.error \
                or not (0 <= search.lo and search.hi == search.lo + 1 < search.n - 1):
            return None
        index = search.lo + 2
        if index in cell.probes:
            cell.check = (index, cell.probes[index][1])
            return None
        return index

    def advance(self, cell: Cell) -> str | None:
        """Walk the cell's search through stored probes; the id of the next probe to run, or
        None when the cell's search has ended (or waits on a probe another cell runs)."""
        while (index := cell.search.next_index()) is not None \
                or (index := self.check_index(cell)) is not None:
            probe = probe_run(cell.run, self.points[index], self.settings)
            try:
                self.store.add_runs([probe])
                todo = runs_to_execute(self.store, [probe], self.retry_failed, self.stream)
            except OSError as err:
                raise UserError(f"cannot write results to {self.store.dir}: "
                                f"{err.strerror or err}") from None
            if todo:
                self.progress.labels[probe.run_id] = (f"{describe_run(cell.run)} "
                                                      f"lr {self.points[index]:.4g}")
                cell.pending = (index, probe.run_id)
                waiting = self.by_probe.setdefault(probe.run_id, [])
                waiting.append(cell)
                # two cells can share a probe (cells equal but for a key the probe ignores)
                return probe.run_id if len(waiting) == 1 else None
            if not self.settle(cell, index, probe.run_id):
                break
        self.finish(cell)
        return None

    def settle(self, cell: Cell, index: int, rid: str) -> bool:
        """Record a stored probe's outcome; False when it failed (the search stops)."""
        try:
            state = self.store.state(rid)
            if state not in FINISHED:
                status = self.store.status(rid)
                cell.error = f"probe at lr {self.points[index]:g} ({rid}) {state}: " \
                             f"{status.get('error') or 'no result'}"
                return False
            stable = probe_stability(self.store, rid, self.settings)
        except DamagedFile as err:
            cell.error = f"probe {rid}: {err.path.name} {err.reason}"
            return False
        cell.probes[index] = (rid, stable)
        if cell.search.next_index() is None:  # the search has ended: the monotonicity probe
            cell.check = (index, stable)
        else:
            cell.search.record(index, stable)
        return True

    def on_result(self, result: dict) -> list[str]:
        """Executor callback: a probe ended; returns the next probes of its cells, if any."""
        rid = result["run_id"]
        self.progress.result(result)
        if rid not in self.by_probe or result["state"] in ("interrupted", "requeued", "busy"):
            return []  # resumes (requeued: the executor runs it again itself)
        follow_ups = []
        self.executed += 1
        for cell in self.by_probe.pop(rid):
            index, _ = cell.pending
            cell.pending = None
            cell.ran += 1
            if not self.settle(cell, index, rid):
                self.finish(cell)
                continue
            follow_up = self.advance(cell)
            if follow_up:
                follow_ups.append(follow_up)
        return follow_ups + self.launch()

    def finish(self, cell: Cell) -> None:
        cell.finished = True
        self.searching -= 1
        self.done += 1
        row = self.row(cell)
        if self.verbosity >= 0 or cell.error:
            print(f"[{self.done}/{len(self.cells)} cells] {describe_run(cell.run)}: "
                  f"{cell_summary(row)}; {row['n_probes']} probes ({cell.ran} run now)",
                  file=self.stream, flush=True)

    def row(self, cell: Cell) -> dict:
        search, points = cell.search, self.points
        config = {k: v for k, v in flatten(cell.run.config, hashable=True).items()
                  if k not in LR_KEYS}
        row = {
            "grid": self.store.grid, "cell_id": cell.run.run_id, "model_label": cell.run.label,
            "axes": tuple(sorted(cell.run.axes)), **config,
            "max_stable_lr": points[search.lo] if search.lo >= 0 else math.nan,
            "min_unstable_lr": points[search.hi] if search.hi < search.n else math.nan,
            "final_acc": math.nan, "n_probes": len(cell.probes),
            "probe_lrs": [points[i] for i in sorted(cell.probes)],
            "probe_stable": [cell.probes[i][1] for i in sorted(cell.probes)],
            "lr_min": self.settings.lr_min, "lr_max": self.settings.lr_max,
            "resolution": self.settings.resolution,
            "probe_steps": self.settings.steps or config.get("steps"),
            "non_monotone": bool(cell.check and cell.check[1]),
            "check_lr": points[cell.check[0]] if cell.check else math.nan,
            "start_lr": points[cell.start] if cell.start is not None else math.nan,
            "method": "bisect",
        }
        if search.lo >= 0:
            summary = self.store.status(cell.probes[search.lo][0]).get("summary") or {}
            if summary.get("final_acc") is not None:
                row["final_acc"] = float(summary["final_acc"])
        lr_min, lr_max = self.settings.lr_min, self.settings.lr_max
        if cell.error:
            row["status"], row["reason"] = "failed", cell.error
        elif not cell.finished:
            row["status"] = "incomplete"
            row["reason"] = "search interrupted; run the same command to continue it"
        elif search.hi == 0:
            row["status"] = "unstable_at_lr_min"
            why = (why_unstable(self.store, cell.probes[0][0], self.settings)
                   if 0 in cell.probes else "lower frontier.lr_min")
            row["reason"] = (f"unstable already at lr_min {lr_min:g}: no stable rate in the "
                             f"range ({why})")
        elif search.lo == search.n - 1:
            row["status"] = "stable_to_lr_max"
            row["reason"] = (f"stable up to lr_max {lr_max:g}: the edge lies higher (raise "
                             f"frontier.lr_max)")
        else:
            row["status"] = "found"
            row["reason"] = ""
            if row["non_monotone"]:
                row["reason"] = (f"non-monotone: stable again at lr {row['check_lr']:g}, two "
                                 f"lattice steps above the edge; the edge is where the search "
                                 f"ended, not the largest stable rate")
        return row

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.row(cell) for cell in self.cells])


def cell_summary(row: dict) -> str:
    acc = f", acc {row['final_acc']:.3f}" if np.isfinite(row["final_acc"]) else ""
    if row["status"] == "found":
        flag = f"; NON-MONOTONE: stable again at {row['check_lr']:.4g}" \
            if row["non_monotone"] else ""
        return (f"max stable lr {row['max_stable_lr']:.4g} (unstable at "
                f"{row['min_unstable_lr']:.4g}){acc}{flag}")
    if row["status"] == "stable_to_lr_max":
        return f"stable up to lr_max {row['max_stable_lr']:.4g}{acc}"
    return f"{row['status'].replace('_', ' ')}: {row['reason']}"


def cells_of(spec: GridSpec, max_runs: int | None = MAX_RUNS) -> tuple[FrontierSettings,
                                                                       list[Run]]:
    """The checked settings and the cells of a spec (claims checked against the cells)."""
    settings = frontier_settings(spec)
    return settings, expand(cell_spec(spec, settings), max_runs)


def run_frontier(
    spec: GridSpec,
    out: str | Path = "runs",
    executor: Executor | None = None,
    **options: Unpack[RunOptions],
) -> FrontierOutcome:
    """Search the frontier of every cell of ``spec`` into ``out/<name>``; writes
    ``frontier.parquet`` there (also when interrupted: unfinished cells say ``incomplete``).
    ``verbosity`` -1 prints only failures, 0 a line per finished cell and a heartbeat per long
    probe (without a terminal, every ``heartbeat_s``), 1 also every probe's start and end;
    the other options: :class:`~ablations.runner.RunOptions`."""
    call = Invocation.open(spec, out, executor, **options)
    settings, cells = cells_of(spec, call.max_runs)
    if settings.method == "range-test":
        return run_range_test(call, settings, cells)
    store, executor, stream = call.store, call.executor, call.stream
    retry_failed, verbosity = call.retry_failed, call.verbosity
    check_data(cells, call.download)
    store.prepare(spec.to_toml_dict(), [])
    # probes are found as the search goes, so every stored one is checked: a reused probe
    # made under another thread count or torch may not give this machine's edge
    mismatches = call.mismatches([Run(run_id, {}, {}) for run_id in store.run_ids()])
    if mismatches:
        print(f"warning: probes: {mismatch_text(mismatches)}; reused as "
              "stored, so the edges may differ from a search here", file=stream, flush=True)
    slots = len(executor.slots()) if settings.warm_start else 1
    search = FrontierSearch(spec, store, cells, settings, retry_failed, stream, verbosity,
                            call.heartbeat_s, slots)
    outcome = FrontierOutcome(store.dir, len(cells),
                              full_grid=len(cells) * len(search.points))
    if verbosity >= 0:
        print(f"frontier {spec.name}: {len(cells)} cells, lr {settings.lr_min:g} to "
              f"{settings.lr_max:g} by x{settings.resolution:.4g} ({len(search.points)} rates; "
              f"a full grid would be {outcome.full_grid} runs) -> {store.dir}", file=stream,
              flush=True)
    started = time.monotonic()
    try:
        with interruptible(outcome):
            todo = search.start()
            if todo:
                if verbosity >= 0:
                    print(f"running probes on {executor.describe()}", file=stream, flush=True)
                executor.run(str(store.root), store.grid, todo, search.on_result,
                             search.progress.step)
    finally:
        outcome.duration_s = time.monotonic() - started
        frame = search.frame()
        write_frontier(store, frame, "bisect")
    outcome.frame = frame
    outcome.probes_run = search.executed
    outcome.probes_stored = len({rid for cell in search.cells
                                 for rid, _ in cell.probes.values()}) - search.executed
    outcome.counts = frame["status"].value_counts().to_dict()
    outcome.non_monotone = int(frame["non_monotone"].sum()) if len(frame) else 0
    return outcome


# ----------------------------------------------------------------------------- range test

# fastai's lr_find (LRFinder.after_batch: stop when ``smooth_loss > 4 * best_loss``, the loss
# smoothed by Recorder's AvgSmoothLoss, beta 0.98, debiased by 1 - beta**count) and Lightning's
# Tuner.lr_find (_LRCallback: beta 0.98, early_stop_threshold 4.0) use the same two numbers.
RAMP_BETA = 0.98
RAMP_FACTOR = 4.0
# The columns a range-test row has besides FRONTIER_COLUMNS (NaN in bisection rows).
RANGE_TEST_COLUMNS = ["ramp_edge_lr", "blowup_step", "blowup_lr"]


def smoothed_loss(loss, beta: float = RAMP_BETA) -> np.ndarray:
    """fastai's and Lightning's smoothed loss: an exponential moving average of the per-step
    losses, debiased, ``avg_k / (1 - beta**(k+1))`` with ``avg_k = beta avg_{k-1} + (1 - beta)
    loss_k`` (step 0's value is its own loss)."""
    out, avg = [], 0.0
    for k, value in enumerate(np.asarray(loss, dtype=float)):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta ** (k + 1)))
    return np.asarray(out, dtype=float)


def range_test_edge(loss, lrs, diverge_loss: float = math.inf, beta: float = RAMP_BETA,
                    factor: float = RAMP_FACTOR) -> tuple[int | None, float | None]:
    """The blow-up of a range test and its edge: ``(b, lrs[b - 1])``.

    ``loss[k]`` is the training loss of step k's forward pass, before its update (so it has
    seen the updates at ``lrs[0] .. lrs[k-1]``), ``lrs[k]`` that update's rate. The blow-up
    step ``b`` is the first step whose loss diverged (not finite, or above ``diverge_loss``:
    the run ended there) or whose smoothed loss (:func:`smoothed_loss`) exceeds ``factor``
    times its minimum over the steps before it: fastai's ``lr_find`` stopping rule, beta 0.98
    and factor 4 (:data:`RAMP_FACTOR`). The edge is ``lrs[b - 1]``: the largest rate the model
    had trained at when the blown-up loss was measured, which in fastai's and Lightning's
    pairing (a step's lr with that step's loss) is the last rate of the curve before the
    blow-up. ``(None, None)``: no blow-up over the ramp; ``(b, None)`` with b 0 or 1: the loss
    blew up at initialisation or after the first update (at ``lrs[0]``), no rate is stable.
    Only the steps up to b matter, so reading it off a run that trained past b (fastai stops
    there) gives the same edge."""
    best = math.inf
    for k, value in enumerate(smoothed_loss(loss, beta)):
        raw = float(np.asarray(loss, dtype=float)[k])
        if not math.isfinite(raw) or raw > diverge_loss or value > factor * best:
            return k, (float(lrs[k - 1]) if k >= 2 else None)
        best = min(best, value)
    return None, None


def range_run(cell: Run, settings: FrontierSettings) -> Run:
    """The cell's range-test run: ``steps`` updates (the cell's own length when unset) with the
    lr rising geometrically from ``lr_min`` to ``lr_max`` (``TrainConfig.schedule =
    "exponential"``, no warmup); an ordinary run of the grid with its own id."""
    from sigprop.train import TrainConfig  # lazy: torch

    config = copy.deepcopy(cell.config)
    config.update(lr=settings.lr_max, lr_start=settings.lr_min, schedule="exponential",
                  warmup_fraction=0.0)
    if settings.steps:
        config["steps"], config["epochs"] = settings.steps, None
    canonical = TrainConfig.from_dict(config).to_dict()
    # axes as a probe's (lr is the peak, lr_max), plus what makes the run a ramp
    return Run(run_id(canonical), canonical,
               {**cell.axes, "lr": settings.lr_max, "schedule": "exponential"}, cell.label,
               cell.departures)


def snap_down(points: list[float], lr: float) -> int:
    """The index of the largest lattice point at or below ``lr`` (0 below the lattice)."""
    below = [i for i, p in enumerate(points) if p <= lr * (1 + 1e-9)]
    return below[-1] if below else 0


def range_test_row(store: GridStore, cell: Run, run: Run, settings: FrontierSettings,
                   points: list[float]) -> dict:
    """The frontier row of one cell from its range-test ``run`` (FRONTIER_COLUMNS plus
    RANGE_TEST_COLUMNS). ``max_stable_lr`` is the edge (:func:`range_test_edge`) snapped down
    to the lattice, ``min_unstable_lr`` the lattice point above it, so both methods' rows
    compare on the same lattice; ``ramp_edge_lr`` is the edge as the ramp gave it, before
    snapping; ``final_acc`` is NaN (no run trained at the edge's rate)."""
    config = {k: v for k, v in flatten(cell.config, hashable=True).items() if k not in LR_KEYS}
    row = {
        "grid": store.grid, "cell_id": cell.run_id, "model_label": cell.label,
        "axes": tuple(sorted(cell.axes)), **config, "method": "range-test",
        "max_stable_lr": math.nan, "min_unstable_lr": math.nan, "final_acc": math.nan,
        "n_probes": 1, "probe_lrs": [], "probe_stable": [], "lr_min": settings.lr_min,
        "lr_max": settings.lr_max, "resolution": settings.resolution,
        "probe_steps": settings.steps or config.get("steps"), "non_monotone": False,
        "check_lr": math.nan, "start_lr": math.nan, "ramp_edge_lr": math.nan,
        "blowup_step": math.nan, "blowup_lr": math.nan, "status": "found", "reason": "",
    }
    rid = run.run_id
    try:
        state = store.state(rid)
        if state not in FINISHED:
            if state != "failed":
                return {**row, "status": "incomplete", "reason": f"range-test run {rid} "
                        f"{state}; run the same command to continue it"}
            status = store.status(rid)
            return {**row, "status": "failed", "reason": f"range-test run {rid} failed: "
                    f"{status.get('error') or 'no result'}"}
        metrics = read_parquet(store.run_dir(rid) / "metrics.parquet")
        # the training steps only: the worker merges the evaluations in on their step, and
        # the last one (step == total steps, after the last update) has no lr and no loss
        metrics = metrics[pd.to_numeric(metrics["lr"], errors="coerce").notna()]
        loss = pd.to_numeric(metrics["loss"], errors="coerce").to_numpy(dtype=float)
        lrs = pd.to_numeric(metrics["lr"], errors="coerce").to_numpy(dtype=float)
        diverge = float(run.config.get("diverge_loss", math.inf))
    except DamagedFile as err:
        return {**row, "status": "failed", "reason": f"run {rid}: {err.path.name} {err.reason}"}
    except (KeyError, TypeError, ValueError) as err:
        return {**row, "status": "failed", "reason": f"run {rid}: unreadable metrics ({err})"}
    blowup, edge = range_test_edge(loss, lrs, diverge)
    if blowup is None:
        if state == "diverged" or len(loss) == 0:
            return {**row, "status": "failed", "reason": f"run {rid}: no loss to read"}
        return {**row, "status": "stable_to_lr_max", "max_stable_lr": settings.lr_max,
                "ramp_edge_lr": float(lrs[-1]),
                "reason": f"no blow-up on the ramp up to lr_max {settings.lr_max:g}: the edge "
                          f"lies higher (raise frontier.lr_max)"}
    row.update(blowup_step=blowup, blowup_lr=float(lrs[blowup]))
    if edge is None:
        return {**row, "status": "unstable_at_lr_min", "min_unstable_lr": settings.lr_min,
                "reason": f"the loss blew up after the first update, at lr_min "
                          f"{settings.lr_min:g}: no stable rate in the range (lower "
                          f"frontier.lr_min)"}
    index = snap_down(points, edge)
    return {**row, "ramp_edge_lr": edge, "max_stable_lr": points[index],
            "min_unstable_lr": points[index + 1] if index + 1 < len(points) else math.nan}


def write_frontier(store: GridStore, frame: pd.DataFrame, method: str) -> None:
    """``frontier.parquet`` with ``frame`` as the rows of ``method``: the rows another method
    wrote there stay (a file from before the ``method`` column holds bisection rows). A file
    that cannot be read is replaced: its rows come back by rerunning, from the stored runs."""
    path = store.dir / FRONTIER_FILE
    kept = None
    if path.is_file():
        try:
            old = read_parquet(path)
        except DamagedFile:
            old = None
        if old is not None and "cell_id" in old:
            methods = old["method"] if "method" in old else pd.Series("bisect", index=old.index)
            kept = old[methods.fillna("bisect").ne(method)]
            kept = kept.assign(method=methods[kept.index].fillna("bisect"))
    frame = frame.assign(method=method) if len(frame) else frame
    if kept is not None and len(kept):
        frame = pd.concat([kept, frame], ignore_index=True) if len(frame) else kept
    try:
        write_parquet(path, frame.reset_index(drop=True))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def run_range_test(call: Invocation, settings: FrontierSettings,
                   cells: list[Run]) -> FrontierOutcome:
    """The frontier by the learning-rate range test (``[frontier] method = "range-test"``):
    one run per cell (:func:`range_run`), all through the executor at once, each cell's edge
    read off its run (:func:`range_test_edge`, :func:`range_test_row`). The runs are ordinary
    runs of the grid's store, so a rerun, or a resume after kill -9, reads the finished ones
    back and runs only the rest. A range test measures where the loss blows up while the rate
    rises, so its edge is instability during a ramp, not at a fixed rate: the model reaches
    each rate after a few steps at lower ones instead of a warmup to it and a whole run
    there. ``call``: :func:`run_frontier`'s arguments, ``settings`` and ``cells`` the
    spec's (:func:`cells_of`); the outcome as :func:`run_frontier`'s (``probes_*`` count
    runs)."""
    spec, store, executor, stream = call.spec, call.store, call.executor, call.stream
    retry_failed, verbosity = call.retry_failed, call.verbosity
    check_data(cells, call.download)
    runs = [range_run(cell, settings) for cell in cells]
    unique = list({run.run_id: run for run in runs}.values())
    store.prepare(spec.to_toml_dict(), unique)
    mismatches = call.mismatches(unique)
    if mismatches:
        print(f"warning: range-test runs: {mismatch_text(mismatches)}; reused "
              "as stored, so the edges may differ from a run here", file=stream, flush=True)
    points = lattice(settings)
    outcome = FrontierOutcome(store.dir, len(cells), full_grid=len(cells) * len(points))
    if verbosity >= 0:
        print(f"frontier {spec.name} by range test: {len(cells)} cells, one run each with lr "
              f"rising from {settings.lr_min:g} to {settings.lr_max:g} -> {store.dir}",
              file=stream, flush=True)
    progress = Progress(None, 0, {run.run_id: f"{describe_run(cell)} range test"
                                  for cell, run in zip(cells, runs)}, 0, stream, verbosity,
                        call.heartbeat_s)
    executed = set()

    def on_result(result: dict) -> list[str]:
        progress.result(result)
        if result["state"] not in ("interrupted", "requeued", "busy"):
            executed.add(result["run_id"])
        return []

    started = time.monotonic()
    frame = pd.DataFrame()
    try:
        try:
            todo = runs_to_execute(store, unique, retry_failed, stream)
        except OSError as err:
            raise UserError(f"cannot write results to {store.dir}: "
                            f"{err.strerror or err}") from None
        with interruptible(outcome):
            if todo:
                if verbosity >= 0:
                    print(f"running {len(todo)} range-test runs on {executor.describe()}",
                          file=stream, flush=True)
                executor.run(str(store.root), store.grid, todo, on_result, progress.step)
    finally:
        outcome.duration_s = time.monotonic() - started
        rows = [range_test_row(store, cell, run, settings, points)
                for cell, run in zip(cells, runs)]
        frame = pd.DataFrame(rows)
        write_frontier(store, frame, "range-test")
    for i, row in enumerate(rows):
        if verbosity >= 0 or row["status"] == "failed":
            edge = (f"edge lr {row['max_stable_lr']:.4g} (ramp {row['ramp_edge_lr']:.4g}, blow-up "
                    f"at step {int(row['blowup_step'])})" if row["status"] == "found"
                    else f"{row['status'].replace('_', ' ')}: {row['reason']}")
            print(f"[{i + 1}/{len(cells)} cells] {describe_run(cells[i])}: {edge}",
                  file=stream, flush=True)
    outcome.frame = frame
    outcome.probes_run = len(executed)
    outcome.probes_stored = len(unique) - len(executed)
    outcome.counts = frame["status"].value_counts().to_dict() if len(frame) else {}
    return outcome

"""Stability frontier: the largest stable learning rate of every cell of a grid, by search.

A cell is one combination of the grid's axes (model, clipping mode and threshold, batch size,
seed, ...) without the learning rate: ``lr`` and ``base_lr`` axes are dropped, and with
``[frontier].steps`` set, so are ``steps`` and ``epochs`` (every probe runs that many steps).
The cells, the outcome and ``frontier.parquet``, which both methods share:
:mod:`ablations.frontier_cells`.

The searched learning rate is the effective peak one: each probe is the cell's config with
``lr`` set to the probe's value, and a config with ``lr`` trains at exactly that rate (no
``base_lr * batch_size / 256`` scaling; warmup and cosine decay still shape it over the run).
Its learning rates lie on the lattice ``lr_min * resolution**k`` up to ``lr_max``
(:func:`~ablations.frontier_search.lattice`), so a rerun probes the same rates and finds
them stored.

Search, per cell: bisection on log-lr over the lattice, or, with warm starts (``[frontier]
warm_start``, default true), from the edges of the cell's neighbours; the search itself, with
no store, and its warm starts are :mod:`ablations.frontier_search`, whose docstring describes
them. Here it runs over the grid's store (:class:`FrontierSearch`): the cells search in
parallel, one probe per cell at a time, through the ordinary executors (local worker processes
or Ray); ``on_result`` hands each cell's next probe back to the executor as the previous one
ends.

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

Range test (``[frontier] method = "range-test"``, ``frontier --method range-test``): one run
per cell with the lr rising over it, instead of the search: :mod:`ablations.range_test`.
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

from ablations.constants import FINISHED
from ablations.executors import Executor
from ablations.frontier_cells import (
    FRONTIER_COLUMNS,
    FrontierOutcome,
    cell_spec,
    cells_of,
    frontier_settings,
    write_frontier,
)
from ablations.frontier_schema import FrontierSettings
from ablations.frontier_search import (
    LR_KEYS,
    BisectSearch,
    WarmPlan,
    WarmSearch,
    lattice,
    numeric,
    start_index,
    warm_plan,
)
from ablations.keys import flatten
from ablations.progress import HEARTBEAT_S, Progress, describe_run
from ablations.range_test import (
    RAMP_BETA,
    RAMP_FACTOR,
    RANGE_TEST_COLUMNS,
    range_run,
    range_test_edge,
    range_test_row,
    run_range_test,
    smoothed_loss,
    snap_down,
)
from ablations.runner import (
    Invocation,
    RunOptions,
    check_data,
    interruptible,
    mismatch_text,
    runs_to_execute,
)
from ablations.spec import GridSpec, Run, run_id
from ablations.store import DamagedFile, GridStore, read_parquet
from sigprop.errors import UserError

# Its public names: its own, and the ones of the modules it was split into (they import from
# here as before: ablations.frontier.lattice, .range_test_edge, .FRONTIER_COLUMNS, ...)
__all__ = [
    "FRONTIER_COLUMNS", "LR_KEYS", "RAMP_BETA", "RAMP_FACTOR", "RANGE_TEST_COLUMNS",
    "BisectSearch", "Cell", "FrontierOutcome", "FrontierSearch", "FrontierSettings", "WarmPlan",
    "WarmSearch", "cell_spec", "cell_summary", "cells_of", "frontier_settings", "lattice",
    "numeric", "probe_losses", "probe_run", "probe_stability", "range_run",
    "range_test_edge", "range_test_row", "run_frontier", "run_range_test", "smoothed_loss",
    "snap_down", "stable_by", "warm_plan", "why_unstable", "write_frontier",
]


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


def probe_losses(store: GridStore, rid: str,
                 settings: FrontierSettings) -> tuple[float, float] | None:
    """A finished probe's initial and final ``metric`` (the criterion's two numbers; module
    docstring); None when it diverged or has no finite values."""
    if store.state(rid) == "diverged":
        return None
    loss = pd.to_numeric(read_parquet(store.run_dir(rid) / "metrics.parquet")[settings.metric],
                         errors="coerce").dropna().to_numpy(dtype=float)
    if not len(loss) or not np.isfinite(loss).all():
        return None
    window = settings.window or min(10, max(1, len(loss) // 10))
    return float(loss[0]), float(loss[-window:].mean())  # FrontierSettings: why not a mean


def stable_by(losses: tuple[float, float] | None, settings: FrontierSettings) -> bool:
    """The criterion on a probe's :func:`probe_losses`: not diverged, and the final value below
    ``max_ratio`` times the initial one."""
    return losses is not None and bool(losses[1] < settings.max_ratio * losses[0])


def probe_stability(store: GridStore, rid: str, settings: FrontierSettings) -> bool:
    """Whether a finished probe is stable by the criterion (module docstring)."""
    return stable_by(probe_losses(store, rid, settings), settings)


def why_unstable(losses: tuple[float, float] | None, settings: FrontierSettings) -> str:
    """Why a probe with these :func:`probe_losses` counts as unstable: it diverged, or it did
    not learn enough. The two differ (frontier_length: 20-step probes at batch 32 never
    diverged below lr 0.34, but their loss fell only to 0.87-0.97 of its initial value, so no
    rate passed)."""
    if losses is None:
        return "its probe diverged"
    initial, final = losses
    return (f"its probe did not diverge, but its loss fell only to {final / initial:.2f} of the "
            f"initial value (stable needs < {settings.max_ratio:g}): too short a probe to "
            f"learn, or lower frontier.lr_min")


@dataclass
class Cell:
    run: Run  # the cell as the grid expands it (no probe lr)
    search: BisectSearch
    start: int | None = None  # the warm start's lattice index (None: cold or not started)
    started: bool = False
    check: tuple[int, bool] | None = None  # the monotonicity probe: (index, stable)
    probes: dict[int, tuple[str, bool]] = field(default_factory=dict)  # index -> (id, stable)
    losses: dict[int, tuple[float, float] | None] = field(default_factory=dict)  # probe_losses
    pending: tuple[int, str] | None = None  # the probe out at an executor
    ran: int = 0  # probes executed by this invocation (the rest were read back)
    error: str = ""  # a failed probe ends the cell's search
    finished: bool = False



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
        """Where a cell's warm search starts (:mod:`ablations.frontier_search`); None: a cold
        bisection. A seed sibling with the other axes' guesses, not alone: on frontier_batch's
        edges the median of both took 3.42 probes per cell against 3.47 for the sibling's edge
        alone (tests/test_frontier_warm.py, the issue-25 oracle, both measured with the start at the
        rounded median, before :func:`start_index`)."""
        # a neighbour's edge with no measured shift is no start: along a threshold it lay 12
        # lattice steps off on frontier_batch's edges, and galloping that far costs more
        # probes than a cold bisection (tests/test_frontier_warm.py, measured shapes)
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
        if not guesses:
            return None
        return start_index(float(np.median(guesses)), self.settings.check_monotone,
                           len(self.points))

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
            losses = probe_losses(self.store, rid, self.settings)
        except DamagedFile as err:
            cell.error = f"probe {rid}: {err.path.name} {err.reason}"
            return False
        stable = stable_by(losses, self.settings)
        cell.probes[index] = (rid, stable)
        cell.losses[index] = losses
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
            why = (why_unstable(cell.losses[0], self.settings) if 0 in cell.losses
                   else "lower frontier.lr_min")
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

"""The frontier by the learning-rate range test (``[frontier] method = "range-test"``,
``frontier --method range-test``): the range test of fastai's ``lr_find`` and Lightning's
``Tuner.lr_find`` instead of the search (:mod:`ablations.frontier`). One run per cell
(:func:`range_run`, an ordinary run of the store with its own id) trains ``steps`` updates
with the lr rising geometrically from ``lr_min`` at the first step to ``lr_max`` at the last
(``TrainConfig.schedule = "exponential"``, no warmup, no decay); its edge is read off the run's
losses by fastai's stopping rule (:func:`range_test_edge`: the lr of the step before the
smoothed loss first exceeds 4x its running minimum, or before the loss diverged), snapped down
to the lattice so both methods' edges compare on it. It measures instability during a ramp,
not at a fixed rate: a rate is reached after a few steps at lower ones and held for one step,
so its edge says where the loss blows up while the rate rises, not that a run at a rate below
it trains stably.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pandas as pd

from ablations.constants import FINISHED
from ablations.frontier_cells import FrontierOutcome, write_frontier
from ablations.frontier_schema import FrontierSettings
from ablations.frontier_search import LR_KEYS, lattice
from ablations.keys import flatten
from ablations.progress import Progress, describe_run
from ablations.runner import (
    Invocation,
    check_data,
    interruptible,
    mismatch_text,
    runs_to_execute,
)
from ablations.spec import Run, run_id
from ablations.store import DamagedFile, GridStore, read_parquet
from sigprop.errors import UserError

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



def run_range_test(call: Invocation, settings: FrontierSettings,
                   cells: list[Run]) -> FrontierOutcome:
    """The frontier by the learning-rate range test (``[frontier] method = "range-test"``):
    one run per cell (:func:`range_run`), all through the executor at once, each cell's edge
    read off its run (:func:`range_test_edge`, :func:`range_test_row`). The runs are ordinary
    runs of the grid's store, so a rerun, or a resume after kill -9, reads the finished ones
    back and runs only the rest. A range test measures where the loss blows up while the rate
    rises, so its edge is instability during a ramp, not at a fixed rate: the model reaches
    each rate after a few steps at lower ones instead of a warmup to it and a whole run
    there. ``call``: :func:`~ablations.frontier.run_frontier`'s arguments, ``settings``
    and ``cells`` the spec's (:func:`~ablations.frontier_cells.cells_of`); the outcome as
    :func:`~ablations.frontier.run_frontier`'s (``probes_*`` count
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

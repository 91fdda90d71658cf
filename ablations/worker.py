"""Execute one stored run: claim it, train (resuming from its checkpoint), store the result.

This is the function every executor ships to its workers, so local processes and Ray tasks
write identical run directories.

Paper A (the variance growth it measures): Brock, De and Smith, "Characterizing signal
propagation to close the performance gap in unnormalized ResNets", ICLR 2021, arXiv 2101.08692.
Paper B: Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021, arXiv 2102.06171.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from ablations.store import (
    FINISHED,
    NUMERIC_ENVIRONMENT,
    PROGRESS_FILE,
    DamagedFile,
    GridStore,
    environment,
    environment_differences,
    set_aside,
    write_json,
)
from ablations.tracking import Trackers, open_trackers
from sigprop.diagnosis import diagnose
from sigprop.errors import UserError

PROGRESS_INTERVAL_S = 0.5  # progress events to the runner's console
PROGRESS_RECORD_S = 5.0  # the run folder's progress.json (read by `status`)
# Torch threads per run. A CPU run's numbers depend on it (a reduction split over more threads
# adds in another order), so it is fixed rather than cores // workers: the same spec gives the
# same numbers whatever --workers and the machine. Recorded in every run's environment.
DEFAULT_THREADS = 1
# cuBLAS is deterministic only with a fixed workspace (read when its handle is created)
CUBLAS_WORKSPACE = ":4096:8"

# What every executor hands a run's outcome to (ablations.executors, module docstring): the
# result dict ``execute_run`` returns, and each progress event it sends (slot, run id, step,
# total, loss). Here, with the function that produces them, so both executors share them.
ResultCallback = Callable[[dict], "list[str] | None"]
StepCallback = Callable[[int, str, int, int, "float | None"], None]
BUSY_RETRY_S = 1.0  # a "busy" result (another runner holds the run): submit it again then


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when present, else "cpu" (the trainer's rule)."""
    from sigprop.train import resolve_device as train_device  # lazy: torch

    return str(train_device(device))


def check_threads(threads: Any) -> int:
    """``threads`` as a thread count (an int >= 1); UserError otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be an integer >= 1, got {threads!r}")
    return threads


@contextlib.contextmanager
def run_settings(threads: int, deterministic: bool) -> Iterator[None]:
    """Torch's thread count and deterministic flags for one run, restored afterwards (a pool
    worker runs several runs, a test runs them in its own process)."""
    import torch  # lazy: torch

    if deterministic:  # before the first cuBLAS handle of this process; harmless on CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    cudnn = torch.backends.cudnn
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    cudnn.deterministic = deterministic
    if deterministic:
        cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def execute_run(
    root: str,
    grid: str,
    run_id: str,
    device: str = "cpu",
    threads: int | None = None,
    events: Any = None,
    slot: int = 0,
    deterministic: bool = False,
) -> dict:
    """Run ``run_id`` of ``grid`` under ``root``; returns {"run_id", "state", ...}.

    ``threads``: torch threads for the run (None: :data:`DEFAULT_THREADS`); ``deterministic``:
    PyTorch's deterministic algorithms (and cuDNN's, with cuBLAS's fixed workspace) on CUDA.
    Both are recorded in the run's environment.
    state is completed / diverged / failed, "busy" when another process holds the run, or
    "interrupted" after Ctrl-C (the run is queued again and resumes from its checkpoint).
    """
    threads = check_threads(DEFAULT_THREADS if threads is None else threads)
    store = GridStore(root, grid)
    lock = store.lock(run_id)
    if not lock.acquire():
        return {"run_id": run_id, "state": "busy"}
    try:
        with run_settings(threads, bool(deterministic)):
            return _execute_locked(store, run_id, resolve_device(device), events, slot)
    finally:
        lock.release()


def _execute_locked(store: GridStore, run_id: str, device: str, events: Any, slot: int) -> dict:
    try:
        status = store.status(run_id)
    except DamagedFile as err:  # kept aside; the run starts over as queued
        set_aside(err.path)
        status = {"state": "queued", "attempts": 0}
    if status.get("state") in FINISHED:  # finished by another process meanwhile
        return {"run_id": run_id, "state": status["state"], "summary": status.get("summary", {}),
                "elsewhere": True}
    record = store.config(run_id)
    remove_stale_temporaries(store.run_dir(run_id))
    try:
        return _train_and_store(store, run_id, status, record, device, events, slot)
    except StoreWriteError as err:
        # the console must not claim what the store does not say: a run whose status stays
        # "running" shows as interrupted in `status` and resumes from its checkpoint
        return {**err.result, "store_error": err.reason}


class StoreWriteError(Exception):
    """A status or result write failed (full disk...): ``result`` is what could not be stored."""

    def __init__(self, result: dict, reason: str):
        super().__init__(reason)
        self.result, self.reason = result, reason


def _record(store: GridStore, run_id: str, result: dict, write, *args: Any, **fields: Any) -> dict:
    try:
        write(run_id, *args, **fields)
    except OSError as err:
        raise StoreWriteError(result, err.strerror or str(err)) from None
    return result


def _train_and_store(store: GridStore, run_id: str, status: dict, record: dict, device: str,
                     events: Any, slot: int) -> dict:
    from sigprop.train import TrainConfig, train  # lazy: torch

    started, clock = time.time(), time.monotonic()  # wall clock for stamps, monotonic for spans
    checkpoint = store.run_dir(run_id) / "checkpoint.pt"
    env = environment(device)
    _record(
        store, run_id, {"run_id": run_id, "state": "interrupted"}, store.update_status,
        state="running", started_at=started, attempts=status.get("attempts", 0) + 1,
        pid=os.getpid(), device=device, environment=env, error=None, traceback=None,
        earlier_environment=earlier_environment(status, env, checkpoint.is_file()),
    )
    progress_path = store.run_dir(run_id) / PROGRESS_FILE
    last_post, last_record, last_loss = [0.0], [-float("inf")], [None]

    def progress(step: int, total: int, loss: float | None = None) -> None:
        nonlocal events
        if loss is not None:  # the trainer passes a loss when it has read one back
            last_loss[0] = float(loss)
        now = time.monotonic()
        if now - last_record[0] >= PROGRESS_RECORD_S or step == total:
            last_record[0] = now
            try:  # atomic and small; every few seconds it costs nothing next to a step
                write_json(progress_path, {"step": step, "total": total, "loss": last_loss[0],
                                           "at": time.time()})
            except OSError:
                pass  # progress is advisory: a full disk shows up in the status write
        if events is not None and (now - last_post[0] > PROGRESS_INTERVAL_S or step == total):
            last_post[0] = now
            if not post(events, ("step", slot, run_id, step, total, last_loss[0])):
                events = None

    tracking: Trackers | None = None
    try:  # from here on an interrupt stores the run as queued again
        post(events, ("step", slot, run_id, 0, 0, None))  # total 0: the run has started
        # live curves (ablations.tracking): never fail the run, their problems go to the status
        tracking = open_trackers(store.dir, run_id, record, started)
        config = TrainConfig.from_dict({**record["config"], "device": device})
        try:
            result = train(config, progress=progress, checkpoint_path=checkpoint, resume=True,
                           live=tracking)
        except Exception:
            why = checkpoint_damage(checkpoint)
            if why is None:
                raise
            kept = set_aside(checkpoint)
            note = (f"checkpoint {checkpoint} was damaged ({why}); kept as {kept.name}, "
                    f"restarted from step 0")
            store.update_status(run_id, restarted=note, earlier_environment=None)
            tracking = restart_trackers(tracking, store.dir, run_id, record, started)
            result = train(config, progress=progress, checkpoint_path=checkpoint, resume=True,
                           live=tracking)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the status write finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _record(store, run_id, {"run_id": run_id, "state": "interrupted"},
                       store.update_status, state="queued", interrupted_at=time.time(),
                       **finish_trackers(tracking, "interrupted", None))
    except Exception as err:  # a failing run is a result of the grid, not its end
        line = (f"{type(err).__name__}: {err}".strip().splitlines() or ["error"])[0]
        return _record(
            store, run_id, {"run_id": run_id, "state": "failed", "error": line},
            store.update_status, state="failed", error=line, traceback=traceback.format_exc(),
            finished_at=time.time(), duration_s=time.monotonic() - clock,
            **finish_trackers(tracking, "failed", None),
        )

    duration = time.monotonic() - clock
    metrics = step_metrics(result)
    summary = summarize(result, metrics, duration)
    blocks = result.blocks if isinstance(result.blocks, pd.DataFrame) else pd.DataFrame()
    flight = flight_frame(result)
    return _record(
        store, run_id, {"run_id": run_id, "state": result.status, "summary": summary},
        store.write_results, metrics, blocks, flight=flight, state=result.status,
        finished_at=time.time(),
        duration_s=duration, summary=summary, warnings=list(getattr(result, "warnings", [])),
        **finish_trackers(tracking, result.status, summary),
    )


def restart_trackers(tracking: Trackers | None, grid_dir, run_id: str, record: dict,
                     started: float) -> Trackers | None:
    """Fresh trackers for a run restarted from step 0 (the first attempt's curves go)."""
    if tracking is None:
        return None
    problems = finish_trackers(tracking, "interrupted", None).get("tracking_warnings", [])
    fresh = open_trackers(grid_dir, run_id, record, started)
    if fresh is not None:
        fresh.problems = problems + fresh.problems
    return fresh


def finish_trackers(tracking: Trackers | None, state: str, summary: dict | None) -> dict:
    """Close the run's trackers; the status fields that say what failed (none if nothing)."""
    if tracking is None:
        return {}
    tracking.finish(state, summary)
    return {"tracking_warnings": tracking.problems} if tracking.problems else {}


def earlier_environment(status: dict, env: dict, resuming: bool) -> dict | None:
    """What changes the numbers in the environment of the attempt a resumed run's checkpoint
    comes from, when it differs from ``env`` (the run's numbers then mix the two); kept from
    an earlier resume; None otherwise."""
    if status.get("earlier_environment") is not None:
        return status["earlier_environment"]
    if not resuming or not status.get("attempts"):
        return None
    previous = status.get("environment")
    previous = previous if isinstance(previous, dict) else {}
    if not environment_differences(previous, {k: env.get(k) for k in NUMERIC_ENVIRONMENT}):
        return None
    return {key: previous.get(key) for key in NUMERIC_ENVIRONMENT}


def post(events: Any, event: tuple) -> bool:
    """Put a progress event on the runner's queue; False once the queue is gone."""
    if events is None:
        return False
    try:
        events.put(event)
    except Exception:  # noqa: BLE001 - a lost progress queue must not fail the run
        return False
    return True


def remove_stale_temporaries(run_dir) -> None:
    """Temporary files of atomic writes cut short by a kill (``.checkpoint.pt.*.tmp``...).

    Only called under the run's lock: nobody else can be writing them."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def checkpoint_damage(path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None (absent or loadable)."""
    import torch  # lazy: torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any load error means an unusable file
        return (f"{type(err).__name__}: {err}".splitlines() or ["unreadable"])[0]
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a training state"
    return None


def step_metrics(result: Any) -> pd.DataFrame:
    """Per-step metrics with the evaluation columns on the rows of their steps.

    An evaluation's step counts the steps done before it, so the final one is a row of its own.
    """
    metrics = result.metrics.copy()
    evals = getattr(result, "evals", None)
    if isinstance(evals, pd.DataFrame) and len(evals):
        keep = [c for c in evals.columns if c == "step" or c not in metrics.columns]
        metrics = metrics.merge(evals[keep], on="step", how="outer").sort_values("step")
    return metrics.reset_index(drop=True)


def flight_frame(result: Any) -> pd.DataFrame | None:
    """A diverged run's flight record (stored as flight.parquet), None for any other run or
    one without a record."""
    flight = getattr(result, "flight", None)
    if result.status != "diverged" or not isinstance(flight, pd.DataFrame) or flight.empty:
        return None
    return flight


def summarize(result: Any, metrics: pd.DataFrame, duration: float) -> dict:
    def col_stat(column: str, how: str) -> float | None:
        if column not in metrics or metrics[column].dropna().empty:
            return None
        return float(getattr(metrics[column].dropna(), how)())

    return {
        "final_acc": _float(result.final_acc),
        "best_acc": _float(result.best_acc),
        "diverged_step": result.diverged_step,
        "max_grad_norm": col_stat("grad_norm", "max"),
        "clip_fraction": col_stat("clip_fraction", "mean"),
        "steps_done": int(result.steps_done),
        "duration_s": duration,
        "gain_clip_ratio": (getattr(result, "gain_check", None) or {}).get("median_ratio"),
        "var_growth": variance_growth(getattr(result, "blocks", None)),
        "var_growth_rel": variance_growth(getattr(result, "blocks", None), relative=True),
        "test_images": getattr(result, "test_images", None),
        **diagnose(flight_frame(result), result.diverged_step if result.status == "diverged"
                   else None),
    }


def variance_growth(blocks: pd.DataFrame | None, relative: bool = False) -> float | None:
    """Mean increase of the block output variance from one block to the next within a stage,
    at the first recorded step: paper A's alpha^2 per block (facts section 1). None without
    probe records or without two blocks in a stage. ``relative``: divided by the stem output's
    variance at that step, the scale the law assumes to be 1 (Var(x0) = 1, paper B appendix
    C): on smooth images scaled WS removes most of the input's variance at the stem (digits:
    about 0.23), and every block carries that factor."""
    if not isinstance(blocks, pd.DataFrame) or blocks.empty or "stat" not in blocks:
        return None
    variances = blocks[blocks["stat"] == "var"]
    rows = variances[variances["stage"] >= 0]
    if rows.empty:
        return None
    scale = 1.0
    if relative:
        stem = variances[(variances["block"] == "stem")
                         & (variances["step"] == rows["step"].min())]
        if stem.empty or not float(stem["value"].iloc[0]) > 0:
            return None
        scale = float(stem["value"].iloc[0])
    first = rows[rows["step"] == rows["step"].min()].sort_values("index")
    steps = [
        float(later - earlier)
        for _, stage in first.groupby("stage")
        for earlier, later in zip(stage["value"], stage["value"].iloc[1:])
    ]
    return float(sum(steps) / len(steps)) / scale if steps else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)

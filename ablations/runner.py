"""Run a grid: expand the spec, store the runs, execute what is not finished. The console it
shows (progress, the dry-run and status tables) is :mod:`ablations.progress`."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypedDict, Unpack

from ablations.constants import FINISHED, MAX_RUNS
from ablations.executors import Executor, LocalExecutor
from ablations.progress import (
    ELSEWHERE,
    HEARTBEAT_S,
    MAX_STEP_BARS,
    Progress,
    blank,
    describe_run,
    dry_run_table,
    duration_text,
    environment_column,
    grid_axis_order,
    sort_key,
    status_table,
    step_text,
)
from ablations.spec import GridSpec, Run, expand
from ablations.store import (
    DamagedFile,
    GridStore,
    differing_base_keys,
    environment_differences,
    numeric_environment,
)
from ablations.worker import DEFAULT_THREADS
from sigprop.errors import UserError

# Its public names: its own, and the console's, which moved to ablations.progress (callers
# import them from here as before: ablations.runner.status_table, .Progress, ...)
__all__ = [
    "ELSEWHERE", "HEARTBEAT_S", "MAX_STEP_BARS", "GridOutcome", "Invocation", "Progress",
    "RunOptions", "Terminated", "blank", "check_data", "describe_run", "dry_run_table",
    "duration_text", "environment_column", "environment_mismatches", "executor_environment",
    "grid_axis_order", "interruptible", "mismatch_text", "run_grid", "runs_to_execute",
    "sort_key", "started_before", "status_table", "step_text", "todo_text", "will_run",
]


@dataclass
class GridOutcome:
    grid_dir: Path
    total: int
    skipped: int  # already finished before this invocation
    counts: dict = field(default_factory=dict)  # state -> runs ended in this invocation
    interrupted: bool = False
    signal: str | None = None  # SIGINT or SIGTERM when interrupted
    duration_s: float = 0.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: in-flight runs are stored as queued and resume later."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def interruptible(outcome: Any) -> Iterator[None]:
    """Run the body with SIGTERM handled like Ctrl-C (main thread only; else left alone);
    either one ends the body and marks ``outcome`` interrupted, naming the signal."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as err:
        outcome.interrupted = True
        outcome.signal = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def will_run(store: GridStore, run_id: str, retry_failed: bool) -> bool:
    """Whether ``run_id`` is left to run, read without writing anything (damaged: yes)."""
    try:
        state = store.state(run_id) if (store.run_dir(run_id) / "config.json").exists() \
            else "queued"
    except DamagedFile:
        return True
    return not (state in FINISHED or (state == "failed" and not retry_failed))


def runs_to_execute(store: GridStore, runs: list[Run], retry_failed: bool,
                    stream=None) -> list[str]:
    """The runs not finished; a damaged run is repaired (its unreadable files kept aside) and
    counts as not finished."""
    todo = []
    for run in runs:
        try:
            note = store.repair(run)
        except OSError as err:
            raise UserError(f"cannot repair run {run.run_id} in {store.dir}: "
                            f"{err.strerror or err}") from None
        if note and stream is not None:
            print(f"run {run.run_id}: {note}; it runs again", file=stream, flush=True)
        if will_run(store, run.run_id, retry_failed):  # damaged and held elsewhere: yes
            todo.append(run.run_id)
    return todo


def executor_environment(executor: Any) -> dict:
    """The :data:`~ablations.store.NUMERIC_ENVIRONMENT` the executor's runs will record."""
    device = getattr(executor, "device", None)
    if not isinstance(device, str):  # Ray: a GPU per run or none
        device = "cuda" if (getattr(executor, "gpus_per_run", 0) or 0) > 0 else "cpu"
    return numeric_environment(getattr(executor, "threads", DEFAULT_THREADS),
                               bool(getattr(executor, "deterministic", False)), device)


def environment_mismatches(store: GridStore, runs: list[Run], current: dict,
                           retry_failed: bool) -> dict[str, list[str]]:
    """Run id -> how its recorded environment differs from ``current`` (see
    :func:`~ablations.store.environment_differences`), for the stored runs this invocation
    would reuse (finished) or continue from a checkpoint (started, not finished). A run
    resumed earlier under another environment also counts (its ``earlier_environment``)."""
    out = {}
    for run in runs:
        if not (store.run_dir(run.run_id) / "config.json").exists():
            continue
        try:
            status = store.status(run.run_id)
        except DamagedFile:
            continue  # repaired and run from step 0 anyway
        state = status.get("state", "queued")
        continued = (state not in FINISHED and (state != "failed" or retry_failed)
                     and (store.run_dir(run.run_id) / "checkpoint.pt").is_file())
        if state not in FINISHED and not continued:
            continue
        found = environment_differences(status.get("environment"), current)
        if status.get("earlier_environment") is not None:
            found += [d for d in environment_differences(status["earlier_environment"], current)
                      if d not in found]
        if found:
            out[run.run_id] = found
    return out


def mismatch_text(mismatches: dict[str, list[str]]) -> str:
    """"3 runs stored under a different environment: threads 2 vs 1 (2 runs), threads not
    recorded (1 run)"."""
    groups: dict[str, int] = {}
    for found in mismatches.values():
        key = ", ".join(found)
        groups[key] = groups.get(key, 0) + 1
    n = len(mismatches)
    parts = [f"{key} ({count} run{'s' if count > 1 else ''})" for key, count in groups.items()]
    return (f"{n} run{'s' if n > 1 else ''} stored under a different environment: "
            f"{'; '.join(parts)}")


def check_data(runs: list[Run], download: bool = False) -> None:
    """Every data set the runs left to run need is there, checked once before anything is
    written.

    CIFAR counts as there when its extracted batches are in the run's data_dir, or its
    tarball, which is checked and extracted here, once (a bad one stops the grid in one line,
    and stays); otherwise ``download`` fetches it now, once, and without it the grid stops
    naming where the files go (runs would each fail on their own). Runs never download.
    """
    from sigprop.data import SOURCES, default_data_dir, ensure_cifar  # lazy: torch

    needed = sorted({(r.config["data"], r.config.get("data_dir") or "") for r in runs})
    for name, data_dir in needed:
        if name == "digits":
            try:
                import sklearn.datasets  # lazy: scikit-learn  # noqa: F401
            except ImportError:
                raise UserError("data set 'digits' needs scikit-learn: pip install "
                                "'sigprop[digits]'") from None
        if name not in SOURCES:
            continue
        source = SOURCES[name]
        folder = Path(data_dir) if data_dir else default_data_dir()
        files = source.train_files + source.test_files
        if all((folder / source.folder / f).is_file() for f in files):
            continue
        if download or (folder / source.filename).is_file():
            ensure_cifar(name, folder, download)
            continue
        raise UserError(
            f"data set {name} not found: put {source.folder}/ (extracted from "
            f"{source.filename}, {source.url}) under {folder}, or pass --download to fetch it"
        )


def started_before(store: GridStore, run_ids: list[str]) -> set[str]:
    """The runs that an earlier invocation started and did not finish (not failed ones)."""
    out = set()
    for rid in run_ids:
        try:
            status = store.status(rid)
        except DamagedFile:
            continue
        if status.get("state") != "failed" and status.get("attempts", 0) > 0:
            out.add(rid)
    return out


def todo_text(store: GridStore, todo: list[str]) -> str:
    """"2 to resume, 1 to retry, 4 to run": runs that started before and did not finish, failed
    runs run again (--retry-failed), and runs never started."""
    resuming = started_before(store, todo)
    counts = {"resume": len(resuming), "retry": 0, "run": 0}
    for rid in set(todo) - resuming:
        try:
            failed = store.state(rid) == "failed"
        except DamagedFile:
            failed = False
        counts["retry" if failed else "run"] += 1
    parts = [f"{n} to {what}" for what, n in counts.items() if n]
    return ", ".join(parts) or "0 to run"


class RunOptions(TypedDict, total=False):
    """The keyword arguments :func:`run_grid` and :func:`ablations.frontier.run_frontier`
    share; each left out takes :class:`Invocation`'s default.

    ``retry_failed`` reruns failed runs; ``stream`` gets the console lines (None: stdout);
    ``max_runs`` caps the expansion; ``download`` fetches missing data sets; ``verbosity``
    -1 prints only failures and warnings, 1 every run's or probe's start and end also on a
    terminal; ``heartbeat_s``: see :class:`Progress`."""

    retry_failed: bool
    stream: TextIO | None
    max_runs: int | None
    download: bool
    verbosity: int
    heartbeat_s: float


@dataclass
class Invocation:
    """One call of :func:`run_grid` or :func:`ablations.frontier.run_frontier`: the
    arguments both take (:class:`RunOptions`), defaults filled in (``stream``: stdout,
    ``executor``: one local worker), and the grid's store under ``out``."""

    spec: GridSpec
    store: GridStore
    executor: Executor
    stream: TextIO
    retry_failed: bool = False
    max_runs: int | None = MAX_RUNS
    download: bool = False
    verbosity: int = 0
    heartbeat_s: float = HEARTBEAT_S

    @classmethod
    def open(cls, spec: GridSpec, out: str | Path, executor: Executor | None,
             stream: TextIO | None = None, **options: Unpack[RunOptions]) -> Invocation:
        return cls(spec, GridStore(out, spec.name), executor or LocalExecutor(),
                   stream or sys.stdout, **options)

    def say(self, text: str, always: bool = False) -> None:
        """A line on the console; unless ``always`` (warnings, failures), not at verbosity -1."""
        if always or self.verbosity >= 0:
            print(text, file=self.stream, flush=True)

    def mismatches(self, runs: list[Run]) -> dict[str, list[str]]:
        """The stored ``runs`` made under another environment than this executor's runs
        would record (:func:`environment_mismatches`)."""
        return environment_mismatches(self.store, runs, executor_environment(self.executor),
                                      self.retry_failed)


def run_grid(
    spec: GridSpec,
    out: str | Path = "runs",
    executor: Executor | None = None,
    *,
    rerun_if_env_differs: bool = False,
    **options: Unpack[RunOptions],
) -> GridOutcome:
    """Expand ``spec`` into ``out/<name>`` and execute every run that is not finished.

    Completed and diverged runs are skipped, failed ones only rerun with ``retry_failed``,
    interrupted ones continue from their checkpoint. A stored run made under another
    environment (thread count, torch, device, deterministic flags: what changes its numbers)
    is said first and reused, or with ``rerun_if_env_differs`` run again from step 0, its old
    files kept aside. The other options: :class:`RunOptions`.
    """
    call = Invocation.open(spec, out, executor, **options)
    store, executor, stream = call.store, call.executor, call.stream
    retry_failed, download, verbosity = call.retry_failed, call.download, call.verbosity
    runs = expand(spec, call.max_runs)
    mismatches = call.mismatches(runs)
    if mismatches and rerun_if_env_differs and verbosity >= 0:
        print(f"{mismatch_text(mismatches)}; they run again from step 0 here "
              f"(--rerun-if-env-differs), their old files kept aside as <name>.env-<time>",
              file=stream, flush=True)
    elif mismatches and not rerun_if_env_differs:
        continued = sum(will_run(store, rid, retry_failed) for rid in mismatches)
        how = ("reused as stored" if not continued else "continued from their checkpoints"
               if continued == len(mismatches) else "reused as stored or continued from their "
               "checkpoints")
        print(f"warning: {mismatch_text(mismatches)}; {how}, so their numbers may differ from "
              f"a run here (--rerun-if-env-differs runs them again)", file=stream, flush=True)
    rerun = set(mismatches) if rerun_if_env_differs else set()
    check_data([r for r in runs if r.run_id in rerun or will_run(store, r.run_id, retry_failed)],
               download)
    differing = differing_base_keys(store, runs)
    if differing:
        print(f"warning: {store.dir} already holds runs made with another value of "
              f"{', '.join(differing)}; both sets stay, `status` and the report show "
              f"{'that key' if len(differing) == 1 else 'those keys'} as a column "
              f"(use another --out to keep them apart)", file=stream, flush=True)
    store.prepare(spec.to_toml_dict(), runs)
    for rid in sorted(rerun):
        why = f"stored under another environment ({', '.join(mismatches[rid])})"
        try:
            store.restart(rid, why)  # None: running elsewhere now, under that runner's settings
        except OSError as err:
            raise UserError(f"cannot set run {rid} aside in {store.dir}: "
                            f"{err.strerror or err}") from None
    todo = runs_to_execute(store, runs, retry_failed, stream)
    outcome = GridOutcome(store.dir, total=len(runs), skipped=len(runs) - len(todo))
    # describing a Ray executor starts Ray: only worth it when there is something to run
    where = f" on {executor.describe()}" if todo else ""
    if verbosity >= 0:
        print(f"grid {spec.name}: {len(runs)} runs, {outcome.skipped} already stored, "
              f"{todo_text(store, todo)}{where} -> {store.dir}", file=stream, flush=True)
    for line in spec.untested_claims:
        print(f"claim {line}", file=stream, flush=True)
    if not todo:
        return outcome
    labels = {r.run_id: describe_run(r) for r in runs}
    progress = Progress(len(runs), outcome.skipped, labels, len(executor.slots()), stream,
                        verbosity, call.heartbeat_s, resuming=started_before(store, todo))
    started = time.monotonic()
    try:
        with interruptible(outcome):
            executor.run(str(store.root), store.grid, todo, progress.result, progress.step)
    finally:
        progress.close()
        outcome.counts = dict(progress.counts)
        outcome.duration_s = time.monotonic() - started
    return outcome

"""Run a grid: expand the spec, store the runs, execute what is not finished, show progress."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ablations.executors import LocalExecutor
from ablations.spec import MAX_RUNS, GridSpec, Run, expand
from ablations.store import FINISHED, DamagedFile, GridStore, differing_base_keys, load_results
from sigprop.errors import UserError


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


def install_sigterm():
    """Handle SIGTERM like Ctrl-C while runs execute (main thread only; else leave it)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def restore_sigterm(previous) -> None:
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


def check_data(runs: list[Run], download: bool = False) -> None:
    """Every data set the runs left to run need is there, checked once before anything is
    written.

    CIFAR counts as there when its extracted batches or its tarball (checked and extracted by
    the first run) are in the run's data_dir; otherwise ``download`` fetches it now, once, and
    without it the grid stops naming where the files go (runs would each fail on their own).
    """
    from sigprop.data import SOURCES, default_data_dir, load_dataset

    needed = sorted({(r.config["data"], r.config.get("data_dir") or "") for r in runs})
    for name, data_dir in needed:
        if name == "digits":
            try:
                import sklearn.datasets  # noqa: F401
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
        if (folder / source.filename).is_file():
            continue
        if download:
            load_dataset(name, folder, train_size=1, test_size=1, download=True)
            continue
        raise UserError(
            f"data set {name} not found: put {source.folder}/ (extracted from "
            f"{source.filename}, {source.url}) under {folder}, or pass --download to fetch it"
        )


def describe_run(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.axes.items()) or "base config"


def dry_run_table(runs: list[Run]) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": r.run_id, "model": r.label, **r.axes} for r in runs])


ELSEWHERE = "done by another runner"
HEARTBEAT_S = 30.0  # without a terminal: a progress line per running run this often
MAX_STEP_BARS = 8  # a Ray cluster can have hundreds of slots


class Progress:
    """A grid bar and per-worker step bars on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, done: int, labels: dict[str, str], slots: int,
                 stream=None):
        self.stream = stream or sys.stdout
        self.labels = labels
        self.counts: dict[str, int] = {}
        self.total, self.done = total, done
        self.started = time.monotonic()
        self.tty = self.stream.isatty()
        self.bars = {}
        if self.tty:
            from tqdm import tqdm

            self.grid_bar = tqdm(total=total, initial=done, desc="grid", unit="run",
                                 position=0, file=self.stream, dynamic_ncols=True)
            self.slot_bars = [
                tqdm(total=1, desc=f"worker {i}", position=i + 1, leave=False, file=self.stream,
                     dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total}")
                for i in range(min(slots, MAX_STEP_BARS))
            ]

    def step(self, slot: int, run_id: str, step: int, total: int) -> None:
        if self.tty and slot < len(self.slot_bars):
            bar = self.slot_bars[slot]
            bar.set_description_str(f"{run_id[:8]} {self.labels.get(run_id, '')}"[:60])
            bar.total = total
            bar.n = step
            bar.refresh()

    def result(self, result: dict) -> None:
        state = result["state"]
        if state in ("busy",):
            return
        counted = state not in ("interrupted", "requeued")
        if result.get("elsewhere"):  # finished by another runner on the same store
            state = ELSEWHERE
        if state != "requeued":
            self.counts[state] = self.counts.get(state, 0) + 1
        if counted:
            self.done += 1
        rid = result["run_id"]
        summary = result.get("summary") or {}
        acc = summary.get("final_acc")
        detail = f"acc={acc:.3f}" if acc is not None else ""
        if state == "diverged":
            detail = f"diverged at step {summary.get('diverged_step')}"
        if state in ("failed", "requeued"):
            detail = result.get("error", "")
        if result.get("store_error"):
            detail += (f" (the store could not record it: {result['store_error']}; `status` "
                       f"shows the run as interrupted)")
        line = f"[{self.done}/{self.total}] {rid} {state:9s} {self.labels.get(rid, '')} {detail}"
        if self.tty:
            self.grid_bar.update(1 if counted else 0)
            self.grid_bar.set_postfix(
                diverged=self.counts.get("diverged", 0), failed=self.counts.get("failed", 0)
            )
            if state in ("failed", "diverged", "requeued") or result.get("store_error"):
                self.grid_bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            for bar in self.slot_bars:
                bar.close()
            self.grid_bar.close()


def run_grid(
    spec: GridSpec,
    out: str | Path = "runs",
    executor: LocalExecutor | None = None,
    retry_failed: bool = False,
    stream=None,
    max_runs: int | None = MAX_RUNS,
    download: bool = False,
    verbosity: int = 0,
    heartbeat_s: float = HEARTBEAT_S,
) -> GridOutcome:
    """Expand ``spec`` into ``out/<name>`` and execute every run that is not finished.

    Completed and diverged runs are skipped, failed ones only rerun with ``retry_failed``,
    interrupted ones continue from their checkpoint. ``verbosity`` -1 prints only failures
    and warnings, 1 every run's start and end line also on a terminal; ``heartbeat_s``: see
    :class:`Progress`.
    """
    stream = stream or sys.stdout
    executor = executor or LocalExecutor()
    runs = expand(spec, max_runs)
    store = GridStore(out, spec.name)
    check_data([r for r in runs if will_run(store, r.run_id, retry_failed)], download)
    differing = differing_base_keys(store, runs)
    if differing:
        print(f"warning: {store.dir} already holds runs made with another value of "
              f"{', '.join(differing)}; both sets stay, `status` and the report show "
              f"{'that key' if len(differing) == 1 else 'those keys'} as a column "
              f"(use another --out to keep them apart)", file=stream, flush=True)
    store.prepare(spec.to_toml_dict(), runs)
    todo = runs_to_execute(store, runs, retry_failed, stream)
    outcome = GridOutcome(store.dir, total=len(runs), skipped=len(runs) - len(todo))
    # describing a Ray executor starts Ray: only worth it when there is something to run
    where = f" on {executor.describe()}" if todo else ""
    if verbosity >= 0:
        print(
            f"grid {spec.name}: {len(runs)} runs, {outcome.skipped} already stored, "
            f"{len(todo)} to run{where} -> {store.dir}",
            file=stream, flush=True,
        )
    for line in spec.untested_claims:
        print(f"claim {line}", file=stream, flush=True)
    if not todo:
        return outcome
    labels = {r.run_id: describe_run(r) for r in runs}
    progress = Progress(len(runs), outcome.skipped, labels, len(executor.slots()), stream)
    started = time.monotonic()
    previous = install_sigterm()
    try:
        executor.run(str(store.root), store.grid, todo, progress.result, progress.step)
    except KeyboardInterrupt as err:
        outcome.interrupted = True
        outcome.signal = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
    finally:
        restore_sigterm(previous)
        progress.close()
        outcome.counts = dict(progress.counts)
        outcome.duration_s = time.monotonic() - started
    return outcome


def status_table(path: str | Path) -> pd.DataFrame:
    """One row per run: grid, id, state, the axes it varies, and its summary metrics."""
    runs = load_results(path, with_frames=False).runs
    axis_columns = sorted({a for axes in runs["axes"] for a in axes})
    columns = ["grid", "run_id", "status", *axis_columns, "final_acc", "diverged_step",
               "duration_s", "error"]
    table = runs[[c for c in columns if c in runs]].copy()
    for column in axis_columns:  # blank where the axis does not apply (e.g. no threshold)
        applies = runs["axes"].map(lambda axes, c=column: c in axes)
        table[column] = table[column].astype(object).where(applies, "")
    for column in ("final_acc", "duration_s"):
        if column in table:
            table[column] = pd.to_numeric(table[column]).round(3 if column == "final_acc" else 1)
    return table

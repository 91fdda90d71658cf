"""Run a grid: expand the spec, store the runs, execute what is not finished, show progress."""

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

import pandas as pd
import tomllib
from tqdm import tqdm

from ablations.constants import FINISHED, MAX_RUNS
from ablations.executors import Executor, LocalExecutor
from ablations.keys import applied_values, flatten
from ablations.spec import GridSpec, Run, expand
from ablations.store import (
    NUMERIC_ENVIRONMENT,
    DamagedFile,
    GridStore,
    differing_base_keys,
    env_value,
    environment_differences,
    grid_dirs,
    load_results,
    numeric_environment,
)
from ablations.worker import DEFAULT_THREADS
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


def describe_run(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.axes.items()) or "base config"


def blank(value):
    """"" for a value that is not there (None, NaN), so tables never print None or NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value


def dry_run_table(runs: list[Run], axes: list[str] | None = None) -> pd.DataFrame:
    """One row per run: its id, the model as built, and the value the run will use for every
    key the grid varies (``axes``, by default the runs' own), then its peak ``lr``; blank
    where the run does not use a key (see :func:`ablations.store.applied_values`)."""
    keys = list(dict.fromkeys([*(axes or []), *(k for r in runs for k in r.axes)]))
    keys += [] if "lr" in keys else ["lr"]
    rows = []
    for run in runs:
        applied = applied_values(run.config, run.effective)
        rows.append({"run_id": run.run_id, "model": run.label,
                     **{key: blank(applied.get(key)) for key in keys}})
    return pd.DataFrame(rows)


ELSEWHERE = "done by another runner"
HEARTBEAT_S = 30.0  # without a terminal: a progress line per running run this often
MAX_STEP_BARS = 8  # a Ray cluster can have hundreds of slots


def duration_text(seconds: float) -> str:
    """45s, 3m12s, 1h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The console while a grid runs.

    On a terminal: a grid bar and a step bar per worker, failed and diverged runs as lines
    above them, and when the grid ends a table of the runs that ended in this invocation.
    Elsewhere (a log, CI): a line when a run starts, a line when it ends (state, accuracy or
    diverged step, elapsed time), and for a run going longer than ``heartbeat_s`` a line every
    ``heartbeat_s`` with its step/total, loss, elapsed time and ETA (0: none).
    ``verbosity`` -1 prints only failed runs and store errors, and no bars; 1 also prints every
    run's start and end line on a terminal. ``total`` None is an open-ended search (the
    frontier's probes): no bars and no table, the start and end lines only with verbosity 1,
    the heartbeat as usual.
    """

    def __init__(self, total: int | None, done: int, labels: dict[str, str], slots: int,
                 stream=None, verbosity: int = 0, heartbeat_s: float = HEARTBEAT_S,
                 resuming: set[str] | frozenset = frozenset()):
        self.stream = stream or sys.stdout
        self.labels = labels
        self.counts: dict[str, int] = {}
        self.total, self.done = total, done
        self.started = time.monotonic()
        self.verbosity, self.heartbeat_s, self.resuming = verbosity, heartbeat_s, resuming
        self.open_ended = total is None
        self.tty = self.stream.isatty() and verbosity >= 0 and not self.open_ended
        self.active: dict[str, dict] = {}  # run id -> started, step, total, loss, last beat
        self.ended: list[dict] = []  # the rows of the final table
        if self.tty:
            self.grid_bar = tqdm(total=total, initial=done, desc="grid", unit="run",
                                 position=0, file=self.stream, dynamic_ncols=True)
            self.slot_bars = [
                tqdm(total=1, desc=f"worker {i}", position=i + 1, leave=False, file=self.stream,
                     dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total}")
                for i in range(min(slots, MAX_STEP_BARS))
            ]

    def line(self, text: str) -> None:
        if self.tty:
            self.grid_bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def every_run(self) -> bool:
        """Whether start and end lines of ordinary runs are printed."""
        if self.open_ended:
            return self.verbosity >= 1
        return self.verbosity >= 1 or (self.verbosity == 0 and not self.tty)

    def prefix(self) -> str:
        return "probe" if self.open_ended else f"[{self.done}/{self.total}]"

    def step(self, slot: int, run_id: str, step: int, total: int,
             loss: float | None = None) -> None:
        """A run's progress; ``total`` 0 says it has just started."""
        now = time.monotonic()
        info = self.active.get(run_id)
        if info is None:
            info = self.active[run_id] = {"started": now, "beat": now, "step": 0, "total": 0,
                                          "loss": None, "first": None}
            if self.every_run():
                verb = "resuming" if run_id in self.resuming else "started"
                self.line(f"{self.prefix()} {run_id} {verb:9s} "
                          f"{self.labels.get(run_id, '')}".rstrip())
        if total:
            info.update(step=step, total=total)
            if info["first"] is None:  # where this attempt began (a resumed run: mid-way)
                info["first"] = (step, now)
        if loss is not None:
            info["loss"] = loss
        if self.tty and total and slot < len(self.slot_bars):
            bar = self.slot_bars[slot]
            bar.set_description_str(f"{run_id[:8]} {self.labels.get(run_id, '')}"[:60])
            bar.total = total
            bar.n = step
            bar.refresh()
        if (not self.tty and self.verbosity >= 0 and self.heartbeat_s and info["total"]
                and now - info["beat"] >= self.heartbeat_s):
            info["beat"] = now
            self.line(self.heartbeat(run_id, info, now))

    def heartbeat(self, run_id: str, info: dict, now: float) -> str:
        step, total = info["step"], info["total"]
        text = f"{self.prefix()} {run_id} running   step {step}/{total}"
        if info["loss"] is not None:
            text += f" loss {info['loss']:.4g}"
        text += f", {duration_text(now - info['started'])}"
        first_step, first_time = info["first"] or (step, now)
        if first_step < step < total and now > first_time:
            rate = (step - first_step) / (now - first_time)
            text += f", about {duration_text((total - step) / rate)} left"
        return f"{text}  {self.labels.get(run_id, '')}".rstrip()

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
        info = self.active.pop(rid, None)
        summary = result.get("summary") or {}
        acc = summary.get("final_acc")
        detail = f"acc={acc:.3f}" if acc is not None else ""
        if state == "diverged":
            detail = f"diverged at step {summary.get('diverged_step')}"
        if state in ("failed", "requeued"):
            detail = result.get("error", "")
        elapsed = summary.get("duration_s")
        if elapsed is None and info is not None:
            elapsed = time.monotonic() - info["started"]
        if elapsed is not None and state not in ("failed", "requeued", ELSEWHERE):
            detail += f" in {duration_text(elapsed)}"
        if result.get("store_error"):
            detail += (f" (the store could not record it: {result['store_error']}; `status` "
                       f"shows the run as interrupted)")
        line = " ".join(part for part in (f"{self.prefix()} {rid} {state:9s}",
                                          self.labels.get(rid, ""), detail.strip()) if part)
        if counted:
            self.ended.append({"run_id": rid, "run": self.labels.get(rid, ""), "state": state,
                               "final_acc": "" if acc is None else round(acc, 3),
                               "diverged_step": blank(summary.get("diverged_step")),
                               "time": "" if elapsed is None else duration_text(elapsed)})
        alarm = state in ("failed", "requeued") or bool(result.get("store_error"))
        if self.tty:
            self.grid_bar.update(1 if counted else 0)
            self.grid_bar.set_postfix(
                diverged=self.counts.get("diverged", 0), failed=self.counts.get("failed", 0)
            )
        if alarm or self.every_run() or (self.tty and state == "diverged"):
            self.line(line)

    def close(self) -> None:
        if not self.tty:
            return
        for bar in self.slot_bars:
            bar.close()
        self.grid_bar.close()
        if self.ended:  # the bars are gone: what each run did stays on screen
            order = {rid: i for i, rid in enumerate(self.labels)}
            rows = sorted(self.ended, key=lambda row: order.get(row["run_id"], len(order)))
            table = pd.DataFrame(rows)
            table = table.drop(columns=[c for c in ("final_acc", "diverged_step", "time")
                                        if (table[c] == "").all()])
            print(table.to_string(index=False), file=self.stream, flush=True)


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


def status_table(path: str | Path) -> pd.DataFrame:
    """One row per run: grid, id, state (a running run with its step, from its progress
    record), the values of the keys the grid varies as the run uses them, and its summary
    metrics, and ``diagnosis`` (where and when a diverged run broke, :mod:`sigprop.diagnosis`);
    sorted by those values. Blank where there is nothing, never None or NaN."""
    results = load_results(path, with_frames=False)
    runs = results.runs
    order = {key: i for i, key in enumerate(grid_axis_order(results.specs))}
    axis_columns = sorted({a for axes in runs["axes"] for a in axes},
                          key=lambda a: (order.get(a, len(order)), a))
    runs = runs.assign(progress=[
        step_text(path, grid, rid) if state in ("running", "interrupted") else ""
        for grid, rid, state in zip(runs["grid"], runs["run_id"], runs["status"])])
    environments = environment_column(runs)
    if environments is not None:
        runs = runs.assign(environment=environments)
    columns = ["grid", "run_id", "status", "progress", *axis_columns, "final_acc",
               "diverged_step", "duration_s", "environment", "error", "diagnosis"]
    table = runs[[c for c in columns if c in runs]].copy()
    if "final_acc" in table:
        table["final_acc"] = pd.to_numeric(table["final_acc"]).round(3)
    if "duration_s" in table:
        table["duration_s"] = pd.to_numeric(table["duration_s"]).round(1)
    if "diverged_step" in table:
        table["diverged_step"] = [v if blank(v) == "" else int(v) for v in table["diverged_step"]]
    sort_keys = ["grid", *axis_columns, "run_id"]
    rows = sorted(table.to_dict("records"),
                  key=lambda row: tuple(sort_key(row.get(k)) for k in sort_keys))
    table = pd.DataFrame(rows, columns=table.columns)
    for column in table:
        if table[column].isna().any():
            table[column] = table[column].astype(object).map(blank)
    empty = [c for c in ("progress", "diverged_step", "environment", "error", "diagnosis")
             if c in table and table[c].map(blank).eq("").all()]
    return table.drop(columns=empty)  # a column with nothing to say


def environment_column(runs: pd.DataFrame) -> list[str] | None:
    """Per run, the recorded environment keys that change numbers and differ between the
    runs that ran ("threads 2"), or that a run did not record ("threads not recorded"), and
    "resumed from ..." for a run continued under other values; None when all runs that ran
    agree and recorded everything (nothing to say)."""
    keys = [k for k in NUMERIC_ENVIRONMENT if f"env.{k}" in runs]
    if not keys:
        return None

    def value(row: dict, key: str):
        raw = blank(row.get(f"env.{key}"))
        return "not recorded" if raw == "" else env_value(key, raw)

    rows = runs.to_dict("records")
    ran_at = {i for i, row in enumerate(rows) if row.get("status") in FINISHED
              or any(blank(row.get(f"env.{k}")) != "" for k in keys)}
    ran = [rows[i] for i in sorted(ran_at)]
    shown = [key for key in keys
             if len({repr(value(row, key)) for row in ran}) > 1
             or any(value(row, key) == "not recorded" for row in ran)]
    earlier = any(blank(row.get("env.earlier")) != "" for row in ran)
    if not shown and not earlier:
        return None
    out = []
    for i, row in enumerate(rows):
        if i not in ran_at:
            out.append("")
            continue
        text = ", ".join(f"{key} {value(row, key)}" for key in shown)
        if blank(row.get("env.earlier")) != "":
            text += f"{'; ' if text else ''}resumed from a checkpoint made under " \
                    f"{row['env.earlier']}"
        out.append(text)
    return out


def sort_key(value) -> tuple:
    """Numbers in order, then text, then blanks (a column may hold all three)."""
    value = blank(value)
    if value == "":
        return (2, 0, "")
    if isinstance(value, bool | int | float):
        return (0, float(value), "")
    return (1, 0, str(value))


def grid_axis_order(specs: dict[str, str]) -> list[str]:
    """The [grid] keys of the stored specs, in the order they are written."""
    keys: list[str] = []
    for text in specs.values():
        try:
            keys += list(flatten(tomllib.loads(text).get("grid", {})))
        except (tomllib.TOMLDecodeError, AttributeError):
            continue
    return list(dict.fromkeys(keys))


def step_text(path: str | Path, grid: str, run_id: str) -> str:
    """"120/300" from the run's progress record, "" without one."""
    folder = next((g for g in grid_dirs(Path(path)) if g.name == grid), None)
    record = GridStore(folder.parent, grid).progress(run_id) if folder else None
    if not record or "step" not in record:
        return ""
    return f"{record['step']}/{record.get('total', '?')}"

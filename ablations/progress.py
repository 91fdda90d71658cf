"""The console of a grid: a run's label, the progress bars and log lines while runs go, the
dry-run table before and the status table after. Only reads the store, never runs anything."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import tomllib
from tqdm import tqdm

from ablations.constants import FINISHED
from ablations.keys import applied_values, flatten
from ablations.spec import Run
from ablations.store import NUMERIC_ENVIRONMENT, GridStore, env_value, grid_dirs, load_results


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

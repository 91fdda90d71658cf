"""Export a grid folder to a TensorBoard log dir, with the HParams plugin data.

Layout of the log dir (``GRID/tensorboard`` unless told otherwise)::

    <out>/events.out.tfevents.*        the HParams experiment, named after the grid with
                                       its spec's description: the varied axes and the
                                       effective lr (discrete domains) and the metrics
                                       final_acc, best_acc, diverged_step, max_grad_norm
    <out>/<axis=value,...>-<run_id>/   one folder per finished run (completed or diverged):
        events.out.tfevents.*          session start/end info (the run's axis values, status),
                                       train/<column> and eval/<column> from metrics.parquet,
                                       blocks/<block>/<stat> (and params/<param>/<stat>) from
                                       blocks.parquet (the classifier's group is blocks/head,
                                       as the report calls it), summary/<metric> at the last
                                       step
        sigprop-run.json               written last: the run is completely exported
    <out>/sigprop-export.json          which grid this folder exports, and its hparams

Exporting again into the same folder adds the runs that finished since and leaves the others
as they are (a finished run never changes), so nothing is duplicated; this is also what
``--live`` repeats. Only when the grid's axes change (a new axis, or one whose values change
type) are all run folders written again. A folder holding another grid's export, or anything
that is no export, is refused, and so is a second export while another one holds the folder's
lock (``.sigprop-export.lock``, an flock released when its process ends).

Values that do not apply are left out, never invented: an axis value that is None/NaN for a run
(``clip.threshold`` of an unclipped run) is a blank cell in the HParams table, a metric that is
None/NaN (``diverged_step`` of a run that did not diverge) is not written, and NaN entries of
the stored frames (a step without an evaluation) are skipped. Infinite values (a diverged loss)
are written as they are.

Events are written with ``torch.utils.tensorboard.SummaryWriter``; the HParams plugin data
are summary protos by nature (``tensorboard.plugins.hparams.summary_v2`` for a session's
start, the plugin's own protos for the experiment's name and description and a session's
end status, which summary_v2 cannot set); none of this needs TensorFlow. Running runs write
their own live event files (``GRID/live``, :mod:`ablations.tracking`) with the same folder
names and tags.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomllib
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
from torch.utils.tensorboard import SummaryWriter

from ablations.store import (
    FINISHED,
    DamagedFile,
    GridStore,
    RunLock,
    grid_dirs,
    load_results,
    read_json,
    read_parquet,
    write_json,
)
from ablations.tracking import (  # noqa: F401 - EVAL_METRIC_COLUMNS, HEAD: part of this API
    EVAL_METRIC_COLUMNS,
    HEAD,
    _missing,
    _plain,
    as_text,
    run_folder_name,
    run_scalars,
    write_scalars,
)
from sigprop.errors import UserError
from sigprop.files import writable_dir_error

MANIFEST = "sigprop-export.json"
RUN_MARK = "sigprop-run.json"
LOCK = ".sigprop-export.lock"
EXPORT_FORMAT = "sigprop tensorboard export 1"
# The four HParams metrics (summary/<name> in every run), with their descriptions.
METRICS = {
    "final_acc": "test accuracy at the last evaluation",
    "best_acc": "best test accuracy over the evaluations",
    "diverged_step": "step at which the run diverged (blank: it did not)",
    "max_grad_norm": "largest global gradient norm before clipping",
}
# States that may still become results: ``--live`` waits for them.
WAITING = ("queued", "running", "interrupted")
LR = "lr"  # the effective peak learning rate: an HParam of every export, varied or not


@dataclass(frozen=True)
class HParamAxis:
    """One varied axis as an HParam: its TensorBoard type and its discrete domain."""

    name: str
    dtype: type  # float, bool or str
    values: tuple

    def value(self, raw: Any) -> float | bool | str | None:
        """``raw`` (a config value) as this axis' type; None when it does not apply."""
        raw = _plain(raw)
        if _missing(raw):
            return None
        if self.dtype is bool:
            return bool(raw)
        if self.dtype is float:
            return float(raw)
        return as_text(raw)

    def proto(self) -> api_pb2.HParamInfo:
        info = api_pb2.HParamInfo(name=self.name, differs=True)
        summary_v2.Discrete(list(self.values), dtype=self.dtype).update_hparam_info(info)
        return info


@dataclass
class ExportResult:
    """What one export did. ``added``: run folders written now; ``kept``: runs exported before;
    ``waiting``: runs not finished yet; ``left_out``: {state: count} of runs with no results
    (failed, damaged); ``rewritten``: the axes changed and every run was written again."""

    out: Path
    added: list[str] = field(default_factory=list)
    kept: int = 0
    waiting: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    rewritten: bool = False

    def line(self) -> str:
        added = len(self.added)
        parts = [f"{added} run{'' if added == 1 else 's'} added", f"{self.kept} already there"]
        if self.waiting:
            parts.append(f"{self.waiting} not finished yet")
        parts += [f"{n} {state} (no results)" for state, n in sorted(self.left_out.items())]
        note = "; the grid's axes changed, every run was written again" if self.rewritten else ""
        return f"tensorboard export {self.out}: {', '.join(parts)}{note}"


# ----------------------------------------------------------------------------- values


def _kind(value: Any) -> type:
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float)):
        return float
    return str


def hparam_axes(runs: pd.DataFrame, lr: bool = False) -> list[HParamAxis]:
    """The axes the grid varied, each with the values its runs take (all runs, finished or not,
    so the domains stay the same while the grid runs). An axis mixing kinds (numbers and
    words, lists) becomes a text axis. ``lr``: also the effective peak learning rate (last),
    varied or not, unless the grid varies ``lr`` itself."""
    names = sorted({a for axes in runs.get("axes", pd.Series(dtype=object)) for a in axes})
    if lr and LR not in names:
        names.append(LR)
    out = []
    for name in names:
        if name not in runs.columns:
            continue
        present = [v for v in map(_plain, runs[name]) if not _missing(v)]
        if not present:
            continue
        kinds = {_kind(v) for v in present}
        dtype = kinds.pop() if len(kinds) == 1 else str
        axis = HParamAxis(name, dtype, ())
        values = tuple(sorted({axis.value(v) for v in present}))
        out.append(HParamAxis(name, dtype, values))
    return out


# ----------------------------------------------------------------------------- protos


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data),
                      tensor=metadata.NULL_TENSOR)
    return summary


def experiment_summary(axes: list[HParamAxis], name: str = "sigprop grid",
                       description: str = "") -> summary_pb2.Summary:
    experiment = api_pb2.Experiment(
        name=name, description=description,
        hparam_infos=[axis.proto() for axis in axes],
        metric_infos=[summary_v2.Metric(f"summary/{name}", display_name=name,
                                        description=text).as_proto()
                      for name, text in METRICS.items()],
        time_created_secs=time.time(),
    )
    return _hparams_summary(metadata.EXPERIMENT_TAG,
                            plugin_data_pb2.HParamsPluginData(experiment=experiment))


def session_end_summary(state: str, end_time: float) -> summary_pb2.Summary:
    status = api_pb2.STATUS_SUCCESS if state == "completed" else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end_time)
    return _hparams_summary(metadata.SESSION_END_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_end_info=info))


# An event: (wall time, step, a summary proto) for the HParams data, or (wall time of a step,
# step, the run's (step, tag, value) scalar rows)
Event = tuple


def _write_events(folder: Path, events: Iterable[Event]) -> None:
    writer = SummaryWriter(log_dir=str(folder), max_queue=1000, flush_secs=30)
    try:
        for wall_time, step, content in events:
            if isinstance(content, summary_pb2.Summary):
                writer.file_writer.add_summary(content, step, wall_time)
            else:
                write_scalars(writer, content, wall_time)
    finally:
        writer.close()


# ----------------------------------------------------------------------------- one run


def _step_clock(metrics: pd.DataFrame, start: float) -> Callable[[int], float]:
    """Wall time of a step: the run's start plus the stored step times up to it, so that
    TensorBoard's "relative" axis shows training time."""
    if not len(metrics) or "step_time" not in metrics.columns:
        return lambda step: start
    timed = metrics[["step", "step_time"]].sort_values("step", kind="stable")
    steps = timed["step"].to_numpy()
    elapsed = timed["step_time"].fillna(0).clip(lower=0).cumsum().to_numpy()

    def clock(step: int) -> float:
        k = int(np.searchsorted(steps, step, side="right")) - 1
        return start + (float(elapsed[k]) if k >= 0 else 0.0)

    return clock


def _run_events(run: pd.Series, status: dict, hparams: dict[str, Any], metrics: pd.DataFrame,
                blocks: pd.DataFrame) -> Iterable[Event]:
    finished_at = status.get("finished_at") or time.time()
    start = status.get("started_at") or finished_at - (status.get("duration_s") or 0)
    clock = _step_clock(metrics, start)
    scalars = run_scalars(metrics, blocks)
    last_step = int(scalars["step"].max()) if len(scalars) else 0
    summary = [(f"summary/{name}", float(_plain(run.get(name))))
               for name in METRICS if not _missing(_plain(run.get(name)))]
    if summary:
        tags, values = zip(*summary)
        scalars = pd.concat([scalars, pd.DataFrame(
            {"step": last_step, "tag": list(tags), "value": list(values)})], ignore_index=True)

    start_info = summary_v2.hparams_pb({k: v for k, v in hparams.items() if v is not None},
                                       trial_id=str(run["run_id"]), start_time_secs=start)
    yield start, 0, start_info
    yield clock, None, scalars.sort_values("step", kind="stable")
    yield finished_at, last_step, session_end_summary(str(run["status"]), finished_at)


# ----------------------------------------------------------------------------- the folder


def resolve_grid(grid_dir: str | Path) -> Path:
    path = Path(grid_dir)
    if (path / "runs").is_dir():
        return path
    inside = grid_dirs(path)
    if inside:
        names = ", ".join(p.name for p in inside)
        raise UserError(f"{path} holds several grids ({names}); export one of them, "
                        f"e.g. {inside[0]}")
    raise UserError(f"{path} is not a grid folder (expected {path}/runs/<run_id>/...)")


def _claim_out(out: Path, grid: Path) -> dict:
    """Check that ``out`` can hold this grid's export; return its manifest (empty if new)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        manifest = read_json(out / MANIFEST) if out.is_dir() else None
    except DamagedFile as err:
        raise UserError(f"{err.path} is unreadable ({err.reason}); remove {out} and export "
                        "again") from None
    if manifest is None:
        if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no sigprop export; choose a "
                            "new or empty folder")
        manifest = {}
    elif manifest.get("grid") != _where(grid, out)["grid"] and (
            manifest.get("grid_from_out") != _where(grid, out)["grid_from_out"]):
        raise UserError(f"--out {out} holds the export of {manifest.get('grid')}; choose "
                        "another folder for this grid")
    why = writable_dir_error(out)
    if why:
        raise UserError(f"cannot write the TensorBoard export to {out}: {why}")
    return manifest


def _where(grid: Path, out: Path) -> dict[str, str]:
    """The grid as the manifest names it: its absolute path, and its path from the export (so a
    grid copied or moved together with its export, the default GRID/tensorboard, still is it)."""
    return {"grid": str(grid.resolve()),
            "grid_from_out": os.path.relpath(grid.resolve(), out.resolve())}


def _exported_runs(out: Path) -> dict[str, Path]:
    """{run_id: folder} of the completely exported runs; removes folders an export cut short
    left behind (event files only, no RUN_MARK)."""
    done = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        try:
            mark = read_json(folder / RUN_MARK)
        except DamagedFile:
            mark = None
        if mark and mark.get("run_id"):
            done[mark["run_id"]] = folder
        elif all(p.is_file() and "tfevents" in p.name for p in folder.iterdir()):
            shutil.rmtree(folder)
    return done


def _axes_record(axes: list[HParamAxis]) -> dict:
    return {a.name: {"type": a.dtype.__name__, "values": list(a.values)} for a in axes}


def export_tensorboard(grid_dir: str | Path, out_dir: str | Path | None = None) -> ExportResult:
    """Export the finished runs of a grid folder to a TensorBoard log dir (default
    ``GRID/tensorboard``); runs exported before are kept, not written again."""
    grid = resolve_grid(grid_dir)
    out = Path(out_dir) if out_dir is not None else grid / "tensorboard"
    manifest = _claim_out(out, grid)
    lock = RunLock(out / LOCK)  # a second export into the folder would take our half-written runs
    if not lock.acquire():
        raise UserError(f"another export is writing to {out}; wait for it or stop it")
    try:
        return _export(grid, out, manifest)
    except OSError as err:  # a full disk mid-way: the next export redoes the unfinished run
        raise UserError(f"cannot write the TensorBoard export to {out}: "
                        f"{err.strerror or err}") from None
    finally:
        lock.release()


def _export(grid: Path, out: Path, manifest: dict) -> ExportResult:
    results = load_results(grid, with_frames=False)
    runs = results.runs
    axes = hparam_axes(runs[runs["status"] != "damaged"], lr=True) if len(runs) else []
    name, description = grid_title(grid.name, results.specs.get(grid.name, ""))
    record = _axes_record(axes)
    previous = manifest.get("hparams")
    result = ExportResult(out)
    layout = {name: spec["type"] for name, spec in record.items()}
    if previous is not None and layout != {n: s["type"] for n, s in previous.items()}:
        for folder in _exported_runs(out).values():  # old sessions lack or mistype an axis
            shutil.rmtree(folder)
        result.rewritten = True
    write_json(out / MANIFEST, {"format": EXPORT_FORMAT, **_where(grid, out),
                                "hparams": previous})
    root_files = [p for p in out.iterdir() if p.is_file() and "tfevents" in p.name]
    if previous != record or not root_files:
        for path in root_files:
            path.unlink()
        _write_events(out, [(time.time(), 0, experiment_summary(axes, name, description))])
        write_json(out / MANIFEST, {"format": EXPORT_FORMAT, **_where(grid, out),
                                    "hparams": record})

    done = _exported_runs(out)
    store = GridStore(grid.parent, grid.name)
    for _, run in runs.iterrows():
        rid, state = str(run["run_id"]), str(run["status"])
        if rid in done:
            result.kept += 1
        elif state in WAITING:
            result.waiting += 1
        elif state not in FINISHED:
            result.left_out[state] = result.left_out.get(state, 0) + 1
        else:
            try:
                status = store.status(rid)
                frames = [read_parquet(store.run_dir(rid) / f"{kind}.parquet")
                          for kind in ("metrics", "blocks")]
            except DamagedFile:  # changed since load_results looked: left for the next export
                result.left_out["damaged"] = result.left_out.get("damaged", 0) + 1
                continue
            hparams = {axis.name: axis.value(run.get(axis.name)) for axis in axes}
            varied = {k: v for k, v in hparams.items() if k in run.get("axes", ()) or k != LR}
            folder = out / run_folder_name(varied, rid)  # named as its live folder
            if folder.exists():
                shutil.rmtree(folder)
            _write_events(folder, _run_events(run, status, hparams, *frames))
            write_json(folder / RUN_MARK, {"run_id": rid, "state": state,
                                           "exported_at": time.time()})
            result.added.append(folder.name)
    return result


def grid_title(grid: str, spec_text: str) -> tuple[str, str]:
    """The HParams experiment's name (the grid's) and description (its spec's, empty when the
    stored spec.toml has none or cannot be read: it is untrusted text, only parsed)."""
    try:
        spec = tomllib.loads(spec_text) if spec_text else {}
    except (tomllib.TOMLDecodeError, ValueError):
        spec = {}
    name = spec.get("name") if isinstance(spec.get("name"), str) else grid
    description = spec.get("description")
    return name or grid, description.strip() if isinstance(description, str) else ""


def check_interval(every_s: float) -> float:
    if not (math.isfinite(every_s) and every_s > 0):
        raise UserError(f"--live wants a number of seconds > 0, got {every_s:g}")
    return every_s


def watch_tensorboard(grid_dir: str | Path, out_dir: str | Path | None, every_s: float,
                      say: Callable[[ExportResult], None] = lambda r: print(r.line()),
                      sleep: Callable[[float], None] = time.sleep) -> ExportResult:
    """Export, then again every ``every_s`` seconds while runs of the grid are queued or
    running; returns when none is left (Ctrl-C stops it earlier)."""
    check_interval(every_s)
    first = True
    while True:
        result = export_tensorboard(grid_dir, out_dir)
        if first or result.added:
            say(result)
        first = False
        if not result.waiting:
            return result
        sleep(every_s)

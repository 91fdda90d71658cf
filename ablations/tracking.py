"""Live tracking of running runs: TensorBoard event files and, optionally, MLflow.

The worker opens the trackers of a run (:func:`open_trackers`) and hands them to
:func:`sigprop.train.train` as its ``live`` sink; every :data:`LIVE_INTERVAL_S` seconds of a
run (and at its end) they get the metric, evaluation and probe rows the run produced since,
so curves grow while it trains.

TensorBoard (on unless ``--no-live-tensorboard``, the environment variable
:data:`ENV_LIVE` = ``0``)::

    <grid>/live/<axis=value,...-run_id>/   one folder per run, named as ``export tensorboard``
        events.out.tfevents.*              names its folders: the HParams session start (the
                                           run's varied keys and lr), train/<column>,
                                           eval/<column>, blocks/<block>/<stat> (the
                                           classifier's group as blocks/head/...), and at the
                                           end summary/<metric> and the session end
        sigprop-live.json                  whose folder this is (a new attempt of the run
                                           replaces only event files of a folder it names)

``tensorboard --logdir runs/<grid>/live`` shows running runs' curves (TensorBoard rereads
the files every few seconds; the writer flushes every :data:`FLUSH_S` seconds).

MLflow (``--mlflow URI``, the environment variable :data:`ENV_MLFLOW`; needs the ``mlflow``
extra): one MLflow run per sigprop run, in the experiment named after the grid, found again by
its tag ``sigprop.run_id`` when the run resumes: params = the run's varied keys with their
effective values (and ``lr``), metrics as above, the summary as ``summary/<metric>`` metrics
(its text fields as tags), tags ``sigprop.state``/``sigprop.grid``/``sigprop.run_id``. The
report goes to a run of its own, ``report`` (:func:`log_report`).

Both settings travel in the environment, like the executor's own settings: they change no
config, so run ids stay as they are. A tracker that fails (no tensorboard, a full disk, an
unreachable server) is dropped with one line in the run's status (``tracking_warnings``);
the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ablations.keys import applied_values
from ablations.store import DamagedFile, read_json, write_json
from sigprop.errors import UserError

LIVE_DIR = "live"
LIVE_MARK = "sigprop-live.json"
LIVE_INTERVAL_S = 5.0  # rows to the trackers at most this often (TensorBoard rereads every 5 s)
MAX_SHARE_INV = 200  # an update costs at most 0.5% of the run's time (Trackers._wait_after)
FLUSH_S = 5  # SummaryWriter's flush interval: how stale a running run's curves may be
MLFLOW_INTERVAL_S = 10.0  # one batch of HTTP requests this often
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch
ENV_LIVE = "SIGPROP_LIVE_TENSORBOARD"
ENV_MLFLOW = "SIGPROP_MLFLOW"
HEAD = "head"  # the probe's "other" group (classifier, layers after the last block), as the
# report names it
# Columns of the merged metrics that only evaluations fill (sigprop.train.EVAL_COLUMNS without
# step and epoch; kept here so the export does not import the trainer).
EVAL_METRIC_COLUMNS = ("test_acc", "test_loss", "train_loss")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]+")
_LABEL_CHARS = 120


# ----------------------------------------------------------------------------- names, values


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return value if isinstance(value, str) else str(value)


def hparam_value(raw: Any) -> float | bool | str | None:
    """A config value as TensorBoard's HParams holds it: numbers as floats, bools, the rest
    (lists too) as text; None when it does not apply."""
    raw = _plain(raw)
    if _missing(raw):
        return None
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)):
        return float(raw)
    return as_text(raw)


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # batch_size=256, seed=0: number axes are floats in TensorBoard
    return as_text(value)


def run_folder_name(hparams: dict[str, Any], run_id: str) -> str:
    """``axis=value,...-<run_id>``: readable in TensorBoard's run list (and its regex filter),
    unique by the run id."""
    label = ",".join(f"{k}={_label_text(v)}" for k, v in sorted(hparams.items())
                     if v is not None)
    label = _UNSAFE.sub("_", label)[:_LABEL_CHARS]
    return f"{label}-{run_id}" if label else run_id


def block_label(block: Any) -> str:
    return HEAD if block == "other" else str(block)


def run_scalars(metrics: pd.DataFrame, blocks: pd.DataFrame) -> pd.DataFrame:
    """Long frame (step, tag, value) of a run's frames: ``train/<column>`` and
    ``eval/<column>`` from the metrics (the stored metrics.parquet, evaluations merged in),
    ``blocks/<block>/<stat>`` (``params/<param>/<stat>`` for per-parameter records; the
    classifier's group as ``blocks/head``) from the probe records. NaN entries (not measured)
    are left out."""
    parts = []
    if len(metrics):
        columns = [c for c in metrics.columns if c not in ("grid", "run_id", "step")
                   and pd.api.types.is_numeric_dtype(metrics[c])]
        long = metrics.melt(id_vars="step", value_vars=columns, var_name="column")
        prefix = np.where(long["column"].isin(EVAL_METRIC_COLUMNS), "eval/", "train/")
        parts.append(pd.DataFrame({"step": long["step"], "tag": prefix + long["column"],
                                   "value": long["value"]}))
    if len(blocks):
        names = blocks["block"].map(block_label)
        tag = "blocks/" + names + "/" + blocks["stat"].astype(str)
        if "param" in blocks.columns:
            per_param = blocks["param"].notna()
            tag = tag.where(~per_param, "params/" + blocks["param"].astype(str) + "/"
                            + blocks["stat"].astype(str))
        parts.append(pd.DataFrame({"step": blocks["step"], "tag": tag,
                                   "value": blocks["value"]}))
    if not parts:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "tag": pd.Series(dtype=str),
                             "value": pd.Series(dtype="float64")})
    frame = pd.concat(parts, ignore_index=True)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    frame = frame[frame["value"].notna()]
    return frame.astype({"step": "int64"}).sort_values("step", kind="stable")


def update_scalars(update: Any) -> dict[int, list[tuple[str, float]]]:
    """{step: [(tag, value), ...]} of a live update, the tags and values of
    :func:`run_scalars` (without its frames: a few hundred rows every few seconds cost less
    in plain loops than pandas' set-up)."""
    out: dict[int, list[tuple[str, float]]] = {}
    for frame, skip in ((update.metrics, ("step",)), (update.evals, ("step", "epoch"))):
        if not len(frame):
            continue
        steps = [int(s) for s in frame["step"].tolist()]
        for column in frame.columns:
            if column in skip or not pd.api.types.is_numeric_dtype(frame[column]):
                continue
            tag = f"{'eval' if column in EVAL_METRIC_COLUMNS else 'train'}/{column}"
            for step, value in zip(steps, frame[column].tolist()):
                if value == value:  # NaN: not measured
                    out.setdefault(step, []).append((tag, float(value)))
    blocks = update.blocks
    if len(blocks):
        params = blocks["param"].tolist() if "param" in blocks.columns else [None] * len(blocks)
        for step, block, stat, param, value in zip(
                blocks["step"].tolist(), blocks["block"].tolist(), blocks["stat"].tolist(),
                params, pd.to_numeric(blocks["value"], errors="coerce").tolist()):
            if value != value:
                continue
            tag = (f"blocks/{block_label(block)}/{stat}" if _missing(param)
                   else f"params/{param}/{stat}")
            out.setdefault(int(step), []).append((tag, float(value)))
    return out


def run_hparams(record: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(axes, params) of a stored run (its config.json record): ``axes``, the keys the grid
    varies with the values the run uses, typed as TensorBoard's HParams holds them (the
    folder name); ``params``, those and the effective ``lr``, ``clip.mode`` and
    ``clip.threshold``. Values that do not apply are None."""
    applied = applied_values(record.get("config") or {}, record.get("effective"))
    axes = {key: hparam_value(applied.get(key, value))
            for key, value in sorted((record.get("axes") or {}).items())}
    params = dict(axes)
    for key in ("lr", "clip.mode", "clip.threshold"):
        if key in applied:
            params[key] = hparam_value(applied[key])
    return axes, params


def _line(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".strip().splitlines() or ["error"])[0][:300]


# ----------------------------------------------------------------------------- trackers


class Tracker:
    """One live destination; ``problem`` is the line of the failure that dropped it."""

    name = "tracker"

    def __init__(self) -> None:
        self.problem: str | None = None

    def failed(self, err: BaseException) -> None:
        if self.problem is None:
            self.problem = f"{self.name}: {_line(err)}; no more live logging for this run"

    def write(self, update: Any) -> None:
        raise NotImplementedError

    def finish(self, state: str, summary: dict | None) -> None:
        raise NotImplementedError


class LiveTensorBoard(Tracker):
    """Event files of one run in ``folder`` through ``torch.utils.tensorboard.SummaryWriter``.
    """

    name = "live tensorboard"

    def __init__(self, folder: Path, run_id: str, axes: dict[str, Any],
                 params: dict[str, Any], started: float):
        super().__init__()
        from tensorboard.plugins.hparams import summary_v2  # lazy: tensorboard
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard

        self.folder = folder
        clear_live_folder(folder, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / LIVE_MARK, {"run_id": run_id, "axes": axes})
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=FLUSH_S, max_queue=1000)
        start = summary_v2.hparams_pb({k: v for k, v in params.items() if v is not None},
                                      trial_id=run_id, start_time_secs=started)
        self.writer.file_writer.add_summary(start, 0, started)
        self.last_step = 0

    def write(self, update: Any) -> None:
        from tensorboard.compat.proto import summary_pb2  # lazy: tensorboard

        value = summary_pb2.Summary.Value
        for step, pairs in sorted(update_scalars(update).items()):
            summary = summary_pb2.Summary(value=[value(tag=t, simple_value=v) for t, v in pairs])
            self.writer.file_writer.add_summary(summary, step)
            self.last_step = max(self.last_step, step)

    def finish(self, state: str, summary: dict | None) -> None:
        from tensorboard.compat.proto import summary_pb2  # lazy: tensorboard
        from tensorboard.plugins.hparams import (  # lazy: tensorboard
            api_pb2,
            metadata,
            plugin_data_pb2,
        )

        try:
            for key, value in (summary or {}).items():
                if key in SUMMARY_METRICS and _number(value):
                    self.writer.add_scalar(f"summary/{key}", float(value), self.last_step)
            if state in ("completed", "diverged", "failed"):
                status = api_pb2.STATUS_SUCCESS if state == "completed" else \
                    api_pb2.STATUS_FAILURE
                data = plugin_data_pb2.HParamsPluginData(session_end_info=(
                    plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())))
                end = summary_pb2.Summary()  # the HParams plugin data are summary protos
                end.value.add(tag=metadata.SESSION_END_INFO_TAG,
                              metadata=metadata.create_summary_metadata(data),
                              tensor=metadata.NULL_TENSOR)
                self.writer.file_writer.add_summary(end, self.last_step)
        finally:
            self.writer.close()


def write_scalars(writer: Any, scalars: pd.DataFrame, wall_time: Any = None) -> None:
    """The (step, tag, value) rows of ``scalars`` through a ``SummaryWriter``, one event per
    step holding all its values (what ``add_scalar`` writes value by value, at a tenth of
    the cost); ``wall_time(step)`` stamps them (None: now)."""
    from tensorboard.compat.proto import summary_pb2  # lazy: tensorboard

    if not len(scalars):
        return
    steps = scalars["step"].to_numpy()
    tags, values = scalars["tag"].tolist(), scalars["value"].tolist()
    bounds = np.flatnonzero(np.diff(steps)) + 1
    value = summary_pb2.Summary.Value
    for lo, hi in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(steps)].tolist()):
        step = int(steps[lo])
        summary = summary_pb2.Summary(value=[value(tag=t, simple_value=v)
                                             for t, v in zip(tags[lo:hi], values[lo:hi])])
        writer.file_writer.add_summary(summary, step,
                                       None if wall_time is None else wall_time(step))


class MlflowTracker(Tracker):
    """One MLflow run for one sigprop run (found again by its ``sigprop.run_id`` tag)."""

    name = "mlflow"

    def __init__(self, uri: str, grid: str, run_id: str, name: str, params: dict[str, Any]):
        super().__init__()
        from mlflow.entities import Param, RunTag  # lazy: mlflow
        from mlflow.tracking import MlflowClient  # lazy: mlflow

        self.client = MlflowClient(tracking_uri=uri)
        experiment = experiment_id(self.client, grid)
        found = self.client.search_runs(
            [experiment], filter_string=f"tags.`sigprop.run_id` = '{run_id}'", max_results=1)
        if found:
            self.run = found[0].info.run_id
            self.client.update_run(self.run, status="RUNNING")
        else:
            self.run = self.client.create_run(
                experiment, run_name=name,
                tags={"sigprop.run_id": run_id, "sigprop.grid": grid}).info.run_id
        self.client.log_batch(
            self.run, params=[Param(k, as_text(v)) for k, v in params.items() if v is not None],
            tags=[RunTag("sigprop.state", "running")])
        self.pending: list = []
        self.last_sent = time.monotonic()
        self.logged_steps: dict[str, int] = {}  # a resumed run's first update repeats rows

    def write(self, update: Any) -> None:
        from mlflow.entities import Metric  # lazy: mlflow

        now = int(time.time() * 1000)
        for step, pairs in sorted(update_scalars(update).items()):
            for tag, value in pairs:
                key = _MLFLOW_UNSAFE.sub("_", tag)
                if step <= self.logged_steps.get(key, -1):
                    continue
                self.logged_steps[key] = step
                self.pending.append(Metric(key, value, now, step))
        if update.final or time.monotonic() - self.last_sent >= MLFLOW_INTERVAL_S:
            self.send()

    def send(self) -> None:
        pending, self.pending = self.pending, []
        for lo in range(0, len(pending), MLFLOW_BATCH):
            self.client.log_batch(self.run, metrics=pending[lo:lo + MLFLOW_BATCH])
        self.last_sent = time.monotonic()

    def finish(self, state: str, summary: dict | None) -> None:
        from mlflow.entities import Metric, RunTag  # lazy: mlflow

        self.send()
        now = int(time.time() * 1000)
        step = max(self.logged_steps.values(), default=0)
        metrics = [Metric(f"summary/{k}", float(v), now, step)
                   for k, v in (summary or {}).items() if _number(v)]
        tags = [RunTag("sigprop.state", state)] + [
            RunTag(f"sigprop.{k}", as_text(v)[:5000]) for k, v in (summary or {}).items()
            if v is not None and not _number(v)]
        self.client.log_batch(self.run, metrics=metrics, tags=tags)
        end = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED",
               "interrupted": "KILLED"}.get(state, "KILLED")
        self.client.set_terminated(self.run, status=end)


SUMMARY_METRICS = ("final_acc", "best_acc", "diverged_step", "max_grad_norm")


def _number(value: Any) -> bool:
    value = _plain(value)
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not math.isnan(value))


def experiment_id(client: Any, grid: str) -> str:
    """The id of the MLflow experiment named ``grid``, made when missing (by whichever worker
    comes first)."""
    found = client.get_experiment_by_name(grid)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(grid, tags={"sigprop.grid": grid})
    except Exception:  # noqa: BLE001 - another worker made it meanwhile
        found = client.get_experiment_by_name(grid)
        if found is None:
            raise
        return found.experiment_id


class Trackers:
    """The live sink :func:`sigprop.train.train` gets: fans the updates out to the trackers,
    drops one that fails (``problems`` then holds its line)."""

    def __init__(self, trackers: list[Tracker], problems: list[str] | None = None):
        self.trackers = trackers
        self.problems = list(problems or [])
        self.next_at = time.monotonic() + LIVE_INTERVAL_S
        self.due_at = self.next_at

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next_at or not self.trackers:
            return False
        self.due_at = now
        return True

    def _wait_after(self) -> None:
        # the cost of an update (the trainer gathering the rows, the writers) since due() said
        # yes: the next one waits at least MAX_SHARE_INV times as long, so updates never take
        # more than 1 / MAX_SHARE_INV of the run, however many probe rows a long run gathers
        now = time.monotonic()
        self.next_at = now + max(LIVE_INTERVAL_S, MAX_SHARE_INV * (now - self.due_at))

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as err:  # noqa: BLE001 - tracking never fails the run
                tracker.failed(err)
                self.trackers.remove(tracker)
                self.problems.append(tracker.problem)
                if call != "finish":
                    with _quiet():
                        tracker.finish("interrupted", None)

    def write(self, update: Any) -> None:
        self._each("write", update)
        self._wait_after()

    def finish(self, state: str, summary: dict | None) -> None:
        self._each("finish", state, summary)
        self.trackers = []


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True  # a tracker that failed may fail again while closing


def clear_live_folder(folder: Path, run_id: str) -> None:
    """A new attempt rewrites the run's live folder from its first step (its first update
    carries the checkpoint's rows): the event files of a folder whose mark names this run go,
    nothing else is touched."""
    if not folder.is_dir():
        return
    try:
        mark = read_json(folder / LIVE_MARK)
    except DamagedFile:
        mark = None
    if not mark or mark.get("run_id") != run_id:
        if any(folder.iterdir()):
            raise OSError(f"{folder} holds files sigprop did not write; left alone")
        return
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith("events.out.tfevents."):
            path.unlink()


def live_enabled() -> bool:
    return os.environ.get(ENV_LIVE, "1").strip().lower() not in ("0", "false", "no", "off")


def open_trackers(grid_dir: Path, run_id: str, record: dict, started: float) -> Trackers | None:
    """The trackers the environment asks for, for one run; None when none is on. A tracker
    that cannot start is left out, its line in ``problems``."""
    uri = os.environ.get(ENV_MLFLOW, "").strip()
    if not live_enabled() and not uri:
        return None
    trackers: list[Tracker] = []
    problems: list[str] = []
    try:
        axes, params = run_hparams(record)
        name = run_folder_name(axes, run_id)
    except Exception as err:  # noqa: BLE001 - a record this version cannot read
        return Trackers([], [f"tracking: {_line(err)}"])
    if live_enabled():
        try:
            trackers.append(LiveTensorBoard(grid_dir / LIVE_DIR / name, run_id, axes, params,
                                            started))
        except ImportError as err:
            problems.append(f"live tensorboard: {_line(err)}; this run writes no event files "
                            "(pip install -e \".[tensorboard]\", or --no-live-tensorboard)")
        except Exception as err:  # noqa: BLE001
            problems.append(f"live tensorboard: {_line(err)}; this run writes no event files")
    if uri:
        try:
            trackers.append(MlflowTracker(uri, grid_dir.name, run_id, name, params))
        except Exception as err:  # noqa: BLE001
            problems.append(f"mlflow: {_line(err)}; this run is not logged to {uri}")
    return Trackers(trackers, problems)


def log_report(uri: str, grid: str, paths: dict[str, Path]) -> str | None:
    """The grid's report (html, md and its figures) as artifacts of the MLflow run ``report``
    of the grid's experiment; returns the line of a failure (None when logged)."""
    try:
        from mlflow.tracking import MlflowClient  # lazy: mlflow

        client = MlflowClient(tracking_uri=uri)
        experiment = experiment_id(client, grid)
        found = client.search_runs([experiment], filter_string="tags.`sigprop.kind` = 'report'",
                                   max_results=1)
        run = found[0].info.run_id if found else client.create_run(
            experiment, run_name="report",
            tags={"sigprop.kind": "report", "sigprop.grid": grid}).info.run_id
        for key in ("html", "md"):
            if paths.get(key) is not None and Path(paths[key]).is_file():
                client.log_artifact(run, str(paths[key]), artifact_path="report")
        files = Path(paths["html"]).with_name(Path(paths["html"]).stem + "_files") \
            if paths.get("html") else None
        if files is not None and files.is_dir():
            client.log_artifacts(run, str(files), artifact_path=f"report/{files.name}")
        client.set_terminated(run, status="FINISHED")
    except Exception as err:  # noqa: BLE001 - the report is written; MLflow is a copy
        return f"mlflow: the report was not logged to {uri}: {_line(err)}"
    return None


# MLflow retries a request 7 times with growing back-off by default (minutes): a server gone
# mid-grid would stall every run that long. Fewer and shorter, unless the user set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class tracking_environment:
    """The CLI's tracking settings as the environment variables the workers read (set for the
    duration of a grid, restored after: a test runs several grids in one process).
    ``overrides``: only these variables, set as given."""

    def __init__(self, live: bool = True, mlflow_uri: str | None = None,
                 overrides: dict[str, str] | None = None):
        if overrides is not None:
            self.values = dict(overrides)
        else:
            self.values = {ENV_LIVE: "1" if live else "0", ENV_MLFLOW: mlflow_uri or ""}
            if mlflow_uri:
                self.values.update({k: os.environ.get(k, v) for k, v in HTTP_DEFAULTS.items()})
        self.before: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.before[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: Any) -> None:
        for key, value in self.before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_mlflow_uri(uri: str | None) -> str | None:
    """``--mlflow URI`` checked before anything runs: mlflow installed, a URI it reads; a plain
    folder becomes its file URI."""
    if uri is None:
        return None
    uri = uri.strip()
    if not uri:
        raise UserError("--mlflow wants a tracking URI (http://HOST:PORT, sqlite:///FILE or a "
                        "folder)")
    try:
        import mlflow  # lazy: mlflow  # noqa: F401
    except ImportError:
        raise UserError("--mlflow needs the mlflow package: pip install -e \".[mlflow]\"") \
            from None
    if "://" not in uri and not uri.startswith(("file:", "databricks")):
        uri = Path(uri).resolve().as_uri()
    if uri.startswith(("http://", "https://")):  # a server that is not there: say so now
        from mlflow.tracking import MlflowClient  # lazy: mlflow

        with tracking_environment(overrides=PROBE_HTTP):
            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except Exception as err:  # noqa: BLE001 - any failure: no usable server
                raise UserError(f"--mlflow {uri}: the tracking server does not answer "
                                f"({_line(err)})") from None
    return uri

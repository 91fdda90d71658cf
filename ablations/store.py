"""Results on disk, crash-safe.

Layout under the output root (``runs/`` by default)::

    <grid>/spec.toml                    the resolved spec of the latest invocation
    <grid>/runs/<run_id>/config.json    {"run_id", "grid", "axes", "config", "label",
                                         "model_departures": {option: registry default},
                                         "effective": {"lr", "clip.mode", "clip.threshold"}}
    <grid>/runs/<run_id>/status.json    state, timings, attempts, summary, error, environment
                                        (versions, device, threads, deterministic: what
                                        changes the numbers besides the config)
    <grid>/runs/<run_id>/progress.json  {"step", "total", "loss", "at"} while it trains
    <grid>/runs/<run_id>/metrics.parquet  one row per step (+ test_acc / test_loss at evals)
    <grid>/runs/<run_id>/blocks.parquet   probe records (step, block, stage, index, stat, value)
    <grid>/runs/<run_id>/flight.parquet   diverged runs only: every step's block statistics
                                          up to the divergence (sigprop.recorder)
    <grid>/runs/<run_id>/checkpoint.pt    resumable training state
    <grid>/frontier.parquet             `frontier` only: one row per cell (ablations.frontier)

Every file is written atomically (temporary file in the same folder, fsync, rename), and the
status is written last: a run is a result only when its status says completed or diverged.

A file that cannot be read (cut short, random bytes, not JSON / parquet, or JSON whose fields
have the wrong types) makes its run ``damaged``: ``status`` and the report show the file and
the reason and go on with the other runs; the next ``run`` moves the file aside to
``<name>.damaged-<time>`` (never deleting it) and runs the run again.
A per-run lock (an flock on ``.lock``, released by the OS when its process dies, the file never
removed so no two processes can lock different inodes) makes sure two runner processes never
execute the same run at once. Readers check it with a shared flock on a read-only descriptor,
so they need no write access: a read-only store (a chmod, a read-only mount) reads as any other.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import platform
import socket
import subprocess
import time
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import numpy
import pandas as pd
import pyarrow.parquet as pq
import tomli_w

import sigprop
from ablations.constants import DAMAGED, FINISHED, STATES
from ablations.keys import applied_values, flatten
from sigprop.diagnosis import FIELDS as DIAGNOSIS_FIELDS
from sigprop.errors import UserError
from sigprop.files import atomic_path, writable_dir_error

RESULT_FILES = ("metrics.parquet", "blocks.parquet")
FLIGHT_FILE = "flight.parquet"  # a diverged run's flight record (sigprop.recorder), if any
PROGRESS_FILE = "progress.json"  # written by the worker every few seconds while a run trains
FRONTIER_FILE = "frontier.parquet"  # written by ablations.frontier


class DamagedFile(Exception):
    """A stored file exists but cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None if there is no file; :class:`DamagedFile` if it
    cannot be read as one."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise DamagedFile(path, f"not valid JSON ({err.msg}: line {err.lineno} column "
                                 f"{err.colno})") from None
    except OSError as err:
        raise DamagedFile(path, f"cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise DamagedFile(path, f"holds a {type(data).__name__}, not a JSON object")
    return data


# ----------------------------------------------------------------------------- field types
# Every field a reader uses is checked where it is read: a file that is valid JSON but holds a
# list or a string where an object or a number belongs makes its run damaged, as unparsable
# JSON does, instead of a traceback in whatever reads it next. Unknown fields pass (a newer
# version may add some).

KIND_NAMES = {"null": "null", "bool": "true/false", "integer": "an integer", "number": "a number",
              "string": "a string", "list": "a list", "object": "an object"}
NUMBER, TEXT = ("number", "null"), ("string", "null")
STATUS_FIELDS: dict[str, tuple[str, ...]] = {
    "state": ("string",), "attempts": ("integer",), "pid": ("integer", "null"),
    "queued_at": NUMBER, "started_at": NUMBER, "finished_at": NUMBER, "interrupted_at": NUMBER,
    "duration_s": NUMBER, "device": TEXT, "error": TEXT, "traceback": TEXT, "repaired": TEXT,
    "restarted": TEXT, "summary": ("object", "null"), "warnings": ("list", "null"),
    "environment": ("object", "null"), "earlier_environment": ("object", "null"),
}
SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "final_acc": NUMBER, "best_acc": NUMBER, "diverged_step": ("integer", "null"),
    "max_grad_norm": NUMBER, "clip_fraction": NUMBER, "steps_done": ("integer", "null"),
    "steps": ("integer", "null"), "duration_s": NUMBER, "gain_clip_ratio": NUMBER,
    "var_growth": NUMBER, "var_growth_rel": NUMBER, "test_images": ("integer", "null"),
    "diverged_block": TEXT, "diverged_first_step": ("integer", "null"),
    "diverged_first_stat": TEXT, "diverged_first_kind": TEXT,
    "diverged_clipping_active": ("bool", "null"), "diagnosis": TEXT,
}
ENVIRONMENT_FIELDS: dict[str, tuple[str, ...]] = {
    "threads": ("integer", "null"), "interop_threads": ("integer", "null"),
    "deterministic": ("bool", "null"), "torch": TEXT, "device": TEXT,
}
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "run_id": TEXT, "grid": TEXT, "axes": ("object",), "config": ("object",),
    "label": TEXT, "model_departures": ("object", "null"), "effective": ("object", "null"),
}
EFFECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "lr": NUMBER, "clip.mode": TEXT, "clip.threshold": NUMBER,
}
PROGRESS_FIELDS: dict[str, tuple[str, ...]] = {
    "step": ("integer",), "total": ("integer", "null"), "loss": NUMBER, "at": NUMBER,
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind, classes in (("bool", bool), ("integer", int), ("number", float), ("string", str),
                        ("list", list), ("object", dict)):
        if isinstance(value, classes):
            return kind
    return type(value).__name__


def _fits(value: Any, kinds: tuple[str, ...]) -> bool:
    kind = _kind(value)
    return kind in kinds or (kind == "integer" and "number" in kinds)


def _held(value: Any) -> str:
    kind = _kind(value)
    return KIND_NAMES.get(kind, kind)


def _wanted(kinds: tuple[str, ...]) -> str:
    return " or ".join(KIND_NAMES[k] for k in kinds)


def check_fields(path: Path, data: dict, fields: dict[str, tuple[str, ...]],
                 prefix: str = "") -> None:
    """:class:`DamagedFile` naming ``path`` and the first field of ``data`` whose JSON type is
    not one of those ``fields`` allows."""
    for key, kinds in fields.items():
        if key in data and not _fits(data[key], kinds):
            raise DamagedFile(path, f"field '{prefix}{key}' holds {_held(data[key])}, not "
                                    f"{_wanted(kinds)}")


def _hint_kinds(hint: Any) -> tuple[str, ...]:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = []
    for option in options:
        origin = typing.get_origin(option)
        kinds.append({type(None): "null", bool: "bool", int: "integer", float: "number",
                      str: "string"}.get(option) or
                     ("list" if origin in (tuple, list) or option in (tuple, list) else "object"))
    return tuple(kinds)


def _dataclass_fields(cls: Any) -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    return {f.name: _hint_kinds(hints[f.name]) for f in dataclasses.fields(cls)}


_TRAIN_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {}


def train_config_fields() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """The JSON kinds of TrainConfig's and ClipConfig's fields, from their annotations."""
    if not _TRAIN_FIELDS:
        from sigprop.clipping import ClipConfig  # lazy: torch
        from sigprop.train import TrainConfig  # lazy: torch

        train = _dataclass_fields(TrainConfig)
        train["augment"] += ("bool",)  # stores before the names: true/false (still accepted)
        _TRAIN_FIELDS.update(train=train, clip=_dataclass_fields(ClipConfig))
    return _TRAIN_FIELDS["train"], _TRAIN_FIELDS["clip"]


def check_status(path: Path, data: dict) -> dict:
    """``data`` (a run's status.json) if every field a reader uses has its type."""
    check_fields(path, data, STATUS_FIELDS)
    if "state" in data and data["state"] not in STATES:
        raise DamagedFile(path, f"field 'state' is {data['state']!r}, not one of "
                                f"{', '.join(STATES)}")
    if data.get("attempts", 0) < 0:
        raise DamagedFile(path, f"field 'attempts' is {data['attempts']}, below 0")
    for key, fields in (("summary", SUMMARY_FIELDS), ("environment", ENVIRONMENT_FIELDS),
                        ("earlier_environment", ENVIRONMENT_FIELDS)):
        if data.get(key) is not None:
            check_fields(path, data[key], fields, f"{key}.")
    for i, line in enumerate(data.get("warnings") or ()):
        if not isinstance(line, str):
            raise DamagedFile(path, f"field 'warnings[{i}]' holds {_held(line)}, not a string")
    return data


def check_config(path: Path, data: dict) -> dict:
    """``data`` (a run's config.json) if every field a reader uses has its type: the record's
    own fields, and the training config's known keys (unknown ones pass: a config written by
    another version)."""
    if not isinstance(data.get("config"), dict):
        raise DamagedFile(path, "has no 'config' table")
    check_fields(path, data, CONFIG_FIELDS)
    if data.get("effective") is not None:
        check_fields(path, data["effective"], EFFECTIVE_FIELDS, "effective.")
    train, clip = train_config_fields()
    config = data["config"]
    check_fields(path, config, train, "config.")
    if isinstance(config.get("clip"), dict):
        check_fields(path, config["clip"], clip, "config.clip.")
    if isinstance(config.get("model"), dict) and "name" in config["model"]:
        check_fields(path, config["model"], {"name": ("string",)}, "config.model.")
    return data


def parquet_damage(path: Path) -> str | None:
    """Why ``path`` is not a readable parquet file (footer and schema), or None."""
    try:
        pq.read_metadata(path)
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # noqa: BLE001 - ArrowInvalid, OSError...: all mean unreadable
        return _parquet_reason(path, err)
    return None


def _parquet_reason(path: Path, err: Exception) -> str:
    text = (str(err).splitlines() or [type(err).__name__])[0]
    text = text.replace(f"Could not open Parquet input source '{path}': ", "")
    return f"not a readable parquet file ({text.split('. ')[0].rstrip('.')})"


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - see parquet_damage
        raise DamagedFile(path, _parquet_reason(path, err)) from None


def set_aside(path: Path, tag: str = "damaged") -> Path:
    """Rename a file to ``<name>.<tag>-<time>`` beside it (kept, never deleted); ``tag`` says
    why: ``damaged``, or ``env`` for a run made again under another environment."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target


def environment(device: str | None = None) -> dict:
    """What a run ran under, as this process has it set now: versions, machine, device, and
    what changes its numbers besides its config (``threads``, ``deterministic``; see
    :data:`NUMERIC_ENVIRONMENT`)."""
    import torch  # lazy: torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "sigprop": sigprop.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": device,
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
        env["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        env["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return env


# The recorded environment keys that change a run's numbers for the same config: a stored run
# made under other values is not what a rerun here would store.
NUMERIC_ENVIRONMENT = ("threads", "torch", "device", "deterministic")


def numeric_environment(threads: int, deterministic: bool, device: str) -> dict:
    """The :data:`NUMERIC_ENVIRONMENT` a run started now by this process would record."""
    import torch  # lazy: torch

    return {"threads": threads, "torch": torch.__version__, "device": device,
            "deterministic": bool(deterministic)}


def env_value(key: str, value: Any) -> Any:
    """A recorded environment value as compared: the device kind, not its index."""
    if key == "device" and isinstance(value, str):
        return value.split(":")[0]  # cuda:0 and cuda:1 are the same kind of device
    return value


def environment_differences(recorded: Any, current: dict) -> list[str]:
    """How a run's recorded environment differs from ``current`` in the keys that change its
    numbers: ["threads 2 vs 1", "deterministic not recorded"...]; [] when it matches. A store
    written before a key was recorded says "not recorded" for it."""
    recorded = recorded if isinstance(recorded, dict) else {}
    out = []
    for key in NUMERIC_ENVIRONMENT:
        if key not in current:
            continue
        if recorded.get(key) is None:
            out.append(f"{key} not recorded")
        elif env_value(key, recorded[key]) != env_value(key, current[key]):
            out.append(f"{key} {env_value(key, recorded[key])} vs "
                       f"{env_value(key, current[key])}")
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class GridStore:
    """One grid's folder: run directories, their configs, statuses and results."""

    def __init__(self, root: str | Path, grid: str):
        self.root = Path(root)
        self.grid = grid
        self.dir = self.root / grid
        self.runs_dir = self.dir / "runs"

    # -- set-up
    def prepare(self, spec_toml: dict, runs: list) -> None:
        """Write the spec and a queued entry for every new run; existing runs are untouched."""
        why = writable_dir_error(self.runs_dir)
        if why:
            raise UserError(f"cannot write results to {self.dir}: {why}")
        try:
            self._write_entries(tomli_w.dumps(spec_toml), runs)
        except OSError as err:  # a full disk: what is written stays valid (atomic writes)
            raise UserError(f"cannot write results to {self.dir}: "
                            f"{err.strerror or err}") from None

    def _write_entries(self, text: str, runs: list) -> None:
        spec_path = self.dir / "spec.toml"
        if spec_path.exists() and spec_path.read_bytes() != text.encode():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            write_bytes(self.dir / f"spec.{stamp}.toml", spec_path.read_bytes())
        write_bytes(spec_path, text.encode())
        self.add_runs(runs)

    def add_runs(self, runs: list) -> None:
        """A config and a queued status for each run not stored yet (the frontier search adds
        its probes one by one this way); stored runs are untouched."""
        for run in runs:
            run_dir = self.run_dir(run.run_id)
            if (run_dir / "config.json").exists():
                continue
            write_json(
                run_dir / "config.json",
                {"run_id": run.run_id, "grid": self.grid, "axes": run.axes, "config": run.config,
                 "label": run.label, "model_departures": run.departures,
                 "effective": run.effective},
            )
            write_json(run_dir / "status.json", {"state": "queued", "attempts": 0,
                                                 "queued_at": time.time()})

    # -- reading
    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def run_ids(self) -> list[str]:
        """The runs stored (a folder with a config.json; one this process cannot look into
        counts too: reading it then says why it cannot be read)."""
        if not self.runs_dir.is_dir():
            return []
        try:
            folders = list(self.runs_dir.iterdir())
        except OSError as err:
            raise UserError(f"cannot list the runs in {self.runs_dir}: "
                            f"{err.strerror or err}") from None
        return sorted(p.name for p in folders if _has_config(p))

    def config(self, run_id: str) -> dict:
        """The run's config.json; :class:`DamagedFile` when it cannot be read or a field has
        the wrong type (see :func:`check_config`)."""
        path = self.run_dir(run_id) / "config.json"
        data = read_json(path)
        if data is None:
            raise UserError(f"run {run_id} has no config.json in {self.runs_dir}")
        return check_config(path, data)

    def status(self, run_id: str) -> dict:
        """The run's status; raises :class:`DamagedFile` when status.json cannot be read or a
        field has the wrong type (see :func:`check_status`)."""
        path = self.run_dir(run_id) / "status.json"
        data = read_json(path)
        return {"state": "queued", "attempts": 0} if data is None else check_status(path, data)

    def state(self, run_id: str) -> str:
        return self.status(run_id).get("state", "queued")

    def progress(self, run_id: str) -> dict | None:
        """The run's last progress record ({"step", "total", "loss", "at"}), or None; best
        effort: an unreadable record, or one with a field of the wrong type, reads as none."""
        path = self.run_dir(run_id) / PROGRESS_FILE
        try:
            data = read_json(path)
            if data is not None:
                check_fields(path, data, PROGRESS_FIELDS)
        except DamagedFile:
            return None
        return data

    def damage(self, run_id: str, status: dict | None = None) -> DamagedFile | None:
        """The first unreadable file of a run (config, status, and a finished run's results)."""
        run_dir = self.run_dir(run_id)
        try:
            if (run_dir / "config.json").exists():
                self.config(run_id)
            status = self.status(run_id) if status is None else status
        except DamagedFile as err:
            return err
        if status.get("state") in FINISHED:
            for name in RESULT_FILES:
                why = parquet_damage(run_dir / name)
                if why:
                    return DamagedFile(run_dir / name, why)
        if status.get("state") == "diverged":
            why = parquet_damage(run_dir / FLIGHT_FILE)
            if why not in (None, "missing"):  # a run without a recorder has none
                return DamagedFile(run_dir / FLIGHT_FILE, why)
        return None

    def repair(self, run: Any) -> str | None:
        """Make a damaged run runnable again: move its unreadable files aside, rewrite its
        config (from the spec's run) and a queued status. Returns what was done, or None if
        the run was not damaged or is held by another process (it repairs it then)."""
        found = self.damage(run.run_id)
        if found is None:
            return None
        lock = self.lock(run.run_id)
        if not lock.acquire():
            return None
        try:
            run_dir = self.run_dir(run.run_id)
            moved = []
            for name in ("config.json", "status.json", *RESULT_FILES, FLIGHT_FILE):
                path = run_dir / name
                damaged = (parquet_damage(path) not in (None, "missing")
                           if name.endswith(".parquet") else _json_damaged(path))
                if damaged:
                    moved.append(set_aside(path).name)
            if not (run_dir / "config.json").exists():
                write_json(run_dir / "config.json", {"run_id": run.run_id, "grid": self.grid,
                                                     "axes": run.axes, "config": run.config,
                                                     "effective": run.effective})
            try:
                previous = self.status(run.run_id)
            except DamagedFile:
                previous = {}
            note = f"{found.path.name} was damaged ({found.reason}); kept as {', '.join(moved)}"
            write_json(run_dir / "status.json", {
                "state": "queued", "attempts": previous.get("attempts", 0),
                "queued_at": time.time(), "repaired": note,
            })
            return note
        finally:
            lock.release()

    def restart(self, run_id: str, why: str) -> list[str] | None:
        """Make a stored run run again from step 0: its checkpoint, results and status are
        moved aside as ``<name>.env-<time>`` (kept, never deleted) and a queued status says
        ``why``. Returns the names kept, or None when another process holds the run."""
        lock = self.lock(run_id)
        if not lock.acquire():
            return None
        try:
            run_dir = self.run_dir(run_id)
            # the checkpoint first: a queued run beside a finished checkpoint would take the
            # old result back at once; the status last, so a cut-short restart reads damaged
            kept = [set_aside(run_dir / name, "env").name
                    for name in ("checkpoint.pt", PROGRESS_FILE, *RESULT_FILES, FLIGHT_FILE,
                                 "status.json")
                    if (run_dir / name).is_file()]
            write_json(run_dir / "status.json", {
                "state": "queued", "attempts": 0, "queued_at": time.time(),
                "restarted": f"{why}; kept as {', '.join(kept)}"})
            return kept
        finally:
            lock.release()

    # -- writing
    def update_status(self, run_id: str, **fields: Any) -> dict:
        status = {**self.status(run_id), **fields}
        write_json(self.run_dir(run_id) / "status.json", status)
        return status

    def write_results(self, run_id: str, metrics: pd.DataFrame, blocks: pd.DataFrame,
                      flight: pd.DataFrame | None = None, **status_fields: Any) -> dict:
        """The run's parquet files (``flight``: a diverged run's flight record, written when
        given), then its status."""
        run_dir = self.run_dir(run_id)
        write_parquet(run_dir / "metrics.parquet", metrics)
        write_parquet(run_dir / "blocks.parquet", blocks)
        if flight is not None:
            write_parquet(run_dir / FLIGHT_FILE, flight)
        return self.update_status(run_id, **status_fields)  # last: makes the run a result

    def lock(self, run_id: str) -> RunLock:
        return RunLock(self.run_dir(run_id) / ".lock")

    def is_locked(self, run_id: str) -> bool:
        """Whether a live process holds the run's lock, checked without write access (a
        reader of a read-only store); :class:`LockUnchecked` when it cannot be checked."""
        return self.lock(run_id).held()


def _has_config(run_dir: Path) -> bool:
    try:
        return (run_dir / "config.json").exists()
    except OSError:  # a folder we may not enter (EACCES): a run we cannot read
        return run_dir.is_dir()


def _json_damaged(path: Path) -> bool:
    """Whether a run's config.json or status.json cannot be read or has a field of the wrong
    type."""
    try:
        data = read_json(path)
        if data is not None:
            (check_config if path.name == "config.json" else check_status)(path, data)
    except DamagedFile:
        return True
    return False


class LockUnchecked(Exception):
    """A run's lock could not be checked (``reason``: why); its state is then as stored."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class RunLock:
    """Exclusive, non-blocking flock on a file that is never deleted."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def held(self) -> bool:
        """Whether another process holds the lock. Needs only read access: a shared flock
        on a read-only descriptor fails exactly while someone holds the exclusive one, and
        creates nothing. No lock file: nobody ever locked it (lockers create it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise LockUnchecked(self.path, f"cannot be opened ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as err:
            raise LockUnchecked(self.path, f"cannot be locked ({err.strerror or err})") from None
        finally:
            os.close(fd)  # closing drops the shared lock
        return False

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- loading


class Results:
    """Frames read from a store: ``runs`` (one row per run), ``metrics``, ``blocks``,
    ``flight`` (the diverged runs' flight records; empty with :data:`FLIGHT_COLUMNS` when
    none) and ``frontier`` (one row per cell of the grids that ``frontier`` searched; None if
    none)."""

    def __init__(self, runs: pd.DataFrame, metrics: pd.DataFrame, blocks: pd.DataFrame,
                 specs: dict[str, str], frontier: pd.DataFrame | None = None,
                 flight: pd.DataFrame | None = None):
        self.runs, self.metrics, self.blocks, self.specs = runs, metrics, blocks, specs
        self.frontier = frontier
        self.flight = empty_flight_frame() if flight is None else flight

    def __repr__(self) -> str:
        counts = self.runs["status"].value_counts().to_dict() if len(self.runs) else {}
        return f"Results({len(self.runs)} runs: {counts})"


SUMMARY_COLUMNS = [
    "final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
    "steps_done", "duration_s", "gain_clip_ratio", "var_growth", "var_growth_rel",
    "test_images", *DIAGNOSIS_FIELDS,
]
# The summary columns that hold text or true/false (the diagnosis, sigprop.diagnosis); every
# other one is a number.
NON_NUMERIC_SUMMARY_COLUMNS = tuple(k for k, kinds in SUMMARY_FIELDS.items()
                                    if not {"number", "integer"} & set(kinds))
FLIGHT_COLUMNS = ["grid", "run_id", "step", "block", "stage", "index", "stat", "value"]


# The runs frame's columns besides the run's config (which ``load_results`` adds flattened to
# dotted keys, as the run uses it: ``applied_values``), each with what it holds. One place for
# the schema: load_results's docstring gives the rules behind them, and
# tests/test_runs_schema.py checks a store's frame against this.
RUN_COLUMNS: dict[str, str] = {
    "grid": "the grid folder's name",
    "run_id": "the run's id (a hash of its canonical config)",
    "status": "queued / running / interrupted / completed / diverged / failed / damaged",
    "error": "why a run failed or is damaged; None otherwise",
    "axes": "the keys the grid varied for this run (a tuple)",
    "model_label": "the model as built, e.g. 'NF-ResNet [1,1,1,1] x0.125'",
    "model_departures": "{model option: registry default} for the options the run changes",
    **{name: "summary: " + ("the diagnosis of a diverged run (sigprop.diagnosis)"
                            if name in DIAGNOSIS_FIELDS else name.replace("_", " "))
       for name in SUMMARY_COLUMNS},
    "acc_chance": "final_acc with a diverged run counted at chance (1 / classes)",
    "warnings": "lines the run raised about itself (a tuple)",
    **{f"env.{key}": f"the run's recorded {key}" for key in NUMERIC_ENVIRONMENT},
    "env.earlier": "for a run resumed under other environment values, those values as text",
}


def empty_flight_frame() -> pd.DataFrame:
    from sigprop.recorder import empty_flight  # lazy: torch

    frame = empty_flight()
    frame.insert(0, "run_id", pd.Series(dtype="object"))
    frame.insert(0, "grid", pd.Series(dtype="object"))
    return frame


def chance_accuracy(config: dict, state: str, final_acc: Any) -> float | None:
    """``final_acc`` with a diverged run counted at chance (1 / its number of classes), the
    rule the claims use; None for runs that did not finish."""
    if state == "completed":
        return None if final_acc is None else float(final_acc)
    if state != "diverged":
        return None
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    classes = model.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        from sigprop.data import dataset_info  # lazy: torch

        try:
            classes = dataset_info(config.get("data", "synthetic")).num_classes
        except (UserError, TypeError, ValueError, KeyError):
            return None
    return 1.0 / classes


def mark_differing_keys(rows: list[dict], configs: dict[str, dict]) -> list[dict]:
    """Add to every run's ``axes`` the config keys that differ between runs of one grid folder
    but are no axis: runs stored by an earlier spec with another base value. Without this they
    would look like duplicates in ``status`` and the report. ``configs``: run id -> flattened
    config of the readable runs."""
    axes = sorted({a for row in rows for a in row.get("axes", ())})
    groups: dict[str, list[dict]] = {}  # runs whose axis values look the same
    for config in configs.values():
        groups.setdefault(repr([config.get(a) for a in axes]), []).append(config)
    differing: set[str] = set()
    for group in groups.values():
        for key in {k for config in group for k in config} - set(axes) - {"device"}:
            if len({repr(config[key]) for config in group if key in config}) > 1:
                differing.add(key)
    if differing:
        for row in rows:
            if row["run_id"] in configs:
                row["axes"] = tuple(sorted({*row["axes"], *differing}))
    return rows


def differing_base_keys(store: GridStore, runs: list) -> list[str]:
    """Config keys in which runs already in the grid folder differ from every run of ``runs``
    although no axis varies them (a changed base value rerun into the same --out)."""
    ours = {r.run_id for r in runs}
    mine = [flatten(r.config, hashable=True) for r in runs]
    axes = {a for r in runs for a in r.axes}
    found: set[str] = set()
    for rid in store.run_ids():
        if rid in ours:
            continue
        try:
            record = store.config(rid)
        except DamagedFile:
            continue
        theirs = flatten(record["config"], hashable=True)
        for key in set(theirs) - axes - set(record.get("axes", {})) - {"device"}:
            if all(m.get(key) != theirs[key] for m in mine if key in m):
                found.add(key)
    return sorted(found)


def read_frontier(grid_dir: str | Path) -> pd.DataFrame | None:
    """A grid folder's ``frontier.parquet`` (see :func:`load_results`), or None when the grid
    has none; :class:`DamagedFile` when it cannot be read."""
    path = Path(grid_dir) / FRONTIER_FILE
    if not path.is_file():
        return None
    frame = read_parquet(path)
    # the method that made each row; files from before the column hold bisection rows
    methods = frame["method"] if "method" in frame else pd.Series(None, index=frame.index,
                                                                   dtype=object)
    return frame.assign(method=methods.fillna("bisect").astype(str))


def one_method(frontier: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of one method per grid, for readers that take a row per cell (figures,
    claims): the bisection's where a grid has both, since its edges are measured at fixed
    rates (``run_ablations.py frontier --method``)."""
    if frontier is None or frontier.empty or "method" not in frontier:
        return frontier
    keep = []
    for _, rows in frontier.groupby("grid", sort=False, dropna=False):
        methods = rows["method"].fillna("bisect")
        chosen = "bisect" if methods.eq("bisect").any() else methods.iloc[0]
        keep.append(rows[methods.eq(chosen)])
    return pd.concat(keep).reset_index(drop=True)


def grid_dirs(path: Path) -> list[Path]:
    if (path / "runs").is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "runs").is_dir()) if path.is_dir() else []


def load_results(path: str | Path, with_frames: bool = True) -> Results:
    """Read a grid folder (or an output root holding several grids) into pandas frames.

    ``runs`` has one row per run, its columns :data:`RUN_COLUMNS` plus the config's: grid,
    run_id, status, error, ``model_label`` (the model as built, e.g. "NF-ResNet [1,1,1,1]
    x0.125"; None in stores written before labels), ``model_departures`` ({model option:
    registry default} for the options the run changes), the config flattened to dotted columns
    (``model.name``, ``clip.mode``, ``batch_size``...) as the run uses it
    (:func:`applied_values`: ``lr`` is the peak lr, values the run does not use are None),
    ``axes`` (the keys the grid varied for this run), the summary metrics ``SUMMARY_COLUMNS``
    (``gain_clip_ratio``: the median ratio of zero-initialised gains' gradients to what AGC
    lets through over the first steps, see ``sigprop.gains``; None when no such gain) and
    ``warnings`` (a tuple of lines the run raised about itself). ``acc_chance``: ``final_acc``
    with a diverged run counted at chance (1 / number of classes), as the claims count it: the
    column to average over seeds (``final_acc`` is blank for a diverged run, so its mean
    averages the survivors); None for runs that did not finish. The diagnosis of a diverged run
    (:mod:`sigprop.diagnosis`; all None for other runs): ``diverged_block`` (None where the
    data singles out no block), ``diverged_first_step``, ``diverged_first_stat``,
    ``diverged_first_kind`` (activations / gradients / update), ``diverged_clipping_active``
    and ``diagnosis`` (one line). ``metrics`` and ``blocks`` concatenate every finished run's
    parquet files with ``grid`` and ``run_id``; ``flight`` the diverged runs' flight.parquet
    (every step's block statistics up to the divergence, :mod:`sigprop.recorder`), empty with
    :data:`FLIGHT_COLUMNS` when none has one. ``env.threads``, ``env.torch``, ``env.device``,
    ``env.deterministic``: what the run recorded of :data:`NUMERIC_ENVIRONMENT` (None: not
    recorded, e.g. stores written before it was); ``env.earlier``: for a run resumed from a
    checkpoint made under other values, those values as text, else None. A running run whose
    lock cannot be checked (a store this process may not read the lock of) stays running, its
    ``error`` saying so.

    ``frontier``: the grids' ``frontier.parquet`` rows (written by ``run_ablations.py
    frontier``), None when no grid has one. One row per cell: ``grid``, ``cell_id`` (the
    cell's run-id hash, without a probe lr), ``model_label``, ``axes`` (the keys the cell
    varies), the cell's config flattened to dotted columns (no ``lr`` / ``base_lr``),
    ``status`` (found / stable_to_lr_max / unstable_at_lr_min / failed / incomplete),
    ``reason`` (why the search ended short; empty when found), ``max_stable_lr`` (NaN when no
    probe was stable), ``min_unstable_lr`` (NaN when none was unstable), ``final_acc`` (of the
    probe at max_stable_lr), ``n_probes``, ``probe_lrs`` and ``probe_stable`` (the probes in lr
    order), ``lr_min``, ``lr_max``, ``resolution``, ``probe_steps``, ``method`` ("bisect" or
    "range-test": what found the edge; a grid searched both ways has a row per cell and
    method, :func:`one_method` keeps one). A frontier file that cannot be read is left out
    with a warning.
    """
    path = Path(path)
    try:
        grids = grid_dirs(path)
    except OSError as err:  # a folder this process may not enter
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if not grids:
        raise UserError(f"no results found in {path} (expected <grid>/runs/<run_id>/...)")
    rows, metrics, blocks, flights, specs, frontiers = [], [], [], [], {}, []
    for grid_dir in grids:
        store = GridStore(grid_dir.parent, grid_dir.name)
        spec_path = grid_dir / "spec.toml"
        try:
            specs[grid_dir.name] = spec_path.read_text() if spec_path.exists() else ""
        except (OSError, UnicodeDecodeError):
            specs[grid_dir.name] = ""
        grid_rows, configs = [], {}
        for rid in store.run_ids():
            row = {"grid": grid_dir.name, "run_id": rid}
            try:
                cfg, status = store.config(rid), store.status(rid)
            except DamagedFile as err:
                grid_rows.append({**row, "status": DAMAGED, "axes": (),
                                  "error": f"{err.path.name}: {err.reason}"})
                continue
            state = status.get("state", "queued")
            unchecked = None
            if state == "running":
                try:
                    if not store.is_locked(rid):
                        state = "interrupted"  # its process is gone; resumable from the checkpoint
                except LockUnchecked as err:
                    unchecked = (f"{err.path.name} {err.reason}: shown as running, it may have "
                                 f"been interrupted")
            summary = status.get("summary") or {}
            if "steps" in summary and "steps_done" not in summary:  # stores before the rename
                summary = {**summary, "steps_done": summary["steps"]}
            row.update({"status": state, "error": status.get("error") or unchecked,
                        "axes": tuple(sorted(cfg.get("axes", {}))),
                        "model_label": cfg.get("label") or None,
                        "model_departures": cfg.get("model_departures") or {}})
            configs[rid] = flatten(cfg["config"], hashable=True)
            row.update(applied_values(cfg["config"], cfg.get("effective")))
            row.update({k: summary.get(k) for k in SUMMARY_COLUMNS})
            row["acc_chance"] = chance_accuracy(cfg["config"], state, summary.get("final_acc"))
            row["warnings"] = tuple(status.get("warnings") or ())
            env = status.get("environment") or {}
            row.update({f"env.{key}": env.get(key) for key in NUMERIC_ENVIRONMENT})
            earlier = status.get("earlier_environment")
            row["env.earlier"] = None if earlier is None else ", ".join(
                f"{key} {earlier.get(key, 'not recorded')}" for key in NUMERIC_ENVIRONMENT)
            if state in FINISHED:
                run_dir = store.run_dir(rid)
                frames = []
                try:
                    files = [("metrics", metrics), ("blocks", blocks)]
                    if state == "diverged" and (run_dir / FLIGHT_FILE).exists():
                        files.append(("flight", flights))  # none: run without a recorder
                    for name, sink in files:
                        file = run_dir / f"{name}.parquet"
                        if not with_frames:
                            why = parquet_damage(file)
                            if why:
                                raise DamagedFile(file, why)
                        elif file.exists():
                            frame = read_parquet(file)
                            frame.insert(0, "run_id", rid)
                            frame.insert(0, "grid", grid_dir.name)
                            frames.append((sink, frame))
                        else:
                            raise DamagedFile(file, "missing")
                except DamagedFile as err:
                    row.update(status=DAMAGED, error=f"{err.path.name}: {err.reason}")
                else:
                    for sink, frame in frames:
                        sink.append(frame)
            grid_rows.append(row)
        rows += mark_differing_keys(grid_rows, configs)
        if (grid_dir / FRONTIER_FILE).is_file():
            try:
                frontiers.append(read_frontier(grid_dir))
            except DamagedFile as err:
                warnings.warn(f"{err}; the grid's frontier is left out", stacklevel=2)
    runs = pd.DataFrame(rows)
    return Results(
        runs,
        pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(),
        pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(),
        specs,
        pd.concat(frontiers, ignore_index=True) if frontiers else None,
        pd.concat(flights, ignore_index=True) if flights else None,
    )

"""One grid's folder: its run directories, their configs and statuses, the per-run locks, and
the writing of a run's results (the layout, the atomic writes and the locks are described in
``ablations.store``, which re-exports everything here).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w

from ablations.constants import FINISHED
from ablations.storefiles import (
    PROGRESS_FIELDS,
    DamagedFile,
    check_config,
    check_fields,
    check_status,
    parquet_damage,
    read_json,
    set_aside,
    write_bytes,
    write_json,
    write_parquet,
)
from sigprop.errors import UserError
from sigprop.files import writable_dir_error

# the public names, all re-exported by ablations.store
__all__ = [
    "FLIGHT_FILE", "FRONTIER_FILE", "PROGRESS_FILE", "RESULT_FILES", "GridStore", "LockUnchecked",
    "RunLock",
]

RESULT_FILES = ("metrics.parquet", "blocks.parquet")
FLIGHT_FILE = "flight.parquet"  # a diverged run's flight record (sigprop.recorder), if any
PROGRESS_FILE = "progress.json"  # written by the worker every few seconds while a run trains
FRONTIER_FILE = "frontier.parquet"  # written by ablations.frontier


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

"""Results on disk, crash-safe.

Layout under the output root (``runs/`` by default)::

    <grid>/spec.toml                    the resolved spec of the latest invocation
    <grid>/runs/<run_id>/config.json    {"run_id", "grid", "axes", "config", "label",
                                         "model_departures": {option: registry default}}
    <grid>/runs/<run_id>/status.json    state, timings, attempts, summary, error, environment
    <grid>/runs/<run_id>/metrics.parquet  one row per step (+ test_acc / test_loss at evals)
    <grid>/runs/<run_id>/blocks.parquet   probe records (step, block, stage, index, stat, value)
    <grid>/runs/<run_id>/checkpoint.pt    resumable training state

Every file is written atomically (temporary file in the same folder, fsync, rename), and the
status is written last: a run is a result only when its status says completed or diverged.
A per-run lock (an flock on ``.lock``, released by the OS when its process dies, the file never
removed so no two processes can lock different inodes) makes sure two runner processes never
execute the same run at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sigprop.errors import UserError
from sigprop.files import atomic_path, writable_dir_error

STATES = ("queued", "running", "completed", "diverged", "failed")
FINISHED = ("completed", "diverged")


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
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def environment(device: str | None = None) -> dict:
    import numpy
    import torch

    import sigprop

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
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


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
        import tomli_w

        why = writable_dir_error(self.runs_dir)
        if why:
            raise UserError(f"cannot write results to {self.dir}: {why}")
        text = tomli_w.dumps(spec_toml)
        spec_path = self.dir / "spec.toml"
        if spec_path.exists() and spec_path.read_text() != text:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            write_bytes(self.dir / f"spec.{stamp}.toml", spec_path.read_bytes())
        write_bytes(spec_path, text.encode())
        for run in runs:
            run_dir = self.run_dir(run.run_id)
            if (run_dir / "config.json").exists():
                continue
            write_json(
                run_dir / "config.json",
                {"run_id": run.run_id, "grid": self.grid, "axes": run.axes, "config": run.config,
                 "label": run.label, "model_departures": run.departures},
            )
            write_json(run_dir / "status.json", {"state": "queued", "attempts": 0,
                                                 "queued_at": time.time()})

    # -- reading
    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def run_ids(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if (p / "config.json").exists())

    def config(self, run_id: str) -> dict:
        data = read_json(self.run_dir(run_id) / "config.json")
        if data is None:
            raise UserError(f"run {run_id} has no config.json in {self.runs_dir}")
        return data

    def status(self, run_id: str) -> dict:
        return read_json(self.run_dir(run_id) / "status.json") or {"state": "queued", "attempts": 0}

    def state(self, run_id: str) -> str:
        return self.status(run_id).get("state", "queued")

    # -- writing
    def update_status(self, run_id: str, **fields: Any) -> dict:
        status = {**self.status(run_id), **fields}
        write_json(self.run_dir(run_id) / "status.json", status)
        return status

    def write_results(self, run_id: str, metrics: pd.DataFrame, blocks: pd.DataFrame,
                      **status_fields: Any) -> dict:
        run_dir = self.run_dir(run_id)
        write_parquet(run_dir / "metrics.parquet", metrics)
        write_parquet(run_dir / "blocks.parquet", blocks)
        return self.update_status(run_id, **status_fields)  # last: makes the run a result

    def lock(self, run_id: str) -> RunLock:
        return RunLock(self.run_dir(run_id) / ".lock")

    def is_locked(self, run_id: str) -> bool:
        lock = self.lock(run_id)
        if not lock.acquire():
            return True
        lock.release()
        return False


class RunLock:
    """Exclusive, non-blocking flock on a file that is never deleted."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

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
    """Frames read from a store: ``runs`` (one row per run), ``metrics``, ``blocks``."""

    def __init__(self, runs: pd.DataFrame, metrics: pd.DataFrame, blocks: pd.DataFrame,
                 specs: dict[str, str]):
        self.runs, self.metrics, self.blocks, self.specs = runs, metrics, blocks, specs

    def __repr__(self) -> str:
        counts = self.runs["status"].value_counts().to_dict() if len(self.runs) else {}
        return f"Results({len(self.runs)} runs: {counts})"


SUMMARY_COLUMNS = [
    "final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
    "steps_done", "duration_s", "gain_clip_ratio", "var_growth",
]


def flatten_config(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def grid_dirs(path: Path) -> list[Path]:
    if (path / "runs").is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "runs").is_dir()) if path.is_dir() else []


def load_results(path: str | Path, with_frames: bool = True) -> Results:
    """Read a grid folder (or an output root holding several grids) into pandas frames.

    ``runs`` has one row per run: grid, run_id, status, error, ``model_label`` (the model as
    built, e.g. "NF-ResNet [1,1,1,1] x0.125"; None in stores written before labels),
    ``model_departures`` ({model option: registry default} for the options the run changes), the
    config flattened to dotted columns (``model.name``, ``clip.mode``, ``batch_size``...),
    ``axes`` (the keys the grid varied for this run), the summary metrics ``SUMMARY_COLUMNS``
    (``gain_clip_ratio``: the median ratio of zero-initialised gains' gradients to what AGC
    lets through over the first steps, see ``sigprop.gains``; None when no such gain) and
    ``warnings`` (a tuple of lines the run raised about itself). ``metrics`` and ``blocks``
    concatenate every finished run's parquet files with ``grid`` and ``run_id``.
    """
    path = Path(path)
    grids = grid_dirs(path)
    if not grids:
        raise UserError(f"no results found in {path} (expected <grid>/runs/<run_id>/...)")
    rows, metrics, blocks, specs = [], [], [], {}
    for grid_dir in grids:
        store = GridStore(grid_dir.parent, grid_dir.name)
        spec_path = grid_dir / "spec.toml"
        specs[grid_dir.name] = spec_path.read_text() if spec_path.exists() else ""
        for rid in store.run_ids():
            cfg, status = store.config(rid), store.status(rid)
            state = status.get("state", "queued")
            if state == "running" and not store.is_locked(rid):
                state = "interrupted"  # its process is gone; resumable from the checkpoint
            summary = status.get("summary", {})
            if "steps" in summary and "steps_done" not in summary:  # stores before the rename
                summary = {**summary, "steps_done": summary["steps"]}
            row = {"grid": grid_dir.name, "run_id": rid, "status": state,
                   "error": status.get("error"), "axes": tuple(sorted(cfg.get("axes", {}))),
                   "model_label": cfg.get("label") or None,
                   "model_departures": cfg.get("model_departures") or {}}
            row.update(flatten_config(cfg["config"]))
            row.update({k: summary.get(k) for k in SUMMARY_COLUMNS})
            row["warnings"] = tuple(status.get("warnings") or ())
            rows.append(row)
            if with_frames and state in FINISHED:
                run_dir = store.run_dir(rid)
                for name, sink in (("metrics", metrics), ("blocks", blocks)):
                    file = run_dir / f"{name}.parquet"
                    if file.exists():
                        frame = pd.read_parquet(file)
                        frame.insert(0, "run_id", rid)
                        frame.insert(0, "grid", grid_dir.name)
                        sink.append(frame)
    runs = pd.DataFrame(rows)
    return Results(
        runs,
        pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(),
        pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(),
        specs,
    )

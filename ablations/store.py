"""Results on disk, crash-safe.

Layout under the output root (``runs/`` by default)::

    <grid>/spec.toml                    the resolved spec of the latest invocation
    <grid>/runs/<run_id>/config.json    {"run_id", "grid", "axes", "config", "label",
                                         "model_departures": {option: registry default},
                                         "effective": {"lr", "clip.mode", "clip.threshold"}}
    <grid>/runs/<run_id>/status.json    state, timings, attempts, summary, error, environment
    <grid>/runs/<run_id>/progress.json  {"step", "total", "loss", "at"} while it trains
    <grid>/runs/<run_id>/metrics.parquet  one row per step (+ test_acc / test_loss at evals)
    <grid>/runs/<run_id>/blocks.parquet   probe records (step, block, stage, index, stat, value)
    <grid>/runs/<run_id>/checkpoint.pt    resumable training state
    <grid>/frontier.parquet             `frontier` only: one row per cell (ablations.frontier)

Every file is written atomically (temporary file in the same folder, fsync, rename), and the
status is written last: a run is a result only when its status says completed or diverged.

A file that cannot be read (cut short, random bytes, not JSON / parquet) makes its run
``damaged``: ``status`` and the report show the file and the reason and go on with the other
runs; the next ``run`` moves the file aside to ``<name>.damaged-<time>`` (never deleting it)
and runs the run again.
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
DAMAGED = "damaged"  # shown by status/report for a run whose files cannot be read
RESULT_FILES = ("metrics.parquet", "blocks.parquet")
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


def parquet_damage(path: Path) -> str | None:
    """Why ``path`` is not a readable parquet file (footer and schema), or None."""
    import pyarrow.parquet as pq

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


def set_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.damaged-<time>`` beside it (kept, never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target


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
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if (p / "config.json").exists())

    def config(self, run_id: str) -> dict:
        path = self.run_dir(run_id) / "config.json"
        data = read_json(path)
        if data is None:
            raise UserError(f"run {run_id} has no config.json in {self.runs_dir}")
        if not isinstance(data.get("config"), dict):
            raise DamagedFile(path, "has no 'config' table")
        return data

    def status(self, run_id: str) -> dict:
        """The run's status; raises :class:`DamagedFile` when status.json cannot be read."""
        return read_json(self.run_dir(run_id) / "status.json") or {"state": "queued", "attempts": 0}

    def state(self, run_id: str) -> str:
        return self.status(run_id).get("state", "queued")

    def progress(self, run_id: str) -> dict | None:
        """The run's last progress record ({"step", "total", "loss", "at"}), or None; best
        effort: an unreadable record reads as none."""
        try:
            return read_json(self.run_dir(run_id) / PROGRESS_FILE)
        except DamagedFile:
            return None

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
            for name in ("config.json", "status.json", *RESULT_FILES):
                path = run_dir / name
                damaged = (parquet_damage(path) not in (None, "missing") if name in RESULT_FILES
                           else _json_damaged(path))
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


def _json_damaged(path: Path) -> bool:
    try:
        data = read_json(path)
    except DamagedFile:
        return True
    return path.name == "config.json" and data is not None and not isinstance(
        data.get("config"), dict)


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
    """Frames read from a store: ``runs`` (one row per run), ``metrics``, ``blocks``, and
    ``frontier`` (one row per cell of the grids that ``frontier`` searched; None if none)."""

    def __init__(self, runs: pd.DataFrame, metrics: pd.DataFrame, blocks: pd.DataFrame,
                 specs: dict[str, str], frontier: pd.DataFrame | None = None):
        self.runs, self.metrics, self.blocks, self.specs = runs, metrics, blocks, specs
        self.frontier = frontier

    def __repr__(self) -> str:
        counts = self.runs["status"].value_counts().to_dict() if len(self.runs) else {}
        return f"Results({len(self.runs)} runs: {counts})"


SUMMARY_COLUMNS = [
    "final_acc", "best_acc", "diverged_step", "max_grad_norm", "clip_fraction",
    "steps_done", "duration_s", "gain_clip_ratio", "var_growth", "var_growth_rel",
    "test_images",
]


def flatten_config(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


AGC_ONLY_KEYS = ("clip.eps", "clip.exclude", "clip.clip_classifier")


def applied_values(config: dict, effective: dict | None = None) -> dict:
    """A run's config flattened to dotted keys as the trainer uses it: ``lr`` is the peak
    learning rate, the clipping is as applied (``effective``, the record config.json holds;
    computed from ``config`` for stores written before it), and a value the run does not use
    is None rather than a stale one: ``clip.threshold`` for mode none, AGC's eps, exclude and
    clip_classifier for the other modes, ``base_lr`` where ``lr`` is given, ``epochs`` where
    ``steps`` is."""
    from ablations.spec import effective_settings

    flat = flatten_config(config)
    if not effective:
        try:
            effective = effective_settings(config)
        except (UserError, TypeError, ValueError):  # a config this version cannot build
            effective = {}
    out = {**flat, **effective}
    if out.get("clip.mode") != "agc":
        out.update({key: None for key in AGC_ONLY_KEYS if key in out})
    if flat.get("lr") is not None and "base_lr" in out:
        out["base_lr"] = None
    if flat.get("steps") is not None and "epochs" in out:
        out["epochs"] = None
    return out


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
    mine = [flatten_config(r.config) for r in runs]
    axes = {a for r in runs for a in r.axes}
    found: set[str] = set()
    for rid in store.run_ids():
        if rid in ours:
            continue
        try:
            record = store.config(rid)
        except DamagedFile:
            continue
        theirs = flatten_config(record["config"])
        for key in set(theirs) - axes - set(record.get("axes", {})) - {"device"}:
            if all(m.get(key) != theirs[key] for m in mine if key in m):
                found.add(key)
    return sorted(found)


def read_frontier(grid_dir: str | Path) -> pd.DataFrame | None:
    """A grid folder's ``frontier.parquet`` (see :func:`load_results`), or None when the grid
    has none; :class:`DamagedFile` when it cannot be read."""
    path = Path(grid_dir) / FRONTIER_FILE
    return read_parquet(path) if path.is_file() else None


def grid_dirs(path: Path) -> list[Path]:
    if (path / "runs").is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "runs").is_dir()) if path.is_dir() else []


def load_results(path: str | Path, with_frames: bool = True) -> Results:
    """Read a grid folder (or an output root holding several grids) into pandas frames.

    ``runs`` has one row per run: grid, run_id, status, error, ``model_label`` (the model as
    built, e.g. "NF-ResNet [1,1,1,1] x0.125"; None in stores written before labels),
    ``model_departures`` ({model option: registry default} for the options the run changes), the
    config flattened to dotted columns (``model.name``, ``clip.mode``, ``batch_size``...) as
    the run uses it (:func:`applied_values`: ``lr`` is the peak lr, values the run does not use
    are None),
    ``axes`` (the keys the grid varied for this run), the summary metrics ``SUMMARY_COLUMNS``
    (``gain_clip_ratio``: the median ratio of zero-initialised gains' gradients to what AGC
    lets through over the first steps, see ``sigprop.gains``; None when no such gain) and
    ``warnings`` (a tuple of lines the run raised about itself). ``metrics`` and ``blocks``
    concatenate every finished run's parquet files with ``grid`` and ``run_id``.

    ``frontier``: the grids' ``frontier.parquet`` rows (written by ``run_ablations.py
    frontier``), None when no grid has one. One row per cell: ``grid``, ``cell_id`` (the
    cell's run-id hash, without a probe lr), ``model_label``, ``axes`` (the keys the cell
    varies), the cell's config flattened to dotted columns (no ``lr`` / ``base_lr``),
    ``status`` (found / stable_to_lr_max / unstable_at_lr_min / failed / incomplete),
    ``reason`` (why the search ended short; empty when found), ``max_stable_lr`` (NaN when no
    probe was stable), ``min_unstable_lr`` (NaN when none was unstable), ``final_acc`` (of the
    probe at max_stable_lr), ``n_probes``, ``probe_lrs`` and ``probe_stable`` (the probes in lr
    order), ``lr_min``, ``lr_max``, ``resolution``, ``probe_steps``. A frontier file that cannot
    be read is left out with a warning.
    """
    path = Path(path)
    grids = grid_dirs(path)
    if not grids:
        raise UserError(f"no results found in {path} (expected <grid>/runs/<run_id>/...)")
    rows, metrics, blocks, specs, frontiers = [], [], [], {}, []
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
            if state == "running" and not store.is_locked(rid):
                state = "interrupted"  # its process is gone; resumable from the checkpoint
            summary = status.get("summary", {})
            if "steps" in summary and "steps_done" not in summary:  # stores before the rename
                summary = {**summary, "steps_done": summary["steps"]}
            row.update({"status": state, "error": status.get("error"),
                        "axes": tuple(sorted(cfg.get("axes", {}))),
                        "model_label": cfg.get("label") or None,
                        "model_departures": cfg.get("model_departures") or {}})
            configs[rid] = flatten_config(cfg["config"])
            row.update(applied_values(cfg["config"], cfg.get("effective")))
            row.update({k: summary.get(k) for k in SUMMARY_COLUMNS})
            row["warnings"] = tuple(status.get("warnings") or ())
            if state in FINISHED:
                run_dir = store.run_dir(rid)
                frames = []
                try:
                    for name, sink in (("metrics", metrics), ("blocks", blocks)):
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
                import warnings

                warnings.warn(f"{err}; the grid's frontier is left out", stacklevel=2)
    runs = pd.DataFrame(rows)
    return Results(
        runs,
        pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(),
        pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(),
        specs,
        pd.concat(frontiers, ignore_index=True) if frontiers else None,
    )

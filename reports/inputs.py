"""What the report reads from a grid's store, checked: the run statuses, the stored spec, the
diagnosis columns, the diverged runs' flight records and the frontier. A store is untrusted
input: nothing here raises on what it holds; what cannot be read is left out and said. The
runs frame needs no check here: the store's readers (``ablations.storefiles.check_status``)
already turn a run whose fields have the wrong type into a damaged one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomllib

from ablations.store import FLIGHT_COLUMNS as STORE_FLIGHT_COLUMNS
from ablations.store import (
    SUMMARY_FIELDS,
    DamagedFile,
    GridStore,
    one_method,
    read_frontier,
    read_parquet,
)
from sigprop.diagnosis import FIELDS as DIAGNOSIS

# summary fields of the diagnosis, each with the type a stored value must have to be shown
DIAGNOSIS_FIELDS = {name: {"string": str, "integer": int, "bool": bool}[SUMMARY_FIELDS[name][0]]
                    for name in DIAGNOSIS}
FLIGHT_COLUMNS = [c for c in STORE_FLIGHT_COLUMNS if c not in ("grid", "run_id")]


def readable_status(store: GridStore, run_id: str) -> dict:
    try:
        return store.status(run_id)
    except DamagedFile:  # listed as damaged by damaged_section
        return {}


def parse_spec(text: str) -> dict:
    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


def grid_frontier(grid_dir: Path) -> pd.DataFrame | None:
    """The grid's frontier.parquet (``run_ablations.py frontier``), None without one."""
    try:  # a row per cell: the bisection's where both methods ran (one_method)
        return one_method(read_frontier(grid_dir))
    except DamagedFile as err:
        warnings.warn(f"{err}; the report leaves the frontier out", stacklevel=2)
        return None


def typed_field(value: Any, kind: type) -> Any:
    """``value`` when it has the field's type (an int that is not a bool; a finite float
    with an integer value counts as an int), else None: a store's fields are untrusted."""
    if isinstance(value, float | np.floating) and kind is int:
        return int(value) if np.isfinite(value) and float(value).is_integer() else None
    if kind is int:
        return int(value) if isinstance(value, int | np.integer) and not isinstance(
            value, bool | np.bool_) else None
    if kind is bool:
        return bool(value) if isinstance(value, bool | np.bool_) else None
    return value if isinstance(value, kind) and value else None


def with_diagnosis(runs: pd.DataFrame, statuses: dict[str, dict]) -> pd.DataFrame:
    """``runs`` with the diagnosis columns (:data:`DIAGNOSIS_FIELDS`): the runs frame's own
    where ``load_results`` gives them, else the run's stored summary; None where neither
    holds a value of the right type."""
    frame = runs.copy()
    for column, kind in DIAGNOSIS_FIELDS.items():
        own = frame[column] if column in frame else pd.Series(None, index=frame.index)
        values = []
        for run_id, value in zip(frame["run_id"], own):
            shown = typed_field(value, kind)
            if shown is None:
                summary = statuses.get(run_id, {}).get("summary")
                if isinstance(summary, dict):
                    shown = typed_field(summary.get(column), kind)
            values.append(shown)
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


def forensic_flight(store: GridStore, results: Any, runs: pd.DataFrame) -> pd.DataFrame | None:
    """The diverged runs' flight records: ``load_results``'s ``flight`` frame where it has
    one, else each diverged run's ``flight.parquet`` (stores read by an ``ablations`` without
    the frame); None when no run has one. A file that cannot be read is left out, warned."""
    diverged = runs.loc[runs["status"].eq("diverged"), "run_id"].tolist()
    flight = getattr(results, "flight", None)
    if isinstance(flight, pd.DataFrame):
        if "run_id" not in flight:
            return None
        part = flight[flight["run_id"].isin(diverged)]
        if "grid" in part:
            part = part[part["grid"] == store.grid]
        return part if len(part) else None
    frames = []
    for run_id in diverged:
        file = store.run_dir(run_id) / "flight.parquet"
        if not file.is_file():
            continue
        try:
            frame = read_parquet(file)
        except DamagedFile as err:
            warnings.warn(f"{err}; the report leaves the flight record of {run_id} out",
                          stacklevel=2)
            continue
        if not set(FLIGHT_COLUMNS) <= set(frame):
            warnings.warn(f"{file} lacks the flight columns "
                          f"{sorted(set(FLIGHT_COLUMNS) - set(frame))}; left out", stacklevel=2)
            continue
        frame = frame[FLIGHT_COLUMNS].copy()
        frame.insert(0, "run_id", run_id)
        frame.insert(0, "grid", store.grid)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None

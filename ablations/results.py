"""Reading a store into frames: :func:`load_results` and its :class:`Results`, the runs
frame's columns (:data:`RUN_COLUMNS`, documented once), the rules behind them
(:func:`chance_accuracy`, :func:`mark_differing_keys`) and the frontier's rows
(:func:`read_frontier`, :func:`one_method`).

Above :mod:`ablations.gridstore` in the layers of ``ablations`` (tests/test_architecture.py):
it reads a :class:`~ablations.gridstore.GridStore`; ``ablations.store`` re-exports it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ablations.chance import chance_of
from ablations.constants import DAMAGED, FINISHED
from ablations.environment import NUMERIC_ENVIRONMENT
from ablations.gridstore import FLIGHT_FILE, FRONTIER_FILE, GridStore, LockUnchecked
from ablations.keys import applied_values, flatten
from ablations.storefiles import SUMMARY_FIELDS, DamagedFile, parquet_damage, read_parquet
from sigprop.diagnosis import FIELDS as DIAGNOSIS_FIELDS
from sigprop.errors import UserError

# the public names, all re-exported by ablations.store
__all__ = [
    "FLIGHT_COLUMNS", "NON_NUMERIC_SUMMARY_COLUMNS", "RUN_COLUMNS", "SUMMARY_COLUMNS", "Results",
    "chance_accuracy", "differing_base_keys", "empty_flight_frame", "grid_dirs", "load_results",
    "mark_differing_keys", "one_method", "read_frontier",
]


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
    """``final_acc`` with a diverged run counted at chance (:func:`ablations.chance.chance_of`,
    the rule the claims use); None for runs that did not finish."""
    if state == "completed":
        return None if final_acc is None else float(final_acc)
    if state != "diverged":
        return None
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    return chance_of(model.get("num_classes"), config.get("data", "synthetic"))


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

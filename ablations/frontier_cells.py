"""What both frontier methods share: the cells of a grid (its runs without the learning rate,
:func:`cells_of`), an invocation's outcome (:class:`FrontierOutcome`) and ``frontier.parquet``
(:data:`FRONTIER_COLUMNS`, :func:`write_frontier`), where each method keeps its own rows.
The methods: the search (:mod:`ablations.frontier`) and the range test
(:mod:`ablations.range_test`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ablations.constants import LENGTH_KEYS, MAX_RUNS
from ablations.frontier_schema import FrontierSettings, parse_frontier
from ablations.frontier_search import LR_KEYS
from ablations.spec import GridSpec, Run, expand
from ablations.store import FRONTIER_FILE, DamagedFile, GridStore, read_parquet, write_parquet
from sigprop.errors import UserError

# A cell's status: ablations.constants.CELL_STATUSES (SEARCHED: the search ended with an answer)
# The columns every frontier.parquet row has besides the cell's flattened config (README).
FRONTIER_COLUMNS = [
    "grid", "cell_id", "model_label", "axes", "status", "reason", "max_stable_lr",
    "min_unstable_lr", "final_acc", "n_probes", "probe_lrs", "probe_stable", "lr_min", "lr_max",
    "resolution", "probe_steps", "non_monotone", "check_lr", "start_lr", "method",
]


def frontier_settings(spec: GridSpec) -> FrontierSettings:
    """The spec's ``[frontier]`` section, checked: a :class:`~ablations.errors.SpecError`
    names the bad field (the schema: :mod:`ablations.frontier_schema`)."""
    return parse_frontier(spec.frontier, spec.name)


def cell_spec(spec: GridSpec, settings: FrontierSettings) -> GridSpec:
    """The spec whose runs are the cells: without the axes the probes set themselves."""
    cells = copy.deepcopy(spec)
    dropped = set(LR_KEYS) | (set(LENGTH_KEYS) if settings.steps else set())
    for key in dropped & set(cells.grid):
        cells.grid.pop(key)
        cells.when.pop(key, None)
    for group, keys in list(cells.tie.items()):
        kept = [k for k in keys if k not in dropped]
        if len(kept) < 2:
            cells.tie.pop(group)
        else:
            cells.tie[group] = kept
    return cells


def cells_of(spec: GridSpec, max_runs: int | None = MAX_RUNS) -> tuple[FrontierSettings,
                                                                       list[Run]]:
    """The checked settings and the cells of a spec (claims checked against the cells)."""
    settings = frontier_settings(spec)
    return settings, expand(cell_spec(spec, settings), max_runs)


@dataclass
class FrontierOutcome:
    grid_dir: Path
    cells: int
    probes_run: int = 0  # executed by this invocation
    probes_stored: int = 0  # read back from the store
    full_grid: int = 0  # runs a grid over every lattice point would take
    counts: dict = field(default_factory=dict)  # cell status -> cells
    non_monotone: int = 0  # cells stable again two lattice steps above their edge
    interrupted: bool = False
    signal: str | None = None
    duration_s: float = 0.0
    frame: pd.DataFrame | None = None


def write_frontier(store: GridStore, frame: pd.DataFrame, method: str) -> None:
    """``frontier.parquet`` with ``frame`` as the rows of ``method``: the rows another method
    wrote there stay (a file from before the ``method`` column holds bisection rows). A file
    that cannot be read is replaced: its rows come back by rerunning, from the stored runs."""
    path = store.dir / FRONTIER_FILE
    kept = None
    if path.is_file():
        try:
            old = read_parquet(path)
        except DamagedFile:
            old = None
        if old is not None and "cell_id" in old:
            methods = old["method"] if "method" in old else pd.Series("bisect", index=old.index)
            kept = old[methods.fillna("bisect").ne(method)]
            kept = kept.assign(method=methods[kept.index].fillna("bisect"))
    frame = frame.assign(method=method) if len(frame) else frame
    if kept is not None and len(kept):
        frame = pd.concat([kept, frame], ignore_index=True) if len(frame) else kept
    try:
        write_parquet(path, frame.reset_index(drop=True))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None

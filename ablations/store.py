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

This module is the store's one import for its readers (the runner, the worker, the report):
it re-exports the names of the modules that do the work, one job each:

- :mod:`ablations.storefiles`: one file read or written safely (atomic writes,
  :class:`DamagedFile`, the JSON field type checks, :func:`set_aside`);
- :mod:`ablations.environment`: what a run ran under, and what of it changes its numbers;
- :mod:`ablations.gridstore`: a grid's folder (:class:`GridStore`, the run locks);
- :mod:`ablations.results`: a store read into frames (:func:`load_results`, :data:`RUN_COLUMNS`).

To replace one of these names in a test, patch it in the module that uses it (``GridStore``'s
writes use ``ablations.gridstore.write_json``), not here.
"""

from __future__ import annotations

# Every public name of gridstore, results and storefiles (their __all__) is the store's; of
# constants, environment and keys, the few below.
from ablations import gridstore, results, storefiles
from ablations.constants import DAMAGED, FINISHED, STATES
from ablations.environment import (
    NUMERIC_ENVIRONMENT,
    env_value,
    environment,
    environment_differences,
    git_commit,
    numeric_environment,
)
from ablations.gridstore import *  # noqa: F403
from ablations.keys import applied_values, flatten
from ablations.results import *  # noqa: F403
from ablations.storefiles import *  # noqa: F403

__all__ = [
    "DAMAGED",
    "FINISHED",
    "NUMERIC_ENVIRONMENT",
    "STATES",
    "applied_values",
    "env_value",
    "environment",
    "environment_differences",
    "flatten",
    "git_commit",
    "numeric_environment",
    *gridstore.__all__,
    *results.__all__,
    *storefiles.__all__,
]

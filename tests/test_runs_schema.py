"""The runs frame's columns are documented once (ablations.store.RUN_COLUMNS): a store's frame
holds exactly those plus the runs' config keys."""

from __future__ import annotations

from ablations.keys import applied_values
from ablations.store import RUN_COLUMNS, SUMMARY_COLUMNS, GridStore, load_results
from tests.helpers import store_finished_grid


def test_the_runs_frame_has_the_documented_columns_and_the_config_keys(tmp_path):
    store_finished_grid(tmp_path)
    grid_dir = tmp_path / "out" / "tiny"
    runs = load_results(grid_dir).runs
    store = GridStore(grid_dir.parent, grid_dir.name)
    config_keys = set()
    for rid in runs["run_id"]:
        cfg = store.config(rid)
        config_keys |= set(applied_values(cfg["config"], cfg.get("effective")))
    assert not config_keys & set(RUN_COLUMNS)  # no config key shadows a documented column
    assert set(runs.columns) == set(RUN_COLUMNS) | config_keys
    assert set(SUMMARY_COLUMNS) <= set(RUN_COLUMNS)
    assert all(isinstance(text, str) and text for text in RUN_COLUMNS.values())

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


def test_acc_chance_and_the_claims_share_one_chance_rule():
    """A 1-class head is no classifier: both fall back to the data set's 10 classes."""
    import pandas as pd

    from ablations.claims import chance_levels
    from ablations.results import chance_accuracy

    for classes, expected in ((1, 0.1), (None, 0.1), (4, 0.25)):
        config = {"model": {"name": "nf_resnet26", "num_classes": classes}, "data": "digits"}
        assert chance_accuracy(config, "diverged", None) == expected
        frame = pd.DataFrame({"model.num_classes": [classes], "data": ["digits"]})
        assert chance_levels(frame).tolist() == [expected]
    assert chance_accuracy({"data": "nope"}, "diverged", None) is None
    assert chance_accuracy({"data": "digits"}, "completed", 0.5) == 0.5

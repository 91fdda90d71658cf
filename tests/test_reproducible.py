"""Reproducible runs (issue 24): the thread count is a setting, recorded with the rest of what
changes a run's numbers, and a store made under another environment says so when reused."""

import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from ablations.executors import LocalExecutor
from ablations.runner import run_grid, status_table
from ablations.spec import load_spec
from ablations.store import GridStore, load_results
from ablations.worker import execute_run
from run_ablations import build_parser, main

SPEC = """
name = "tiny"
[base]
data = "synthetic"
train_size = 64
test_size = 32
steps = {steps}
batch_size = 32
eval_every = 0
checkpoint_every = 0
seed = 0
[base.model]
name = "nf_resnet26"
stem = "cifar"
width_mult = 0.25
depths = [1, 1, 1, 1]
[base.clip]
mode = "norm"
threshold = 0.5
[grid]
seed = [0, 1]
"""


def write_spec(folder: Path, steps: int = 8) -> Path:
    path = folder / "tiny.toml"
    path.write_text(SPEC.format(steps=steps))
    return path


def metrics_of(grid_dir: Path) -> dict[str, pd.DataFrame]:
    """Every run's stored metrics without the wall-clock column (the one that may differ)."""
    return {run.name: pd.read_parquet(run / "metrics.parquet").drop(columns="step_time")
            for run in sorted((grid_dir / "runs").iterdir())}


class InlineExecutor:
    """Runs in this process, one after the other, with the thread count and flags given."""

    def __init__(self, threads: int = 1, deterministic: bool = False):
        self.threads, self.deterministic, self.device = threads, deterministic, "cpu"

    def slots(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> str:
        return "this process"

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        import torch

        before = torch.get_num_threads()
        try:
            for rid in run_ids:
                on_result(execute_run(root, grid, rid, "cpu", self.threads,
                                      deterministic=self.deterministic))
        finally:
            torch.set_num_threads(before)


def run_inline(spec: Path, out: Path, **kwargs) -> tuple:
    stream = io.StringIO()
    executor_args = {k: kwargs.pop(k) for k in ("threads", "deterministic") if k in kwargs}
    outcome = run_grid(load_spec(spec), out, InlineExecutor(**executor_args), stream=stream,
                       **kwargs)
    return outcome, stream.getvalue()


@pytest.mark.slow
def test_one_and_two_workers_store_identical_metrics(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    for workers in (1, 2):
        executor = LocalExecutor(workers=workers, device="cpu")
        outcome = run_grid(spec, tmp_path / f"w{workers}", executor, stream=io.StringIO())
        assert outcome.counts == {"completed": 2}
    one, two = metrics_of(tmp_path / "w1" / "tiny"), metrics_of(tmp_path / "w2" / "tiny")
    assert list(one) == list(two) and len(one) == 2
    for rid in one:
        assert len(one[rid]) == 9  # 8 steps and the final evaluation
        pd.testing.assert_frame_equal(one[rid], two[rid], check_exact=True)
    for run in (tmp_path / "w2" / "tiny" / "runs").iterdir():
        env = json.loads((run / "status.json").read_text())["environment"]
        assert env["threads"] == 1 and env["deterministic"] is False
        assert env["torch"] and env["device"] == "cpu"

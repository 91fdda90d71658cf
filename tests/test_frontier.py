"""The stability frontier search (issue 15): bisection on a synthetic stability oracle, bad
[frontier] input, the edge cases at the bounds, resume after kill -9, frontier.parquet and
load_results, claims over frontier values, and the frontier figures."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.claims import evaluate_claims, parse_claims
from ablations.frontier import FRONTIER_COLUMNS, lattice, run_frontier
from ablations.spec import FrontierSettings, load_spec
from ablations.store import GridStore, load_results
from run_ablations import main

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name = "edge"
[base]
data = "synthetic"
train_size = 64
test_size = 32
steps = 4
batch_size = 16
eval_every = 0
seed = 0
[base.model]
name = "nf_resnet26"
stem = "cifar"
width_mult = 0.125
depths = [1, 1, 1, 1]
[grid]
batch_size = [16, 64]
seed = [0, 1]
[frontier]
lr_min = 0.01
lr_max = 10.0
{frontier}
"""


def write_spec(folder: Path, frontier: str = "", extra: str = "") -> Path:
    path = folder / "edge.toml"
    path.write_text(SPEC.format(frontier=textwrap.dedent(frontier)) + textwrap.dedent(extra))
    return path


def oracle_edge(config: dict) -> float:
    """The synthetic trainer's edge: stable up to 0.05 * batch_size (seed shifts it a bit)."""
    return 0.05 * config["batch_size"] * (1.1 if config["seed"] else 1.0)


class OracleExecutor:
    """A fake trainer: a probe diverges above its cell's known edge; below it the loss halves
    and more. Writes the same status and metrics files as the real worker."""

    def __init__(self, edge=oracle_edge):
        self.edge, self.executed = edge, []

    def slots(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> str:
        return "the stability oracle"

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        store = GridStore(root, grid)
        pending = list(run_ids)
        while pending:
            rid = pending.pop(0)
            self.executed.append(rid)
            config = store.config(rid)["config"]
            lr, edge = config["lr"], self.edge(config)
            steps = np.arange(config["steps"])
            if lr > edge:
                state, loss = "diverged", np.full(len(steps), math.inf)
                summary = {"final_acc": None, "diverged_step": 0}
            else:
                state, loss = "completed", 2.3 * 0.2 ** (steps / max(1, len(steps) - 1))
                summary = {"final_acc": 0.9 - 0.1 * (edge - lr) / edge}
            metrics = pd.DataFrame({"step": steps, "loss": loss})
            store.write_results(rid, metrics, pd.DataFrame(), state=state, summary=summary,
                                finished_at=time.time())
            pending += on_result({"run_id": rid, "state": state, "summary": summary}) or []


def search(folder: Path, frontier: str = "", executor=None, overrides=None):
    executor = executor or OracleExecutor()
    stream = io.StringIO()
    outcome = run_frontier(load_spec(write_spec(folder, frontier), overrides), folder / "out",
                           executor, stream=stream)
    return outcome, executor, stream.getvalue()


def test_lattice_spans_the_bounds_at_the_resolution():
    points = lattice(FrontierSettings(0.01, 10.0, 2 ** 0.25))
    assert points[0] == 0.01 and points[-1] == 10.0
    ratios = np.array(points[1:]) / np.array(points[:-1])
    assert np.all(ratios <= 2 ** 0.25 * (1 + 1e-5)) and np.all(ratios > 1)
    assert len(points) == math.ceil(math.log(1000) / math.log(2 ** 0.25)) + 1


def test_bisection_finds_the_oracle_edge_within_the_resolution(tmp_path):
    outcome, executor, text = search(tmp_path)
    frame = outcome.frame
    assert len(frame) == 4 and set(frame["status"]) == {"found"}
    for _, row in frame.iterrows():
        edge = oracle_edge({"batch_size": row["batch_size"], "seed": row["seed"]})
        assert row["max_stable_lr"] <= edge < row["min_unstable_lr"]
        assert row["min_unstable_lr"] / row["max_stable_lr"] <= 2 ** 0.25 * (1 + 1e-5)
    # bisection: about log2 of the lattice size per cell, far below a full grid
    n_points = len(lattice(FrontierSettings(0.01, 10.0)))
    assert frame["n_probes"].max() <= math.ceil(math.log2(n_points + 1))
    assert len(executor.executed) == frame["n_probes"].sum() == outcome.probes_run
    assert outcome.full_grid == 4 * n_points
    # every probe is an ordinary run, its lr an axis; a line per finished cell
    runs = load_results(tmp_path / "out" / "edge").runs
    assert len(runs) == len(executor.executed)
    assert all("lr" in axes for axes in runs["axes"])
    assert text.count("max stable lr") == 4


def test_a_rerun_reads_every_probe_back_and_runs_none(tmp_path):
    first, _, _ = search(tmp_path)
    again, executor, _ = search(tmp_path)
    assert executor.executed == [] and again.probes_run == 0
    assert again.probes_stored == first.probes_run
    pd.testing.assert_frame_equal(again.frame, first.frame)


def test_unstable_at_lr_min_and_stable_to_lr_max_are_reported(tmp_path):
    edge = lambda config: 0.001 if config["batch_size"] == 16 else 100.0  # noqa: E731
    outcome, _, text = search(tmp_path, executor=OracleExecutor(edge))
    frame = outcome.frame.set_index(["batch_size", "seed"])
    low, high = frame.loc[(16, 0)], frame.loc[(64, 0)]
    assert low["status"] == "unstable_at_lr_min" and math.isnan(low["max_stable_lr"])
    assert low["min_unstable_lr"] == 0.01 and "lr_min" in low["reason"]
    assert high["status"] == "stable_to_lr_max" and high["max_stable_lr"] == 10.0
    assert math.isnan(high["min_unstable_lr"]) and "stable up to lr_max" in high["reason"]
    assert "stable up to lr_max 10" in text


def test_probes_train_at_exactly_the_probe_lr_with_the_probe_steps(tmp_path):
    outcome, executor, _ = search(tmp_path, "steps = 3")
    store = GridStore(tmp_path / "out", "edge")
    for rid in executor.executed:
        config = store.config(rid)["config"]
        from sigprop.train import TrainConfig

        assert TrainConfig.from_dict(config).peak_lr() == config["lr"]
        assert config["steps"] == 3
    assert set(outcome.frame["probe_steps"]) == {3}

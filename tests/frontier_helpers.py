"""What the frontier tests share (test_frontier*.py, test_range_test.py): the tiny frontier
spec, a stability oracle that stands in for training (each cell's edge fixed, nothing trains),
frontier_batch's measured edges (BENCHMARKS.md, issues 15 and 25) for the oracle's edges, and
the oracle stopped midway as by Ctrl-C."""

from __future__ import annotations

import io
import math
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ablations.frontier import run_frontier
from ablations.spec import load_spec
from ablations.store import GridStore
from tests.helpers import tiny_spec

# the tiny NF-ResNet over 2 batch sizes x 2 seeds; {frontier} takes more [frontier] lines
SPEC = tiny_spec("edge", train_size=64, test_size=32, steps=4,
                 grid="batch_size = [16, 64]\nseed = [0, 1]") + """[frontier]
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
            if on_step is not None:  # as the real workers report: a start, then steps
                on_step(0, rid, 0, 0)
                for step in steps:
                    on_step(0, rid, int(step) + 1, len(steps), float(loss[step]))
            metrics = pd.DataFrame({"step": steps, "loss": loss})
            store.write_results(rid, metrics, pd.DataFrame(), state=state, summary=summary,
                                finished_at=time.time())
            pending += on_result({"run_id": rid, "state": state, "summary": summary}) or []


def search(folder: Path, frontier: str = "", executor=None, overrides=None, **console):
    executor = executor or OracleExecutor()
    stream = io.StringIO()
    outcome = run_frontier(load_spec(write_spec(folder, frontier), overrides), folder / "out",
                           executor, stream=stream, **console)
    return outcome, executor, stream.getvalue()


# frontier_batch's measured edges (BENCHMARKS.md, issue 15): per setting, per batch 32, 256,
# 1024, the two seeds' largest stable lrs; the oracle puts each cell's edge just above them
MEASURED = {
    ("nf_resnet26", "none", 0.01): [(0.141, 0.2), (0.238, 0.336), (0.141, 0.283)],
    ("bn_resnet26_v2", "none", 0.01): [(0.283, 0.336), (0.673, 0.8), (0.951, 0.951)],
    ("nf_resnet26", "norm", 0.1): [(2.69, 3.81), (6.4, 6.4), (7.61, 7.61)],
    ("nf_resnet26", "norm", 0.8): [(0.336, 0.4), (0.951, 0.951), (0.951, 0.951)],
    ("nf_resnet26", "agc", 0.02): [(0.951, 0.951), (2.26, 2.69), (2.26, 2.26)],
    ("nf_resnet26", "agc", 0.16): [(0.283, 0.336), (0.4, 0.673), (0.8, 0.8)],
}

# the issue-25 run of frontier_batch (BENCHMARKS.md), seed by seed: (seed 0, seed 1), for the
# same settings in MEASURED's order
MEASURED_BY_SEED = dict(zip(MEASURED, [
    [(0.2, 0.141421), (0.2, 0.336359), (0.282843, 0.4)],
    [(0.282843, 0.282843), (0.8, 0.8), (0.8, 0.951366)],
    [(2.69087, 3.80546), (6.4, 7.61093), (7.61093, 6.4)],
    [(0.4, 0.336359), (0.8, 1.13137), (0.951366, 0.8)],
    [(0.951366, 0.951366), (1.90273, 2.69087), (2.26274, 2.26274)],
    [(0.237841, 0.282843), (0.4, 1.13137), (0.8, 0.8)],
], strict=True))


def measured_edge(config: dict, table: dict = MEASURED) -> float:
    clip = config["clip"]
    threshold = clip["threshold"] if clip["mode"] != "none" else 0.01
    by_batch = table[(config["model"]["name"], clip["mode"], threshold)]
    return by_batch[[32, 256, 1024].index(config["batch_size"])][config["seed"]] * 1.05


class StopAfter(OracleExecutor):
    """The oracle, interrupted (as by Ctrl-C) once ``limit`` probes have run."""

    def __init__(self, limit: int, edge=measured_edge):
        super().__init__(edge)
        self.limit = limit

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        def stop_at_limit(result: dict) -> list[str]:
            follow_ups = on_result(result)
            if len(self.executed) >= self.limit:
                raise KeyboardInterrupt
            return follow_ups

        super().run(root, grid, run_ids, stop_at_limit, on_step)

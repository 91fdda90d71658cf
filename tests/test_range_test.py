"""The learning-rate range test as a frontier method (issue 26, item 3): the edge on synthetic
loss curves, the exponential schedule, a range-test frontier on a tiny grid (rows, rerun,
resume, the bisection's rows kept), the report's wording and bad --method input."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.frontier import (
    FRONTIER_COLUMNS,
    RANGE_TEST_COLUMNS,
    FrontierSettings,
    lattice,
    range_test_edge,
    run_frontier,
    smoothed_loss,
)
from ablations.spec import load_spec
from ablations.store import GridStore, load_results, one_method, read_frontier
from run_ablations import main
from sigprop.errors import UserError
from sigprop.train import TrainConfig, exponential_lr, train
from tests.frontier_helpers import OracleExecutor, oracle_edge, write_spec

LRS = np.geomspace(0.1, 25.6, 40)


# ----------------------------------------------------------------------------- the edge

def test_smoothed_loss_is_fastais_debiased_moving_average():
    # by hand: s0 = 1; s1 = (0.98 * 0.02 * 1 + 0.02 * 3) / (1 - 0.98**2) = 0.0796 / 0.0396
    assert smoothed_loss([1.0, 3.0]).tolist() == pytest.approx([1.0, 0.0796 / 0.0396])
    assert smoothed_loss(np.full(50, 2.5)) == pytest.approx(np.full(50, 2.5))  # no bias


def test_a_jump_past_four_times_the_smoothed_minimum_gives_the_lr_of_the_step_before():
    loss = np.r_[np.linspace(2.3, 1.0, 25), np.full(15, 1000.0)]  # blows up at step 25
    assert range_test_edge(loss, LRS) == (25, LRS[24])


def test_a_diverged_step_is_the_blow_up_even_below_four_times_the_minimum():
    loss = np.r_[np.full(12, 2.3), [math.inf]]  # the run ended there (metrics stop)
    assert range_test_edge(loss, LRS[:13]) == (12, LRS[11])
    loss = np.r_[np.full(12, 2.3), [150.0]]  # finite, but above diverge_loss
    assert range_test_edge(loss, LRS[:13], diverge_loss=100.0) == (12, LRS[11])


def test_one_spike_of_five_times_the_minimum_is_smoothed_away_and_a_slow_rise_is_caught():
    spike = np.full(40, 1.0)
    spike[20] = 5.0  # raw ratio 5 > 4, smoothed about 1.2: fastai keeps going
    assert range_test_edge(spike, LRS) == (None, None)
    rise = np.r_[np.full(10, 1.0), np.geomspace(1.0, 1e4, 30)]
    blowup, edge = range_test_edge(rise, LRS)
    smooth = smoothed_loss(rise)
    # the first step whose smoothed loss is above 4x the minimum of the steps before it
    first = next(k for k in range(1, 40) if smooth[k] > 4 * smooth[:k].min())
    assert 10 < blowup == first and edge == LRS[first - 1]
    assert smooth[blowup - 1] <= 4 * smooth[:blowup - 1].min()


def test_a_blow_up_after_the_first_update_has_no_edge_and_a_calm_ramp_none():
    assert range_test_edge([2.3, 1e5, 1e6], LRS[:3]) == (1, None)
    assert range_test_edge([math.nan], LRS[:1]) == (0, None)
    assert range_test_edge(np.linspace(2.3, 0.5, 40), LRS) == (None, None)


# ----------------------------------------------------------------------------- the schedule

def test_the_exponential_schedule_is_geometric_from_lr_start_to_the_peak():
    lrs = [exponential_lr(k, 5, 0.1, 1.6) for k in range(5)]
    assert lrs[0] == 0.1 and lrs[-1] == 1.6  # exactly, not to rounding
    assert lrs == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6], rel=1e-12)
    assert exponential_lr(0, 1, 0.1, 1.6) == 1.6


def test_a_range_test_run_trains_at_exactly_the_ramp_with_no_warmup():
    config = dict(data="synthetic", train_size=64, test_size=32, image_size=8, steps=5,
                  batch_size=16, eval_every=0, device="cpu", warmup_fraction=0.2,
                  model={"name": "nf_resnet26", "width_mult": 0.125, "depths": [1, 1, 1, 1]},
                  schedule="exponential", lr_start=0.01, lr=0.16)
    lrs = train(TrainConfig.from_dict(config)).metrics["lr"].tolist()
    assert lrs == [exponential_lr(k, 5, 0.01, 0.16) for k in range(5)]
    assert lrs[0] == 0.01 and lrs[-1] == 0.16
    assert np.allclose(np.diff(np.log(lrs)), math.log(2))  # warmup_fraction is unused


def test_the_default_schedule_leaves_configs_and_run_ids_as_they_were():
    plain = TrainConfig.from_dict({"data": "synthetic"}).to_dict()
    assert "schedule" not in plain and "lr_start" not in plain
    ramp = TrainConfig.from_dict({"schedule": "exponential", "lr_start": 0.1, "lr": 1.0})
    assert ramp.to_dict()["schedule"] == "exponential" and ramp.to_dict()["lr_start"] == 0.1


@pytest.mark.parametrize("config, words", [
    ({"schedule": "exponentail"}, "did you mean 'exponential'?"),
    ({"schedule": "exponential", "lr": 1.0}, "needs lr_start > 0"),
    ({"schedule": "exponential", "lr": 1.0, "lr_start": 2.0}, "must be below it"),
    ({"lr_start": 0.1}, "set schedule = \"exponential\""),
])
def test_bad_schedule_settings_are_refused_naming_the_field(config, words):
    with pytest.raises(UserError, match="schedule|lr_start") as err:
        TrainConfig.from_dict(config)
    assert words in str(err.value)


# ----------------------------------------------------------------------------- the frontier

class RampExecutor(OracleExecutor):
    """A fake trainer for range-test runs: the loss falls while the ramp's lr is below the
    cell's oracle edge and diverges (inf, the run ends) one step after the lr passed it;
    ``limit`` runs at most that many (the rest stay queued, as after a kill)."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        store = GridStore(root, grid)
        for rid in run_ids[:self.limit]:
            self.executed.append(rid)
            config = store.config(rid)["config"]
            total = config["steps"]
            lrs = [exponential_lr(k, total, config["lr_start"], config["lr"])
                   for k in range(total)]
            past = [k for k, lr in enumerate(lrs) if lr > oracle_edge(config)]
            end = past[0] + 1 if past and past[0] + 1 < total else total
            loss = 2.3 * 0.9 ** np.arange(total, dtype=float)
            state = "completed"
            if end < total:
                loss[end] = math.inf
                state = "diverged"
            rows = end + (state == "diverged")
            metrics = pd.DataFrame({"step": np.arange(rows), "loss": loss[:rows],
                                    "lr": lrs[:rows], "test_acc": np.nan})
            if state == "completed":  # as the worker merges the last evaluation in: no lr
                metrics.loc[rows] = [total, np.nan, np.nan, 0.5]
            summary = {"final_acc": None, "diverged_step": end if state == "diverged" else None}
            store.write_results(rid, metrics, pd.DataFrame(), state=state, summary=summary,
                                finished_at=time.time())
            on_result({"run_id": rid, "state": state, "summary": summary})


RAMP = """
method = "range-test"
steps = 40
"""


def ramp_search(folder: Path, executor=None, frontier: str = RAMP, overrides=None):
    executor = executor or RampExecutor()
    stream = io.StringIO()
    outcome = run_frontier(load_spec(write_spec(folder, frontier), overrides), folder / "out",
                           executor, stream=stream)
    return outcome, executor, stream.getvalue()


def test_a_range_test_frontier_writes_range_test_rows_and_a_rerun_runs_nothing(tmp_path):
    outcome, executor, text = ramp_search(tmp_path)
    assert len(executor.executed) == 4 == outcome.probes_run  # one run per cell
    frame = read_frontier(tmp_path / "out" / "edge")
    assert set(FRONTIER_COLUMNS + RANGE_TEST_COLUMNS) <= set(frame.columns)
    assert frame["method"].tolist() == ["range-test"] * 4
    assert frame["status"].tolist() == ["found"] * 4 and frame["n_probes"].tolist() == [1] * 4
    points = lattice(FrontierSettings(0.01, 10.0))
    ramp = np.geomspace(0.01, 10.0, 40)
    for _, row in frame.iterrows():
        edge = oracle_edge({"batch_size": row["batch_size"], "seed": row["seed"]})
        # the fake blows up at the step after the first rate above the edge: the edge is the
        # ramp's first rate above the oracle's, snapped down to the lattice
        expected = ramp[np.argmax(ramp > edge)]
        assert row["ramp_edge_lr"] == pytest.approx(expected)
        assert row["max_stable_lr"] == max(p for p in points if p <= expected * (1 + 1e-9))
        assert row["min_unstable_lr"] / row["max_stable_lr"] == pytest.approx(2 ** 0.25,
                                                                              rel=1e-4)
    assert "blow-up at step" in text
    again, executor2, _ = ramp_search(tmp_path)
    assert executor2.executed == [] and again.probes_run == 0 and again.probes_stored == 4
    pd.testing.assert_frame_equal(read_frontier(tmp_path / "out" / "edge"), frame)


def test_a_ramp_that_never_blows_up_is_stable_to_lr_max_not_an_edge(tmp_path):
    # batch 64's oracle edges (3.2, 3.52) lie above lr_max 2: those runs complete, and the
    # worker's last row (the final evaluation's, no loss) is no blow-up
    outcome, _, _ = ramp_search(tmp_path, overrides=["frontier.lr_max=2"])
    frame = outcome.frame.set_index("batch_size")
    assert frame.loc[64, "status"].tolist() == ["stable_to_lr_max"] * 2
    assert frame.loc[64, "max_stable_lr"].tolist() == [2.0, 2.0]
    assert frame.loc[64, "blowup_step"].isna().all()
    assert frame.loc[16, "status"].tolist() == ["found"] * 2


def test_a_range_test_stopped_midway_resumes_running_only_what_is_not_stored(tmp_path):
    first, executor, _ = ramp_search(tmp_path, RampExecutor(limit=1))
    assert first.counts == {"found": 1, "incomplete": 3}
    _, executor2, _ = ramp_search(tmp_path)
    assert len(executor2.executed) == 3 and executor.executed[0] not in executor2.executed
    assert read_frontier(tmp_path / "out" / "edge")["status"].eq("found").all()


def test_both_methods_keep_each_others_rows_and_readers_get_one_row_per_cell(tmp_path):
    search_frame = run_frontier(load_spec(write_spec(tmp_path, "steps = 40")),
                                tmp_path / "out", OracleExecutor(), stream=io.StringIO()).frame
    assert search_frame["method"].eq("bisect").all()
    ramp_search(tmp_path)
    both = read_frontier(tmp_path / "out" / "edge")
    assert sorted(both["method"].value_counts().items()) == [("bisect", 4), ("range-test", 4)]
    assert load_results(tmp_path / "out").frontier["method"].value_counts().to_dict() == \
        {"bisect": 4, "range-test": 4}
    assert one_method(both)["method"].tolist() == ["bisect"] * 4
    # a bisection rerun rewrites its rows and keeps the range test's
    run_frontier(load_spec(write_spec(tmp_path, "steps = 40")), tmp_path / "out",
                 OracleExecutor(), stream=io.StringIO())
    assert len(read_frontier(tmp_path / "out" / "edge")) == 8


def test_a_frontier_file_from_before_the_method_column_reads_as_bisection(tmp_path):
    run_frontier(load_spec(write_spec(tmp_path, "steps = 40")), tmp_path / "out",
                 OracleExecutor(), stream=io.StringIO())
    path = tmp_path / "out" / "edge" / "frontier.parquet"
    pd.read_parquet(path).drop(columns="method").to_parquet(path)
    assert read_frontier(path.parent)["method"].tolist() == ["bisect"] * 4
    ramp_search(tmp_path)  # the old rows stay, now marked
    assert sorted(read_frontier(path.parent)["method"]) == ["bisect"] * 4 + ["range-test"] * 4


def test_the_report_says_a_range_test_made_the_frontier_and_what_that_means(tmp_path):
    from reports.build import frontier_sections

    ramp_search(tmp_path)
    (section,) = frontier_sections(read_frontier(tmp_path / "out" / "edge"))
    text = " ".join(p for p in section.parts if isinstance(p, str))
    assert "range test" in text and "instability during a ramp, not at a fixed rate" in text
    assert "bisection" not in text and "Monotonicity" not in text


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("value, words", [
    ("range-tst", "did you mean 'range-test'?"), ("newton", "one of bisect, range-test")])
def test_a_bad_method_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, value, words):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    assert main(["frontier", str(spec), "--method", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigprop: error: frontier.method") and words in err
    assert "\n" not in err and "Traceback" not in err and not out.exists()


def test_the_method_is_a_spec_key_and_the_flag_overrides_it(tmp_path, capsys):
    spec = write_spec(tmp_path, RAMP)
    assert main(["frontier", str(spec), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "range test: 1 run per cell" in printed
    assert main(["frontier", str(spec), "--dry-run", "--method", "bisect"]) == 0
    bisect = capsys.readouterr().out
    assert "probes per cell" in bisect
    for table in (printed, bisect):  # the cells' lr is no probe's: no lr column
        header = table.splitlines()[0].split()
        assert header[0] == "run_id" and "batch_size" in header and "lr" not in header


@pytest.mark.slow
def test_a_real_range_test_through_the_cli_trains_and_a_rerun_runs_nothing(tmp_path, capsys):
    spec = write_spec(tmp_path, "steps = 8", extra="")
    args = ["frontier", str(spec), "--method", "range-test", "--out", str(tmp_path / "out"),
            "--set", "batch_size=16", "--set", "seed=0", "--workers", "1", "--no-report"]
    assert main(args) == 0
    assert "1 range-test runs (0 read back" in capsys.readouterr().out
    (row,) = read_frontier(tmp_path / "out" / "edge").to_dict("records")
    assert row["method"] == "range-test" and row["status"] in ("found", "stable_to_lr_max")
    assert main(args) == 0
    assert "0 range-test runs (1 read back" in capsys.readouterr().out

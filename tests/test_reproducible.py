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
from ablations.store import load_results
from run_ablations import build_parser, main
from tests.helpers import run_inline, tiny_spec


def write_spec(folder: Path, steps: int = 8) -> Path:
    path = folder / "tiny.toml"
    path.write_text(tiny_spec(train_size=64, test_size=32, steps=steps, batch_size=32,
                              checkpoint_every=0, width_mult=0.25,
                              clip='mode = "norm"\nthreshold = 0.5'))
    return path


def metrics_of(grid_dir: Path) -> dict[str, pd.DataFrame]:
    """Every run's stored metrics without the wall-clock column (the one that may differ)."""
    return {run.name: pd.read_parquet(run / "metrics.parquet").drop(columns="step_time")
            for run in sorted((grid_dir / "runs").iterdir())}


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


def test_the_thread_count_is_fixed_whatever_the_workers_and_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert LocalExecutor(workers=2, device="cpu").threads_per_worker() == 1
    assert LocalExecutor(workers=1, device="cpu", threads=3).threads_per_worker() == 3


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """A 2-run grid stored with 1 thread (spec at <folder>/tiny.toml, store <folder>/out)."""
    folder = tmp_path_factory.mktemp("stored")
    outcome, _ = run_inline(write_spec(folder, steps=3), folder / "out")
    assert outcome.counts == {"completed": 2}
    return folder


@pytest.fixture
def copy(stored, tmp_path) -> Path:
    import shutil

    shutil.copytree(stored, tmp_path, dirs_exist_ok=True)
    return tmp_path


def environments(grid_dir: Path) -> dict[str, dict]:
    return {run.name: json.loads((run / "status.json").read_text())["environment"]
            for run in sorted((grid_dir / "runs").iterdir())}


def test_every_run_records_what_changes_its_numbers(stored):
    for env in environments(stored / "out" / "tiny").values():
        assert env["threads"] == 1 and env["deterministic"] is False
        assert env["device"] == "cpu" and env["torch"] == __import__("torch").__version__
    runs = load_results(stored / "out" / "tiny").runs
    assert set(runs["env.threads"]) == {1} and set(runs["env.deterministic"]) == {False}
    assert "environment" not in status_table(stored / "out" / "tiny")  # nothing to say


def test_reusing_runs_of_another_thread_count_is_said_first(copy):
    outcome, text = run_inline(copy / "tiny.toml", copy / "out", threads=2)
    first = text.splitlines()[0]
    assert first == ("warning: 2 runs stored under a different environment: threads 1 vs 2 "
                     "(2 runs); reused as stored, so their numbers may differ from a run here "
                     "(--rerun-if-env-differs runs them again)")
    assert outcome.skipped == 2 and outcome.counts == {}
    _, text = run_inline(copy / "tiny.toml", copy / "out", threads=1)
    assert "different environment" not in text


@pytest.mark.slow
def test_rerun_if_env_differs_runs_them_again_and_keeps_the_old_files(copy):
    grid = copy / "out" / "tiny"
    before = metrics_of(grid)
    old = {rid: (grid / "runs" / rid / "metrics.parquet").read_bytes() for rid in before}
    outcome, text = run_inline(copy / "tiny.toml", copy / "out", deterministic=True,
                               rerun_if_env_differs=True)
    assert text.splitlines()[0].startswith(
        "2 runs stored under a different environment: deterministic False vs True (2 runs); "
        "they run again from step 0 here (--rerun-if-env-differs)")
    assert outcome.skipped == 0 and outcome.counts == {"completed": 2}
    import torch

    assert not torch.are_deterministic_algorithms_enabled()  # restored after the runs
    for rid, env in environments(grid).items():
        assert env["threads"] == 1 and env["deterministic"] is True
        run_dir = grid / "runs" / rid
        for name in ("status.json", "metrics.parquet", "blocks.parquet", "checkpoint.pt"):
            assert len(list(run_dir.glob(f"{name}.env-*"))) == 1, name
        assert next(run_dir.glob("metrics.parquet.env-*")).read_bytes() == old[rid]
        kept = json.loads(next(run_dir.glob("status.json.env-*")).read_text())
        assert kept["state"] == "completed" and kept["environment"]["threads"] == 1
        status = json.loads((run_dir / "status.json").read_text())
        assert status["attempts"] == 1 and "stored under another environment" in \
            status["restarted"]
    after = metrics_of(grid)  # the same runs trained again: on CPU, the same numbers
    assert set(after) == set(before)
    for rid in before:
        pd.testing.assert_frame_equal(after[rid], before[rid], check_exact=True)


def test_a_store_written_before_the_record_says_not_recorded(copy, capsys):
    grid = copy / "out" / "tiny"
    for run in (grid / "runs").iterdir():
        path = run / "status.json"
        status = json.loads(path.read_text())
        for key in ("threads", "interop_threads", "deterministic"):
            del status["environment"][key]
        path.write_text(json.dumps(status))
    table = status_table(grid)
    assert set(table["environment"]) == {"threads not recorded, deterministic not recorded"}
    assert main(["status", str(grid)]) == 0
    assert "threads not recorded" in capsys.readouterr().out
    _, text = run_inline(copy / "tiny.toml", copy / "out")
    assert text.startswith("warning: 2 runs stored under a different environment: threads not "
                           "recorded, deterministic not recorded (2 runs); reused as stored")


def test_status_shows_runs_whose_environments_differ(copy):
    grid = copy / "out" / "tiny"
    odd = sorted((grid / "runs").iterdir())[0]
    path = odd / "status.json"
    status = json.loads(path.read_text())
    status["environment"]["threads"] = 2
    path.write_text(json.dumps(status))
    table = status_table(grid).set_index("run_id")["environment"].to_dict()
    assert table[odd.name] == "threads 2" and set(table.values()) == {"threads 1", "threads 2"}


def test_a_run_resumed_under_another_environment_records_both(copy):
    """A checkpoint made with 2 threads, resumed with 1: the run's numbers mix the two."""
    grid = copy / "out" / "tiny"
    resumed = sorted((grid / "runs").iterdir())[0]
    path = resumed / "status.json"
    status = json.loads(path.read_text())
    status.update(state="queued", summary=None)
    status["environment"]["threads"] = 2
    path.write_text(json.dumps(status))
    _, text = run_inline(copy / "tiny.toml", copy / "out")
    assert text.startswith("warning: 1 run stored under a different environment: threads 2 vs 1 "
                           "(1 run); continued from their checkpoints")
    status = json.loads(path.read_text())
    assert status["state"] == "completed" and status["environment"]["threads"] == 1
    assert status["earlier_environment"]["threads"] == 2
    row = status_table(grid).set_index("run_id").loc[resumed.name]
    assert row["environment"] == ("resumed from a checkpoint made under threads 2, torch "
                                  f"{status['environment']['torch']}, device cpu, "
                                  "deterministic False")
    _, text = run_inline(copy / "tiny.toml", copy / "out")  # still said on the next reuse
    assert "1 run stored under a different environment: threads 2 vs 1" in text


def test_cli_flags_reach_the_executor_and_bad_thread_counts_are_one_line(capsys):
    from run_ablations import make_executor

    args = build_parser().parse_args(["run", "quickstart", "--threads", "3", "--deterministic",
                                      "--rerun-if-env-differs", "--device", "cpu"])
    executor = make_executor(args)
    assert (executor.threads, executor.deterministic, args.rerun_if_env_differs) == (3, True,
                                                                                    True)
    quick = build_parser().parse_args(["quickstart", "--device", "cpu"])
    assert make_executor(quick).threads == 1 and not quick.rerun_if_env_differs
    assert build_parser().parse_args(["frontier", "frontier_batch", "--threads", "2"]).threads == 2
    assert main(["run", "quickstart", "--threads", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == "sigprop: error: --threads must be an integer >= 1, got 0\n"

"""The grid runner end to end on CPU: store layout, resume, kill -9, concurrent runners."""

import io
import json
import pickle
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.executors import LocalExecutor
from ablations.runner import run_grid, status_table
from ablations.spec import expand, load_spec
from ablations.store import GridStore, load_results
from run_ablations import main
from sigprop.files import atomic_path, writable_dir_error
from tests.helpers import kill_9, start_runner, tiny_spec
from tests.test_data import write_cifar10


def write_spec(tmp_path: Path, steps: int = 6, seeds: str = "[0, 1]", extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_spec(train_size=64, test_size=32, steps=steps, eval_every=4,
                              checkpoint_every=1, probe_every=2, grid=f"seed = {seeds}",
                              clip='mode = "agc"\nthreshold = 0.04') + textwrap.dedent(extra))
    return path


def spec_with_failing_data(tmp_path: Path, grid_lines: str, extra: str = "") -> Path:
    """A one-seed tiny spec whose cifar10 runs fail: a batch file with a label out of range
    (read by each run; a corrupt archive would stop the grid before anything runs)."""
    bad_data = tmp_path / "cifar"
    write_cifar10(bad_data)
    batch = bad_data / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}))
    profile = f'[data_profiles.cifar10]\ndata_dir = "{bad_data}"\ntrain_size = 64\n'
    path = write_spec(tmp_path, seeds="[0]", extra=profile + extra)
    path.write_text(path.read_text().replace("[grid]\n", "[grid]\n" + grid_lines))
    return path


def run_states(grid_dir: Path) -> dict[str, dict]:
    store = GridStore(grid_dir.parent, grid_dir.name)
    return {rid: store.status(rid) for rid in store.run_ids()}


def metrics_by_run(grid_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for run_dir in sorted((grid_dir / "runs").iterdir()):
        frame = pd.read_parquet(run_dir / "metrics.parquet")
        out[run_dir.name] = frame.drop(columns=["step_time"])
    return out


@pytest.mark.slow
def test_grid_stores_runs_in_the_documented_layout(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    out = tmp_path / "out"
    stream = io.StringIO()
    outcome = run_grid(spec, out, LocalExecutor(workers=2, device="cpu"), stream=stream)
    assert outcome.counts == {"completed": 2} and outcome.skipped == 0
    log = stream.getvalue().splitlines()  # no terminal: a line as each run starts and ends
    assert sum(" started " in line for line in log) == 2
    assert sum(" completed " in line and " in " in line for line in log) == 2
    grid_dir = out / "tiny"
    assert (grid_dir / "spec.toml").is_file()
    for rid in {r.run_id for r in expand(spec)}:
        run_dir = grid_dir / "runs" / rid
        for name in ("config.json", "status.json", "metrics.parquet", "blocks.parquet",
                     "checkpoint.pt"):
            assert (run_dir / name).is_file(), name
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "completed" and status["attempts"] == 1
        record = json.loads((run_dir / "progress.json").read_text())
        assert (record["step"], record["total"]) == (6, 6) and record["loss"] > 0
        assert status["environment"]["torch"] and status["summary"]["steps_done"] == 6
    assert not list(grid_dir.rglob("*.tmp"))

    results = load_results(out)
    assert len(results.runs) == 2 and set(results.runs["status"]) == {"completed"}
    assert {"model.name", "clip.mode", "seed", "final_acc", "best_acc"} <= set(results.runs)
    assert len(results.metrics.dropna(subset=["loss"])) == 12
    final = results.metrics.dropna(subset=["test_acc"]).groupby("run_id")["test_acc"].last()
    by_run = results.runs.set_index("run_id")["final_acc"]
    assert final.to_dict() == pytest.approx(by_run.to_dict())
    assert {"step", "block", "stat", "value"} <= set(results.blocks)

    # a second invocation finds everything stored and runs nothing
    again = run_grid(spec, out, LocalExecutor(workers=1, device="cpu"), stream=io.StringIO())
    assert again.skipped == 2 and again.counts == {}
    assert all(s["attempts"] == 1 for s in run_states(grid_dir).values())


@pytest.mark.slow
def test_diverged_and_failed_runs_are_stored_and_the_grid_completes(tmp_path, capsys):
    path = spec_with_failing_data(
        tmp_path, '"clip.mode" = ["none"]\nlr = [0.05, 1e6]\ndata = ["synthetic", "cifar10"]\n',
        extra='[when]\nlr = { data = ["synthetic"] }\n',
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--device", "cpu", "--no-report"]) == 0
    printed = capsys.readouterr().out
    assert "failed" in printed and "cannot read CIFAR batch" in printed
    runs = load_results(out).runs
    states = runs.groupby(["data", "lr"])["status"].first().to_dict()
    assert states[("synthetic", 0.05)] == "completed"
    assert states[("synthetic", 1e6)] == "diverged"
    assert runs[runs.data == "cifar10"]["status"].tolist() == ["failed"]
    failed = runs[runs.status == "failed"].iloc[0]
    assert failed["error"].startswith("UserError: cannot read CIFAR batch")
    status = GridStore(out, "tiny").status(failed["run_id"])
    assert "Traceback" in status["traceback"]
    diverged = runs[runs.status == "diverged"].iloc[0]
    assert diverged["diverged_step"] is not None

    # failed runs are rerun only when asked
    assert main(["run", str(path), "--out", str(out), "--device", "cpu"]) == 0
    assert "0 to run" in capsys.readouterr().out
    # a retry reruns it; the bad batch is still there (not ours to delete), so it fails again
    main(["run", str(path), "--out", str(out), "--device", "cpu", "--retry-failed"])
    assert "1 to retry" in capsys.readouterr().out
    assert (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").is_file()
    table = status_table(out)
    assert list(table["status"].value_counts().sort_index().items()) == [
        ("completed", 1), ("diverged", 1), ("failed", 1)]


@pytest.mark.slow
def test_sigkill_mid_grid_then_resume_equals_an_uninterrupted_grid(tmp_path):
    spec = write_spec(tmp_path, steps=12, seeds="[0, 1, 2]")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert start_runner(spec, reference).wait(timeout=300) == 0

    runner = start_runner(spec, killed)
    grid_dir = killed / "tiny"
    deadline = time.monotonic() + 240
    # kill once one run is complete and the next one has checkpointed steps
    while time.monotonic() < deadline:
        states = [s.get("state") for s in run_states(grid_dir).values()] if grid_dir.exists() \
            else []
        running_with_checkpoint = any(
            s.get("state") == "running" and (grid_dir / "runs" / rid / "checkpoint.pt").exists()
            for rid, s in run_states(grid_dir).items()
        ) if grid_dir.exists() else False
        if states.count("completed") >= 1 and running_with_checkpoint:
            break
        time.sleep(0.05)
    kill_9(runner, GridStore(killed, "tiny"), deadline + 30)
    before = run_states(grid_dir)
    done_before = {rid: s["finished_at"] for rid, s in before.items() if s["state"] == "completed"}
    assert 1 <= len(done_before) < 3
    assert "interrupted" in set(status_table(killed)["status"])

    assert start_runner(spec, killed).wait(timeout=300) == 0
    after = run_states(grid_dir)
    assert all(s["state"] == "completed" for s in after.values()) and len(after) == 3
    for rid, finished in done_before.items():  # never run twice
        assert after[rid]["finished_at"] == finished and after[rid]["attempts"] == 1
    resumed = [rid for rid, s in before.items() if s["state"] == "running"]
    assert resumed and all(after[rid]["attempts"] == 2 for rid in resumed)

    expected, got = metrics_by_run(reference / "tiny"), metrics_by_run(grid_dir)
    assert expected.keys() == got.keys()
    for rid in expected:
        pd.testing.assert_frame_equal(got[rid], expected[rid])


@pytest.mark.slow
def test_two_runners_share_one_store_without_duplicates(tmp_path):
    spec = write_spec(tmp_path, steps=4, seeds="[0, 1, 2, 3]")
    out = tmp_path / "out"
    runners = [start_runner(spec, out) for _ in range(2)]
    for runner in runners:
        assert runner.wait(timeout=300) == 0, runner.stderr.read()
    states = run_states(out / "tiny")
    assert len(states) == 4
    assert all(s["state"] == "completed" and s["attempts"] == 1 for s in states.values())
    assert len(load_results(out).metrics.dropna(subset=["loss"])) == 16


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "status.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_unwritable_output_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    spec = write_spec(tmp_path)
    assert main(["run", str(spec), "--out", str(blocker / "sub"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write results" in err
    assert blocker.read_text() == ""


def test_writable_dir_error_names_the_reason(tmp_path):
    assert writable_dir_error(tmp_path / "new" / "folder") is None
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new").rglob(".*"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert writable_dir_error(blocker / "sub") == "Not a directory"


# ----------------------------------------------------------------------------- stored values


class NoExecutor:
    """Runs nothing: for what the runner says and stores before any run executes."""

    def slots(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> str:
        return "nothing"

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        pass


AXES = '"clip.mode" = ["none", "agc"]\nbatch_size = [32, 16]\n'


def prepared(tmp_path: Path):
    """The tiny grid over seed x clip.mode x batch_size, stored (queued), nothing run."""
    spec = load_spec(write_spec(tmp_path, seeds="[1, 0]", extra=AXES))
    out = tmp_path / "out"
    run_grid(spec, out, NoExecutor(), stream=io.StringIO())
    return spec, out / "tiny", GridStore(out, "tiny")


def test_results_hold_the_effective_lr_and_blank_values_a_run_does_not_use(tmp_path):
    _, grid_dir, store = prepared(tmp_path)

    def check(runs: pd.DataFrame) -> None:
        assert len(runs) == 8
        assert runs["lr"].tolist() == pytest.approx((0.1 * runs["batch_size"] / 256).tolist())
        agc = runs["clip.mode"] == "agc"
        assert runs.loc[agc, "clip.threshold"].tolist() == [0.04] * 4
        assert runs.loc[~agc, "clip.threshold"].isna().all()  # not the base's stale 0.04
        assert runs.loc[~agc, "clip.eps"].isna().all() and runs.loc[agc, "clip.eps"].notna().all()
        assert runs["epochs"].isna().all()  # the grid gives steps

    check(load_results(grid_dir).runs)
    stored = json.loads((store.run_dir(store.run_ids()[0]) / "config.json").read_text())
    assert set(stored["effective"]) == {"lr", "clip.mode", "clip.threshold"}
    for rid in store.run_ids():  # a store written before the record: same values
        path = store.run_dir(rid) / "config.json"
        record = json.loads(path.read_text())
        record.pop("effective")
        path.write_text(json.dumps(record))
    check(load_results(grid_dir).runs)


def test_status_is_sorted_by_the_axes_shows_a_running_step_and_no_none(tmp_path, capsys):
    _, grid_dir, store = prepared(tmp_path)
    running = store.run_ids()[0]
    store.update_status(running, state="running", attempts=1)
    (store.run_dir(running) / "progress.json").write_text('{"step": 3, "total": 6}')
    lock = store.lock(running)
    assert lock.acquire()  # its process is alive: running, not interrupted
    try:
        table = status_table(grid_dir)
        assert main(["status", str(grid_dir)]) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    assert "None" not in out and "NaN" not in out and "nan" not in out
    assert list(table.columns[:7]) == ["grid", "run_id", "status", "progress", "seed",
                                       "clip.mode", "batch_size"]  # the spec's axis order
    keys = list(zip(table["seed"], table["clip.mode"], table["batch_size"]))
    assert keys == sorted(keys) and len(set(keys)) == 8
    row = table.set_index("run_id").loc[running]
    assert (row["status"], row["progress"]) == ("running", "3/6")
    assert set(table["progress"]) == {"3/6", ""}
    none = table[table["clip.mode"] == "none"]
    assert len(none) == 4  # no threshold column: the grid does not vary it


def test_a_resumed_grid_says_how_many_runs_it_resumes(tmp_path):
    spec, grid_dir, store = prepared(tmp_path)
    first, second, *_ = store.run_ids()
    store.update_status(first, state="queued", attempts=1, interrupted_at=time.time())
    store.update_status(second, state="failed", attempts=1, error="boom")
    stream = io.StringIO()
    run_grid(spec, grid_dir.parent, NoExecutor(), stream=stream)
    assert "8 runs, 1 already stored, 1 to resume, 6 to run on nothing" in stream.getvalue()
    stream = io.StringIO()
    run_grid(spec, grid_dir.parent, NoExecutor(), stream=stream, retry_failed=True)
    assert "0 already stored, 1 to resume, 1 to retry, 6 to run" in stream.getvalue()


# ----------------------------------------------------------------------------- the console


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def result(rid: str, state: str = "completed", **summary) -> dict:
    return {"run_id": rid, "state": state,
            "summary": {"final_acc": 0.9, "duration_s": 75.0, **summary}}


def test_without_a_terminal_runs_log_start_end_and_a_heartbeat(monkeypatch):
    from ablations import runner

    clock = Clock()
    monkeypatch.setattr(runner.time, "monotonic", clock)
    stream = io.StringIO()
    progress = runner.Progress(3, 1, {"a": "seed=0", "b": "seed=1"}, 2, stream, heartbeat_s=30,
                               resuming={"b"})
    progress.step(0, "a", 0, 0)
    progress.step(1, "b", 0, 0)
    progress.step(0, "a", 10, 100, 2.5)
    clock.now += 29
    progress.step(0, "a", 40, 100, 2.0)  # a short run says nothing between its start and end
    clock.now += 2
    progress.step(0, "a", 41, 100, 1.9)
    clock.now += 10
    progress.step(0, "a", 45, 100, 1.8)  # the next heartbeat is 30 s after the last one
    progress.result(result("a"))
    progress.result(result("b", "diverged", final_acc=None, diverged_step=7))
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[1/3] a started   seed=0",
        "[1/3] b resuming  seed=1",
        # step 10 -> 41 in 31 s: 59 steps left, about 59 s
        "[1/3] a running   step 41/100 loss 1.9, 31s, about 59s left  seed=0",
        "[2/3] a completed seed=0 acc=0.900 in 1m15s",
        "[3/3] b diverged  seed=1 diverged at step 7 in 1m15s",
    ]


def test_heartbeat_zero_and_quiet_print_less(monkeypatch):
    from ablations import runner

    clock = Clock()
    monkeypatch.setattr(runner.time, "monotonic", clock)
    stream = io.StringIO()
    progress = runner.Progress(2, 0, {}, 1, stream, heartbeat_s=0)
    progress.step(0, "a", 0, 0)
    clock.now += 1000
    progress.step(0, "a", 5, 10, 1.0)
    assert "running" not in stream.getvalue()

    quiet = io.StringIO()
    progress = runner.Progress(2, 0, {}, 1, Terminal(), verbosity=-1)
    progress.stream = quiet
    progress.step(0, "a", 0, 0)
    progress.result(result("a"))
    progress.result({"run_id": "b", "state": "failed", "error": "ValueError: boom"})
    progress.close()
    assert quiet.getvalue() == "[2/2] b failed    ValueError: boom\n"  # no bars, no table


def test_on_a_terminal_a_summary_table_stays_after_the_bars():
    from ablations import runner

    stream = Terminal()
    labels = {"a": "clip.mode=none", "b": "clip.mode=agc"}
    progress = runner.Progress(2, 0, labels, 1, stream)
    progress.step(0, "b", 0, 0)
    progress.step(0, "b", 5, 10, 1.0)
    progress.result(result("b", final_acc=0.5))
    progress.result(result("a", "diverged", final_acc=None, diverged_step=3))
    progress.close()
    text = stream.getvalue()
    assert " started " not in text  # ordinary runs show in the bars, not as lines
    assert "[2/2] a diverged  clip.mode=none diverged at step 3" in text
    table = text[text.rindex("run_id"):].splitlines()
    assert table[0].split() == ["run_id", "run", "state", "final_acc", "diverged_step", "time"]
    assert [line.split()[:3] for line in table[1:]] == [
        ["a", "clip.mode=none", "diverged"], ["b", "clip.mode=agc", "completed"]]
    assert table[2].split()[3:] == ["0.5", "1m15s"]


def test_verbose_on_a_terminal_also_prints_every_start_and_end():
    from ablations import runner

    stream = Terminal()
    progress = runner.Progress(1, 0, {"a": "seed=0"}, 1, stream, verbosity=1)
    progress.step(0, "a", 0, 0)
    progress.result(result("a"))
    progress.close()
    text = stream.getvalue()
    assert "[0/1] a started   seed=0" in text and "[1/1] a completed seed=0 acc=0.900" in text

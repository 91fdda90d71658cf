"""Fault campaign (issue #13), processes: signals, killed runners and workers, broken process
pools, and Ray over several nodes on one machine (``ray.cluster_utils.Cluster``, marked
``ray``). The signal and kill tests start the real command line, tag it with an environment
variable and look for every process carrying the tag afterwards.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from ablations import executors
from ablations.executors import LocalExecutor
from ablations.runner import run_grid, status_table
from ablations.spec import load_spec
from ablations.store import GridStore, load_results
from sigprop.errors import UserError
from tests.helpers import start_runner, wait_for, write_spec

# ----------------------------------------------------------------------------- processes

TOKEN = "SIGPROP_FAULT_TEST"


def tagged(tag: str) -> list[int]:
    """Pids of live processes started with ``TOKEN=tag`` in their environment."""
    found = []
    needle = f"{TOKEN}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def states(out: Path) -> list[str]:
    store = GridStore(out, "tiny")
    try:
        return [store.state(rid) for rid in store.run_ids()]
    except Exception:  # noqa: BLE001 - polled while being written
        return []


def workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


@linux_only
@pytest.mark.slow
def test_sigterm_requeues_runs_prints_one_line_and_exits_143(tmp_path):
    tag = uuid.uuid4().hex
    spec, out = write_spec(tmp_path, steps=400, seeds="[0, 1]"), tmp_path / "out"
    runner = start_runner(spec, out, "--workers", "1", env={TOKEN: tag})
    wait_for(lambda: "running" in states(out))
    runner.send_signal(signal.SIGTERM)
    stdout, stderr = runner.communicate(timeout=60)
    assert runner.returncode == 143, stderr
    assert stderr.startswith("interrupted after") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stdout + stderr
    assert "running" not in states(out) and "queued" in states(out)
    wait_for(lambda: not tagged(tag), timeout=5)


@linux_only
@pytest.mark.parametrize("when", ["starting", "training"])
@pytest.mark.slow
def test_no_process_outlives_a_killed_runner(tmp_path, when):
    tag = uuid.uuid4().hex
    spec, out = write_spec(tmp_path, steps=400, seeds="[0, 1]"), tmp_path / "out"
    runner = start_runner(spec, out, "--workers", "2" if when == "starting" else "1",
                          env={TOKEN: tag})
    if when == "starting":  # workers spawned, still importing
        wait_for(lambda: len(workers_of(runner.pid)) >= 1)
    else:
        wait_for(lambda: "running" in states(out))
    runner.kill()
    runner.wait(timeout=10)
    killed_at = time.monotonic()
    while tagged(tag) and time.monotonic() - killed_at < 5:
        time.sleep(0.1)
    assert not tagged(tag)


def training_worker(out: Path, runner: subprocess.Popen) -> int | None:
    """The pid of a worker of ``runner`` that is training a run (its status names it)."""
    workers = set(workers_of(runner.pid))
    store = GridStore(out, "tiny")
    for rid in store.run_ids():
        try:
            status = store.status(rid)
        except Exception:  # noqa: BLE001 - polled while being written
            continue
        if status.get("state") == "running" and status.get("pid") in workers:
            return status["pid"]
    return None


@linux_only
@pytest.mark.slow
def test_killing_workers_repeatedly_requeues_their_runs_every_time(tmp_path):
    tag = uuid.uuid4().hex
    spec, out = write_spec(tmp_path, steps=12, seeds="[0, 1]"), tmp_path / "out"
    runner = start_runner(spec, out, "--workers", "2", env={TOKEN: tag})  # one torch thread each
    killed = []
    for _ in range(3):  # each time mid-run: the worker has written its pid into the status
        wait_for(lambda: training_worker(out, runner) not in (None, *killed), timeout=120)
        pid = training_worker(out, runner)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    stdout, stderr = runner.communicate(timeout=240)
    assert runner.returncode == 0, stderr
    assert stdout.count("requeued") >= 3 and "Traceback" not in stderr
    assert list(status_table(out)["status"]) == ["completed", "completed"]
    steps = load_results(out).metrics.dropna(subset=["loss"]).groupby("run_id")["step"]
    assert [list(s) for _, s in steps] == [list(range(12))] * 2  # every step once, resumed


class FlakyPool(ThreadPoolExecutor):
    """Stands in for the process pool (threads, no start-up): the first submit finds the pool
    broken, as when a worker died while the pool was idle."""

    broken_once: list = []

    def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
        super().__init__(workers)

    def submit(self, *args, **kwargs):
        if not FlakyPool.broken_once:
            FlakyPool.broken_once.append(True)
            raise executors.BrokenProcessPool("a worker died while the pool was idle")
        return super().submit(*args, **kwargs)


@pytest.mark.slow
def test_a_pool_broken_at_submit_is_replaced_and_its_runs_requeued(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "ProcessPoolExecutor", FlakyPool)
    monkeypatch.setattr(FlakyPool, "broken_once", [])
    # runs execute in this process's threads: keep its torch thread count as the suite set it
    monkeypatch.setattr(LocalExecutor, "threads_per_worker", lambda self: 1)
    stream = io.StringIO()
    spec = load_spec(write_spec(tmp_path, steps=1, seeds="[0, 1]"))
    outcome = run_grid(spec, tmp_path / "out", LocalExecutor(1, "cpu"), stream=stream)
    assert FlakyPool.broken_once and outcome.counts == {"completed": 2}, stream.getvalue()


class DyingPool(ThreadPoolExecutor):
    """Every task's worker dies: the run must end as failed after MAX_WORKER_DEATHS requeues."""

    def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
        super().__init__(workers)

    def submit(self, *args, **kwargs):
        future = Future()
        future.set_exception(executors.BrokenProcessPool("worker killed"))
        return future


def test_a_run_whose_worker_keeps_dying_is_stored_as_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "ProcessPoolExecutor", DyingPool)
    stream = io.StringIO()
    spec = load_spec(write_spec(tmp_path, steps=1, seeds="[0]"))
    outcome = run_grid(spec, tmp_path / "out", LocalExecutor(1, "cpu"), stream=stream)
    assert outcome.counts == {"failed": 1}
    assert stream.getvalue().count("requeued") == executors.MAX_WORKER_DEATHS
    table = status_table(tmp_path / "out")
    assert list(table["status"]) == ["failed"]
    assert table["error"][0].startswith("worker process died 4 times")


# ----------------------------------------------------------------------------- Ray, several nodes


def node_of(pid: int) -> str | None:
    """The SIGPROP_TEST_NODE label a Ray worker inherited from its node's raylet."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"SIGPROP_TEST_NODE="):
            return item.split(b"=", 1)[1].decode()
    return None


@linux_only
@pytest.mark.ray
def test_ray_cluster_spreads_runs_retries_a_removed_node_and_names_an_unwritable_one(
        tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray._common import utils as common_utils
    from ray._private import utils as private_utils
    from ray.cluster_utils import Cluster

    from ablations.executors import UNWRITABLE_ENV, RayExecutor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The test cluster must not publish itself in /tmp/ray/ray_current_cluster: every
    # ray.init() without an address on this machine (other tests, other users) would join it.
    monkeypatch.setattr(private_utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(common_utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "env_vars": {"SIGPROP_TEST_NODE": "head"}})
    try:
        nodes = {label: cluster.add_node(num_cpus=1, env_vars={"SIGPROP_TEST_NODE": label})
                 for label in ("a", "b")}
        bad = cluster.add_node(num_cpus=1, env_vars={"SIGPROP_TEST_NODE": "c",
                                                     UNWRITABLE_ENV: "1"})
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        spec = load_spec(write_spec(tmp_path, steps=40, seeds="[0, 1]"))
        out = tmp_path / "out"
        executor = RayExecutor(cluster.address, cpus_per_run=1, max_retries=3)
        with pytest.raises(UserError, match=f"not writable from Ray node .*{UNWRITABLE_ENV}"):
            run_grid(spec, out, executor, stream=io.StringIO())
        assert set(states(out)) == {"queued"}  # named before anything ran
        cluster.remove_node(bad)

        outcome = {}

        def run() -> None:
            outcome["grid"] = run_grid(spec, out, RayExecutor(cluster.address, 1, 0, 3),
                                       stream=io.StringIO())

        thread = threading.Thread(target=run)
        thread.start()
        store = GridStore(out, "tiny")

        def placed() -> dict[str, str]:  # run -> node label, for runs training with a checkpoint
            found = {}
            for rid in store.run_ids():
                try:
                    status = store.status(rid)
                except Exception:  # noqa: BLE001 - polled while being written
                    continue
                ckpt = store.run_dir(rid) / "checkpoint.pt"
                if status.get("state") == "running" and ckpt.exists():
                    label = node_of(status["pid"])
                    if label:
                        found[rid] = label
            return found

        wait_for(lambda: len(placed()) == 2, timeout=90)
        where = placed()
        assert sorted(where.values()) == ["a", "b"]  # spread over both nodes
        victim = next(rid for rid, label in where.items() if label == "b")
        cluster.remove_node(nodes["b"])
        thread.join(timeout=180)
        assert not thread.is_alive()
        assert outcome["grid"].counts == {"completed": 2}
        final = {rid: store.status(rid) for rid in store.run_ids()}
        assert final[victim]["attempts"] == 2  # retried on node a, from its checkpoint
        steps = load_results(out).metrics.dropna(subset=["loss"]).groupby("run_id")["step"]
        assert [list(s) for _, s in steps] == [list(range(40))] * 2
    finally:
        ray.shutdown()
        cluster.shutdown()

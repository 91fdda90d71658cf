"""The Ray executor on a real local Ray instance (2 CPUs). Needs the ``ray`` extra."""

import io
import os
import signal
import time

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e .[ray])")

from ablations.executors import LocalExecutor, RayExecutor  # noqa: E402
from ablations.runner import run_grid  # noqa: E402
from ablations.spec import load_spec  # noqa: E402
from ablations.store import GridStore, load_results  # noqa: E402
from tests.helpers import start_runner  # noqa: E402
from tests.test_runner import (  # noqa: E402
    metrics_by_run,
    run_states,
    spec_with_failing_data,
    write_spec,
)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_ray_results_equal_the_local_executor(tmp_path, local_ray):
    spec = load_spec(write_spec(tmp_path, steps=6, seeds="[0, 1, 2]"))
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_grid(spec, local, LocalExecutor(workers=2, device="cpu"), stream=io.StringIO())
    executor = RayExecutor(cpus_per_run=1)
    assert executor.slots() == ["ray", "ray"]
    outcome = run_grid(spec, remote, executor, stream=io.StringIO())
    assert outcome.counts == {"completed": 3}
    expected, got = metrics_by_run(local / "tiny"), metrics_by_run(remote / "tiny")
    assert expected.keys() == got.keys() and len(got) == 3
    for rid in expected:
        pd.testing.assert_frame_equal(got[rid], expected[rid])
    states = run_states(remote / "tiny")
    assert all(s["attempts"] == 1 and s["device"] == "cpu" for s in states.values())


def test_ray_failing_run_is_stored_as_failed(tmp_path, local_ray):
    path = spec_with_failing_data(tmp_path, 'data = ["synthetic", "cifar10"]\n')
    outcome = run_grid(load_spec(path), tmp_path / "out", RayExecutor(), stream=io.StringIO())
    assert outcome.counts == {"completed": 1, "failed": 1}
    runs = load_results(tmp_path / "out").runs.set_index("data")
    assert runs.loc["cifar10", "error"].startswith("UserError: cannot read CIFAR batch")


def test_unwritable_store_is_reported_before_running(tmp_path, local_ray):
    from sigprop.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not writable from Ray node"):
        RayExecutor().check_store(str(blocker / "sub"))


def test_resume_after_the_ray_driver_is_killed(tmp_path):
    spec = write_spec(tmp_path, steps=12, seeds="[0, 1, 2]")
    out = tmp_path / "out"
    env_args = ("--executor", "ray", "--cpus-per-run", "2")  # one run at a time
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    driver = start_runner(spec, out, *env_args)
    grid_dir = out / "tiny"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        states = run_states(grid_dir) if grid_dir.exists() else {}
        values = [s.get("state") for s in states.values()]
        if "completed" in values and "running" in values:
            break
        assert driver.poll() is None, driver.stderr.read()
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    store = GridStore(out, "tiny")
    while any(store.is_locked(rid) for rid in store.run_ids()):  # Ray ends the dead job's tasks
        assert time.monotonic() < deadline + 60
        time.sleep(0.1)
    before = run_states(grid_dir)
    done = {rid: s["finished_at"] for rid, s in before.items() if s["state"] == "completed"}
    assert 1 <= len(done) < 3

    assert start_runner(spec, out, *env_args).wait(timeout=300) == 0
    after = run_states(grid_dir)
    assert all(s["state"] == "completed" for s in after.values()) and len(after) == 3
    assert all(after[rid]["finished_at"] == t and after[rid]["attempts"] == 1
               for rid, t in done.items())

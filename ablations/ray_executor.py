"""The Ray executor: each run of a grid is a Ray task, on one machine or a cluster.

``RayExecutor`` keeps the contract of ``ablations.executors.Executor`` (that module's
docstring); it is re-exported there, so ``from ablations.executors import RayExecutor`` keeps
working. Ray itself is imported only inside the functions that need it: the command line's
light paths and ``LocalExecutor`` never load it, and Ray is an optional dependency.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ablations import worker
from ablations.constants import MALLOC_ENV
from ablations.store import DamagedFile, GridStore
from sigprop.errors import UserError
from sigprop.files import writable_dir_error

# Set on a Ray node (``ray start --env-vars``/its environment), this makes the node refuse the
# results folder: how the multi-node test stands in for a node that does not mount it.
UNWRITABLE_ENV = "SIGPROP_STORE_UNWRITABLE"


def store_check_task(root: str) -> tuple[str, str | None]:
    """On one node: (node, None) if ``root`` is writable there, else (node, reason); node is
    the hostname and the Ray node id (several nodes can share a host)."""
    import ray  # lazy: ray

    node = f"{socket.gethostname()} (node {ray.get_runtime_context().get_node_id()[:12]})"
    if os.environ.get(UNWRITABLE_ENV):
        return node, f"{UNWRITABLE_ENV} is set on this node"
    return node, writable_dir_error(root)


HEAD_GRACE_S = 10.0  # the Ray head unreachable this long: it is lost (Ray's own limit: 60 s)
HEAD_CHECK_S = 1.0
HEAD_LOCK_WAIT_S = 10.0  # then, for the runs its workers held, to let go of them


class HeadWatch:
    """Whether the Ray head still answers: a TCP connect to its GCS every ``HEAD_CHECK_S``,
    lost once none succeeded for ``grace_s``. Without it, Ray ends the driver from inside,
    60 s after the head died (exit 1, Ray's log lines, nothing said of the runs)."""

    def __init__(self, address: str | None, grace_s: float = HEAD_GRACE_S):
        host, _, port = (address or "").rpartition(":")
        self.address, self.host = address, host.strip("[]")
        self.port = int(port) if port.isdigit() else None  # unknown (Ray client): not watched
        self.grace_s = grace_s
        self.last_ok = self.next_check = time.monotonic()

    def lost(self) -> bool:
        now = time.monotonic()
        if self.port is None:
            return False
        if now >= self.next_check:
            self.next_check = now + HEAD_CHECK_S
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    self.last_ok = time.monotonic()
            except OSError:
                pass
        return time.monotonic() - self.last_ok > self.grace_s


def requeue_if_free(root: str, grid: str, run_id: str) -> bool:
    """Store ``run_id`` as queued unless a live process holds it; False if one does."""
    store = GridStore(root, grid)
    lock = store.lock(run_id)
    if not lock.acquire():
        return False
    try:
        if store.status(run_id).get("state") == "running":
            store.update_status(run_id, state="queued")
    except (DamagedFile, OSError):
        pass  # a damaged status is repaired by the next run; the run is not held
    finally:
        lock.release()
    return True


def head_lost(root: str, grid: str, run_ids: list[str], head: HeadWatch) -> UserError:
    """Requeue the runs in flight when the Ray head was lost (waiting a little for workers
    cut off from it to let go of theirs) and say so in one line."""
    waiting = set(run_ids)
    deadline = time.monotonic() + HEAD_LOCK_WAIT_S
    while True:
        waiting = {rid for rid in waiting if not requeue_if_free(root, grid, rid)}
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    held = (f"; {len(waiting)} still held by workers cut off from it, which a rerun continues "
            f"once they stop" if waiting else "")
    return UserError(
        f"lost the Ray head at {head.address} (no answer for {head.grace_s:g} s): "
        f"{len(run_ids) - len(waiting)} unfinished run(s) queued again{held}; run the same "
        f"command again (with or without Ray) to finish the grid"
    )


def ray_run_task(root: str, grid: str, run_id: str, gpus: float, threads: int,
                 events: Any, deterministic: bool = False) -> dict:
    import ray  # lazy: ray

    # Ray sets CUDA_VISIBLE_DEVICES for tasks that asked for GPUs, so "cuda" is the right one.
    device = "cuda" if gpus > 0 else "cpu"
    result = worker.execute_run(root, grid, run_id, device, threads, events, 0, deterministic)
    return {**result, "node": ray.get_runtime_context().get_node_id()}


class RayExecutor:
    """Each run is a Ray task (``ray.remote`` with ``num_cpus`` / ``num_gpus``).

    Without an address a local Ray instance is started; ``RAY_ADDRESS`` is honoured. Worker
    crashes are retried ``max_retries`` times; exceptions inside a run are stored as a failed
    run by ``execute_run`` and never retried. The store must be on a filesystem every node
    can write (checked before anything runs).
    """

    def __init__(self, address: str | None = None, cpus_per_run: float = 1,
                 gpus_per_run: float = 0, max_retries: int = 3, num_cpus: int | None = None,
                 threads: int = worker.DEFAULT_THREADS, deterministic: bool = False):
        try:
            import ray  # lazy: ray  # noqa: F401
        except ImportError:
            raise UserError(
                "--executor ray needs Ray: pip install -e \".[ray]\" (or pip install ray)"
            ) from None
        if cpus_per_run <= 0 or gpus_per_run < 0:
            raise UserError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got "
                            f"{cpus_per_run} and {gpus_per_run}")
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.cpus_per_run, self.gpus_per_run = cpus_per_run, gpus_per_run
        self.max_retries = max_retries
        self.num_cpus = num_cpus  # only for a local instance started here
        self.threads, self.deterministic = worker.check_threads(threads), deterministic

    def connect(self) -> None:
        import ray  # lazy: ray

        if ray.is_initialized():
            return
        env_vars = {key: os.environ.get(key, value) for key, value in MALLOC_ENV.items()}
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False,
                                  "runtime_env": {"env_vars": env_vars}}
        if self.address:
            kwargs["address"] = self.address
        elif self.num_cpus:
            kwargs["num_cpus"] = self.num_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = self.address or "a local instance"
            raise UserError(f"cannot connect to Ray at {where}: {err}".splitlines()[0]) from None

    def slots(self) -> list[str]:
        import ray  # lazy: ray

        self.connect()
        cpus = ray.cluster_resources().get("CPU", 1)
        return ["ray"] * max(1, int(cpus // self.cpus_per_run))

    def describe(self) -> str:
        import ray  # lazy: ray

        self.connect()
        res = ray.cluster_resources()
        return (f"Ray ({len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, "
                f"{res.get('GPU', 0):g} GPUs; {self.cpus_per_run:g} CPU / "
                f"{self.gpus_per_run:g} GPU per run)")

    def check_store(self, root: str) -> None:
        import ray  # lazy: ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: ray

        self.connect()
        check = ray.remote(store_check_task)
        refs = [
            check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                node["NodeID"], soft=False)).remote(root)
            for node in ray.nodes() if node.get("Alive")
        ]
        problems = [(host, why) for host, why in ray.get(refs) if why]
        if problems:
            host, why = problems[0]
            raise UserError(
                f"results folder {root} is not writable from Ray node {host} ({why}); put it "
                f"on a filesystem shared by every node"
            )

    def run(
        self, root: str, grid: str, run_ids: list[str], on_result: worker.ResultCallback,
        on_step: worker.StepCallback | None = None,
    ) -> None:
        import ray  # lazy: ray
        from ray.exceptions import RayError, TaskCancelledError  # lazy: ray
        from ray.util.queue import Empty, Queue  # lazy: ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: ray

        self.check_store(root)
        task = ray.remote(ray_run_task).options(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
            max_retries=self.max_retries, retry_exceptions=False,
        )
        # the progress queue lives on the driver's node: a worker node leaving the cluster
        # must not take it along (its death would fail the runs that report to it)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        submit = lambda rid: task.remote(root, grid, rid, self.gpus_per_run, self.threads,  # noqa: E731
                                         events, self.deterministic)
        refs = {submit(rid): rid for rid in run_ids}
        retry_at: dict[str, float] = {}
        head = HeadWatch(getattr(ray.get_runtime_context(), "gcs_address", None))
        lost: UserError | None = None
        try:
            while refs or retry_at:
                if head.lost():
                    lost = head_lost(root, grid, [*refs.values(), *retry_at], head)
                    break
                for rid, when in list(retry_at.items()):
                    if when <= time.monotonic():
                        retry_at.pop(rid)
                        refs[submit(rid)] = rid
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.2) if refs else ([], [])
                if not refs:
                    time.sleep(0.2)
                while on_step is not None:
                    try:
                        _, _, step_rid, step, total, loss = events.get_nowait()
                    except Empty:
                        break
                    except RayError:  # progress is best effort; the results still arrive
                        on_step = None
                        break
                    on_step(0, step_rid, step, total, loss)
                for ref in ready:
                    rid = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except TaskCancelledError:
                        continue
                    except RayError as err:  # the worker died more than max_retries times
                        line = f"{type(err).__name__}: {err}".splitlines()[0]
                        result = {"run_id": rid, "state": "failed", "error": line}
                    if result["state"] == "busy":
                        retry_at[rid] = time.monotonic() + worker.BUSY_RETRY_S
                        continue
                    for follow_up in on_result(result) or ():
                        refs[submit(follow_up)] = follow_up
        except KeyboardInterrupt:
            for ref in refs:  # a run receives KeyboardInterrupt and stores itself as queued
                ray.cancel(ref)
            for ref, rid in refs.items():
                try:
                    on_result(ray.get(ref, timeout=30))
                except (RayError, TimeoutError):
                    on_result({"run_id": rid, "state": "interrupted"})
            raise
        finally:
            if lost is None:  # without a head, Ray calls would wait for it
                try:
                    ray.kill(events.actor)
                except RayError:
                    pass
        if lost is not None:
            raise lost

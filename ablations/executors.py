"""Executors: where the runs of a grid execute. ``LocalExecutor`` uses worker processes;
``RayExecutor`` (in ``ablations.ray_executor``, re-exported here) runs them as Ray tasks.

An executor takes the ids of stored runs and calls ``execute_run`` for each, reporting
``on_result(dict)`` as runs end and ``on_step(slot, run_id, step, total, loss)`` as they
progress (``total`` 0: the run has just started; ``loss`` the latest read back, or None).
``on_result`` may return ids of further stored runs: the executor runs them too, in the same
pool, before it returns (the frontier search submits a cell's next probe that way).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import popen_spawn_posix, spawn
from typing import Any, Protocol, runtime_checkable

from ablations.constants import MALLOC_ENV
from ablations.ray_executor import (
    HEAD_CHECK_S,
    HEAD_GRACE_S,
    HEAD_LOCK_WAIT_S,
    UNWRITABLE_ENV,
    HeadWatch,
    RayExecutor,
    head_lost,
    ray_run_task,
    requeue_if_free,
    store_check_task,
)
from ablations.store import DamagedFile, GridStore
from ablations.worker import (
    BUSY_RETRY_S,
    DEFAULT_THREADS,
    ResultCallback,
    StepCallback,
    check_threads,
    execute_run,
    resolve_device,
)
from sigprop.errors import UserError

# The Ray names are re-exported, so code written against this module keeps importing them here.
__all__ = [
    "BUSY_RETRY_S", "DEATHSIG_PRELUDE", "HEAD_CHECK_S", "HEAD_GRACE_S", "HEAD_LOCK_WAIT_S",
    "MAX_WORKER_DEATHS", "STOP_SIGNALS", "UNWRITABLE_ENV", "Executor", "HeadWatch",
    "LocalExecutor", "RayExecutor", "ResultCallback", "StepCallback", "dead_workers",
    "deathsig_command_line", "head_lost", "ray_run_task", "requeue_if_free", "run_pid",
    "set_parent_death_signal", "stop_signals_blocked", "store_check_task", "worker_context",
    "worker_died", "worker_environment",
]


@runtime_checkable
class Executor(Protocol):
    """What ``run_grid`` and ``run_frontier`` need of an executor (module docstring):
    :class:`LocalExecutor`, :class:`RayExecutor`, or one of your own (the tests run grids
    in their own process with one).

    ``slots()``: one entry per run that can execute at once (a device name such as "cpu" or
    "cuda:0"); ``describe()``: where the runs execute, for the console (may connect, so it is
    called only when there is something to run); ``run(...)``: execute the stored runs
    ``run_ids`` of ``root/grid``, calling ``on_result`` as each ends (and running the ids it
    returns) and ``on_step`` as they progress; it returns when all have ended. The runner
    also reads ``device``, ``threads``, ``deterministic`` and ``gpus_per_run`` when an
    executor has them, for the environment its runs will record."""

    def slots(self) -> list[str]: ...

    def describe(self) -> str: ...

    def run(self, root: str, grid: str, run_ids: list[str], on_result: ResultCallback,
            on_step: StepCallback | None = None) -> None: ...


MAX_WORKER_DEATHS = 3  # requeues of a run whose worker died; one more death: failed


def worker_environment() -> None:
    """Set the allocator variables (unless the user set them) for processes started later."""
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)


def set_parent_death_signal(parent_pid: int) -> None:
    """Die with the runner (kill -9 included) instead of training on as an orphan; the run's
    checkpoint lets the next invocation continue it. If the runner died before this line
    (while this process was starting), exit now."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


# Run by each worker process on Linux before anything else (before it unpickles its task, which
# imports torch): set the parent-death signal, then check that the runner is still its parent.
# Without it a worker still importing torch when the runner is killed (seconds on a busy
# machine) would live on until it reached the pool's initializer. The code goes inline in the
# worker's ``python -c`` command line: no launcher file is written or exec'd (one in the shared
# temp folder could be planted or rewritten by another local user).
DEATHSIG_PRELUDE = (
    "import ctypes, os, signal; "
    "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL); "  # PR_SET_PDEATHSIG
    "os.getppid() != {pid} and os._exit(1); "  # the runner died before the line above
)
_prelude = threading.local()


def deathsig_command_line(cmd: list[str]) -> list[str]:
    """``cmd`` (a spawn command line: ``python [opts] -c CODE ...``) with the prelude put
    before CODE, naming this process as the runner."""
    at = len(cmd) - cmd[::-1].index("-c")  # the last -c: the stdlib puts its own after opts
    return [*cmd[:at], DEATHSIG_PRELUDE.format(pid=os.getpid()) + cmd[at], *cmd[at + 1:]]


def _command_line(original: Callable[..., list[str]]) -> Callable[..., list[str]]:
    def command_line(**kwds: Any) -> list[str]:
        cmd = original(**kwds)
        if getattr(_prelude, "active", False) and "-c" in cmd:
            return deathsig_command_line(cmd)
        return cmd

    command_line.sigprop_prelude = True  # type: ignore[attr-defined]
    return command_line


class _DeathsigPopen(popen_spawn_posix.Popen):
    def _launch(self, process_obj: Any) -> None:
        # The stdlib builds the command line in spawn.get_command_line; the wrapper installed
        # once adds the prelude only for launches of this class, in this thread.
        if not getattr(spawn.get_command_line, "sigprop_prelude", False):
            spawn.get_command_line = _command_line(spawn.get_command_line)
        _prelude.active = True
        try:
            super()._launch(process_obj)
        finally:
            _prelude.active = False


class _DeathsigProcess(mp.context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _DeathsigPopen(process_obj)


class _DeathsigContext(mp.context.SpawnContext):
    Process = _DeathsigProcess


def worker_context() -> Any:
    """The multiprocessing context of the worker pools: spawn, with the prelude on Linux."""
    if sys.platform.startswith("linux"):
        return _DeathsigContext()
    return mp.get_context("spawn")


_EVENTS: Any = None  # this worker's end of the progress queue (set by _init_worker)
_STOPPED = False  # Ctrl-C / SIGTERM arrived while this worker was starting
_IN_TASK = False  # a run is executing in this worker
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread: processes started meanwhile inherit the mask, so
    a Ctrl-C while they import torch stays pending (no traceback) until they are ready."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _init_worker(parent_pid: int, events: Any) -> None:
    global _EVENTS, _STOPPED
    set_parent_death_signal(parent_pid)
    _STOPPED = bool(signal.sigpending() & STOP_SIGNALS)
    for sig in STOP_SIGNALS:  # ignoring a blocked pending signal discards it
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:  # SIGTERM like Ctrl-C: the run stores itself as queued
        signal.signal(sig, _on_stop_signal)
    events.cancel_join_thread()  # progress events are best effort: never block an exit
    _EVENTS = events


def _on_stop_signal(signum: int, frame: Any) -> None:
    # During a run: KeyboardInterrupt, so the run stores itself as queued. Idle (waiting for a
    # task, e.g. the survivors of a pool broken by a killed worker, which the pool ends with
    # SIGTERM): nothing to store, so leave quietly instead of printing a traceback.
    if _IN_TASK:
        raise KeyboardInterrupt
    os._exit(0)


def _pool_task(root: str, grid: str, run_id: str, device: str, threads: int,
               slot: int, deterministic: bool = False) -> dict:
    global _IN_TASK
    if _STOPPED:
        return {"run_id": run_id, "state": "interrupted"}
    _IN_TASK = True
    try:
        return execute_run(root, grid, run_id, device, threads, _EVENTS, slot, deterministic)
    finally:
        _IN_TASK = False


class LocalExecutor:
    """Runs on this machine: ``workers`` processes on CPU, or slots on each visible GPU.

    On CUDA there are ``runs_per_gpu`` slots per GPU and runs are spread over the GPUs; on
    CPU the cores are divided between the workers.
    """

    def __init__(self, workers: int = 1, device: str = "auto", runs_per_gpu: int = 1,
                 threads: int = DEFAULT_THREADS, deterministic: bool = False):
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        if runs_per_gpu < 1:
            raise UserError(f"--runs-per-gpu must be >= 1, got {runs_per_gpu}")
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
        self.device = resolve_device(device)
        if self.device.startswith("cuda"):
            import torch  # lazy: torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda asked for, but no CUDA device is available")
        self.workers = workers
        self.runs_per_gpu = runs_per_gpu
        self.threads, self.deterministic = check_threads(threads), deterministic

    def slots(self) -> list[str]:
        if self.device == "cuda":
            import torch  # lazy: torch

            gpus = torch.cuda.device_count()
            return [f"cuda:{g}" for _ in range(self.runs_per_gpu) for g in range(gpus)]
        if self.device.startswith("cuda:"):
            return [self.device] * self.runs_per_gpu
        return [self.device] * self.workers

    def threads_per_worker(self) -> int:
        return self.threads  # fixed, not cores // workers: see worker.DEFAULT_THREADS

    def describe(self) -> str:
        slots = self.slots()
        return f"{len(slots)} worker(s) on {', '.join(sorted(set(slots)))}"

    def run(
        self, root: str, grid: str, run_ids: list[str], on_result: ResultCallback,
        on_step: StepCallback | None = None,
    ) -> None:
        slots = self.slots()
        threads = self.threads_per_worker()
        worker_environment()
        ctx = worker_context()
        events: Any = None

        def new_pool() -> ProcessPoolExecutor:
            # No Manager process: the queue reaches the workers when they start, so nothing
            # but the workers (each with a parent-death signal) outlives a killed runner. A
            # fresh queue per pool: a worker killed while writing may leave its lock taken.
            nonlocal events
            events = ctx.Queue()
            events.cancel_join_thread()
            return ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_init_worker,
                                       initargs=(os.getpid(), events))

        pool = new_pool()
        pending = collections.deque(run_ids)
        running: dict[Future, tuple[int, str]] = {}
        free = list(range(len(slots)))
        retry_at: dict[str, float] = {}
        deaths: dict[str, int] = {}

        def pool_broke() -> None:
            # a worker died (killed, out of memory): the pool is unusable, every run it held
            # goes back to the queue and resumes from its checkpoint in a fresh pool; only
            # the run of the worker that died counts towards MAX_WORKER_DEATHS
            nonlocal pool, free
            workers = dict(getattr(pool, "_processes", None) or {})
            pool.shutdown(wait=False, cancel_futures=True)
            culprits = dead_workers(workers)
            pool = new_pool()
            held = {rid: run_pid(root, grid, rid) for _, rid in running.values()}
            # no culprit known (exit codes not read): every run it held is suspect
            blamed = set(held)
            if culprits:
                blamed = {rid for rid, pid in held.items() if pid in culprits}
            for _, rid in running.values():
                deaths[rid] = deaths.get(rid, 0) + (rid in blamed)
                if deaths[rid] > MAX_WORKER_DEATHS:
                    pending.extend(on_result(worker_died(root, grid, rid, deaths[rid])) or ())
                else:
                    pending.appendleft(rid)
                    on_result({"run_id": rid, "state": "requeued",
                               "error": "its worker process died; it resumes from its checkpoint"})
            running.clear()
            free = list(range(len(slots)))

        try:
            while pending or running:
                while free and pending:
                    rid = pending.popleft()
                    if retry_at.get(rid, 0) > time.monotonic():
                        pending.append(rid)
                        if all(retry_at.get(r, 0) > time.monotonic() for r in pending):
                            break
                        continue
                    slot = free.pop(0)
                    try:
                        with stop_signals_blocked():
                            future = pool.submit(_pool_task, root, grid, rid, slots[slot],
                                                 threads, slot, self.deterministic)
                    except BrokenProcessPool:
                        pending.appendleft(rid)
                        free.append(slot)
                        pool_broke()
                        continue
                    running[future] = (slot, rid)
                if not running:
                    time.sleep(0.2)  # only runs held by another runner are left
                done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                self._drain(events, on_step)
                broken = False
                for future in done:
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken = True  # requeued below with the other runs of the pool
                        continue
                    slot, rid = running.pop(future)
                    free.append(slot)
                    result = self._result(future, rid)
                    if result["state"] == "busy":  # another runner holds it: come back later
                        retry_at[rid] = time.monotonic() + BUSY_RETRY_S
                        pending.append(rid)
                        continue
                    # follow-ups first: a frontier cell finishes before the next one starts
                    pending.extendleft(reversed(on_result(result) or ()))
                if broken:
                    pool_broke()
        except KeyboardInterrupt:
            self._interrupt(pool)
            for future, (_, rid) in running.items():
                on_result(self._result(future, rid))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            events.close()

    @staticmethod
    def _drain(events, on_step: StepCallback | None) -> None:
        while True:
            try:
                _, slot, rid, step, total, loss = events.get_nowait()
            except (queue.Empty, EOFError, OSError):
                return
            if on_step:
                on_step(slot, rid, step, total, loss)

    @staticmethod
    def _result(future: Future, rid: str) -> dict:
        try:
            return future.result()
        except (BrokenProcessPool, KeyboardInterrupt):  # stopped: resumes next time
            return {"run_id": rid, "state": "interrupted"}
        except BaseException as err:  # noqa: BLE001 - reported as the run's failure
            line = f"{type(err).__name__}: {err}".splitlines()[0]
            return {"run_id": rid, "state": "failed", "error": line}

    @staticmethod
    def _interrupt(pool: ProcessPoolExecutor) -> None:
        # Ctrl-C in a terminal reaches the workers already; a signal sent to the runner alone
        # does not, so pass it on. Workers store their run as queued (resumable) and return.
        for process in list(getattr(pool, "_processes", {}).values()):
            try:
                os.kill(process.pid, signal.SIGINT)
            except (ProcessLookupError, OSError):
                pass


def dead_workers(workers: dict) -> set[int]:
    """Pids of pool processes that died of something other than the pool's own SIGTERM."""
    out = set()
    for pid, process in workers.items():
        process.join(timeout=2)
        if process.exitcode not in (None, 0, -signal.SIGTERM):
            out.add(pid)
    return out


def run_pid(root: str, grid: str, run_id: str) -> int | None:
    """The pid of the process that last started ``run_id`` (from its status)."""
    try:
        return GridStore(root, grid).status(run_id).get("pid")
    except DamagedFile:
        return None


def worker_died(root: str, grid: str, run_id: str, times: int) -> dict:
    """Store ``run_id`` as failed after its worker process died ``times`` times."""
    line = (f"worker process died {times} times while running it (killed or out of memory); "
            f"--retry-failed resumes it from its checkpoint")
    store = GridStore(root, grid)
    lock = store.lock(run_id)
    result = {"run_id": run_id, "state": "failed", "error": line}
    if lock.acquire():
        try:
            store.update_status(run_id, state="failed", error=line, finished_at=time.time())
        except OSError as err:
            result["store_error"] = err.strerror or str(err)
        finally:
            lock.release()
    return result

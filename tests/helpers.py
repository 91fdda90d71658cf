"""What several test files share: the tiny grid spec, an executor that runs in this process,
the command line started as a subprocess, and polling.

One copy here, so a change to how the runner is started or to the tiny grid reaches every test
that relies on it (the copies had drifted: one executor recorded its thread count, another did
not).
"""

from __future__ import annotations

import functools
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ablations.runner import run_grid, status_table
from ablations.shipped import GRIDS_DIR
from ablations.spec import Run, expand, load_spec
from ablations.store import GridStore
from ablations.worker import execute_run

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(name: str = "tiny", grid: str = "seed = [0, 1]", clip: str = "",
              width_mult: float = 0.125, description: str = "", **base: object) -> str:
    """A spec of the tiny NF-ResNet on synthetic data, as TOML text ending in its ``[grid]``
    section (callers append more sections after it).

    ``base``: the ``[base]`` values that differ from the defaults below (32 training images,
    16 test images, 2 steps, batch 16, no evaluation, seed 0), a default given as None left
    out of the spec; ``clip``: the ``[base.clip]`` lines, if any; ``grid``: the lines of
    ``[grid]`` (none: no such section); ``description``: the spec's, if any."""
    values = {"data": "synthetic", "train_size": 32, "test_size": 16, "steps": 2,
              "batch_size": 16, "eval_every": 0, "seed": 0, **base}
    lines = [f'name = "{name}"'] + ([f'description = "{description}"'] if description else [])
    lines += ["[base]"]
    lines += [f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
              for key, value in values.items() if value is not None]
    # the smallest NF-ResNet that trains: one block per stage
    lines += ["[base.model]", 'name = "nf_resnet26"', 'stem = "cifar"',
              f"width_mult = {width_mult}", "depths = [1, 1, 1, 1]"]
    text = "\n".join(lines) + "\n"
    if clip:
        text += "[base.clip]\n" + clip.strip() + "\n"
    return text + ("[grid]\n" + grid.strip() + "\n" if grid else "")


@functools.cache
def shipped_runs(name: str) -> tuple[Run, ...]:
    """``expand`` of the shipped grid ``name`` as shipped, once per test process: for the tests
    that only read its runs (agc_batch alone takes about a second to expand)."""
    return tuple(expand(load_spec(GRIDS_DIR / f"{name}.toml")))


def write_spec(folder: Path, steps: int = 2, seeds: str = "[0, 1]") -> Path:
    """``folder/tiny.toml``: the tiny grid over ``seeds``, checkpointed and probed every step."""
    path = folder / "tiny.toml"
    path.write_text(tiny_spec(steps=steps, checkpoint_every=1, probe_every=1,
                              grid=f"seed = {seeds}"))
    return path


class InlineExecutor:
    """Runs in this process, one after the other: the store logic without process start-up.

    ``threads`` and ``deterministic`` are passed to each run and recorded as the runner's
    environment, as the real executors do; the caller's torch thread count is restored."""

    device = "cpu"

    def __init__(self, threads: int = 1, deterministic: bool = False):
        self.threads, self.deterministic = threads, deterministic

    def slots(self) -> list[str]:
        return ["cpu"]

    def describe(self) -> str:
        return "this process"

    def run(self, root, grid, run_ids, on_result, on_step=None) -> None:
        before = torch.get_num_threads()
        try:
            for rid in run_ids:
                on_result(execute_run(root, grid, rid, "cpu", self.threads,
                                      deterministic=self.deterministic))
        finally:
            torch.set_num_threads(before)


def run_inline(spec: Path, out: Path, overrides: list[str] | None = None,
               **kwargs) -> tuple:
    """Run the grid at ``spec`` (with ``--set`` ``overrides``) into ``out`` with the
    :class:`InlineExecutor`: (outcome, what the runner printed). ``threads`` and
    ``deterministic`` go to the executor, the other keywords to ``run_grid``."""
    stream = io.StringIO()
    executor_args = {k: kwargs.pop(k) for k in ("threads", "deterministic") if k in kwargs}
    outcome = run_grid(load_spec(spec, overrides), out, InlineExecutor(**executor_args),
                       stream=stream, **kwargs)
    return outcome, stream.getvalue()


def store_finished_grid(folder: Path) -> Path:
    """Run the tiny grid (2 steps, 2 seeds) under ``folder``: spec ``folder/tiny.toml``, store
    ``folder/out/tiny``, both runs completed. Returns ``folder``."""
    outcome, _ = run_inline(write_spec(folder), folder / "out")
    assert outcome.counts == {"completed": 2}
    return folder


def run_dirs(grid_dir: Path) -> list[Path]:
    return sorted(p for p in (grid_dir / "runs").iterdir())


def rerun_repairs(grid: Path, run_dir: Path, name: str, damaged: bytes, message: str) -> str:
    """Run the grid of :func:`store_finished_grid` at ``grid`` again, one of whose runs,
    ``run_dir``, has its file ``name`` damaged (``damaged``: its bytes): that run runs again and
    the other is skipped, the runner prints ``message``, the damaged file is kept aside as it
    was and every run ends completed. Returns what the runner printed."""
    outcome, text = run_inline(grid.parent.parent / "tiny.toml", grid.parent)
    assert outcome.counts == {"completed": 1} and outcome.skipped == 1
    assert message in text
    kept = list(run_dir.glob(f"{name}.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged  # kept aside, never deleted
    assert set(status_table(grid)["status"]) == {"completed"}
    return text


def start_runner(spec: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``run_ablations.py run SPEC --out OUT`` on the CPU as a subprocess, with ``env`` added
    to this process's environment."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_ablations.py"), "run", str(spec), "--out", str(out),
         "--device", "cpu", "--no-report", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def kill_9(runner: subprocess.Popen, store: GridStore, deadline: float) -> None:
    """SIGKILL the runner, then wait (until ``deadline``, monotonic) for its workers, which
    die with it, to let go of their runs' locks."""
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait(timeout=30)
    while any(store.is_locked(rid) for rid in store.run_ids()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def wait_for(condition: Callable[[], object], timeout: float = 120) -> None:
    """Poll ``condition`` every 50 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)

"""Security (issue 24): nobody else's code runs as the user.

- The worker launcher: another local user plants a file (or a symlink) at the predictable path
  the runner once used in the shared temp folder, with the content it expects, and rewrites it
  after the runner checked it. The planted code must never run.
- CIFAR batch files: a batch whose unpickling runs a command must not run it, in a grid run on
  ``data_dir`` and in ``spp --input cifar10``; malformed batches are one line naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from ablations import executors
from ablations.executors import LocalExecutor
from ablations.runner import run_grid
from ablations.spec import load_spec
from tests.test_faults import write_spec

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux launcher")
NOBODY = 65534

# What the runner used to write to, and exec from, <tmp>/sigprop-launcher-<uid>-<digest>
OLD_LAUNCHER = """#!{python} -SE
import ctypes, os, signal, sys
ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if str(os.getppid()) != os.environ.get("SIGPROP_RUNNER_PID"):
    os._exit(1)  # the runner died before the line above
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


@pytest.fixture
def shared_temp_folder() -> Iterator[Path]:
    """A world-writable sticky folder, like /tmp, that another user can reach (pytest's
    tmp_path is inside a folder private to us)."""
    folder = Path(tempfile.mkdtemp(prefix="sigprop-shared-", dir=tempfile.gettempdir()))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


def as_nobody(action) -> bool:
    """Call ``action()`` in a forked child running as uid 65534; False where that is not
    possible (not root). A fork, not a new interpreter: uid 65534 may not reach ours."""
    if os.getuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker could not write its file"
    return True


@linux_only
@pytest.mark.parametrize("plant", ["file", "symlink"])
def test_a_launcher_planted_in_the_shared_temp_folder_never_runs(
        tmp_path, monkeypatch, shared_temp_folder, plant):
    shared = shared_temp_folder
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.setenv("TMPDIR", str(shared))
    expected = OLD_LAUNCHER.format(python=sys.executable)
    digest = hashlib.sha256(expected.encode()).hexdigest()[:12]
    path = shared / f"sigprop-launcher-{os.getuid()}-{digest}"
    target = shared / "attacker-owned" if plant == "symlink" else path
    marker = shared / "planted-code-ran"
    payload = f'#!/bin/sh\nid -u > {marker}\nexec {sys.executable} "$@"\n'

    def write_as_attacker(text: str) -> None:
        def write() -> None:
            target.write_text(text)
            target.chmod(0o777)

        if not as_nobody(write):  # not root: the attacker's file, at least, is not ours
            write()

    write_as_attacker(expected)  # planted before the runner starts, with the content it checks
    if plant == "symlink":
        path.symlink_to(target)
    assert os.lstat(path).st_uid in (NOBODY, os.getuid())
    rewrites = []

    class AttackerRewritesAfterTheCheck(ProcessPoolExecutor):
        # workers start at the first submit, after any check the runner made of the launcher
        def submit(self, *args, **kwargs):
            write_as_attacker(payload)
            rewrites.append(True)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(executors, "ProcessPoolExecutor", AttackerRewritesAfterTheCheck)
    spec = load_spec(write_spec(tmp_path, steps=1, seeds="[0]"))
    stream = io.StringIO()
    outcome = run_grid(spec, tmp_path / "out", LocalExecutor(1, "cpu"), stream=stream)
    assert rewrites and outcome.counts == {"completed": 1}, stream.getvalue()
    assert not marker.exists(), f"planted code ran as uid {marker.read_text().strip()}"
    # and sigprop wrote nothing there to exec (torch may keep its compile cache there)
    written = {p.name for p in shared.iterdir()} - {path.name, target.name}
    assert not [name for name in written if name.startswith("sigprop")], written


def parent_death_signal(results) -> None:
    """In a worker: the parent-death signal it runs under (PR_GET_PDEATHSIG)."""
    import ctypes

    value = ctypes.c_int(0)
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(value))
    results.put(value.value)


@linux_only
def test_workers_start_with_the_parent_death_signal_set_inline():
    cmd = executors.deathsig_command_line(["python", "-c", "print(1)", "--multiprocessing-fork"])
    assert cmd[0] == "python" and cmd[1] == "-c" and cmd[3] == "--multiprocessing-fork"
    assert "prctl(1, " in cmd[2] and cmd[2].endswith("print(1)")
    assert f"!= {os.getpid()}" in cmd[2]  # the runner's pid, not an environment variable
    ctx = executors.worker_context()
    assert ctx.get_start_method() == "spawn"
    results = ctx.Queue()
    proc = ctx.Process(target=parent_death_signal, args=(results,))
    proc.start()
    assert results.get(timeout=60) == signal.SIGKILL
    proc.join(timeout=60)
    assert proc.exitcode == 0

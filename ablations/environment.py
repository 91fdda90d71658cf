"""What a run ran under: the versions, machine and device it records in its status, and the
keys of those (:data:`NUMERIC_ENVIRONMENT`) that change its numbers for the same config.

A low layer of ``ablations`` (tests/test_architecture.py); ``ablations.store`` re-exports it.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy
import pandas as pd

import sigprop


def environment(device: str | None = None) -> dict:
    """What a run ran under, as this process has it set now: versions, machine, device, and
    what changes its numbers besides its config (``threads``, ``deterministic``; see
    :data:`NUMERIC_ENVIRONMENT`)."""
    import torch  # lazy: torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "sigprop": sigprop.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": device,
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
        env["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        env["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return env


# The recorded environment keys that change a run's numbers for the same config: a stored run
# made under other values is not what a rerun here would store.
NUMERIC_ENVIRONMENT = ("threads", "torch", "device", "deterministic")


def numeric_environment(threads: int, deterministic: bool, device: str) -> dict:
    """The :data:`NUMERIC_ENVIRONMENT` a run started now by this process would record."""
    import torch  # lazy: torch

    return {"threads": threads, "torch": torch.__version__, "device": device,
            "deterministic": bool(deterministic)}


def env_value(key: str, value: Any) -> Any:
    """A recorded environment value as compared: the device kind, not its index."""
    if key == "device" and isinstance(value, str):
        return value.split(":")[0]  # cuda:0 and cuda:1 are the same kind of device
    return value


def environment_differences(recorded: Any, current: dict) -> list[str]:
    """How a run's recorded environment differs from ``current`` in the keys that change its
    numbers: ["threads 2 vs 1", "deterministic not recorded"...]; [] when it matches. A store
    written before a key was recorded says "not recorded" for it."""
    recorded = recorded if isinstance(recorded, dict) else {}
    out = []
    for key in NUMERIC_ENVIRONMENT:
        if key not in current:
            continue
        if recorded.get(key) is None:
            out.append(f"{key} not recorded")
        elif env_value(key, recorded[key]) != env_value(key, current[key]):
            out.append(f"{key} {env_value(key, recorded[key])} vs "
                       f"{env_value(key, current[key])}")
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

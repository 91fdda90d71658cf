"""A training run's checkpoint: what it holds, how it is written and how a run resumes from it.

A checkpoint is one ``torch.save`` of plain containers, tensors and numbers, read back with
``weights_only=True`` (no class is unpickled, so the file of an untrusted folder cannot run
code): the run's config as :meth:`TrainConfig.to_dict`, its step and status, the state dicts
of the model, optimizer, EMA model, grad scaler and batch stream, the torch RNG states, the
metric and evaluation rows, and the probe's (and a diverged run's flight recorder's) frames
as parquet bytes. It is written atomically (:func:`atomic_save`): a killed run leaves the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from sigprop.errors import UserError
from sigprop.files import atomic_path

if TYPE_CHECKING:
    from sigprop.train import _Run

CHECKPOINT_FORMAT = 1
# Fields a resumed run may change without changing the trajectory.
RESUME_FREE_FIELDS = ("checkpoint_every", "device", "compile", "eval_batch_size", "data_dir",
                      "record_early", "record_ring")


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` that never leaves half a checkpoint (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, on the CPU, with nothing unpickled but tensors and plain
    containers."""
    return torch.load(path, map_location="cpu", weights_only=True)


def frame_to_bytes(frame: pd.DataFrame) -> torch.Tensor:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def frame_from_bytes(data: torch.Tensor | None) -> pd.DataFrame:
    if data is None:
        return pd.DataFrame()
    return pd.read_parquet(io.BytesIO(data.numpy().tobytes()))


def run_state(run: _Run) -> dict:
    """Everything a resumed ``run`` needs to go on exactly as if it had not stopped."""
    blocks = run.blocks()
    return {
        "format": CHECKPOINT_FORMAT,
        "config": run.config.to_dict(),
        "step": run.step,
        "status": run.status,
        "diverged_step": run.diverged_step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "ema": None if run.ema_model is None else run.ema_model.state_dict(),
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "stream": run.stream.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "metrics": run.metric_rows,
        "evals": run.eval_rows,
        "last_eval": [run.last_eval_step, run.last_eval_row],
        "blocks": None if blocks.empty else frame_to_bytes(blocks),
        "gain_check": run.gain_check.state(),
        # only a diverged run's: the recorder's buffer is not carried over a resume
        "flight": None if run.status != "diverged" else frame_to_bytes(run.flight()),
    }


def check_same_config(state: dict, config: dict, path: Path) -> None:
    """Refuse a checkpoint of another format, or written by a config that differs from
    ``config`` (a :meth:`TrainConfig.to_dict`) in more than :data:`RESUME_FREE_FIELDS`."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has an unknown format; remove it to restart")
    mine, theirs = dict(config), dict(state["config"])
    for key in RESUME_FREE_FIELDS:
        mine.pop(key, None)
        theirs.pop(key, None)
    if mine != theirs:
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise UserError(
            f"checkpoint {path} was written by a different config (differs in "
            f"{', '.join(changed)}); remove it or pass resume=False"
        )


def restore_run(run: _Run, state: dict, path: Path) -> None:
    """Put ``run`` (just built from its config) where the checkpoint ``state`` left it."""
    check_same_config(state, run.config.to_dict(), path)
    run.step = int(state["step"])
    run.status = state["status"]
    run.diverged_step = state["diverged_step"]
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema_model is not None:
        run.ema_model.load_state_dict(state["ema"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    run.metric_rows = [list(r) for r in state["metrics"]]
    run.eval_rows = [list(r) for r in state["evals"]]
    run.last_eval_step, run.last_eval_row = state["last_eval"]
    run.earlier_blocks = frame_from_bytes(state["blocks"])
    run.gain_check.load(state.get("gain_check"))
    if state.get("flight") is not None:
        run.flight_frame = frame_from_bytes(state["flight"])

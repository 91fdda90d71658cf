"""Execute one stored run: claim it, train (resuming from its checkpoint), store the result.

This is the function every executor ships to its workers, so local processes and Ray tasks
write identical run directories.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any

import pandas as pd

from ablations.store import FINISHED, GridStore, environment

PROGRESS_INTERVAL_S = 0.5


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when present, else "cpu" (the trainer's rule)."""
    from sigprop.train import resolve_device as train_device

    return str(train_device(device))


def execute_run(
    root: str,
    grid: str,
    run_id: str,
    device: str = "cpu",
    threads: int | None = None,
    events: Any = None,
    slot: int = 0,
) -> dict:
    """Run ``run_id`` of ``grid`` under ``root``; returns {"run_id", "state", ...}.

    state is completed / diverged / failed, "busy" when another process holds the run, or
    "interrupted" after Ctrl-C (the run is queued again and resumes from its checkpoint).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    store = GridStore(root, grid)
    lock = store.lock(run_id)
    if not lock.acquire():
        return {"run_id": run_id, "state": "busy"}
    try:
        return _execute_locked(store, run_id, resolve_device(device), events, slot)
    finally:
        lock.release()


def _execute_locked(store: GridStore, run_id: str, device: str, events: Any, slot: int) -> dict:
    from sigprop.train import TrainConfig, train

    status = store.status(run_id)
    if status.get("state") in FINISHED:  # finished by another process meanwhile
        return {"run_id": run_id, "state": status["state"], "summary": status.get("summary", {})}
    record = store.config(run_id)
    started, clock = time.time(), time.monotonic()  # wall clock for stamps, monotonic for spans
    store.update_status(
        run_id, state="running", started_at=started, attempts=status.get("attempts", 0) + 1,
        pid=os.getpid(), device=device, environment=environment(device), error=None,
        traceback=None,
    )
    last_post = [0.0]

    def progress(step: int, total: int, loss: float | None = None) -> None:
        now = time.monotonic()
        if events is not None and (now - last_post[0] > PROGRESS_INTERVAL_S or step == total):
            last_post[0] = now
            events.put(("step", slot, run_id, step, total))

    try:
        config = TrainConfig.from_dict({**record["config"], "device": device})
        result = train(
            config, progress=progress, checkpoint_path=store.run_dir(run_id) / "checkpoint.pt",
            resume=True,
        )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the status write finish
        store.update_status(run_id, state="queued", interrupted_at=time.time())
        return {"run_id": run_id, "state": "interrupted"}
    except Exception as err:  # a failing run is a result of the grid, not its end
        line = (f"{type(err).__name__}: {err}".strip().splitlines() or ["error"])[0]
        store.update_status(
            run_id, state="failed", error=line, traceback=traceback.format_exc(),
            finished_at=time.time(), duration_s=time.monotonic() - clock,
        )
        return {"run_id": run_id, "state": "failed", "error": line}

    duration = time.monotonic() - clock
    metrics = step_metrics(result)
    summary = summarize(result, metrics, duration)
    blocks = result.blocks if isinstance(result.blocks, pd.DataFrame) else pd.DataFrame()
    store.write_results(
        run_id, metrics, blocks, state=result.status, finished_at=time.time(),
        duration_s=duration, summary=summary, warnings=list(getattr(result, "warnings", [])),
    )
    return {"run_id": run_id, "state": result.status, "summary": summary}


def step_metrics(result: Any) -> pd.DataFrame:
    """Per-step metrics with the evaluation columns on the rows of their steps.

    An evaluation's step counts the steps done before it, so the final one is a row of its own.
    """
    metrics = result.metrics.copy()
    evals = getattr(result, "evals", None)
    if isinstance(evals, pd.DataFrame) and len(evals):
        keep = [c for c in evals.columns if c == "step" or c not in metrics.columns]
        metrics = metrics.merge(evals[keep], on="step", how="outer").sort_values("step")
    return metrics.reset_index(drop=True)


def summarize(result: Any, metrics: pd.DataFrame, duration: float) -> dict:
    def col_stat(column: str, how: str) -> float | None:
        if column not in metrics or metrics[column].dropna().empty:
            return None
        return float(getattr(metrics[column].dropna(), how)())

    return {
        "final_acc": _float(result.final_acc),
        "best_acc": _float(result.best_acc),
        "diverged_step": result.diverged_step,
        "max_grad_norm": col_stat("grad_norm", "max"),
        "clip_fraction": col_stat("clip_fraction", "mean"),
        "steps_done": int(result.steps_done),
        "duration_s": duration,
        "gain_clip_ratio": (getattr(result, "gain_check", None) or {}).get("median_ratio"),
        "var_growth": variance_growth(getattr(result, "blocks", None)),
    }


def variance_growth(blocks: pd.DataFrame | None) -> float | None:
    """Mean increase of the block output variance from one block to the next within a stage,
    at the first recorded step: paper A's alpha^2 per block (facts section 1). None without
    probe records or without two blocks in a stage."""
    if not isinstance(blocks, pd.DataFrame) or blocks.empty or "stat" not in blocks:
        return None
    rows = blocks[(blocks["stat"] == "var") & (blocks["stage"] >= 0)]
    if rows.empty:
        return None
    first = rows[rows["step"] == rows["step"].min()].sort_values("index")
    steps = [
        float(later - earlier)
        for _, stage in first.groupby("stage")
        for earlier, later in zip(stage["value"], stage["value"].iloc[1:])
    ]
    return float(sum(steps) / len(steps)) if steps else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)

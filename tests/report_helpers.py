"""Fake grids for the report tests (test_report*.py, test_forensics_report.py): frames built
in the documented ``load_results`` schema, and tiny grids written on disk in the exact store
layout, so that nothing depends on the trainer; and reading a figure's marks back by gid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_row(run_id: str, axes: dict, status: str = "completed", acc: float | None = 0.8,
            diverged_step: int | None = None, error: str | None = None, **config) -> dict:
    """One row of ``Results.runs``: config flattened to dotted keys, summary metrics."""
    base = {"model.name": "nf_resnet26", "model.alpha": 0.2, "clip.mode": "agc",
            "clip.threshold": 0.04, "clip.clip_classifier": False, "batch_size": 256,
            "seed": 0, "lr": 0.1, "base_lr": 0.1, "data": "synthetic", "epochs": 2}
    row = {**base, **config, **axes}
    if str(row["model.name"]).startswith("bn_"):
        row["model.alpha"] = np.nan
    finished = status in ("completed", "diverged")
    return {
        "grid": "fake", "run_id": run_id, "status": status, "error": error,
        "axes": tuple(sorted(axes)), **row,
        "final_acc": acc if status == "completed" else np.nan,
        "best_acc": acc if status == "completed" else np.nan,
        "diverged_step": diverged_step if status == "diverged" else np.nan,
        "max_grad_norm": 3.0 if finished else np.nan, "clip_fraction": 0.1 if finished else np.nan,
        "steps_done": 40 if finished else np.nan, "duration_s": 12.0 if finished else np.nan,
    }


def lambda_batch_runs() -> pd.DataFrame:
    """AGC threshold x batch size x 2 seeds. At batch 4096: lambda 0.16 always diverges,
    0.04 diverges for seed 1; accuracy falls with batch and with lambda."""
    rows = []
    for threshold in (0.01, 0.04, 0.16):
        for batch in (256, 1024, 4096):
            for seed in (0, 1):
                acc = 0.9 - 0.1 * np.log2(batch / 256) / 2 - threshold + 0.01 * seed
                diverged = batch == 4096 and (threshold == 0.16 or (threshold == 0.04 and seed))
                rows.append(run_row(
                    f"t{threshold}-b{batch}-s{seed}",
                    {"clip.threshold": threshold, "batch_size": batch, "seed": seed},
                    status="diverged" if diverged else "completed", acc=acc,
                    diverged_step=17 if diverged else None))
    # an unclipped reference run: its threshold is meaningless and must not become a row
    rows.append(run_row("none-ref", {"batch_size": 256, "seed": 0}, **{"clip.mode": "none"}))
    return pd.DataFrame(rows)


def agc_batch_runs() -> pd.DataFrame:
    """Paper B Fig. 2a in miniature: NF x {none, norm, agc} + BN unclipped, 4 batch sizes,
    3 seeds; unclipped NF diverges at 4096 (all seeds), global norm for one seed."""
    rows = []
    clippings = [("none", 0.01), ("norm", 1.0), ("agc", 0.01)]
    for model in ("nf_resnet26", "bn_resnet26_v2"):
        for mode, threshold in clippings if model.startswith("nf") else clippings[:1]:
            for batch in (64, 256, 1024, 4096):
                for seed in (0, 1, 2):
                    axes = {"model.name": model, "batch_size": batch, "seed": seed}
                    if model.startswith("nf"):
                        axes |= {"clip.mode": mode}
                        if mode != "none":
                            axes |= {"clip.threshold": threshold}
                    diverged = model.startswith("nf") and batch == 4096 and (
                        mode == "none" or (mode == "norm" and seed == 2))
                    acc = 0.85 + 0.01 * seed - (0.05 * np.log2(batch / 64) / 6
                                                if mode == "agc" else 0.1 * np.log2(batch / 64) / 6)
                    rows.append(run_row(
                        f"{model[:2]}-{mode}-b{batch}-s{seed}", axes,
                        status="diverged" if diverged else "completed", acc=acc,
                        diverged_step=5 if diverged else None,
                        **{"clip.mode": mode, "clip.threshold": threshold}))
    return pd.DataFrame(rows)


def fake_metrics(run_id: str, steps: int = 40, diverged_step: int | None = None,
                 final_acc: float = 0.8, ids: bool = True) -> pd.DataFrame:
    """Per-step metrics; ``ids=False`` leaves out grid and run_id, as stored on disk."""
    step = np.arange(steps if diverged_step is None else diverged_step + 1)
    loss = 2.3 * np.exp(-step / 15) + 0.3
    if diverged_step is not None:
        loss[-1] = np.inf
    acc = np.full(len(step), np.nan)
    evals = (step % 10 == 0) & (step > 0)
    acc[evals] = final_acc * step[evals] / steps
    frame = pd.DataFrame({"step": step, "epoch": step / 20, "loss": loss, "lr": 0.1,
                          "grad_norm": 1.0 + step / 10, "clip_fraction": 0.1, "step_time": 0.01,
                          "test_acc": acc, "test_loss": np.where(evals, 1.0, np.nan)})
    if ids:
        frame.insert(0, "run_id", run_id)
        frame.insert(0, "grid", "fake")
    return frame


BLOCKS = [("stem", -1, -1), ("stages.0.0", 0, 0), ("stages.0.1", 0, 1), ("stages.0.2", 0, 2),
          ("stages.1.0", 1, 3), ("stages.1.1", 1, 4), ("stages.1.2", 1, 5), ("other", -1, 6)]


def fake_blocks(run_id: str, alpha: float = 0.2, steps=(0, 10, 20, 30), params: bool = False,
                ids: bool = True, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Probe records: var follows 1 + k*alpha^2 within a stage (reset at transitions);
    ``ids=False`` leaves out grid and run_id, as stored on disk."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in steps:
        k = 0
        for block, stage, index in BLOCKS:
            if stage >= 0:
                k = 1 if block.endswith(".0") else k + 1
            expected = 1 + k * alpha**2 if stage >= 0 else (1.0 if block == "stem" else np.nan)
            stats = {"grad_norm": 0.1 * (index + 2) * (1 + step),
                     "agc_frac_above": min(1.0, 0.02 * index + 0.01 * step)}
            if block != "other":
                stats |= {"var": expected * (1 + noise * rng.standard_normal()),
                          "sq_mean": 0.01}
            for stat, value in stats.items():
                rows.append({"step": step, "block": block, "stage": stage, "index": index,
                             "stat": stat, "value": value, "expected_var": expected})
                if params and stat == "agc_frac_above" and block != "other":
                    for name in ("conv1.weight", "conv2.weight"):
                        rows.append({"step": step, "block": block, "stage": stage,
                                     "index": index, "param": f"{block}.{name}", "stat": stat,
                                     "value": value / 2, "expected_var": np.nan})
    frame = pd.DataFrame(rows)
    if params:
        frame["param"] = frame["param"].astype(object)
    if ids:
        frame.insert(0, "run_id", run_id)
        frame.insert(0, "grid", "fake")
    return frame


def write_fake_grid(root: Path, name: str, runs: list[dict]) -> Path:
    """A grid folder in the exact store layout. Each ``runs`` item: run_id, axes, config
    (nested), state, optional summary/error/traceback/metrics/blocks."""
    grid_dir = root / name
    (grid_dir / "runs").mkdir(parents=True)
    (grid_dir / "spec.toml").write_text(
        f'name = "{name}"\ndescription = "A fake grid for the report tests."\n'
        'intended_for = "tests"\n')
    env = {"python": "3.11.7", "torch": "2.13.0+cpu", "numpy": "2.4.6", "pandas": "3.1.1",
           "sigprop": "0.1.0", "platform": "Linux-test", "host": "testhost", "device": "cpu",
           "git_commit": "0123456789abcdef0123456789abcdef01234567"}
    for run in runs:
        run_dir = grid_dir / "runs" / run["run_id"]
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(
            {"run_id": run["run_id"], "grid": name, "axes": run["axes"],
             "config": run["config"]}))
        status = {"state": run["state"], "attempts": 1, "summary": run.get("summary", {}),
                  "error": run.get("error"), "traceback": run.get("traceback")}
        if run["state"] != "queued":
            status["environment"] = env
        (run_dir / "status.json").write_text(json.dumps(status))
        for kind in ("metrics", "blocks"):
            if run.get(kind) is not None:
                run[kind].to_parquet(run_dir / f"{kind}.parquet", index=False)
    return grid_dir


def small_disk_grid(root: Path) -> Path:
    """AGC lambda {0.01, 0.16} x batch {64, 256}, seed 0: one run diverged, one failed, one
    queued, the rest completed, with metrics and probe records."""
    runs = []
    for threshold in (0.01, 0.16):
        for batch in (64, 256):
            run_id = f"l{threshold}-b{batch}"
            state, acc, diverged = "completed", 0.9 - threshold - batch / 2560, None
            error = traceback = None
            if (threshold, batch) == (0.16, 256):
                state, acc, diverged = "diverged", None, 12
            if (threshold, batch) == (0.16, 64):
                state, error = "failed", "RuntimeError: CUDA out of memory while probing"
                traceback = "Traceback (most recent call last):\n  File \"x.py\"\n" + error
            config = {"model": {"name": "nf_resnet26", "alpha": 0.2}, "batch_size": batch,
                      "clip": {"mode": "agc", "threshold": threshold, "clip_classifier": False},
                      "seed": 0, "data": "synthetic", "base_lr": 0.1, "epochs": 2}
            finished = state in ("completed", "diverged")
            runs.append({
                "run_id": run_id, "state": state, "error": error, "traceback": traceback,
                "axes": {"clip.threshold": threshold, "batch_size": batch}, "config": config,
                "summary": {"final_acc": acc, "best_acc": acc, "diverged_step": diverged,
                            "max_grad_norm": 2.0, "clip_fraction": 0.2, "steps": 40,
                            "duration_s": 3.0} if finished else {},
                "metrics": fake_metrics(run_id, diverged_step=diverged, ids=False)
                if finished else None,
                "blocks": fake_blocks(run_id, ids=False) if finished else None,
            })
    runs.append({"run_id": "queued-one", "state": "queued", "config": {
        "model": {"name": "nf_resnet26"}, "batch_size": 1024,
        "clip": {"mode": "agc", "threshold": 0.01}, "seed": 0, "data": "synthetic",
        "base_lr": 0.1, "epochs": 2},
        "axes": {"clip.threshold": 0.01, "batch_size": 1024}})
    return write_fake_grid(root, "fake_lambda", runs)


def gids(fig: Figure, gid: str) -> list:
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]

"""Coordinate check (mup's diagnostic over width): activation size per block during the first
training steps, at several widths.

Each model is trained for ``steps`` forwards on one fixed batch (mup's ``fix_data``) with plain
SGD at ``lr`` (no momentum, no weight decay, no clipping: mup's standard-parametrization check)
and cross-entropy loss. On every forward, hooks on the probe points record the output's

- ``l1``: mean absolute value over all its elements, ``x.abs().mean()`` (mup's ``l1``, the
  "coordinate size"),
- ``rms``: root mean square, ``sqrt(mean(x^2))``.

Step numbering: step 0 is the forward at initialization, before any update; step k the forward
after k updates (mup numbers the same forwards t = 1, 2, ...). The update after the last
recorded forward would be seen by nothing, so it is not made.

Points: those of :func:`sigprop.probes.find_points` (a sigprop model's stem and blocks, or glob
patterns on module names for any other module), plus ``"head"``: the model's output (the
logits), with ``depth_index`` = number of blocks, ``stage`` -1. The stem has ``depth_index`` -1.

Seeds (mup's ``nseeds``): seed s re-seeds the global torch generator with s before building
each width's model (so every width's init is drawn from the same seed, whatever other widths
run); the batch is the same for every seed and width, so the seeds vary the init only. The
caller's generator state is left alone. Models run in training mode (batch-norm statistics of
the batch) with stochastic depth and dropout off (:func:`sigprop.spp.prepare_for_spp`), so the
forwards are deterministic: on CPU at one thread count the same call gives the same frame.

Registered families (:func:`coord_check_models`) are built at each ``width_mult`` with the CIFAR
stem, the data set's class count, and, for NF models, SkipInit gain 1 (the signal-propagation
convention of :mod:`sigprop.spp`: the residual branches are on from step 0); ``overrides`` go
on top. Their ``width`` is the channel count of the first stage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sigprop.errors import UserError
from sigprop.fields import check_seeds
from sigprop.points import find_points

COORD_STATS = ("l1", "rms")
# One row per (model, width, step, block) after averaging over seeds.
COORD_COLUMNS = [
    "model", "width", "width_mult", "step", "block", "stage", "depth_index", "l1", "l1_std",
    "rms", "rms_std", "seeds", "lr", "data", "batch",
]
SEED_COLUMNS = [
    "model", "width", "width_mult", "seed", "step", "block", "stage", "depth_index", "l1", "rms",
]
HEAD = "head"  # the model output (logits); the report's name for what follows the blocks
DEFAULT_MODELS = ("nf_resnet26", "bn_resnet26_v2")
DEFAULT_WIDTH_MULTS = (0.0625, 0.125, 0.25, 0.5)
DEFAULT_STEPS = 3  # mup's nsteps
DEFAULT_LR = 0.1  # mup's default for SGD
DEFAULT_SEEDS = 2
DEFAULT_DATA = "digits"
DEFAULT_BATCH = 32
# Native sizes. The default check (two ResNet-26, widths 1/16 to 1/2, digits at 8 px, batch 32,
# 3 steps, 2 seeds) then takes about a minute on two busy CPU cores; 16 px costs 4x, and width
# 1.0 alone as much as the four default widths together.
DEFAULT_IMAGE_SIZE = {"digits": 8, "synthetic": 32, "cifar10": 32, "cifar100": 32}
FAMILY_DEFAULTS = {"stem": "cifar"}
DATA_POOL = 512  # the first training images, from which the batch is drawn


def check_settings(steps: int, lr: float, seeds: int | Iterable[int]) -> list[int]:
    """The seed list; a :class:`UserError` for a step count, lr or seed count out of range."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
            math.isfinite(lr) and lr >= 0):
        raise UserError(f"lr must be a finite number >= 0, got {lr!r}")
    return check_seeds(seeds)


def check_widths(widths: Sequence[float], what: str = "widths") -> list[float]:
    values = list(widths)
    if not values:
        raise UserError(f"{what}: give at least one")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, int | float) or not (
                math.isfinite(w) and w > 0):
            raise UserError(f"{what} must be finite numbers > 0, got {w!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{what} listed twice: {values}")
    return values


def coord_batch(
    data: str = DEFAULT_DATA,
    batch_size: int = DEFAULT_BATCH,
    image_size: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x, y, num_classes)``: ``batch_size`` training images of data set ``data`` (the
    project's loader, normalised as for training) drawn with ``seed`` from its first
    ``DATA_POOL`` (or ``batch_size`` if more) images, at ``image_size`` px."""
    from sigprop.data import dataset_info, load_dataset

    info = dataset_info(data)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise UserError(f"batch size must be an integer >= 2 (batch statistics), got "
                        f"{batch_size!r}")
    size = DEFAULT_IMAGE_SIZE.get(data, 32) if image_size is None else image_size
    pool = max(batch_size, DATA_POOL)
    if data == "digits":
        pool = min(pool, 1500)  # the digits training split
        if batch_size > pool:
            raise UserError(f"batch size {batch_size} is larger than the digits training set "
                            f"({pool} samples)")
    loaded = load_dataset(data, data_dir, train_size=pool, test_size=1, image_size=size)
    pick = torch.randperm(len(loaded.train_y), generator=torch.Generator().manual_seed(seed))
    pick = pick[:batch_size]
    return loaded.train_x[pick].contiguous(), loaded.train_y[pick].contiguous(), info.num_classes


def _tensor(output, name: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise UserError(f"coordinate check point {name!r} returned {type(output).__name__}, "
                        "not a tensor")
    return output


def _record_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    blocks, branches, stem,
    head: bool,
) -> tuple[list[tuple[str, int, int]], torch.Tensor]:
    """Train ``model`` for ``steps`` forwards; the points (block, stage, depth_index) and a
    (steps, points, 2) tensor of (l1, rms), moved to the host in one transfer."""
    from sigprop.spp import prepare_for_spp

    points = find_points(model, blocks, branches, stem)
    labels = [(p.block, p.stage, p.index) for p in points]
    num_blocks = sum(p.block != "stem" for p in points)
    if head:
        labels.append((HEAD, -1, num_blocks))
    prepare_for_spp(model)
    modules = dict(model.named_modules())
    current: list[torch.Tensor] = []

    def measure(out: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = out.detach().float()
            return torch.stack((flat.abs().mean(), flat.square().mean().sqrt()))

    handles = []
    for p in points:
        def hook(_module, _args, output, name=p.module):
            current.append(measure(_tensor(output, name)))

        handles.append(modules[p.module].register_forward_hook(hook))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rows = []
    try:
        for step in range(steps):
            current.clear()
            out = _tensor(model(x), "the model output")
            if head:
                current.append(measure(out))
            if len(current) != len(labels):
                raise UserError(f"expected one output per point ({len(labels)}) in a forward, "
                                f"got {len(current)}: a point module ran twice or not at all")
            rows.append(torch.stack(current))
            if step + 1 < steps:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(out.float(), y).backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return labels, torch.stack(rows).cpu()


def coord_data(
    models: Sequence[tuple[float, Callable[[], nn.Module]]],
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    label: str = "model",
    width_mults: Sequence[float] | None = None,
    blocks: str | Sequence[str] | None = None,
    branches: str | Sequence[str] | None = None,
    stem: str | None = None,
    head: bool = True,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Per-seed coordinate data of one model family: one row per (width, seed, step, point),
    columns ``SEED_COLUMNS``; see the module docstring.

    Args:
        models: ``(width, constructor)`` pairs; ``constructor()`` builds a fresh model (its
            init drawn from the global torch generator, which is seeded per seed).
        batch: ``(x, y)``, the fixed training batch (``y`` class indices).
        steps: recorded forwards (step 0 = init); ``steps - 1`` SGD updates between them.
        lr: plain SGD learning rate.
        seeds: a count (seeds 0..k-1, mup's ``nseeds``) or the seeds themselves.
        label: the ``model`` column.
        width_mults: the ``width_mult`` column per model; default width / the largest width.
        blocks, branches, stem: glob patterns of :func:`sigprop.probes.find_points`, for
            modules without ``blocks()``.
        head: also record the model output (block ``"head"``).
        device: where to run; default CPU.
    """
    entries = list(models)
    if not entries:
        raise UserError("give at least one (width, constructor) pair")
    widths = check_widths([w for w, _ in entries])
    mults = (check_widths(width_mults, "width_mults") if width_mults is not None
             else [w / max(widths) for w in widths])
    if len(mults) != len(widths):
        raise UserError(f"{len(mults)} width_mults for {len(widths)} models")
    seed_list = check_settings(steps, lr, seeds)
    device = torch.device("cpu" if device is None else device)
    x, y = batch[0].to(device), batch[1].to(device)
    frames = []
    for (width, build), mult in zip(entries, mults):
        for seed in seed_list:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build()
            model = model.to(device)
            labels, values = _record_run(model, x, y, steps, lr, blocks, branches, stem, head)
            n_steps, n_points = values.shape[:2]
            frames.append(pd.DataFrame({
                "model": label, "width": width, "width_mult": mult, "seed": seed,
                "step": [s for s in range(n_steps) for _ in range(n_points)],
                "block": [b for _ in range(n_steps) for b, _, _ in labels],
                "stage": [s for _ in range(n_steps) for _, s, _ in labels],
                "depth_index": [i for _ in range(n_steps) for _, _, i in labels],
                "l1": values[:, :, 0].reshape(-1).double().numpy(),
                "rms": values[:, :, 1].reshape(-1).double().numpy(),
            }))
            del model
    frame = pd.concat(frames, ignore_index=True)[SEED_COLUMNS]
    return frame.astype({"step": "int64", "stage": "int64", "depth_index": "int64",
                         "seed": "int64"})


def summarize_coords(frame: pd.DataFrame, lr: float | None = None, data: str | None = None,
                     batch: Sequence[int] | None = None) -> pd.DataFrame:
    """Mean and standard deviation (ddof 1; NaN for one seed) over seeds: one row per (model,
    width, step, block), columns ``COORD_COLUMNS`` (``lr``, ``data`` and ``batch``, the input
    shape as "32x3x8x8", name the run, as mup's frame names its optimizer and lr)."""
    keys = ["model", "width", "width_mult", "step", "block", "stage", "depth_index"]
    grouped = frame.groupby(keys, sort=False)
    out = grouped.agg(l1=("l1", "mean"), l1_std=("l1", "std"), rms=("rms", "mean"),
                      rms_std=("rms", "std"), seeds=("seed", "nunique")).reset_index()
    out["lr"] = math.nan if lr is None else float(lr)
    out["data"] = data if data is not None else "given batch"
    out["batch"] = "" if batch is None else "x".join(map(str, batch))
    out = out.sort_values(["model", "width", "step", "depth_index"], kind="stable")
    return out.reset_index(drop=True)[COORD_COLUMNS]


def coord_check(
    models: Sequence[tuple[float, Callable[[], nn.Module]]],
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float = DEFAULT_LR,
    data: str | None = None,
    **kwargs,
) -> pd.DataFrame:
    """:func:`coord_data` averaged over seeds (:func:`summarize_coords`): one row per
    (width, step, point). ``data`` only names the batch in the frame; the other keywords
    (``steps``, ``seeds``, ``label``, ...) are :func:`coord_data`'s, with its defaults."""
    raw = coord_data(models, batch, lr=lr, **kwargs)
    return summarize_coords(raw, lr=lr, data=data, batch=tuple(batch[0].shape))


def family_overrides(name: str, num_classes: int, overrides: dict | None = None) -> dict:
    """The options a registered model is built with here (see the module docstring)."""
    from sigprop.models import model_options
    from sigprop.spp import spp_overrides

    options = set(model_options(name))
    chosen = {k: v for k, v in {**FAMILY_DEFAULTS, "num_classes": num_classes}.items()
              if k in options}
    return {**chosen, **spp_overrides(name, overrides)}


def coord_check_models(
    names: Sequence[str] = DEFAULT_MODELS,
    width_mults: Sequence[float] = DEFAULT_WIDTH_MULTS,
    *,
    overrides: dict | None = None,
    data: str = DEFAULT_DATA,
    batch_size: int = DEFAULT_BATCH,
    image_size: int | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    device: str | torch.device | None = None,
    data_dir: str | os.PathLike | None = None,
    per_seed: bool = False,
    progress: Callable[[str], None] | None = None,
    before_run: Callable[[], None] | None = None,
    batch_shape: Callable[[tuple[int, ...]], None] | None = None,
) -> pd.DataFrame:
    """Coordinate check of registered models at each ``width_mult``: the frame of
    :func:`coord_check` for every name, concatenated (``per_seed``: :func:`coord_data`'s).

    Every name, override, width and the data are checked before any model trains; then
    ``before_run`` is called (the writer checks its folder there) and ``batch_shape`` with the
    input's shape. ``progress`` is called with one line per model and width done.
    """
    from sigprop.models import create_model, resolve_config
    from sigprop.models.base import scaled
    from sigprop.spp import check_overrides

    names = list(names)
    if not names:
        raise UserError("name at least one model")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"model(s) listed twice: {', '.join(repeated)}")
    mults = check_widths(width_mults, "width multipliers")
    check_overrides(names, overrides)  # unknown names and options, before any work
    if "width_mult" in (overrides or {}):
        raise UserError("width_mult is what the check varies: give the multipliers as widths "
                        "(--widths), not as an override")
    seed_list = check_settings(steps, lr, seeds)
    from sigprop.data import dataset_info

    num_classes = dataset_info(data).num_classes
    if isinstance(device, str):
        from sigprop.train import resolve_device

        device = resolve_device(device)  # "auto": CUDA when there is one
    configs = {}
    for name in names:
        own = family_overrides(name, num_classes, overrides)
        for mult in mults:  # bad values (padding="valid", depths=[]) before any work
            configs[name, mult] = (own, resolve_config(name, **own, width_mult=mult))
    x, y, _ = coord_batch(data, batch_size, image_size, seed=0, data_dir=data_dir)
    if before_run is not None:
        before_run()
    if batch_shape is not None:
        batch_shape(tuple(x.shape))
    frames = []
    for name in names:
        for mult in mults:
            own, cfg = configs[name, mult]
            raw = coord_data(
                [(scaled(cfg.widths[0], mult),
                  lambda name=name, own=own, mult=mult: create_model(name, **own,
                                                                     width_mult=mult))],
                (x, y), steps=steps, lr=lr, seeds=seed_list, label=name,
                width_mults=[mult], device=device,
            )
            frames.append(raw if per_seed else summarize_coords(raw, lr=lr, data=data,
                                                                batch=tuple(x.shape)))
            if progress is not None:
                progress(f"{name} width_mult={mult:g} done")
    return pd.concat(frames, ignore_index=True)


COORD_FILES = ("coord.parquet", "coord.csv", "coord_seeds.csv", "coord.png")  # a folder's files


def write_coord_check(
    out_dir: str | os.PathLike = "runs/coord_check",
    warn: Callable[[str], None] | None = None,
    **kwargs,
) -> dict[str, Path]:
    """Run :func:`coord_check_models` (``kwargs``) and write ``coord.parquet`` and
    ``coord.csv`` (mean over seeds) and ``coord_seeds.csv`` (one row per seed) into
    ``out_dir``; returns the paths by kind. Inputs are checked before the folder is touched;
    ``warn`` gets one line before an earlier check there is overwritten. (The command line
    draws ``coord.png``: drawing is the report layer's job.)"""
    from sigprop.files import writable_dir_error

    kwargs = {**kwargs, "per_seed": True}
    folder = Path(out_dir)

    def check_folder() -> None:
        why = writable_dir_error(folder)
        if why:
            raise UserError(f"cannot write to output directory {str(out_dir)!r}: {why}")
        stored = [name for name in COORD_FILES if (folder / name).exists()]
        if stored and warn is not None:
            warn(f"overwriting the coordinate check in {folder} ({', '.join(stored)}); "
                 "--out DIR keeps it")

    shapes: list[tuple[int, ...]] = []
    raw = coord_check_models(**kwargs, before_run=check_folder, batch_shape=shapes.append)
    summary = pd.concat(
        [summarize_coords(part, lr=kwargs.get("lr", DEFAULT_LR),
                          data=kwargs.get("data", DEFAULT_DATA), batch=shapes[0])
         for _, part in raw.groupby("model", sort=False)], ignore_index=True)
    paths = {"parquet": folder / "coord.parquet", "csv": folder / "coord.csv",
             "seeds": folder / "coord_seeds.csv"}
    summary.to_parquet(paths["parquet"], index=False)
    summary.to_csv(paths["csv"], index=False)
    raw.to_csv(paths["seeds"], index=False)
    return paths

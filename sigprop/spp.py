"""Signal propagation plots (paper A, section 7 of the facts file) at initialization.

:func:`signal_propagation` builds a model (or takes one), feeds it a batch of N(0, 1) inputs
with batch-norm layers in training mode (batch statistics, as the paper) but stochastic depth
and dropout switched off (so nothing is dropped), and returns a tidy frame of three statistics
for the stem and every residual block:

- ``sq_mean``: average channel squared mean of the block output,
- ``var``: average channel variance of the block output,
- ``res_var``: average channel variance of the residual branch output (before stochastic
  depth, the skip gain and alpha).

Every seed builds a fresh model (``torch.manual_seed(seed)`` before construction) and draws a
fresh input batch, so the spread over seeds covers both initialization and data.

Skip gain: NF models default to the authors' SkipInit gain 0, with which the residual branches
contribute nothing at init and the variance cannot follow 1 + k*alpha^2. Signal-propagation
studies use gain 1, so when a model is built by name and has a ``skipinit_gain`` option, it is
set to 1.0 unless the overrides give it (``--set skipinit_gain=0`` to see SkipInit).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from sigprop.errors import UserError
from sigprop.files import writable_dir_error
from sigprop.layers import StochasticDepth
from sigprop.models import create_model, model_options, resolve_config
from sigprop.probes import Probe

SPP_STATS = ("sq_mean", "var", "res_var")
SPP_COLUMNS = [
    "model", "seed", "block", "stage", "index", "stat", "value", "expected_var", "rel_dev",
]
# `spp --model nf_resnet50 --model bn_resnet50_v2` (3 seeds) takes ~10-15 s on two busy CPU
# cores. 128 px leaves the ImageNet-stem models a 4x4 final stage; at 64 px (2x2) the zero
# padding of the 3x3 convs visibly lowers the last stage's residual variance. Batch 8 still
# gives >= 128 samples per channel, and the channel average makes the statistics stable to a
# few percent across seeds.
DEFAULT_INPUT_SHAPE = (8, 3, 128, 128)
DEFAULT_SEEDS = 3
SPP_DEFAULTS = {"skipinit_gain": 1.0}
# Modules that drop activations at random in training mode: SPP keeps them in eval mode.
DROPPING_MODULES: tuple[type[nn.Module], ...] = (
    StochasticDepth, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# The same for other libraries' modules, by class name (timm's DropPath and DropBlock2d,
# torchvision's StochasticDepth), so a probed foreign model drops nothing either.
DROPPING_CLASS_NAMES = frozenset({"DropPath", "DropBlock2d", "StochasticDepth"})


def spp_overrides(name: str, overrides: dict | None = None) -> dict:
    """The overrides an SPP run uses for model ``name``: ``overrides`` filtered to the options
    the model has, plus skip gain 1 for NF models unless given."""
    options = set(model_options(name))
    chosen = {k: v for k, v in (overrides or {}).items() if k in options}
    for key, value in SPP_DEFAULTS.items():
        if key in options and key not in chosen:
            chosen[key] = value
    return chosen


def check_overrides(names: Sequence[str], overrides: dict | None) -> None:
    """Every override key must be an option of at least one of the models."""
    known: set[str] = set()
    for name in names:
        known.update(model_options(name))
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for model(s) {', '.join(names)}; valid "
            f"options: {', '.join(sorted(known))}"
        )


def check_input_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"input shape must be four positive integers N,C,H,W, got {shape}")
    if shape[0] < 2:
        raise UserError(f"input shape needs a batch of at least 2 for batch statistics: {shape}")
    return shape


def _seed_list(seeds: int | Iterable[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise UserError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise UserError("seeds must name at least one seed")
    return out


def prepare_for_spp(model: nn.Module) -> None:
    """Training mode (batch statistics) with every randomly dropping module in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, DROPPING_MODULES) or type(module).__name__ in DROPPING_CLASS_NAMES:
            module.eval()


def measure_once(
    model: nn.Module, batch: torch.Tensor, probe_kwargs: dict | None = None
) -> pd.DataFrame:
    """One SPP measurement of ``model`` on ``batch``; the model's modes and buffers (BN running
    statistics) are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    prepare_for_spp(model)
    try:
        with Probe(model, record_eval=True, gradients=False, **(probe_kwargs or {})) as probe:
            with torch.no_grad():
                model(batch)
        frame = probe.records()
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    frame = frame[frame["stat"].isin(SPP_STATS)].drop(columns="step")
    return frame.reset_index(drop=True)


def signal_propagation(
    model_or_name: str | nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    batch: torch.Tensor | None = None,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    overrides: dict | None = None,
    label: str | None = None,
    device: str | torch.device | None = None,
    probe_kwargs: dict | None = None,
) -> pd.DataFrame:
    """SPP statistics of a model at initialization, one row per (seed, block, stat).

    Args:
        model_or_name: a registered model name (built fresh per seed with ``overrides``; NF
            models get ``skipinit_gain=1.0`` unless overridden), or a module, measured as it is
            (then seeds vary only the input batch; its modes and buffers are restored).
        input_shape: (N, C, H, W) of the N(0, 1) batch; default ``DEFAULT_INPUT_SHAPE``.
        batch: a fixed input instead of random ones (the same for every seed).
        seeds: a count (seeds 0..k-1) or the seeds themselves.
        overrides: model options; keys the model does not have are ignored here (the CLI
            checks each key belongs to some model).
        label: the ``model`` column; default the name, or the module's class name.
        device: where to run; default CPU for a name, the parameters' device for a module.
        probe_kwargs: block patterns for modules without ``blocks()`` (see :class:`Probe`).

    Columns: ``model, seed, block, stage, index, stat, value, expected_var, rel_dev`` with
    ``rel_dev`` = (var - expected_var) / expected_var on ``var`` rows (NaN elsewhere and for
    models without NF bookkeeping). The stem is block "stem" with index -1.
    """
    if batch is None:
        shape = check_input_shape(DEFAULT_INPUT_SHAPE if input_shape is None else input_shape)
    seed_list = _seed_list(seeds)
    if isinstance(model_or_name, str):
        name_overrides = spp_overrides(model_or_name, overrides)
        label = label or model_or_name
        device = device or "cpu"
    else:
        label = label or type(model_or_name).__name__
        first = next(iter(model_or_name.parameters()), None)
        device = device or (first.device if first is not None else "cpu")
    frames = []
    for seed in seed_list:
        # Models initialise from the global generator: seed it, and give the caller's state
        # back afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(model_or_name, str):
                model = create_model(model_or_name, **name_overrides).to(device)
            else:
                model = model_or_name
        if batch is None:
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=gen).to(device)
        else:
            x = batch.to(device)
        frame = measure_once(model, x, probe_kwargs)
        frame.insert(0, "seed", seed)
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "model", label)
    is_var = out["stat"] == "var"
    out["rel_dev"] = ((out["value"] - out["expected_var"]) / out["expected_var"]).where(is_var)
    return out[SPP_COLUMNS]


def summarize_spp(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1; NaN for one seed) and seed count per model, block and
    stat, with ``rel_dev`` of the mean."""
    keys = ["model", "block", "stage", "index", "stat"]
    grouped = frame.groupby(keys, sort=False, dropna=False)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["expected_var"] = grouped["expected_var"].first().to_numpy()
    is_var = out["stat"] == "var"
    out["rel_dev"] = ((out["mean"] - out["expected_var"]) / out["expected_var"]).where(is_var)
    return out.sort_values(["model", "index", "stat"], kind="stable").reset_index(drop=True)


def _writable_dir(out_dir: str | os.PathLike) -> Path:
    why = writable_dir_error(out_dir)
    if why:
        raise UserError(f"cannot write to output directory {str(out_dir)!r}: {why}")
    return Path(out_dir)


def model_label(name: str, overrides: dict | None = None) -> str:
    """``name`` or ``name:key=value:...``: the ``model`` column of a per-model override run."""
    return ":".join([name] + [f"{k}={v!r}" for k, v in (overrides or {}).items()])


def write_spp(
    models: Sequence[str | tuple[str, dict]],
    overrides: dict | None = None,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    out_dir: str | os.PathLike = "spp_out",
) -> dict[str, Path]:
    """Measure ``models`` and write ``spp.parquet``, ``spp.csv`` (raw, one row per seed),
    ``spp_summary.csv`` (mean/std over seeds) and ``spp.png`` (the three-panel plot) into
    ``out_dir``; returns the paths by kind.

    ``models``: names, or ``(name, overrides)`` pairs whose overrides apply to that model only
    (on top of ``overrides``, which apply to every model that has the option; an option no
    model has is an error); such a model is labelled :func:`model_label`. Input errors raise
    :class:`UserError` before any model runs.
    """
    from reports.plots import plot_spp  # matplotlib is only needed here

    if not models:
        raise UserError("name at least one model")
    entries = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in models]
    labels = [model_label(name, own) for name, own in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"model(s) listed twice: {', '.join(repeated)}")
    for name, own in entries:
        options = model_options(name)  # unknown names fail before any work
        unknown = sorted(set(own) - set(options))
        if unknown:
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid options: "
                f"{', '.join(options)}"
            )
    check_overrides([name for name, _ in entries], overrides)
    shape = check_input_shape(input_shape)
    seed_list = _seed_list(seeds)
    for name, own in entries:  # bad option values fail before the output folder is made
        resolve_config(name, **spp_overrides(name, {**(overrides or {}), **own}))
    path = _writable_dir(out_dir)

    frame = pd.concat(
        [
            signal_propagation(name, shape, seeds=seed_list, label=label,
                               overrides={**(overrides or {}), **own})
            for (name, own), label in zip(entries, labels)
        ],
        ignore_index=True,
    )
    paths = {
        "parquet": path / "spp.parquet",
        "csv": path / "spp.csv",
        "summary": path / "spp_summary.csv",
        "png": path / "spp.png",
    }
    frame.to_parquet(paths["parquet"], index=False)
    frame.to_csv(paths["csv"], index=False)
    summarize_spp(frame).to_csv(paths["summary"], index=False)
    title = f"Signal propagation at init, input {'x'.join(map(str, shape))}"
    if len(seed_list) > 1:
        title += f", {len(seed_list)} seeds (band: min-max)"
    plot_spp(frame, title=title).savefig(paths["png"], dpi=120, bbox_inches="tight")
    return paths

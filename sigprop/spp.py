"""Signal propagation plots (paper A, section 7 of the facts file) at initialization.

Paper A: Brock, De and Smith, "Characterizing signal propagation to close the performance gap
in unnormalized ResNets", ICLR 2021, arXiv 2101.08692, section 3 and Figure 1.

:func:`signal_propagation` builds a model (or takes one), feeds it a batch (i.i.d. N(0, 1)
noise, or images of a data set, see ``INPUTS``) with batch-norm layers in training mode (batch
statistics, as the paper) but stochastic depth and dropout switched off (so nothing is
dropped), and returns a tidy frame of three statistics for the stem and every residual block:

- ``sq_mean``: average channel squared mean of the block output,
- ``var``: average channel variance of the block output,
- ``res_var``: average channel variance of the residual branch output (before stochastic
  depth, the skip gain and alpha).

Every seed builds a fresh model (``torch.manual_seed(seed)`` before construction) and draws a
fresh input batch, so the spread over seeds covers both initialization and data.

Inputs (``input=``): ``noise`` is i.i.d. N(0, 1). ``synthetic``, ``digits`` and ``cifar10`` draw
N images of that data set (:func:`sigprop.data.load_dataset` at the set's native size, 32 px
or 8 px for digits, resized bilinearly to the input shape's H x W, which must be square with 3
channels) from its first ``DATA_POOL`` training images (or N if more), a different draw per
seed, and normalise the batch per channel to mean 0 and variance 1 (so the
input variance is the theory's 1 whatever the data set's own statistics).

Theory, and where it does not hold (``expected_var``, ``rel_dev``): the expected variance is
each family's own bookkeeping (``BlockInfo.expected_var``: Var(h) = 1 + k*alpha^2 within a
stage, reset by every conv shortcut; NaN for BN-ResNets), which assumes (a) each residual branch
is variance preserving, so Var(f(h/beta)) = 1, (b) a conv shortcut acting on h/beta outputs unit
variance, (c) branch and skip are uncorrelated. It is not defined at the stem (the stem is not a
residual block), so the stem row has no expectation. (b) fails for NFNet's transitions: the
shortcut averages 2x2 windows before its 1x1 conv, which keeps the variance only of spatially
smooth input (i.i.d. noise keeps 1/4). The factor is measured on the actual input
(``pool_factor``: average channel variance after / before the pool, on the transition block's
rows); from the first transition whose factor is off 1 by more than ``POOL_FACTOR_TOLERANCE``
on, the expectation is left out (NaN). (a) fails on tiny feature maps, where the zero padding
of the 3x3 convs is a large part of the window: ``map_size`` is the smaller spatial side of a
block's output and ``tiny_map`` flags ``map_size < TINY_MAP``; the expectation is kept there but
the plot marks those blocks and the CLI warns.

Skip gain: NF models default to the authors' SkipInit gain 0, with which the residual branches
contribute nothing at init and the variance cannot follow 1 + k*alpha^2. Signal-propagation
studies use gain 1, so when a model is built by name and has a ``skipinit_gain`` option, it is
set to 1.0 unless the overrides give it (``--set skipinit_gain=0`` to see SkipInit).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sigprop.errors import UserError, did_you_mean
from sigprop.fields import check_keys, check_seeds
from sigprop.files import writable_dir_error
from sigprop.layers import StochasticDepth
from sigprop.models import create_model, model_options, resolve_config
from sigprop.probes import Probe

SPP_STATS = ("sq_mean", "var", "res_var")
SPP_COLUMNS = [
    "model", "input", "input_shape", "seed", "block", "stage", "index", "stat", "value",
    "expected_var", "rel_dev", "map_size", "tiny_map", "pool_factor",
]
INPUTS = ("noise", "synthetic", "digits", "cifar10")
INPUT_TITLES = {
    "noise": "i.i.d. N(0,1) noise",
    "synthetic": "synthetic images",
    "digits": "digits images",
    "cifar10": "CIFAR-10 images",
}
# Training images a data set has at most (None: as many as asked), and its native size:
# images are loaded at that size and resized bilinearly to the input's H x W (rendering the
# synthetic set at 128 px would cost 20 s and give it pixel-level noise real photos lack).
DATASET_TRAIN_SIZE = {"synthetic": None, "digits": 1500, "cifar10": 50000}
DATASET_NATIVE_PX = {"synthetic": 32, "digits": 8, "cifar10": 32}
DATA_POOL = 512  # the first training images, from which each seed draws its batch
# An SPP plans for at most this share of the machine's memory (its input batches, a data set's
# resized image pool and the first activation of a model, float32), checked before anything
# is built or written: a shape that does not fit is one line, not an allocation error.
MEMORY_FRACTION = 0.5
# Feature maps whose smaller side is below this are "tiny". A 3x3 zero-padded conv on an s x s
# map sees ((3s - 2) / 3s)^2 of its taps on average, and NF-ResNet residual variances follow
# it (docs/spp.md): 0.97 on 128x128 maps, 0.91 at 16x16, 0.84 at 8x8, 0.67 at 4x4, 0.40 at
# 2x2. Below 8x8 a third or more of the branch variance is lost to padding.
TINY_MAP = 8
# NFNet avg-pool shortcut factor accepted as "about 1" by the bookkeeping.
POOL_FACTOR_TOLERANCE = 0.1
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
    check_keys(overrides or {}, sorted(known), lead="unknown option(s)",
               after=f" for model(s) {', '.join(names)}", valid_label="valid options")


def check_input(kind: str) -> str:
    check_keys([kind], INPUTS, lead="unknown input", first=True, valid_label="valid inputs")
    return kind


def check_input_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"input shape must be four positive integers N,C,H,W, got {shape}")
    if shape[0] < 2:
        raise UserError(f"input shape needs a batch of at least 2 for batch statistics: {shape}")
    return shape


def prepare_for_spp(model: nn.Module) -> None:
    """Training mode (batch statistics) with every randomly dropping module in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, DROPPING_MODULES) or type(module).__name__ in DROPPING_CLASS_NAMES:
            module.eval()


def input_batches(
    kind: str,
    shape: Sequence[int],
    seeds: Sequence[int],
    data_dir: str | os.PathLike | None = None,
) -> dict[int, torch.Tensor]:
    """One input batch of ``shape`` per seed: N(0, 1) noise, or data set images normalised per
    channel over the batch (mean 0, biased variance 1); see the module docstring."""
    check_input(kind)
    shape = check_input_shape(shape)
    n, channels, height, width = shape
    if kind == "noise":
        return {s: torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds}
    if channels != 3 or height != width:
        raise UserError(
            f"input {kind!r} gives square RGB images: the input shape needs C=3 and H=W, got "
            f"{','.join(map(str, shape))}"
        )
    from sigprop.data import load_dataset

    # A fixed pool, so a seed's batch does not depend on which other seeds run
    available = DATASET_TRAIN_SIZE[kind]
    pool_size = _pool_size(kind, n)
    if pool_size < n:
        raise UserError(f"input {kind!r} has {available} training images, fewer than N={n}")
    images = load_dataset(
        kind, data_dir, train_size=pool_size, test_size=1, image_size=DATASET_NATIVE_PX[kind]
    ).train_x
    if images.shape[-1] != height:
        images = F.interpolate(images, size=(height, width), mode="bilinear",
                               align_corners=False, antialias=height < images.shape[-1])
    batches = {}
    for s in seeds:
        pick = torch.randperm(pool_size, generator=torch.Generator().manual_seed(s))[:n]
        x = images[pick]
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        batches[s] = ((x - mean) / var.clamp_min(1e-12).sqrt()).contiguous()
    return batches


def _pool_size(kind: str, n: int) -> int:
    available = DATASET_TRAIN_SIZE[kind]
    return max(n, DATA_POOL) if available is None else min(max(n, DATA_POOL), available)


def memory_bound() -> tuple[int, str]:
    """The bytes an SPP may plan for, and how that was set (for the error line)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    where = "this machine's"
    try:  # a container's limit (cgroup v2) when lower: "max" when there is none
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text())
    except (OSError, ValueError):
        limit = None
    if limit is not None and limit < total:
        total, where = limit, "this container's"
    return int(total * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of {where} {_gb(total)}"


def _gb(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB"


def first_activation_bytes(name: str, overrides: dict, shape: Sequence[int]) -> int:
    """Bytes of model ``name``'s first convolution output on ``shape`` (float32), read from the
    model built on the meta device (no memory); 0 where that cannot be built."""
    n, _, height, width = shape
    try:
        with torch.device("meta"):
            model = create_model(name, **overrides)
    except (RuntimeError, NotImplementedError, TypeError):
        return 0
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return 0
    rows, cols = (-(-side // stride) for side, stride in zip((height, width), conv.stride))
    return 4 * n * conv.out_channels * rows * cols


def check_memory(kind: str, shape: Sequence[int], seeds: Sequence[int],
                 models: Sequence[tuple[str, dict]] = ()) -> None:
    """A :class:`UserError` naming the estimate when the input batches (every seed's, built
    up front, and a data set's image pool resized to H x W) and the largest first activation
    of ``models`` ((name, SPP overrides) pairs) pass :func:`memory_bound`."""
    n, channels, height, width = shape
    image = 4 * channels * height * width
    inputs = image * n * len(seeds) + (0 if kind == "noise" else image * _pool_size(kind, n))
    bound, why = memory_bound()
    activation = 0
    if inputs <= bound:  # else no model needs building to know
        activation = max((first_activation_bytes(name, own, shape) for name, own in models),
                         default=0)
    if inputs + activation > bound:
        parts = f"input batches {_gb(inputs)}"
        parts += f" + first activation {_gb(activation)}" if activation else ""
        raise UserError(f"input shape {','.join(map(str, shape))} needs about "
                        f"{_gb(inputs + activation)} ({parts}), over the bound of {_gb(bound)} "
                        f"({why}); use a smaller --input-shape")


def _channel_var(x: torch.Tensor) -> float:
    return float(torch.var(x.float(), dim=(0, 2, 3), unbiased=False).mean())


def measure_once(
    model: nn.Module, batch: torch.Tensor, probe_kwargs: dict | None = None
) -> pd.DataFrame:
    """One SPP measurement of ``model`` on ``batch``; the model's modes and buffers (BN running
    statistics) are restored afterwards. Besides the probe's rows, ``map_size`` (the smaller
    spatial side of each point's output) and ``pool_factor`` (for blocks with an avg-pool
    shortcut, ``pool``: average channel variance after / before it; NaN elsewhere)."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    prepare_for_spp(model)
    sizes: dict[str, int] = {}
    pool_factors: dict[str, float] = {}
    handles = []
    try:
        with Probe(model, record_eval=True, gradients=False, **(probe_kwargs or {})) as probe:
            modules = dict(model.named_modules())
            for point in probe.points:
                module = modules[point.module]

                def size_hook(_m, _args, out, name=point.block):
                    image = isinstance(out, torch.Tensor) and out.dim() == 4
                    sizes[name] = int(min(out.shape[-2:])) if image else -1

                handles.append(module.register_forward_hook(size_hook))
                pool = getattr(module, "pool", None)
                if point.block != "stem" and isinstance(pool, nn.AvgPool2d):
                    def pool_hook(_m, args, out, name=point.block):
                        pool_factors[name] = _channel_var(out) / _channel_var(args[0])

                    handles.append(pool.register_forward_hook(pool_hook))
            with torch.no_grad():
                model(batch)
        frame = probe.records()
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    frame = frame[frame["stat"].isin(SPP_STATS)].drop(columns="step")
    frame["map_size"] = frame["block"].map(sizes).fillna(-1).astype(int)
    frame["pool_factor"] = frame["block"].map(pool_factors).astype(float)
    return frame.reset_index(drop=True)


def apply_theory_limits(frame: pd.DataFrame) -> pd.DataFrame:
    """No expectation at the stem, nor from the first avg-pool transition whose measured
    factor is off 1 by more than ``POOL_FACTOR_TOLERANCE`` (per model and seed); ``tiny_map``
    flags; ``rel_dev`` recomputed. Returns a new frame."""
    out = frame.copy()
    out.loc[out["block"] == "stem", "expected_var"] = math.nan
    for _, part in out.groupby(["model", "seed"], sort=False):
        off = part[(part["pool_factor"] - 1.0).abs() > POOL_FACTOR_TOLERANCE]
        if not off.empty:
            first = off["index"].min()
            out.loc[part.index[part["index"] >= first], "expected_var"] = math.nan
    out["tiny_map"] = (out["map_size"] >= 0) & (out["map_size"] < TINY_MAP)
    is_var = out["stat"] == "var"
    out["rel_dev"] = ((out["value"] - out["expected_var"]) / out["expected_var"]).where(is_var)
    return out


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
    input: str = "noise",
    data_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """SPP statistics of a model at initialization, one row per (seed, block, stat).

    Args:
        model_or_name: a registered model name (built fresh per seed with ``overrides``; NF
            models get ``skipinit_gain=1.0`` unless overridden), or a module, measured as it is
            (then seeds vary only the input batch; its modes and buffers are restored).
        input_shape: (N, C, H, W) of the input batch; default ``DEFAULT_INPUT_SHAPE``.
        batch: a fixed input instead of drawn ones (the same for every seed; ``input`` then
            only names it in the frame).
        seeds: a count (seeds 0..k-1) or the seeds themselves.
        overrides: model options; keys the model does not have are ignored here (the CLI
            checks each key belongs to some model).
        label: the ``model`` column; default the name, or the module's class name.
        device: where to run; default CPU for a name, the parameters' device for a module.
        probe_kwargs: block patterns for modules without ``blocks()`` (see :class:`Probe`).
        input: ``noise`` (i.i.d. N(0, 1)) or a data set of ``INPUTS`` (a per-channel
            normalised batch of its training images, drawn per seed).
        data_dir: where the data set lives (default :func:`sigprop.data.default_data_dir`).

    Columns ``SPP_COLUMNS``: ``rel_dev`` = (var - expected_var) / expected_var on ``var`` rows
    (NaN elsewhere, for models without NF bookkeeping, and where the theory does not hold: see
    the module docstring); ``map_size``, ``tiny_map`` and ``pool_factor`` as there;
    ``input_shape`` the batch's N x C x H x W ("8x3x128x128"). The stem is block "stem" with
    index -1.
    """
    check_input(input)
    seed_list = check_seeds(seeds)
    if batch is None:
        shape = check_input_shape(DEFAULT_INPUT_SHAPE if input_shape is None else input_shape)
        named = [(model_or_name, spp_overrides(model_or_name, overrides))] \
            if isinstance(model_or_name, str) else []
        check_memory(input, shape, seed_list, named)
        batches = input_batches(input, shape, seed_list, data_dir)
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
        x = (batches[seed] if batch is None else batch).to(device)
        frame = measure_once(model, x, probe_kwargs)
        frame.insert(0, "seed", seed)
        frame.insert(0, "input_shape", "x".join(map(str, x.shape)))  # the figure's title says it
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "model", label)
    out.insert(1, "input", input)
    out = apply_theory_limits(out)[SPP_COLUMNS]
    if len(seed_list) > 1:
        # what the seeds changed, which the rows cannot show: the figure's title says it
        named = isinstance(model_or_name, str)
        out.attrs["seeds_vary"] = {(True, True): "init and input", (True, False): "init",
                                   (False, True): "input", (False, False): "nothing"}[
                                       (named, batch is None)]
    return out


def summarize_spp(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1; NaN for one seed) and seed count per model, block and
    stat, with ``rel_dev`` of the mean."""
    keys = [k for k in ("model", "input", "input_shape", "block", "stage", "index", "stat")
            if k in frame]
    grouped = frame.groupby(keys, sort=False, dropna=False)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    # NaN if any seed had no expectation there (expected_var is the same on every seed)
    out["expected_var"] = grouped["expected_var"].agg(lambda v: v.mean(skipna=False)).to_numpy()
    for column, how in (("map_size", "min"), ("tiny_map", "max"), ("pool_factor", "mean")):
        if column in frame:
            out[column] = grouped[column].agg(how).to_numpy()
    is_var = out["stat"] == "var"
    out["rel_dev"] = ((out["mean"] - out["expected_var"]) / out["expected_var"]).where(is_var)
    return out.sort_values(["model", "index", "stat"], kind="stable").reset_index(drop=True)


def _writable_dir(out_dir: str | os.PathLike) -> Path:
    why = writable_dir_error(out_dir)
    if why:
        raise UserError(f"cannot write to output directory {str(out_dir)!r}: {why}")
    return Path(out_dir)


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return str(value)


def model_label(name: str, overrides: dict | None = None) -> str:
    """``name`` or ``name key=value ...`` (values unquoted): the ``model`` column, and the
    legend entry, of a run with per-model overrides."""
    return " ".join([name] + [f"{k}={_plain(v)}" for k, v in (overrides or {}).items()])


@dataclass(frozen=True)
class SppPreset:
    """A named SPP figure: its models, a CPU-sized default and the full size one flag away."""

    description: str
    models: tuple[tuple[str, dict], ...]
    input_shape: tuple[int, ...]
    overrides: dict = field(default_factory=dict)
    full_input_shape: tuple[int, ...] | None = None
    full_overrides: dict = field(default_factory=dict)
    seeds: int = 1


# Paper A, Figure 1 (ResNet-600 at init, BN-ReLU-Conv vs ReLU-BN-Conv, N(0,1) input at 512 px),
# with NF-ResNet-600 with and without scaled WS beside them. Full width costs about 5
# CPU-minutes per seed (half an hour of wall time on the loaded 2-core machine, BENCHMARKS.md),
# so the default keeps depth (what the figure is about) and input size and divides the widths
# by 4.
PRESETS: dict[str, SppPreset] = {
    "paper-a-fig1": SppPreset(
        description="paper A Fig. 1: ResNet-600, NF with and without scaled WS, BN-ResNet v2 "
        "in BN-ReLU-Conv and ReLU-BN-Conv order",
        models=(
            ("nf_resnet600", {}),
            ("nf_resnet600", {"ws": False}),
            ("bn_resnet600_v2", {}),
            ("bn_resnet600_v2", {"order": "act_bn_conv"}),
        ),
        input_shape=(4, 3, 512, 512),
        overrides={"width_mult": 0.25},
        full_input_shape=(4, 3, 512, 512),
        full_overrides={"width_mult": 1.0},
    ),
}


def preset(name: str) -> SppPreset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; valid presets: "
                        f"{', '.join(PRESETS)}")
    return PRESETS[name]


def preset_caption(name: str, full: bool, overrides: dict, shape: Sequence[int],
                   seeds: Sequence[int], input: str) -> str:
    """What a preset run measured, in words, for the plot caption."""
    spec = preset(name)
    models = "; ".join(model_label(m, own) for m, own in spec.models)
    settings = ", ".join(f"{k}={_plain(v)}" for k, v in overrides.items()) or "none"
    size = "full size" if full else "reduced widths, --full-size for the paper's"
    return (
        f"Preset {name} ({size}): {spec.description}. Models: {models}. Options for all: "
        f"{settings}; NF models: skip gain {overrides.get('skipinit_gain', 1.0)}, alpha "
        f"{overrides.get('alpha', 0.2)}. Input: {INPUT_TITLES[input]}, "
        f"{'x'.join(map(str, shape))}; seeds {', '.join(map(str, seeds))}."
    )


def spp_warning(frame: pd.DataFrame) -> str | None:
    """One line naming the models measured on tiny feature maps, or None."""
    tiny = frame[frame["tiny_map"] & (frame["index"] >= 0)]
    if tiny.empty:
        return None
    smallest = int(tiny["map_size"].min())
    models = ", ".join(dict.fromkeys(tiny["model"]))
    return (
        f"feature maps down to {smallest}x{smallest} (< {TINY_MAP}x{TINY_MAP}) in {models}: "
        "zero padding lowers the variances there; use a larger input for comparisons with theory"
    )


SPP_FILES = ("spp.parquet", "spp.csv", "spp_summary.csv", "spp.png")  # what an SPP folder holds


def write_spp(
    models: Sequence[str | tuple[str, dict]],
    overrides: dict | None = None,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    out_dir: str | os.PathLike = "runs/spp",
    *,
    input: str = "noise",
    data_dir: str | os.PathLike | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Measure ``models`` and write ``spp.parquet``, ``spp.csv`` (raw, one row per seed) and
    ``spp_summary.csv`` (mean/std over seeds) into ``out_dir``; returns the paths by kind.
    (The command line draws ``spp.png`` from the parquet: drawing is the report layer's job,
    :func:`reports.figures.spp.plot_spp`.)

    ``models``: names, or ``(name, overrides)`` pairs whose overrides apply to that model only
    (on top of ``overrides``, which apply to every model that has the option; an option no
    model has is an error); such a model is labelled :func:`model_label`. ``input``: see
    :func:`signal_propagation`. ``warn`` is
    called with one line before an earlier SPP in ``out_dir`` is overwritten, and with one
    when some block sees a tiny feature map. Input errors raise
    :class:`UserError` before any model runs.
    """
    if not models:
        raise UserError("name at least one model")
    check_input(input)
    entries = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in models]
    labels = [model_label(name, own) for name, own in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"model(s) listed twice: {', '.join(repeated)}")
    for name, own in entries:
        options = model_options(name)  # unknown names fail before any work
        check_keys(own, options, lead="unknown option(s)", after=f" for model {name!r}",
                   valid_label="valid options")
    check_overrides([name for name, _ in entries], overrides)
    shape = check_input_shape(input_shape)
    seed_list = check_seeds(seeds)
    chosen = [(name, spp_overrides(name, {**(overrides or {}), **own})) for name, own in entries]
    for name, options in chosen:  # bad values (padding="valid", width_mult=-1) before any work
        resolve_config(name, **options)
    check_memory(input, shape, seed_list, chosen)
    # the data first: a missing or malformed set must not leave an output folder behind
    batches = input_batches(input, shape, seed_list, data_dir)
    path = _writable_dir(out_dir)
    stored = [name for name in SPP_FILES if (path / name).exists()]
    if stored and warn is not None:
        # after every check and before the measurement: a bad input overwrites nothing, and an
        # unwanted overwrite can still be stopped
        warn(f"overwriting the SPP in {path} ({', '.join(stored)}); --out DIR keeps it")

    frames = []
    for (name, own), label in zip(entries, labels):
        per_seed = [
            signal_propagation(name, batch=batches[seed], seeds=[seed], label=label,
                               overrides={**(overrides or {}), **own}, input=input)
            for seed in seed_list
        ]
        frames.extend(per_seed)
    frame = pd.concat(frames, ignore_index=True)
    if len(seed_list) > 1:
        frame.attrs["seeds_vary"] = "init and input"  # a fresh model and batch per seed
    paths = {
        "parquet": path / "spp.parquet",
        "csv": path / "spp.csv",
        "summary": path / "spp_summary.csv",
    }
    frame.to_parquet(paths["parquet"], index=False)
    frame.to_csv(paths["csv"], index=False)
    summarize_spp(frame).to_csv(paths["summary"], index=False)
    message = spp_warning(frame)
    if message and warn is not None:
        warn(message)
    return paths

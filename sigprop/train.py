"""Train one model on one small data set with the NFNet recipe (facts file, section 6).

Recipe: SGD with Nesterov momentum 0.9; lr = base_lr * batch_size / 256 unless ``lr`` is given;
linear warmup, then cosine decay towards 0; label smoothing; gradient clipping of the raw
gradient (AGC, global norm or none, :mod:`sigprop.clipping`), THEN coupled L2 weight decay added
to the gradient of weights only (parameters with two or more dims: never gains, biases or skip
gains), then the momentum step (so SGD's own ``weight_decay`` stays 0); optional EMA of the
weights, used for evaluation when enabled.

Numbering: ``metrics.step`` is the 0-based index of the update (the loss is that of the forward
pass before it; probes see the same index through ``Probe.start_step``); ``evals.step`` is the
number of updates completed when the evaluation ran, so the last evaluation has
``step == total_steps``.

Determinism: on CPU two runs of the same config at the same torch thread count
(``torch.set_num_threads``; the grid runner fixes it per run, default 1, and records it) give
identical metrics (step_time aside); another thread count splits reductions differently and
changes the last bits, which a chaotic run can grow into a different outcome. A run stopped or
killed and resumed from its checkpoint at the same thread count ends with exactly the metrics
of an uninterrupted one. On CUDA bit-for-bit repeats need PyTorch's deterministic algorithms
(the runner's ``--deterministic``). All randomness comes from ``seed``: model init, dropout and
stochastic depth use the global torch RNG (forked for the run, so the caller's state is left
alone; its state is checkpointed), the data order and augmentation use their own generator
(also checkpointed).

Host syncs: losses and clip statistics stay on the device and move to the host in chunks (every
step on CPU, where a "sync" costs nothing; every ``SYNC_EVERY_CUDA`` steps on CUDA), so
divergence is detected within that many steps; ``step_time`` is host wall time (on CUDA it
includes queueing, not the kernels' completion, except at sync points).

Flight recorder (:mod:`sigprop.recorder`, on unless ``record_early = record_ring = 0`` or
``compile``): every step's per-block statistics stay in a device buffer (the first
``record_early`` steps, then a ring of the last ``record_ring``); a diverged run's result
carries them up to the diverged step (``TrainResult.flight``, one transfer), any other run's
never leave the device. The buffer is not checkpointed: a run resumed mid-way records from the
step it resumed at (a diverged run's record is kept in its final checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import sys
import time
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sigprop.clipping import ClipConfig, GradClipper
from sigprop.data import (
    BatchStream,
    check_augment,
    dataset_info,
    dataset_names,
    default_augment,
    eval_batches,
    load_dataset,
)
from sigprop.errors import UserError, did_you_mean
from sigprop.fields import check_field
from sigprop.files import atomic_path
from sigprop.gains import ZeroGainCheck

DEFAULT_MODEL: dict = {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.25}
DEFAULT_EPOCHS = 10.0
SYNC_EVERY_CUDA = 8
CHECKPOINT_FORMAT = 1
METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "clip_fraction", "step_time"]
EVAL_COLUMNS = ["step", "epoch", "test_acc", "test_loss", "train_loss"]
# Fields a resumed run may change without changing the trajectory.
RESUME_FREE_FIELDS = ("checkpoint_every", "device", "compile", "eval_batch_size", "data_dir",
                      "record_early", "record_ring")
SEED_MAX = 2**63 - 1
# Training images of the data sets with a fixed training split (synthetic renders as many as
# train_size asks, by default 10000): a batch larger than that is refused before any run.
TRAIN_SAMPLES = {"digits": 1500, "cifar10": 50_000, "cifar100": 50_000}
SYNTHETIC_TRAIN_SAMPLES = 10_000
# Left out of ``to_dict`` while unset, so the configs (and run ids) written before they existed
# stay the same.
UNSET_OMITTED_FIELDS = ("micro_batch", "lr_start")
# Left out of ``to_dict`` at their default, for the same reason (the recorder's change no
# number; the schedule's default is the one every earlier run trained with).
DEFAULT_OMITTED_FIELDS = {"record_early": 50, "record_ring": 32, "schedule": "cosine"}
# "cosine": linear warmup, then cosine decay (lr_at); "exponential": the range test's ramp
# from lr_start up to the peak lr (exponential_lr)
SCHEDULES = ("cosine", "exponential")


@dataclass
class TrainConfig:
    """One training run. Build from nested or dotted dicts with :meth:`from_dict`.

    ``model``: ``{"name": registered model, **create_model overrides}``; a dict without
    "name" overrides the default model's keys. ``num_classes`` defaults to the data set's.
    Length: ``epochs`` or ``steps`` (at most one; neither: 10 epochs); an epoch is
    ``train_size // batch_size`` steps. ``warmup_fraction`` of the steps warm up linearly.
    ``schedule``: "cosine" (warmup, then cosine decay from the peak lr towards 0) or
    "exponential": the learning-rate range test's ramp, rising geometrically from
    ``lr_start`` at the first step to the peak lr at the last (:func:`exponential_lr`; no
    warmup, no decay, so ``warmup_fraction`` is unused). ``lr_start`` is only for it.
    ``augment``: "none", "crop" or "crop+flip" (:mod:`sigprop.data`); None (or true) takes the
    data set's default, false means "none"; the resolved value is what the config keeps.
    ``eval_every``: steps between evaluations (None: once per epoch; 0: only at the end).
    ``device``: "auto" (CUDA when available), "cpu" or "cuda[:i]"; ``amp`` (None: on for
    CUDA) autocasts to ``amp_dtype`` (float16 adds a GradScaler, unscaled before clipping);
    ``channels_last`` (None: on for CUDA). ``diverge_loss``: a training loss above it (or not
    finite) ends the run as diverged. ``checkpoint_every``: steps between checkpoints (0: only
    at the end) when ``train`` gets a ``checkpoint_path``. ``micro_batch`` (None: off): run
    each step's forward and backward in slices of this many examples and accumulate the
    gradient, so a large batch fits in memory; clipping, weight decay and the update act on the
    whole batch's gradient, so an NF model trains as with the full batch (to float32 rounding).
    A BatchNorm model then normalizes with each slice's statistics, not the batch's: its
    trajectory changes with ``micro_batch``, which is why the field is part of the run's config.
    A last slice smaller than ``micro_batch`` is weighted by its size. A probe then records the
    activation statistics (and block-output gradient norms) of the step's last slice, and the
    parameter-gradient statistics of the accumulated gradient.
    ``record_early``, ``record_ring``: the flight recorder (:mod:`sigprop.recorder`) keeps
    per-block statistics of every one of the first ``record_early`` steps and of the last
    ``record_ring`` steps, on the device, and hands them over (``TrainResult.flight``) only
    when the run diverges; both 0 turn it off, and it is off for compiled runs.
    """

    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))
    data: str = "synthetic"
    data_dir: str | None = None
    data_seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    image_size: int = 32
    augment: str | None = None
    batch_size: int = 128
    epochs: float | None = None
    steps: int | None = None
    base_lr: float = 0.1
    lr: float | None = None
    warmup_fraction: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 2e-5
    label_smoothing: float = 0.1
    ema_decay: float | None = None
    clip: ClipConfig = field(default_factory=ClipConfig)
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    amp: bool | None = None
    amp_dtype: str = "bfloat16"
    channels_last: bool | None = None
    eval_every: int | None = None
    eval_batch_size: int = 1000
    probe_every: int = 0
    diverge_loss: float = 100.0
    checkpoint_every: int = 0
    micro_batch: int | None = None
    record_early: int = DEFAULT_OMITTED_FIELDS["record_early"]
    record_ring: int = DEFAULT_OMITTED_FIELDS["record_ring"]
    schedule: str = DEFAULT_OMITTED_FIELDS["schedule"]
    lr_start: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ dict forms
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """Build from a dict: nested (``{"model": {"alpha": 0.5}}``) or dotted
        (``{"model.alpha": 0.5, "clip.mode": "agc"}``) keys, or both. Unknown keys, wrong types
        and invalid values raise :class:`UserError` naming the field."""
        if not isinstance(d, Mapping):
            raise UserError(f"a training config must be a table of keys, got {d!r}")
        valid = cls.field_names()
        nested: dict = {}
        dotted: dict[str, dict] = {"model": {}, "clip": {}}
        for key, value in d.items():
            if not isinstance(key, str):
                raise UserError(f"config keys must be strings, got {key!r}")
            head, dot, rest = key.partition(".")
            if dot and head in dotted and rest:
                dotted[head][rest] = value
            elif key in valid:
                nested[key] = value
            else:
                raise UserError(f"unknown key {key!r}; valid keys: {', '.join(valid)}")
        for head, extra in dotted.items():
            if not extra:
                continue
            base = nested.get(head, {})
            if isinstance(base, ClipConfig):
                base = base.to_dict()
            if not isinstance(base, Mapping):
                raise UserError(f"{head} must be a table, got {base!r}")
            nested[head] = {**base, **extra}
        if "model" in nested:
            model = nested["model"]
            if not isinstance(model, Mapping):
                raise UserError(f"model must be a table with a 'name' key, got {model!r}")
            nested["model"] = dict(model) if "name" in model else {**DEFAULT_MODEL, **model}
        if "clip" in nested and isinstance(nested["clip"], Mapping):
            nested["clip"] = ClipConfig.from_dict(dict(nested["clip"]))
        return cls(**nested)

    def to_dict(self) -> dict:
        """JSON-able and canonical: every field, model keys sorted with lists for tuples."""
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            if name in UNSET_OMITTED_FIELDS and value is None:
                continue
            if name in DEFAULT_OMITTED_FIELDS and value == DEFAULT_OMITTED_FIELDS[name]:
                continue
            if name == "clip":
                value = value.to_dict()
            elif name == "model":
                value = {k: _jsonable(value[k]) for k in sorted(value)}
            out[name] = value
        return out

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raises :class:`UserError` naming the first bad one."""
        hints = typing.get_type_hints(type(self))
        if isinstance(self.clip, Mapping):
            self.clip = ClipConfig.from_dict(dict(self.clip))
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)
        if isinstance(self.augment, bool):  # earlier configs: true meant "augment as usual"
            self.augment = None if self.augment else "none"
        for name in self.field_names():
            setattr(self, name, check_field(name, getattr(self, name), hints[name]))
        self._check_values()
        self._check_micro_batch()
        self._check_seeds_and_sizes()
        self._check_model()

    def _check_micro_batch(self) -> None:
        if self.micro_batch is not None and not 0 < self.micro_batch <= self.batch_size:
            raise UserError(
                f"micro_batch must be a positive integer no larger than batch_size "
                f"({self.batch_size}), or unset; got {self.micro_batch!r}"
            )

    def _check_seeds_and_sizes(self) -> None:
        # here, not as failed runs: torch.manual_seed overflows above 2**64-1 and numpy's
        # SeedSequence (the synthetic data) refuses negative seeds; one range for both
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) <= SEED_MAX:
                raise UserError(f"{name} must be in 0 .. 2**63-1, got {getattr(self, name)!r}")
        have = TRAIN_SAMPLES.get(self.data)
        if have is not None and self.train_size is not None and self.train_size > have:
            raise UserError(f"train_size {self.train_size} is more than data set {self.data!r} "
                            f"has ({have} training images)")
        samples = self.train_size or have or SYNTHETIC_TRAIN_SAMPLES
        if self.batch_size > samples:
            where = "train_size" if self.train_size else f"all of {self.data!r}"
            raise UserError(f"batch_size {self.batch_size} is larger than the training set "
                            f"({samples} samples: {where})")

    def _check_values(self) -> None:
        if self.data not in dataset_names():
            raise UserError(
                f"data: unknown data set {self.data!r}; valid: {', '.join(dataset_names())}"
            )
        if self.augment is None:
            self.augment = default_augment(self.data)
        self.augment = check_augment(self.augment)
        positive = ("batch_size", "image_size", "eval_batch_size", "base_lr", "diverge_loss")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("train_size", "test_size", "epochs", "steps", "lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name} must be > 0 (or unset), got {value!r}")
        if self.epochs is not None and self.steps is not None:
            raise UserError("set either epochs or steps, not both")
        for name in ("warmup_fraction", "momentum", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise UserError(f"ema_decay must be in [0, 1) or unset, got {self.ema_decay!r}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum == 0:
            raise UserError("nesterov needs momentum > 0; set nesterov = false or a momentum")
        for name in ("eval_every", "probe_every", "checkpoint_every", "record_early",
                     "record_ring"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"{name} must be >= 0, got {value!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise UserError(f"amp_dtype must be bfloat16 or float16, got {self.amp_dtype!r}")
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got "
                            f"{self.schedule!r}{did_you_mean(self.schedule, SCHEDULES)}")
        if self.schedule == "cosine":
            if self.lr_start is not None:
                raise UserError("lr_start is the exponential schedule's first rate; set "
                                "schedule = \"exponential\" or leave lr_start unset")
            return
        if self.lr_start is None or not self.lr_start > 0:
            raise UserError(f"schedule \"exponential\" needs lr_start > 0 (its first rate), got "
                            f"{self.lr_start!r}")
        if not self.lr_start < self.peak_lr():
            raise UserError(f"schedule \"exponential\" rises from lr_start to the peak lr: "
                            f"lr_start ({self.lr_start:g}) must be below it "
                            f"({self.peak_lr():g})")

    def _check_model(self) -> None:
        from sigprop.models import model_spec, resolve_config

        name = self.model.get("name")
        if not isinstance(name, str):
            raise UserError(f"model.name must name a registered model, got {name!r}")
        try:
            model_spec(name)
        except UserError as err:
            raise UserError(f"model.name: {err}") from None
        classes = dataset_info(self.data).num_classes
        overrides = self.model_overrides()
        if overrides["num_classes"] != classes:
            raise UserError(
                f"model.num_classes is {overrides['num_classes']} but data set "
                f"{self.data!r} has {classes} classes"
            )
        try:
            resolve_config(name, **overrides)
        except UserError as err:
            raise UserError(f"model: {err}") from None

    # ------------------------------------------------------------------ derived values
    def model_overrides(self) -> dict:
        """Keyword overrides for ``create_model``, ``num_classes`` filled from the data."""
        overrides = {k: v for k, v in self.model.items() if k != "name"}
        overrides.setdefault("num_classes", dataset_info(self.data).num_classes)
        return overrides

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def total_steps(self, train_samples: int) -> int:
        if self.steps is not None:
            return self.steps
        epochs = DEFAULT_EPOCHS if self.epochs is None else self.epochs
        return max(1, math.ceil(epochs * (train_samples // self.batch_size)))


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``status``: "completed", "diverged" (``diverged_step`` is the first metrics step whose loss
    was not finite or above ``diverge_loss``; metrics end there) or "stopped" (``stop_after``).
    ``metrics``: one row per step, columns ``METRIC_COLUMNS``; ``evals``: ``EVAL_COLUMNS``
    (test accuracy and loss, and the mean training loss since the previous evaluation).
    ``final_acc``: the last evaluation's accuracy (NaN when diverged or none ran);
    ``best_acc``: the best evaluation (NaN if none). ``blocks``: the probe's records.
    ``flight``: the flight recorder's rows up to the diverged step (:mod:`sigprop.recorder`);
    empty unless the run diverged with the recorder on.
    ``warnings``: findings about the run a reader must see (AGC holding zero-initialised gains
    at 0, :mod:`sigprop.gains`); ``gain_check``: that check's numbers (None when no AGC-clipped
    gain started at 0).
    """

    status: str
    diverged_step: int | None
    metrics: pd.DataFrame
    evals: pd.DataFrame
    final_acc: float
    best_acc: float
    blocks: pd.DataFrame
    steps_done: int
    total_steps: int
    config: dict
    warnings: list[str] = field(default_factory=list)
    gain_check: dict | None = None
    test_images: int | None = None  # how many test images the accuracies were measured on
    flight: pd.DataFrame = field(default_factory=pd.DataFrame)


# True: a tqdm bar on stderr; a callable: progress(steps_done, total_steps, loss); or an object
# with tqdm's update(n) and set_postfix; False or None: silent.
ProgressArg = bool | Callable[[int, int, float | None], object] | None


@dataclass
class LiveUpdate:
    """What a run produced since the previous update, for a live tracker (:func:`train`'s
    ``live``): new rows of ``TrainResult.metrics`` (``METRIC_COLUMNS``) and ``evals``
    (``EVAL_COLUMNS``), and the probe records of the steps not sent before. The first update
    of a resumed run also carries the rows of the earlier attempt (from the checkpoint)."""

    step: int
    total_steps: int
    metrics: pd.DataFrame
    evals: pd.DataFrame
    blocks: pd.DataFrame
    final: bool = False  # the run's last update: its loop has ended


class LiveSink(typing.Protocol):
    """A live tracker: ``due()`` is asked after every step whose statistics are on the host
    (so it must be cheap, a clock read); when it says yes, ``write(update)`` gets the rows."""

    def due(self) -> bool: ...

    def write(self, update: LiveUpdate) -> object: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def lr_at(step: int, total: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay towards 0 at ``total``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def exponential_lr(step: int, total: int, start: float, end: float) -> float:
    """The range test's ramp: ``start * (end / start) ** (step / (total - 1))``, so step 0
    trains at exactly ``start`` and the last step (``total - 1``) at exactly ``end``; a
    one-step run trains at ``end``. fastai's ``lr_find`` and Lightning's ``Tuner.lr_find``
    use the same geometric form (with ``step / num_it``, so they stop one step short of
    ``end``)."""
    if step >= total - 1:
        return end
    if step <= 0:
        return start
    return start * (end / start) ** (step / (total - 1))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` that never leaves half a checkpoint (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _frame_to_bytes(frame: pd.DataFrame) -> torch.Tensor:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _frame_from_bytes(data: torch.Tensor | None) -> pd.DataFrame:
    if data is None:
        return pd.DataFrame()
    return pd.read_parquet(io.BytesIO(data.numpy().tobytes()))


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
    autocast: Callable[[], typing.ContextManager], channels_last: bool,
) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy (no label smoothing) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    try:
        for xb, yb in eval_batches(x, y, batch_size):
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    finally:
        model.train(was_training)
    n = max(1, len(y))
    return float(correct) / n, float(loss_sum) / n


class _Run:
    """The state of one training run; :func:`train` drives it."""

    def __init__(self, config: TrainConfig, probe, progress: ProgressArg,
                 live: LiveSink | None = None):
        from sigprop.models import create_model

        self.config = config
        self.device = resolve_device(config.device)
        cuda = self.device.type == "cuda"
        self.use_amp = config.amp if config.amp is not None else cuda
        self.amp_dtype = getattr(torch, config.amp_dtype)
        self.channels_last = config.channels_last if config.channels_last is not None else cuda
        self.sync_every = SYNC_EVERY_CUDA if cuda else 1
        self.progress = progress
        self.live = live
        self.live_sent = (0, 0, -1)  # metric rows, eval rows, last probe step sent

        data = load_dataset(
            config.data, config.data_dir, config.train_size, config.test_size,
            config.data_seed, config.image_size,
        )
        self.data = data.to(self.device)
        self.stream = BatchStream(
            self.data.train_x, self.data.train_y, config.batch_size, seed=config.seed,
            augment=config.augment,
        )
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = config.total_steps(len(self.data.train_y))
        self.warmup_steps = round(config.warmup_fraction * self.total_steps)
        self.peak_lr = config.peak_lr()
        if config.eval_every is None:
            self.eval_every = self.steps_per_epoch
        else:
            self.eval_every = config.eval_every

        torch.manual_seed(config.seed)  # inside the caller's fork_rng
        model = create_model(config.model["name"], **config.model_overrides())
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.decay_params = [p for p in params if p.ndim > 1]
        self.optimizer = torch.optim.SGD(
            params, lr=self.peak_lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=0.0,
        )
        self.scaler = None
        if self.use_amp and self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.clipper: GradClipper = config.clip.clipper(model)
        self.gain_check = ZeroGainCheck(self.clipper)
        self.ema_model: nn.Module | None = None
        if config.ema_decay is not None:
            self.ema_model = copy.deepcopy(model)
            for p in self.ema_model.parameters():
                p.requires_grad_(False)
            self.ema_pairs = (
                [p for p in self.ema_model.parameters()], [p.detach() for p in model.parameters()]
            )
            self.ema_buffers = (list(self.ema_model.buffers()), list(model.buffers()))

        self.probe = None
        self.owns_probe = False
        if probe is not None:
            is_instance = hasattr(probe, "start_step") and not isinstance(probe, type)
            self.probe = probe if is_instance else probe(model)
            self.owns_probe = self.probe is not probe
        elif config.probe_every > 0:
            from sigprop.probes import Probe

            # the fraction of units above lambda is the one this run's AGC acts on
            lam = config.clip.threshold if config.clip.mode == "agc" else 0.01
            self.probe = Probe(model, every=config.probe_every, agc_lambda=lam)
            self.owns_probe = True
        self.recorder = None
        if (config.record_early or config.record_ring) and not config.compile:
            from sigprop.recorder import FlightRecorder

            lam = config.clip.threshold if config.clip.mode == "agc" else 0.01
            self.recorder = FlightRecorder(model, config.record_early, config.record_ring,
                                           slack=self.sync_every - 1, agc_lambda=lam)
        self.flight_frame: pd.DataFrame | None = None
        self.forward = model
        if config.compile:
            if self.probe is not None:
                warnings.warn("compile is off while probing: probe hooks would break the graph",
                              stacklevel=3)
            else:
                self.forward = torch.compile(model)

        self.step = 0  # updates completed
        self.metric_rows: list[list] = []
        self.eval_rows: list[list] = []
        self.pending: list[tuple[int, float, float, torch.Tensor]] = []
        self.status = "running"
        self.diverged_step: int | None = None
        self.earlier_blocks = pd.DataFrame()
        self.last_eval_step = 0
        self.last_eval_row = 0  # metric rows already summarized by an evaluation

    # ------------------------------------------------------------------ one step
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def forward_backward(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (detached), its gradient accumulated into ``.grad``: in one
        pass, or in ``micro_batch`` slices whose losses are weighted by their share of the
        batch (the label-smoothed loss is a mean over examples, so the sum is the full mean)."""
        size = self.config.micro_batch
        if size is None or size >= len(yb):
            pieces = [(xb, yb)]
        else:
            pieces = list(zip(xb.split(size), yb.split(size)))
        total = None
        for xs, ys in pieces:
            with self.autocast():
                logits = self.forward(xs)
            loss = F.cross_entropy(logits.float(), ys, label_smoothing=self.config.label_smoothing)
            if len(pieces) > 1:
                loss = loss * (len(ys) / len(yb))
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def train_step(self) -> None:
        config, step = self.config, self.step
        start = time.perf_counter()
        xb, yb = self.stream.next()
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if self.probe is not None:
            self.probe.start_step(step)
        recorder = self.recorder
        if recorder is not None:
            recorder.start_step(step)
        loss = self.forward_backward(xb, yb)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the unscaled gradient
        self.gain_check.observe(step)
        stats = self.clipper()
        if config.weight_decay:
            pairs = [(p.grad, p.detach()) for p in self.decay_params if p.grad is not None]
            if pairs:
                grads, weights = zip(*pairs)
                torch._foreach_add_(list(grads), list(weights), alpha=config.weight_decay)
        if config.schedule == "exponential":
            lr = exponential_lr(step, self.total_steps, config.lr_start, self.peak_lr)
        else:
            lr = lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if recorder is not None:
            recorder.before_update()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if recorder is not None:
            recorder.after_update()
            recorder.end_step(loss, lr, stats.clip_fraction)
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema_model is not None:
            with torch.no_grad():
                ema, live = self.ema_pairs
                torch._foreach_lerp_(ema, live, 1.0 - config.ema_decay)
                for mine, theirs in zip(*self.ema_buffers):
                    mine.copy_(theirs)
        values = torch.stack(
            [loss.detach(), stats.grad_norm.to(loss.device), stats.clip_fraction.to(loss.device)]
        )
        self.pending.append((step, lr, time.perf_counter() - start, values))
        self.step += 1

    def flush(self) -> None:
        """Move pending step statistics to the host; marks divergence."""
        if not self.pending:
            return
        host = torch.stack([v for *_, v in self.pending]).tolist()
        for (step, lr, step_time, _), (loss, grad_norm, clip_fraction) in zip(self.pending, host):
            self.metric_rows.append([
                step, (step + 1) / self.steps_per_epoch, loss, lr, grad_norm, clip_fraction,
                step_time,
            ])
            if not math.isfinite(loss) or loss > self.config.diverge_loss:
                self.status, self.diverged_step = "diverged", step
                break
        self.pending = []

    def run_eval(self) -> None:
        model = self.ema_model if self.ema_model is not None else self.model
        acc, loss = evaluate(
            model, self.data.test_x, self.data.test_y, self.config.eval_batch_size,
            self.autocast, self.channels_last,
        )
        losses = [row[2] for row in self.metric_rows[self.last_eval_row:]]
        train_loss = sum(losses) / len(losses) if losses else math.nan
        self.eval_rows.append([self.step, self.step / self.steps_per_epoch, acc, loss,
                               train_loss])
        self.last_eval_step, self.last_eval_row = self.step, len(self.metric_rows)

    def report(self, loss: float | None) -> None:
        if self.progress is None:
            return
        if hasattr(self.progress, "update"):  # tqdm-like
            # the postfix first, so the redraw that update() may do already shows this loss
            if loss is not None and hasattr(self.progress, "set_postfix"):
                self.progress.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.progress.update(1)
        else:
            self.progress(self.step, self.total_steps, loss)

    def send_live(self, final: bool = False) -> None:
        """The rows since the last update to the live tracker. Only called with no pending
        step statistics, so it never waits for the device beyond the probe's one transfer; a
        tracker that raises is dropped with a warning, the run goes on."""
        if self.live is None or self.pending:
            return
        try:
            if not (final or self.live.due()):
                return
            rows, evals, last_block = self.live_sent
            blocks = self.blocks()
            if len(blocks) and "step" in blocks:
                blocks = blocks[blocks["step"] > last_block]
                last_block = int(blocks["step"].max()) if len(blocks) else last_block
            update = LiveUpdate(
                step=self.step, total_steps=self.total_steps,
                metrics=pd.DataFrame(self.metric_rows[rows:], columns=METRIC_COLUMNS),
                evals=pd.DataFrame(self.eval_rows[evals:], columns=EVAL_COLUMNS),
                blocks=blocks.reset_index(drop=True), final=final,
            )
            self.live_sent = (len(self.metric_rows), len(self.eval_rows), last_block)
            self.live.write(update)
        except Exception as err:  # noqa: BLE001 - tracking must never fail the run
            warnings.warn(f"live tracker dropped: {type(err).__name__}: {err}", stacklevel=2)
            self.live = None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        blocks = self.blocks()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "status": self.status,
            "diverged_step": self.diverged_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema_model is None else self.ema_model.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "metrics": self.metric_rows,
            "evals": self.eval_rows,
            "last_eval": [self.last_eval_step, self.last_eval_row],
            "blocks": None if blocks.empty else _frame_to_bytes(blocks),
            "gain_check": self.gain_check.state(),
            # only a diverged run's: the recorder's buffer is not carried over a resume
            "flight": None if self.status != "diverged" else _frame_to_bytes(self.flight()),
        }

    def load(self, state: dict, path: Path) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"checkpoint {path} has an unknown format; remove it to restart")
        mine, theirs = self.config.to_dict(), dict(state["config"])
        for key in RESUME_FREE_FIELDS:
            mine.pop(key, None)
            theirs.pop(key, None)
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise UserError(
                f"checkpoint {path} was written by a different config (differs in "
                f"{', '.join(changed)}); remove it or pass resume=False"
            )
        self.step = int(state["step"])
        self.status = state["status"]
        self.diverged_step = state["diverged_step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema_model is not None:
            self.ema_model.load_state_dict(state["ema"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.metric_rows = [list(r) for r in state["metrics"]]
        self.eval_rows = [list(r) for r in state["evals"]]
        self.last_eval_step, self.last_eval_row = state["last_eval"]
        self.earlier_blocks = _frame_from_bytes(state["blocks"])
        self.gain_check.load(state.get("gain_check"))
        if state.get("flight") is not None:
            self.flight_frame = _frame_from_bytes(state["flight"])

    def blocks(self) -> pd.DataFrame:
        if self.probe is None:
            return self.earlier_blocks
        current = self.probe.records()
        if self.earlier_blocks.empty:
            return current
        return pd.concat([self.earlier_blocks, current], ignore_index=True)

    def flight(self) -> pd.DataFrame:
        """The flight record of a diverged run (empty otherwise); reads the device once."""
        from sigprop.recorder import empty_flight

        if self.flight_frame is None:
            if self.status != "diverged" or self.recorder is None:
                return empty_flight()
            self.flight_frame = self.recorder.flight(self.diverged_step)
        return self.flight_frame

    def result(self) -> TrainResult:
        metrics = pd.DataFrame(self.metric_rows, columns=METRIC_COLUMNS).astype({"step": "int64"})
        evals = pd.DataFrame(self.eval_rows, columns=EVAL_COLUMNS).astype({"step": "int64"})
        accs = evals["test_acc"]
        final = math.nan if self.status == "diverged" or accs.empty else float(accs.iloc[-1])
        best = math.nan if accs.empty else float(accs.max())
        warning = self.gain_check.warning(self.peak_lr)
        return TrainResult(
            status=self.status, diverged_step=self.diverged_step, metrics=metrics, evals=evals,
            final_acc=final, best_acc=best, blocks=self.blocks(), steps_done=self.step,
            total_steps=self.total_steps, config=self.config.to_dict(),
            warnings=[warning] if warning else [], gain_check=self.gain_check.summary(),
            test_images=int(self.data.test_y.shape[0]), flight=self.flight(),
        )


def train(
    config: TrainConfig | Mapping,
    probe=None,
    progress: ProgressArg = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    live: LiveSink | None = None,
) -> TrainResult:
    """Train ``config`` (a :class:`TrainConfig` or a dict for :meth:`TrainConfig.from_dict`).

    Args:
        probe: a ``sigprop.probes.Probe`` already attached to nothing yet, or a factory
            ``probe(model) -> Probe``; without one, ``config.probe_every > 0`` attaches
            ``Probe(model, every=probe_every, agc_lambda=<the run's AGC threshold, else 0.01>)``.
            Probes built here are removed at the end.
        progress: True shows a tqdm bar on stderr (steps, rate, time left, the last loss);
            a callable gets ``progress(steps_done, total_steps, loss)`` after every step (loss
            is None on steps whose loss has not reached the host yet); a tqdm-like object gets
            ``set_postfix(loss=...)`` and ``update(1)``; False or None: silent.
        checkpoint_path: where to save the run (every ``config.checkpoint_every`` steps and at
            the end); with ``resume`` and an existing file the run continues from it, and a
            finished run returns its stored result at once.
        stop_after: stop (status "stopped", checkpoint saved) once this many steps are done;
            resuming later finishes the run exactly as if it had not stopped.
        live: a :class:`LiveSink` (a TensorBoard or MLflow writer) that gets the new metric,
            evaluation and probe rows whenever it says it is due, and once more at the end;
            one that raises is dropped with a warning.

    Divergence ends the run with status "diverged"; it is not raised.
    """
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    config.validate()
    if stop_after is not None and stop_after < 0:
        raise UserError(f"stop_after must be >= 0, got {stop_after!r}")
    if not (progress is None or isinstance(progress, bool) or callable(progress)
            or hasattr(progress, "update")):
        raise UserError("progress must be True (a bar on stderr), False, a callable "
                        f"progress(steps_done, total_steps, loss) or a tqdm-like object; "
                        f"got {type(progress).__name__}")
    show_bar = progress is True
    if show_bar or progress is False:
        progress = None  # the bar is made once a resumed run knows its first step
    path = None if checkpoint_path is None else Path(checkpoint_path)
    device = resolve_device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        run = _Run(config, probe, progress, live)
        try:
            if path is not None and resume and path.is_file():
                run.load(torch.load(path, map_location="cpu", weights_only=True), path)
            if run.status == "stopped":
                run.status = "running"
            if show_bar:
                run.progress = _progress_bar(run)
            _loop(run, path, stop_after)
        finally:
            if show_bar and run.progress is not None:
                _close_bar(run)
            if run.recorder is not None:
                run.recorder.remove()  # its buffer stays readable for flight()
            if run.probe is not None and run.owns_probe:
                blocks = run.blocks()
                run.probe.remove()
                run.earlier_blocks, run.probe = blocks, None
        return run.result()


def _progress_bar(run: _Run):
    """A tqdm bar over the run's steps, on stderr, starting where a resumed run starts."""
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.step, desc=str(run.config.model.get("name")),
                unit="step", file=sys.stderr, dynamic_ncols=True)


def _close_bar(run: _Run) -> None:
    bar = run.progress
    run.progress = None
    try:
        if run.status in ("stopped", "diverged"):  # the bar says why it ended early
            at = run.diverged_step if run.status == "diverged" else run.step
            bar.set_postfix_str(f"{bar.postfix or ''} {run.status} at step {at}".strip(),
                                refresh=False)
        bar.close()
    except Exception:  # noqa: BLE001 - a broken terminal never fails the run
        pass


def _loop(run: _Run, path: Path | None, stop_after: int | None) -> None:
    config = run.config
    every_ckpt = config.checkpoint_every
    while run.status == "running" and run.step < run.total_steps:
        if stop_after is not None and run.step >= stop_after:
            run.flush()
            if run.status == "running":
                run.status = "stopped"
            break
        run.train_step()
        step = run.step
        due_eval = run.eval_every and step % run.eval_every == 0
        due_ckpt = path is not None and every_ckpt and step % every_ckpt == 0
        if len(run.pending) >= run.sync_every or due_eval or due_ckpt or step == run.total_steps:
            run.flush()
        if run.status != "running":
            break
        if due_eval:
            run.run_eval()
        last_loss = run.metric_rows[-1][2] if not run.pending and run.metric_rows else None
        run.report(last_loss)
        if run.live is not None:
            run.send_live()
        if due_ckpt:
            atomic_save(run.state(), path)
    run.flush()
    if run.status == "running":
        if run.last_eval_step != run.step:
            run.run_eval()
        run.status = "completed"
    run.send_live(final=True)
    if path is not None:
        atomic_save(run.state(), path)

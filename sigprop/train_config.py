"""The schema of one training run: :class:`TrainConfig`, its dict forms and its validation.

A config is checked whole when it is built (``__post_init__``) and again by
:func:`sigprop.train.train`: unknown keys, wrong types and invalid values raise
:class:`~sigprop.errors.UserError` naming the field, before any data is loaded. ``to_dict`` is
the canonical JSON form the grid runner hashes into run ids, so a field added later is left
out of it while unset or at its default (:data:`UNSET_OMITTED_FIELDS`,
:data:`DEFAULT_OMITTED_FIELDS`) and the ids of earlier runs stay the same.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from sigprop.clipping import ClipConfig
from sigprop.data import check_augment, dataset_info, dataset_names, default_augment
from sigprop.errors import UserError, did_you_mean
from sigprop.fields import check_field
from sigprop.schedule import SCHEDULES

DEFAULT_MODEL: dict = {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.25}
DEFAULT_EPOCHS = 10.0
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

"""The schema of one training run: :class:`TrainConfig`, its dict forms and its validation.

A config is checked whole when it is built (``__post_init__``) and again by
:func:`sigprop.train.train`: unknown keys, wrong types and invalid values raise
:class:`~sigprop.errors.UserError` naming the field, before any data is loaded. The checks go
through :mod:`sigprop.fields`: each field declares its rules (``checked(default, POSITIVE)``), and
:meth:`TrainConfig.check_together` holds the few that span fields. ``to_dict`` is
the canonical JSON form the grid runner hashes into run ids, so a field added later is left
out of it while unset or at its default (:data:`UNSET_OMITTED_FIELDS`,
:data:`DEFAULT_OMITTED_FIELDS`) and the ids of earlier runs stay the same.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from sigprop.clipping import ClipConfig
from sigprop.data import AUGMENT, dataset_info, dataset_names, default_augment
from sigprop.errors import UserError
from sigprop.fields import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    check_keys,
    check_table,
    checked,
    one_of,
    validate,
)
from sigprop.schedule import SCHEDULES

DEFAULT_MODEL: dict = {"name": "nf_resnet26", "stem": "cifar", "width_mult": 0.25}
DEFAULT_EPOCHS = 10.0
SEED_MAX = 2**63 - 1
# Training images of the data sets with a fixed training split (synthetic renders as many as
# train_size asks, by default 10000): a batch larger than that is refused before any run.
TRAIN_SAMPLES = {"digits": 1500, "cifar10": 50_000, "cifar100": 50_000}
SYNTHETIC_TRAIN_SAMPLES = 10_000
# here, not as failed runs: torch.manual_seed overflows above 2**64-1 and numpy's SeedSequence
# (the synthetic data) refuses negative seeds; one range for both
SEED_RANGE = Rule(lambda v: 0 <= v <= SEED_MAX, "in 0 .. 2**63-1")
DEVICE = Rule(lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
              "auto, cpu, cuda or cuda:N")
DATA_TEMPLATE = "{name}: unknown data set {value!r}; valid: {choices}"
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
    data: str = checked("synthetic", one_of(dataset_names, DATA_TEMPLATE))
    data_dir: str | None = None
    data_seed: int = checked(0, SEED_RANGE)
    train_size: int | None = checked(None, POSITIVE)
    test_size: int | None = checked(None, POSITIVE)
    image_size: int = checked(32, POSITIVE)
    augment: str | None = checked(None, AUGMENT)
    batch_size: int = checked(128, POSITIVE)
    epochs: float | None = checked(None, POSITIVE)
    steps: int | None = checked(None, POSITIVE)
    base_lr: float = checked(0.1, POSITIVE)
    lr: float | None = checked(None, POSITIVE)
    warmup_fraction: float = checked(0.05, FRACTION)
    momentum: float = checked(0.9, FRACTION)
    nesterov: bool = True
    weight_decay: float = checked(2e-5, NON_NEGATIVE)
    label_smoothing: float = checked(0.1, FRACTION)
    ema_decay: float | None = checked(None, FRACTION)
    clip: ClipConfig = field(default_factory=ClipConfig)
    seed: int = checked(0, SEED_RANGE)
    device: str = checked("auto", DEVICE)
    compile: bool = False
    amp: bool | None = None
    amp_dtype: str = checked("bfloat16", one_of(("bfloat16", "float16")))
    channels_last: bool | None = None
    eval_every: int | None = checked(None, NON_NEGATIVE)
    eval_batch_size: int = checked(1000, POSITIVE)
    probe_every: int = checked(0, NON_NEGATIVE)
    diverge_loss: float = checked(100.0, POSITIVE)
    checkpoint_every: int = checked(0, NON_NEGATIVE)
    micro_batch: int | None = None
    record_early: int = checked(DEFAULT_OMITTED_FIELDS["record_early"], NON_NEGATIVE)
    record_ring: int = checked(DEFAULT_OMITTED_FIELDS["record_ring"], NON_NEGATIVE)
    schedule: str = checked(DEFAULT_OMITTED_FIELDS["schedule"], one_of(SCHEDULES))
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
        check_table(d, "a training config", says="a table of keys")
        valid = cls.field_names()
        nested: dict = {}
        dotted: dict[str, dict] = {"model": {}, "clip": {}}
        for key, value in d.items():
            if not isinstance(key, str):
                raise UserError(f"config keys must be strings, got {key!r}")
            head, dot, rest = key.partition(".")
            if dot and head in dotted and rest:
                dotted[head][rest] = value
            else:
                check_keys([key], valid, valid_label="valid keys", suggest=False, first=True)
                nested[key] = value
        for head, extra in dotted.items():
            if not extra:
                continue
            base = nested.get(head, {})
            if isinstance(base, ClipConfig):
                base = base.to_dict()
            nested[head] = {**check_table(base, head), **extra}
        if "model" in nested:
            model = check_table(nested["model"], "model", says="a table with a 'name' key")
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
        """Check every field (:func:`sigprop.fields.validate`: types, the rules declared on
        the fields, then :meth:`check_together`); raises :class:`UserError` naming the first
        bad one."""
        if isinstance(self.clip, Mapping):
            self.clip = ClipConfig.from_dict(dict(self.clip))
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)
        if isinstance(self.augment, bool):  # earlier configs: true meant "augment as usual"
            self.augment = None if self.augment else "none"
        validate(self)

    def check_together(self) -> str | None:
        """The checks across fields, after each field's own: the first failure's message."""
        if self.augment is None:
            self.augment = default_augment(self.data)
        if self.epochs is not None and self.steps is not None:
            return "set either epochs or steps, not both"
        if self.nesterov and self.momentum == 0:
            return "nesterov needs momentum > 0; set nesterov = false or a momentum"
        return self._schedule_problem() or self._size_problem() or self._model_problem()

    def _size_problem(self) -> str | None:
        if self.micro_batch is not None and not 0 < self.micro_batch <= self.batch_size:
            return (f"micro_batch must be a positive integer no larger than batch_size "
                    f"({self.batch_size}), or unset; got {self.micro_batch!r}")
        have = TRAIN_SAMPLES.get(self.data)
        if have is not None and self.train_size is not None and self.train_size > have:
            return (f"train_size {self.train_size} is more than data set {self.data!r} "
                    f"has ({have} training images)")
        samples = self.train_size or have or SYNTHETIC_TRAIN_SAMPLES
        if self.batch_size > samples:
            where = "train_size" if self.train_size else f"all of {self.data!r}"
            return (f"batch_size {self.batch_size} is larger than the training set "
                    f"({samples} samples: {where})")
        return None

    def _schedule_problem(self) -> str | None:
        if self.schedule == "cosine":
            if self.lr_start is not None:
                return ("lr_start is the exponential schedule's first rate; set "
                        "schedule = \"exponential\" or leave lr_start unset")
            return None
        if self.lr_start is None or not self.lr_start > 0:
            return (f"schedule \"exponential\" needs lr_start > 0 (its first rate), got "
                    f"{self.lr_start!r}")
        if not self.lr_start < self.peak_lr():
            return (f"schedule \"exponential\" rises from lr_start to the peak lr: "
                    f"lr_start ({self.lr_start:g}) must be below it ({self.peak_lr():g})")
        return None

    def _model_problem(self) -> str | None:
        from sigprop.models import model_spec, resolve_config

        name = self.model.get("name")
        if not isinstance(name, str):
            return f"model.name must name a registered model, got {name!r}"
        try:
            model_spec(name)
        except UserError as err:
            return f"model.name: {err}"
        classes = dataset_info(self.data).num_classes
        overrides = self.model_overrides()
        if overrides["num_classes"] != classes:
            return (f"model.num_classes is {overrides['num_classes']} but data set "
                    f"{self.data!r} has {classes} classes")
        try:
            resolve_config(name, **overrides)
        except UserError as err:
            return f"model: {err}"
        return None

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

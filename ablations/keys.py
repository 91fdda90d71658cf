"""Dotted keys: nested config tables flattened to ``"clip.mode"``-style keys, read and set by
them, and a run's settings as it applies them.

One of the bottom layers of ``ablations`` (tests/test_architecture.py): the spec writes
configs with these helpers and the store reads them back with the same ones.
"""

from __future__ import annotations

from typing import Any

from ablations.errors import SpecError
from sigprop.constants import THRESHOLD_MODES
from sigprop.errors import UserError


def flatten(table: dict, prefix: str = "", hashable: bool = False) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; quoted dotted keys pass through unchanged.

    ``hashable``: lists become tuples, for values that go into a frame cell or are compared as
    a whole (a grid's axis values stay lists: they are the axis)."""
    out = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{full}.", hashable))
        else:
            out[full] = tuple(value) if hashable and isinstance(value, list) else value
    return out


def set_dotted(table: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise SpecError(f"cannot set {key}: {part} is not a table")
    table[leaf] = value


def get_dotted(table: dict, key: str, default: Any = None) -> Any:
    for part in key.split("."):
        if not isinstance(table, dict) or part not in table:
            return default
        table = table[part]
    return table


def effective_settings(config: Any) -> dict:
    """What a run uses that its config does not state outright, as dotted keys: ``lr``, the
    peak learning rate (``base_lr * batch_size / 256`` unless ``lr`` is given), and the
    clipping as applied (``clip.threshold`` None for a mode that uses none).

    ``config``: a ``TrainConfig`` or its dict. Stored in each run's config.json."""
    from sigprop.train import TrainConfig  # lazy: torch

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    mode = config.clip.mode
    return {"lr": float(config.peak_lr()), "clip.mode": mode,
            "clip.threshold": config.clip.threshold if mode in THRESHOLD_MODES else None}


AGC_ONLY_KEYS = ("clip.eps", "clip.exclude", "clip.clip_classifier")


def applied_values(config: dict, effective: dict | None = None) -> dict:
    """A run's config flattened to dotted keys as the trainer uses it: ``lr`` is the peak
    learning rate, the clipping is as applied (``effective``, the record config.json holds;
    computed from ``config`` for stores written before it), and a value the run does not use
    is None rather than a stale one: ``clip.threshold`` for mode none, AGC's eps, exclude and
    clip_classifier for the other modes, ``base_lr`` where ``lr`` is given, ``epochs`` where
    ``steps`` is."""
    flat = flatten(config, hashable=True)
    if not effective:
        try:
            effective = effective_settings(config)
        except (UserError, TypeError, ValueError):  # a config this version cannot build
            effective = {}
    out = {**flat, **effective}
    if out.get("clip.mode") != "agc":
        out.update({key: None for key in AGC_ONLY_KEYS if key in out})
    if flat.get("lr") is not None and "base_lr" in out:
        out["base_lr"] = None
    if flat.get("steps") is not None and "epochs" in out:
        out["epochs"] = None
    return out

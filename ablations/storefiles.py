"""The store's files, one at a time: atomic writes, readers that raise :class:`DamagedFile`
for a file that exists but cannot be read, the JSON type checks of status.json, config.json
and progress.json, and :func:`set_aside` for a damaged file (kept, never deleted).

A low layer of ``ablations`` (tests/test_architecture.py): :mod:`ablations.gridstore` reads
and writes a grid's folder with these; ``ablations.store`` re-exports them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from ablations.constants import STATES
from sigprop.files import atomic_path

# the public names, all re-exported by ablations.store
__all__ = [
    "CONFIG_FIELDS", "EFFECTIVE_FIELDS", "ENVIRONMENT_FIELDS", "KIND_NAMES", "PROGRESS_FIELDS",
    "STATUS_FIELDS", "SUMMARY_FIELDS", "DamagedFile", "check_config", "check_fields",
    "check_status", "parquet_damage", "read_json", "read_parquet", "set_aside",
    "train_config_fields", "write_bytes", "write_json", "write_parquet",
]


class DamagedFile(Exception):
    """A stored file exists but cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None if there is no file; :class:`DamagedFile` if it
    cannot be read as one."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise DamagedFile(path, f"not valid JSON ({err.msg}: line {err.lineno} column "
                                 f"{err.colno})") from None
    except OSError as err:
        raise DamagedFile(path, f"cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise DamagedFile(path, f"holds a {type(data).__name__}, not a JSON object")
    return data


# ----------------------------------------------------------------------------- field types
# Every field a reader uses is checked where it is read: a file that is valid JSON but holds a
# list or a string where an object or a number belongs makes its run damaged, as unparsable
# JSON does, instead of a traceback in whatever reads it next. Unknown fields pass (a newer
# version may add some).

KIND_NAMES = {"null": "null", "bool": "true/false", "integer": "an integer", "number": "a number",
              "string": "a string", "list": "a list", "object": "an object"}
NUMBER, TEXT = ("number", "null"), ("string", "null")
STATUS_FIELDS: dict[str, tuple[str, ...]] = {
    "state": ("string",), "attempts": ("integer",), "pid": ("integer", "null"),
    "queued_at": NUMBER, "started_at": NUMBER, "finished_at": NUMBER, "interrupted_at": NUMBER,
    "duration_s": NUMBER, "device": TEXT, "error": TEXT, "traceback": TEXT, "repaired": TEXT,
    "restarted": TEXT, "summary": ("object", "null"), "warnings": ("list", "null"),
    "environment": ("object", "null"), "earlier_environment": ("object", "null"),
}
SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "final_acc": NUMBER, "best_acc": NUMBER, "diverged_step": ("integer", "null"),
    "max_grad_norm": NUMBER, "clip_fraction": NUMBER, "steps_done": ("integer", "null"),
    "steps": ("integer", "null"), "duration_s": NUMBER, "gain_clip_ratio": NUMBER,
    "var_growth": NUMBER, "var_growth_rel": NUMBER, "test_images": ("integer", "null"),
    "diverged_block": TEXT, "diverged_first_step": ("integer", "null"),
    "diverged_first_stat": TEXT, "diverged_first_kind": TEXT,
    "diverged_clipping_active": ("bool", "null"), "diagnosis": TEXT,
}
ENVIRONMENT_FIELDS: dict[str, tuple[str, ...]] = {
    "threads": ("integer", "null"), "interop_threads": ("integer", "null"),
    "deterministic": ("bool", "null"), "torch": TEXT, "device": TEXT,
}
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "run_id": TEXT, "grid": TEXT, "axes": ("object",), "config": ("object",),
    "label": TEXT, "model_departures": ("object", "null"), "effective": ("object", "null"),
}
EFFECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "lr": NUMBER, "clip.mode": TEXT, "clip.threshold": NUMBER,
}
PROGRESS_FIELDS: dict[str, tuple[str, ...]] = {
    "step": ("integer",), "total": ("integer", "null"), "loss": NUMBER, "at": NUMBER,
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind, classes in (("bool", bool), ("integer", int), ("number", float), ("string", str),
                        ("list", list), ("object", dict)):
        if isinstance(value, classes):
            return kind
    return type(value).__name__


def _fits(value: Any, kinds: tuple[str, ...]) -> bool:
    kind = _kind(value)
    return kind in kinds or (kind == "integer" and "number" in kinds)


def _held(value: Any) -> str:
    kind = _kind(value)
    return KIND_NAMES.get(kind, kind)


def _wanted(kinds: tuple[str, ...]) -> str:
    return " or ".join(KIND_NAMES[k] for k in kinds)


def check_fields(path: Path, data: dict, fields: dict[str, tuple[str, ...]],
                 prefix: str = "") -> None:
    """:class:`DamagedFile` naming ``path`` and the first field of ``data`` whose JSON type is
    not one of those ``fields`` allows."""
    for key, kinds in fields.items():
        if key in data and not _fits(data[key], kinds):
            raise DamagedFile(path, f"field '{prefix}{key}' holds {_held(data[key])}, not "
                                    f"{_wanted(kinds)}")


def _hint_kinds(hint: Any) -> tuple[str, ...]:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = []
    for option in options:
        origin = typing.get_origin(option)
        kinds.append({type(None): "null", bool: "bool", int: "integer", float: "number",
                      str: "string"}.get(option) or
                     ("list" if origin in (tuple, list) or option in (tuple, list) else "object"))
    return tuple(kinds)


def _dataclass_fields(cls: Any) -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    return {f.name: _hint_kinds(hints[f.name]) for f in dataclasses.fields(cls)}


_TRAIN_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {}


def train_config_fields() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """The JSON kinds of TrainConfig's and ClipConfig's fields, from their annotations."""
    if not _TRAIN_FIELDS:
        from sigprop.clipping import ClipConfig  # lazy: torch
        from sigprop.train import TrainConfig  # lazy: torch

        train = _dataclass_fields(TrainConfig)
        train["augment"] += ("bool",)  # stores before the names: true/false (still accepted)
        _TRAIN_FIELDS.update(train=train, clip=_dataclass_fields(ClipConfig))
    return _TRAIN_FIELDS["train"], _TRAIN_FIELDS["clip"]


def check_status(path: Path, data: dict) -> dict:
    """``data`` (a run's status.json) if every field a reader uses has its type."""
    check_fields(path, data, STATUS_FIELDS)
    if "state" in data and data["state"] not in STATES:
        raise DamagedFile(path, f"field 'state' is {data['state']!r}, not one of "
                                f"{', '.join(STATES)}")
    if data.get("attempts", 0) < 0:
        raise DamagedFile(path, f"field 'attempts' is {data['attempts']}, below 0")
    for key, fields in (("summary", SUMMARY_FIELDS), ("environment", ENVIRONMENT_FIELDS),
                        ("earlier_environment", ENVIRONMENT_FIELDS)):
        if data.get(key) is not None:
            check_fields(path, data[key], fields, f"{key}.")
    for i, line in enumerate(data.get("warnings") or ()):
        if not isinstance(line, str):
            raise DamagedFile(path, f"field 'warnings[{i}]' holds {_held(line)}, not a string")
    return data


def check_config(path: Path, data: dict) -> dict:
    """``data`` (a run's config.json) if every field a reader uses has its type: the record's
    own fields, and the training config's known keys (unknown ones pass: a config written by
    another version)."""
    if not isinstance(data.get("config"), dict):
        raise DamagedFile(path, "has no 'config' table")
    check_fields(path, data, CONFIG_FIELDS)
    if data.get("effective") is not None:
        check_fields(path, data["effective"], EFFECTIVE_FIELDS, "effective.")
    train, clip = train_config_fields()
    config = data["config"]
    check_fields(path, config, train, "config.")
    if isinstance(config.get("clip"), dict):
        check_fields(path, config["clip"], clip, "config.clip.")
    if isinstance(config.get("model"), dict) and "name" in config["model"]:
        check_fields(path, config["model"], {"name": ("string",)}, "config.model.")
    return data


def parquet_damage(path: Path) -> str | None:
    """Why ``path`` is not a readable parquet file (footer and schema), or None."""
    try:
        pq.read_metadata(path)
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # noqa: BLE001 - ArrowInvalid, OSError...: all mean unreadable
        return _parquet_reason(path, err)
    return None


def _parquet_reason(path: Path, err: Exception) -> str:
    text = (str(err).splitlines() or [type(err).__name__])[0]
    text = text.replace(f"Could not open Parquet input source '{path}': ", "")
    return f"not a readable parquet file ({text.split('. ')[0].rstrip('.')})"


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - see parquet_damage
        raise DamagedFile(path, _parquet_reason(path, err)) from None


def set_aside(path: Path, tag: str = "damaged") -> Path:
    """Rename a file to ``<name>.<tag>-<time>`` beside it (kept, never deleted); ``tag`` says
    why: ``damaged``, or ``env`` for a run made again under another environment."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target

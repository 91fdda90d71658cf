"""Type checks of config fields against their annotations, shared by ``TrainConfig`` and the
model configs, so every field error reads the same way and names the field."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from sigprop.errors import UserError

TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
              dict: "a table", type(None): "unset (null)"}


def type_name(hint: Any) -> str:
    """'a number or unset (null)' for ``float | None``."""
    if typing.get_origin(hint) is tuple:
        return "a list of integers"
    args = typing.get_args(hint)
    if args and isinstance(hint, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if hint in TYPE_NAMES:
        return TYPE_NAMES[hint]
    description = getattr(hint, "type_description", None)  # a config class may name itself
    return description or getattr(hint, "__name__", str(hint))


def check_field(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the field's annotation ``hint``: ints become floats for float
    fields and lists tuples for tuple-of-int fields; bools are never numbers; a float must be
    finite (inf and nan pass every ``x > 0`` style check after this). Raises
    :class:`UserError` naming the field otherwise."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if option is int and isinstance(value, int):
            return value
        if option is float and isinstance(value, int | float):
            if not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if typing.get_origin(option) is tuple:
            if isinstance(value, list | tuple) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                return tuple(value)
            continue
        if isinstance(option, type) and option is not float and isinstance(value, option):
            return value
    raise UserError(f"{name} must be {type_name(hint)}, got {value!r}")


def check_seeds(seeds: int | typing.Iterable[int]) -> list[int]:
    """``seeds`` as a list: a count ``n`` is seeds 0..n-1, else the seeds named, each once.
    Raises :class:`UserError` for a count below 1, an empty list or a seed named twice."""
    if isinstance(seeds, bool):  # never a count: True is not "one seed"
        raise UserError(f"seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise UserError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise UserError("seeds must name at least one seed")
    if len(set(out)) != len(out):
        raise UserError(f"seeds listed twice: {out}")
    return out

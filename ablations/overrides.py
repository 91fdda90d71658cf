"""``--set key=value`` parsing: the key and values of one override, which
``ablations.spec.apply_overrides`` applies to a spec; the command line reads its model options
(``spp --set``, ``NAME:key=value``) with :func:`parse_value` too. Torch- and pandas-free."""

from __future__ import annotations

import ast
from typing import Any

import tomllib

from ablations.errors import SpecError


def parse_value(text: str) -> Any:
    """A TOML literal (1, 0.5, true, [1, 2], "x"), a Python one (False, (1, 2)), else the
    bare string, so ``stem=cifar``, ``ws=false`` and ``ws=False`` all work."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return list(value) if isinstance(value, tuple) else value


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_override(item: str) -> tuple[str, list, str]:
    """``key=v`` or ``key=v1,v2`` -> (key, values, the text after ``=``); a
    :class:`SpecError` for a malformed item or an empty value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set expects key=value or key=v1,v2, got {item!r}")
    values = [parse_value(part) for part in split_top_level(text)]
    if any(v == "" for v in values):
        raise SpecError(f"--set {key}: empty value in {text!r}")
    return key, values, text

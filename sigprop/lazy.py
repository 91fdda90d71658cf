"""A package's lazy exports (PEP 562): each public name's module is imported on first use, so
that importing the package, and the command line's light paths (``--help``), load neither torch
nor pandas nor matplotlib. ``sigprop``, ``ablations`` and ``reports.figures`` export this way."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``: ``exports`` maps each public name to the
    module that defines it, absolute or relative to ``package`` (``".spp"``)."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

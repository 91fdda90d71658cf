"""sigprop: signal-propagation analysis and ablation lab for normalizer-free networks."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["BlockInfo", "ModelError", "count_parameters", "create_model", "list_models"]


def __getattr__(name: str) -> Any:
    # torch loads on first use of a model name, so `sigprop --help` and light submodules
    # (sigprop.errors) start without it
    if name in __all__:
        return getattr(importlib.import_module("sigprop.models"), name)
    raise AttributeError(f"module 'sigprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

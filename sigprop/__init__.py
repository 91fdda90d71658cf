"""sigprop: signal-propagation analysis and ablation lab for normalizer-free networks."""

from __future__ import annotations

import sys as _sys
import types as _types
from collections.abc import Callable as _Callable

from sigprop.lazy import lazy_getattr as _lazy_getattr

__version__ = "0.1.0"

# Public name -> the module defining it. Loaded on first use, so `import sigprop`, `sigprop
# --help` and light submodules (sigprop.errors) start without torch.
_EXPORTS = {
    "BlockInfo": "sigprop.models", "ModelError": "sigprop.models",
    "count_parameters": "sigprop.models", "create_model": "sigprop.models",
    "list_models": "sigprop.models",
    "train": "sigprop.train", "TrainConfig": "sigprop.train_config",
    "ClipConfig": "sigprop.clipping", "Probe": "sigprop.probes",
    "signal_propagation": "sigprop.spp",
}
__all__ = sorted(_EXPORTS)
__getattr__ = _lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted({"__version__", *__all__})


class _Package(_types.ModuleType):
    """``sigprop.train`` is the function, as ``__all__`` says, even once the submodule of the
    same name has loaded (the import system then binds the package attribute to the module).
    The module stays reachable by path: ``from sigprop.train import TrainConfig``."""

    @property
    def train(self) -> _Callable:
        from sigprop.train import train

        return train

    @train.setter
    def train(self, _module: object) -> None:
        pass  # the import system binding the submodule; sys.modules keeps it


_sys.modules[__name__].__class__ = _Package

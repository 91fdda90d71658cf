"""Named variants of every family, and ``create_model`` that builds one with overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sigprop.errors import UserError, did_you_mean
from sigprop.models.base import check_values


class ModelError(UserError):
    """An unknown model name or override; the message lists the valid choices."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    build: Callable[..., nn.Module]
    config_cls: type
    defaults: dict = field(default_factory=dict)
    resolution: str = "224"


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


def list_models(family: str | None = None) -> list[str]:
    _load_families()
    return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def model_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}{did_you_mean(name, _REGISTRY)}; valid models: "
                         f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def model_options(name: str) -> list[str]:
    """The override keys ``create_model(name, ...)`` accepts."""
    return [f.name for f in dataclasses.fields(model_spec(name).config_cls)]


def resolve_config(name: str, **overrides):
    """The dataclass config that ``create_model(name, **overrides)`` would build."""
    spec = model_spec(name)
    valid = model_options(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ModelError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}"
            f"{did_you_mean(unknown[0], valid)}; valid options: {', '.join(valid)}"
        )
    try:
        values = check_values(spec.config_cls, {**spec.defaults, **overrides})
        return spec.config_cls(**values)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ModelError(f"bad option for model {name!r}: {err}") from None


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; keyword overrides replace its config fields."""
    cfg = resolve_config(name, **overrides)
    return model_spec(name).build(cfg)


def count_parameters(model: str | nn.Module, **overrides) -> int:
    """Parameter count of a registered model (built on the meta device, so no weights are
    allocated; ``overrides`` as :func:`create_model`) or of a module as it is."""
    if isinstance(model, nn.Module):
        if overrides:
            raise ModelError(f"overrides ({', '.join(sorted(overrides))}) go with a model name, "
                             f"not a module ({type(model).__name__})")
        return sum(p.numel() for p in model.parameters())
    if not isinstance(model, str):
        # the type only: a repr can run to hundreds of lines
        raise ModelError(f"count_parameters takes a model name or an nn.Module, got "
                         f"{type(model).__name__}")
    with torch.device("meta"):
        built = create_model(model, **overrides)
    return sum(p.numel() for p in built.parameters())


def _load_families() -> None:
    # The family modules register their variants on import.
    from sigprop.models import bn_resnet, nf_resnet, nfnet  # noqa: F401

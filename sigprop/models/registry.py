"""Named variants of every family, and ``create_model`` that builds one with overrides.

A family module registers its variants on import (:func:`register_variants`, in the manner of
timm's model registry). ``sigprop/models/__init__.py`` imports every family, and Python runs a
package's ``__init__`` before any of its submodules can be used, so the registry is complete
whenever it is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from sigprop.errors import UserError, did_you_mean
from sigprop.fields import check_keys, check_types


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


class Variant(NamedTuple):
    """One named member of a family: its config defaults and its (train/test) resolution."""

    name: str
    defaults: dict[str, Any]
    resolution: str = "224"


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


def register_variants(
    family: str, build: Callable[..., nn.Module], config_cls: type, variants: Iterable[Variant]
) -> None:
    """Register every variant of ``family``, built by ``build(config_cls(**defaults))``; the
    listing keeps the order of registration."""
    for variant in variants:
        register(ModelSpec(variant.name, family, build, config_cls, dict(variant.defaults),
                           variant.resolution))


def list_models(family: str | None = None) -> list[str]:
    return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def model_spec(name: str) -> ModelSpec:
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
    check_keys(overrides, valid, error=ModelError, lead="unknown option(s)",
               after=f" for model {name!r}", valid_label="valid options")
    try:
        values = check_types(spec.config_cls, {**spec.defaults, **overrides})
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


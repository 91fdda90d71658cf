"""Human names of built models, from what was built rather than the registry name.

``nf_resnet26`` with its registry shape is "NF-ResNet-26"; overridden to depths [1, 1, 1, 1] and
width 0.125 it is no longer a ResNet-26, so it is named by its shape: "NF-ResNet [1,1,1,1]
x0.125". Names follow the papers: NF-ResNet (arXiv 2101.08692), NFNet-F0 (arXiv 2102.06171),
BN-ResNet v1/v2 (arXiv 1512.03385 / 1603.05027).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sigprop.models.registry import model_spec, resolve_config

FAMILY_TITLES = {"nf_resnet": "NF-ResNet", "nfnet": "NFNet", "bn_resnet": "BN-ResNet"}


def model_label(name: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The label of ``create_model(name, **overrides)``: registry name while the shape is the
    registry's, else the family and its depths, with the width multiplier when not 1."""
    spec = model_spec(name)
    overrides = {k: v for k, v in (overrides or {}).items() if k != "name"}
    built = resolve_config(name, **overrides)
    registry = resolve_config(name)
    title = FAMILY_TITLES.get(spec.family, spec.family)
    depths = tuple(built.depths)
    if depths == tuple(registry.depths):
        if spec.family == "nfnet":
            text = f"{title}-{built.variant}"
        else:
            text = f"{title}-{_resnet_depth(name)}"
    else:
        text = f"{title} [{','.join(str(d) for d in depths)}]"
    if getattr(built, "width_mult", 1.0) != 1.0:
        text += f" x{built.width_mult:g}"
    if spec.family == "bn_resnet":
        text += f" {built.version}"
    if getattr(built, "ws", True) is False:
        text += " (no WS)"
    if getattr(built, "order", "bn_act_conv") == "act_bn_conv":
        text += " (ReLU-BN-Conv)"
    return text


def _resnet_depth(name: str) -> str:
    match = re.search(r"resnet(\d+)", name)
    return match.group(1) if match else name


def model_departures(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{option: registry default} for every option ``overrides`` changes (``num_classes`` and
    ``in_chans`` aside: they follow the data). The registry defaults are the authors'."""
    overrides = {k: v for k, v in (overrides or {}).items()
                 if k not in ("name", "num_classes", "in_chans")}
    built = resolve_config(name, **overrides)
    registry = resolve_config(name)
    return {key: _plain(getattr(registry, key)) for key in sorted(overrides)
            if _plain(getattr(built, key)) != _plain(getattr(registry, key))}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

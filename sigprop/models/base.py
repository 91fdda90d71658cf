"""What every sigprop residual network shares: named probe points and the block listing.

A block's output is the block module itself; its residual branch output, before stochastic
depth, the skip gain and alpha, is the ``branch_out`` identity inside it. Probes hook these by
name, so they never need to know a block's code.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import torch
from torch import nn

from sigprop.fields import check_field


@dataclass(frozen=True)
class BlockInfo:
    name: str  # qualified module name of the block, e.g. "stages.1.0"
    stage: int
    index: int  # position among all blocks, from 0
    branch: str  # qualified module name of the branch output point
    transition: bool  # first block of a stage, with a projection shortcut
    expected_var: float | None  # NF bookkeeping (skip gain 1); None for BN / plain nets


def expected_variances(depths: list[int], alpha: float, projections: list[bool]) -> list[float]:
    """Expected Var(h) after every block: +alpha^2 per block, reset to 1 by projections.

    ``projections[i]`` says whether block i has a conv shortcut acting on h/beta.
    """
    out, var = [], 1.0
    for projected in projections:
        var = (1.0 if projected else var) + alpha**2
        out.append(var)
    assert len(out) == sum(depths)
    return out


class ResidualNet(nn.Module):
    """Mixin for the sigprop families: ``stem`` -> ``stages`` (ModuleList of Sequentials) -> head.

    Subclasses define ``stem``, ``stages``, ``fc``, and ``forward_features`` / ``forward_head``.
    """

    stem: nn.Module
    stages: nn.ModuleList
    fc: nn.Linear

    def blocks(self) -> list[BlockInfo]:
        out: list[BlockInfo] = []
        for s, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                name = f"stages.{s}.{j}"
                out.append(
                    BlockInfo(
                        name=name,
                        stage=s,
                        index=len(out),
                        branch=f"{name}.branch_out",
                        transition=block.conv_shortcut is not None,
                        expected_var=getattr(block, "expected_var", None),
                    )
                )
        return out

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.cfg)


def check_values(config_cls: type, values: dict) -> dict:
    """Type-check override ``values`` for ``config_cls`` before it is built, so a family's own
    arithmetic on them (NFNet's depth_mult) never meets a string or an infinity."""
    hints = typing.get_type_hints(config_cls)
    return {k: check_field(k, v, hints[k]) if k in hints else v for k, v in values.items()}


def check_config(cfg) -> None:
    """Validate the fields the families share; raises ValueError naming the field."""
    from sigprop.layers import ACTIVATIONS, PADDING_MODES

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, check_field(f.name, getattr(cfg, f.name), hints[f.name]))
    cfg.depths = tuple(int(d) for d in cfg.depths)
    cfg.widths = tuple(int(w) for w in cfg.widths)
    if not cfg.depths or any(d < 1 for d in cfg.depths):
        raise ValueError(f"depths must be positive block counts per stage, got {list(cfg.depths)}")
    if len(cfg.widths) != len(cfg.depths):
        raise ValueError(
            f"widths ({len(cfg.widths)} stages) and depths ({len(cfg.depths)} stages) differ"
        )
    if cfg.width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {cfg.width_mult}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {cfg.activation!r} unknown; valid: {', '.join(sorted(ACTIVATIONS))}"
        )
    if cfg.stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' or 'cifar', got {cfg.stem!r}")
    if cfg.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {cfg.drop_rate}")
    if getattr(cfg, "alpha", 0.0) < 0:
        raise ValueError(f"alpha must be >= 0, got {cfg.alpha}")
    if not 0.0 <= getattr(cfg, "stochdepth_rate", 0.0) < 1.0:
        raise ValueError(f"stochdepth_rate must be in [0, 1), got {cfg.stochdepth_rate}")
    if cfg.padding not in PADDING_MODES:
        raise ValueError(
            f"padding must be one of {', '.join(PADDING_MODES)}, got {cfg.padding!r}"
        )
    for name in ("se_ratio", "bottleneck_ratio", "final_conv_mult", "in_chans", "group_width"):
        if hasattr(cfg, name) and not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")


def scaled(width: int, mult: float) -> int:
    return max(1, int(width * mult))

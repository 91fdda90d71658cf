"""What every sigprop residual network shares: the ResNet stage tables, the stage builder with
the normalizer-free variance bookkeeping, named probe points, the block listing, and the rules
of the config fields the families share (declared on each config's fields, checked by
:func:`sigprop.fields.validate`).

The bookkeeping is that of Brock, De, Smith, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets" (ICLR 2021, arXiv 2101.08692), used unchanged by
Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization" (arXiv 2102.06171): block i computes h + alpha * f(h * beta_i) with
beta_i = 1 / sqrt(expected Var(h_i)); the expected variance grows by alpha^2 per block and is
reset to 1 by a transition block, whose conv shortcut reads h * beta.

A block's output is the block module itself; its residual branch output, before stochastic
depth, the skip gain and alpha, is the ``branch_out`` identity inside it. Probes hook these by
name, so they never need to know a block's code.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sigprop.fields import POSITIVE, Rule, at_least, checked, one_of, validate
from sigprop.layers import ACTIVATIONS, PADDING_MODES, StochasticDepth, apply_padding

# Bottleneck ResNet depths by name, as in the NF-ResNet paper and the authors' nf_resnet.py.
RESNET_DEPTHS: dict[int, tuple[int, ...]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
    600: (50, 50, 50, 50),
}
RESNET_WIDTHS = (256, 512, 1024, 2048)
# Stride of each stage's first block, the last repeated for any stage after the fourth.
STAGE_STRIDES = (1, 2, 2, 2)


# The rules of the fields the families' configs share (sigprop.fields): each config declares
# them on its fields, sigprop.fields.validate checks them when it is built.
DEPTHS = Rule(lambda v: len(v) > 0 and all(d >= 1 for d in v), "positive block counts per stage")
ACTIVATION = one_of(sorted(ACTIVATIONS))
STEM = one_of(("imagenet", "cifar"))
PADDING = one_of(PADDING_MODES)
NUM_CLASSES = at_least(1)


@dataclass
class ResNetStages:
    """The stage fields the bottleneck ResNet configs (NF and BN) start with, and the check of
    every field when a config is built (:func:`sigprop.fields.validate`)."""

    depths: tuple[int, ...] = checked(RESNET_DEPTHS[50], DEPTHS)
    widths: tuple[int, ...] = RESNET_WIDTHS
    width_mult: float = checked(1.0, POSITIVE)

    def __post_init__(self) -> None:
        validate(self)

    def check_together(self) -> str | None:
        return stages_problem(self)


@dataclass(frozen=True)
class BlockInfo:
    name: str  # qualified module name of the block, e.g. "stages.1.0"
    stage: int
    index: int  # position among all blocks, from 0
    branch: str  # qualified module name of the branch output point
    transition: bool  # first block of a stage, with a projection shortcut
    expected_var: float | None  # NF bookkeeping (skip gain 1); None for BN / plain nets


@dataclass(frozen=True)
class BlockPlan:
    """What the stage builder tells a block: its shape, and the NF bookkeeping at its place."""

    in_ch: int
    out_ch: int
    stride: int
    beta: float  # 1 / sqrt(expected Var of the block's input)
    expected_var: float  # expected Var of the block's output (skip gain 1)
    stochdepth_rate: float  # the net's rate * index / number of blocks: 0 for the first


def build_stages(
    in_ch: int,
    widths: Sequence[int],
    depths: Sequence[int],
    make_block: Callable[[BlockPlan], nn.Module],
    alpha: float = 0.0,
    stochdepth_rate: float = 0.0,
) -> nn.ModuleList:
    """``stages``: one Sequential of ``make_block(plan)`` per stage, the first block of each
    strided by ``STAGE_STRIDES``. A normalized net leaves alpha and the rate at 0 and its blocks
    ignore the bookkeeping."""
    num_blocks, index, expected_var = sum(depths), 0, 1.0
    stages = []
    for s, (width, depth) in enumerate(zip(widths, depths)):
        blocks = []
        for j in range(depth):
            stride = STAGE_STRIDES[min(s, len(STAGE_STRIDES) - 1)] if j == 0 else 1
            projected = stride > 1 or in_ch != width
            # the conv shortcut reads h * beta, whose expected variance is 1
            out_var = (1.0 if projected else expected_var) + alpha**2
            plan = BlockPlan(
                in_ch, width, stride, beta=expected_var**-0.5, expected_var=out_var,
                stochdepth_rate=stochdepth_rate * index / num_blocks,
            )
            blocks.append(make_block(plan))
            in_ch, expected_var, index = width, out_var, index + 1
        stages.append(nn.Sequential(*blocks))
    return nn.ModuleList(stages)


class ResidualNet(nn.Module):
    """Mixin for the sigprop families: ``stem`` -> ``stages`` (ModuleList of Sequentials) -> head.

    Subclasses define ``build`` (``stem``, ``stages`` by :func:`build_stages`, then the head by
    :meth:`build_head`) and ``forward_features``; the head is the same in every family: global
    mean pool, dropout, linear.
    """

    stem: nn.Module
    stages: nn.ModuleList
    drop: nn.Dropout
    fc: nn.Linear
    config_class: type  # the family's config dataclass

    def __init__(self, cfg: typing.Any = None, **overrides: typing.Any) -> None:
        super().__init__()
        self.cfg = cfg or self.config_class(**overrides)
        self.build(self.cfg, self.stage_widths())
        # every strided conv and max-pool, once the layers are built as usual
        apply_padding(self, self.cfg.padding)

    def build(self, cfg: typing.Any, widths: list[int]) -> None:
        """The family's layers, from its config and its stage widths (:meth:`stage_widths`)."""
        raise NotImplementedError

    def build_head(self, num_features: int, weight_std: float) -> None:
        """Dropout and the linear classifier over ``num_features`` channels: its weights drawn
        from N(0, weight_std²), or zero for ``weight_std=0``, and its bias zero."""
        self.num_features = num_features
        self.drop = nn.Dropout(self.cfg.drop_rate)
        self.fc = nn.Linear(num_features, self.cfg.num_classes)
        if weight_std:
            nn.init.normal_(self.fc.weight, 0.0, weight_std)
        else:
            nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def stage_widths(self) -> list[int]:
        """The config's stage widths times its width_mult."""
        return [scaled(w, self.cfg.width_mult) for w in self.cfg.widths]

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

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

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NFResidualBlock(nn.Module):
    """What the normalizer-free blocks share: the scaled block input ``act(h) * beta`` and the
    residual ``h + alpha * skip_gain * stoch_depth(branch_out(f))`` (see the module docstring).
    Subclasses set ``act``, ``alpha`` and ``input_scale``, and call :meth:`add_residual` last
    in ``__init__`` (the modules keep the authors' order)."""

    act: nn.Module
    alpha: float
    input_scale: float

    def add_residual(self, plan: BlockPlan, cfg: typing.Any) -> None:
        """``branch_out``, ``stoch_depth`` and the ``skip_gain`` parameter."""
        self.branch_out = nn.Identity()
        self.stoch_depth = StochasticDepth(plan.stochdepth_rate, cfg.scale_by_keep)
        self.skip_gain = nn.Parameter(torch.tensor(float(cfg.skipinit_gain)))

    def block_input(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x)
        return out * self.input_scale if self.input_scale != 1.0 else out

    def residual(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        out = self.stoch_depth(self.branch_out(branch))
        return torch.addcmul(shortcut, out, self.skip_gain * self.alpha)  # one pass, not two


def stages_problem(cfg: typing.Any) -> str | None:
    """The cross-field check every family's config shares (its ``check_together``)."""
    if len(cfg.widths) != len(cfg.depths):
        return f"widths ({len(cfg.widths)} stages) and depths ({len(cfg.depths)} stages) differ"
    return None


def scaled(width: int, mult: float) -> int:
    return max(1, int(width * mult))

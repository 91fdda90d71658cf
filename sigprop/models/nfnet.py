"""NFNet F0-F7: SE-ResNeXt-D style normalizer-free network with GELU.

Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization" (arXiv 2102.06171); the reference is the authors' JAX code (deepmind-research,
nfnets/nfnet.py, variants from nfnets/base.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from sigprop.fields import FRACTION, NON_NEGATIVE, POSITIVE, checked, one_of, validate
from sigprop.layers import (
    GAMMA,
    ScaledStdConv2d,
    SqueezeExcite,
    get_activation,
)
from sigprop.models import base
from sigprop.models.base import (
    BlockPlan,
    NFResidualBlock,
    ResidualNet,
    build_stages,
    scaled,
    stages_problem,
)
from sigprop.models.registry import Variant, register_variants

# The authors' variant table (nfnets/base.py): F_k has k+1 times F0's depths.
NFNET_VARIANTS: dict[str, dict] = {
    f"F{k}": {
        "depths": tuple(d * (k + 1) for d in (1, 2, 6, 3)),
        "train_px": train,
        "test_px": test,
        "drop_rate": drop,
    }
    for k, (train, test, drop) in enumerate(
        [(192, 256, 0.2), (224, 320, 0.3), (256, 352, 0.4), (320, 416, 0.4),
         (384, 512, 0.5), (416, 544, 0.5), (448, 576, 0.5), (480, 608, 0.5)]
    )
}
NFNET_WIDTHS = (256, 512, 1536, 1536)


@dataclass
class NFNetConfig:
    variant: str = checked("F0", one_of(NFNET_VARIANTS))
    depths: tuple[int, ...] | None = checked(None, base.DEPTHS)  # None: the variant's
    widths: tuple[int, ...] = NFNET_WIDTHS
    # width_mult also scales the group width, keeping the group count
    width_mult: float = checked(1.0, POSITIVE)
    depth_mult: float = checked(1.0, POSITIVE)
    alpha: float = checked(0.2, NON_NEGATIVE)
    activation: str = checked("gelu", base.ACTIVATION)
    skipinit_gain: float = 0.0
    stochdepth_rate: float = checked(0.1, FRACTION)
    scale_by_keep: bool = False
    se_ratio: float = checked(0.5, POSITIVE)
    group_width: int = checked(128, POSITIVE)
    bottleneck_ratio: float = checked(0.5, POSITIVE)
    final_conv_mult: float = checked(2.0, POSITIVE)
    use_two_convs: bool = True
    drop_rate: float | None = checked(None, FRACTION)  # None: the variant's
    stem: str = checked("imagenet", base.STEM)  # or "cifar": the same four convs, all stride 1
    num_classes: int = checked(1000, base.NUM_CLASSES)
    in_chans: int = checked(3, POSITIVE)
    # "same": the authors' TF SAME (asymmetric at even sizes); "symmetric": timm's nfnet_*
    padding: str = checked("same", base.PADDING)
    # True: each activation's gamma, and each block's input scale beta, move into the scale of
    # the convs they feed (same maths, fewer passes over the activations); off: gamma and beta
    # multiply the activations (the authors' layout).
    fold_gamma: bool = False

    def __post_init__(self) -> None:
        validate(self, names=("variant", "depth_mult"))  # what the derivation reads
        table = NFNET_VARIANTS[self.variant]
        if self.depths is None:
            self.depths = table["depths"]
        if self.drop_rate is None:
            self.drop_rate = table["drop_rate"]
        self.depths = tuple(max(1, round(d * self.depth_mult)) for d in self.depths)
        self.depth_mult = 1.0  # folded into depths, so the resolved config rebuilds the same net
        validate(self)

    def check_together(self) -> str | None:
        return stages_problem(self)


class NFBlock(NFResidualBlock):
    def __init__(self, plan: BlockPlan, cfg: NFNetConfig, group_width: int):
        super().__init__()
        in_ch, out_ch, stride, beta = plan.in_ch, plan.out_ch, plan.stride, plan.beta
        width = max(1, int(out_ch * cfg.bottleneck_ratio))
        groups = max(1, width // group_width)
        width = min(width, group_width) * groups  # round to whole groups, as the authors
        self.beta, self.alpha = beta, cfg.alpha
        self.expected_var = plan.expected_var
        gamma = GAMMA[cfg.activation] if cfg.fold_gamma else 1.0  # every conv reads an act
        # conv0 and the shortcut conv read the block's input, scaled by beta
        input_gamma = gamma * beta if cfg.fold_gamma else 1.0
        self.input_scale = 1.0 if cfg.fold_gamma else beta
        self.act = get_activation(cfg.activation, scaled=not cfg.fold_gamma)
        self.conv0 = ScaledStdConv2d(in_ch, width, 1, gamma=input_gamma)
        self.conv1 = ScaledStdConv2d(width, width, 3, stride, groups=groups, gamma=gamma)
        self.conv1b = (
            ScaledStdConv2d(width, width, 3, 1, groups=groups, gamma=gamma)
            if cfg.use_two_convs else None
        )
        self.conv2 = ScaledStdConv2d(width, out_ch, 1, gamma=gamma)
        projected = stride > 1 or in_ch != out_ch
        # ResNet-D shortcut: average-pool first, then a stride-1 1x1 conv
        self.pool = (
            nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride > 1 else None
        )
        self.conv_shortcut = (
            ScaledStdConv2d(in_ch, out_ch, 1, gamma=input_gamma) if projected else None
        )
        self.se = SqueezeExcite(out_ch, out_ch, cfg.se_ratio)
        self.add_residual(plan, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block_input(x)
        shortcut = x
        if self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(out if self.pool is None else self.pool(out))
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        if self.conv1b is not None:
            out = self.conv1b(self.act(out))
        out = self.se(self.conv2(self.act(out)))
        return self.residual(shortcut, out)


class NFNet(ResidualNet):
    config_class = NFNetConfig

    def build(self, cfg: NFNetConfig, widths: list[int]) -> None:
        group_width = scaled(cfg.group_width, cfg.width_mult)
        stem_widths = [scaled(c, cfg.width_mult) for c in (16, 32, 64)] + [max(1, widths[0] // 2)]
        stem_strides = (2, 1, 1, 2) if cfg.stem == "imagenet" else (1, 1, 1, 1)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        ch = cfg.in_chans
        gamma = GAMMA[cfg.activation] if cfg.fold_gamma else 1.0
        for i, (width, stride) in enumerate(zip(stem_widths, stem_strides)):
            # conv0 reads the image; the others read the previous act's output
            layers[f"conv{i}"] = ScaledStdConv2d(ch, width, 3, stride, gamma=gamma if i else 1.0)
            if i < 3:
                layers[f"act{i}"] = get_activation(cfg.activation, scaled=not cfg.fold_gamma)
            ch = width
        self.stem = nn.Sequential(layers)

        self.stages = build_stages(
            ch, widths, cfg.depths, lambda plan: NFBlock(plan, cfg, group_width),
            alpha=cfg.alpha, stochdepth_rate=cfg.stochdepth_rate,
        )
        num_features = int(cfg.final_conv_mult * widths[-1])
        self.final_conv = ScaledStdConv2d(widths[-1], num_features, 1)
        self.final_act = get_activation(cfg.activation)
        self.build_head(num_features, weight_std=0.01)
        # ResidualNet pads every strided conv; the transition avg-pool (ceil mode, valid
        # counts) already averages a lone last row / column at odd sizes, as Haiku's SAME
        # avg_pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.final_conv(self.forward_stages(x)))


register_variants(
    "nfnet", NFNet, NFNetConfig,
    [Variant(f"nfnet_{variant.lower()}", {"variant": variant},
             f"{table['train_px']}/{table['test_px']}")
     for variant, table in NFNET_VARIANTS.items()],
)

"""NF-ResNet: pre-activation bottleneck ResNet without normalization.

Brock, De, Smith, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets" (ICLR 2021, arXiv 2101.08692); the reference is the authors' JAX code
(deepmind-research, nfnets/nf_resnet.py).

h_{i+1} = h_i + alpha * skip_gain * f_i(h_i / beta_i), beta_i = sqrt(expected Var(h_i)).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from sigprop.fields import FRACTION, NON_NEGATIVE, POSITIVE, checked
from sigprop.layers import (
    GAMMA,
    MaxPool2dPadded,
    ScaledStdConv2d,
    SqueezeExcite,
    get_activation,
    he_conv2d,
)
from sigprop.models import base
from sigprop.models.base import (
    RESNET_DEPTHS,
    BlockPlan,
    NFResidualBlock,
    ResidualNet,
    ResNetStages,
    build_stages,
)
from sigprop.models.registry import Variant, register_variants


@dataclass
class NFResNetConfig(ResNetStages):
    alpha: float = checked(0.2, NON_NEGATIVE)
    activation: str = checked("relu", base.ACTIVATION)
    skipinit_gain: float = 0.0  # the authors' SkipInit; 1.0 for signal-propagation studies
    stochdepth_rate: float = checked(0.1, FRACTION)
    scale_by_keep: bool = False
    use_se: bool = False
    se_ratio: float = checked(0.25, POSITIVE)
    ws: bool = True  # False: plain He-init convs and plain activation (the paper's control)
    # True: each activation's gamma, and each block's input scale beta, move into the scale of
    # the convs they feed (same maths, two fewer passes over the activations per block); the
    # activations inside the blocks are then the unscaled ones. Off: gamma and beta multiply the
    # activations (the authors' layout).
    fold_gamma: bool = False
    stem: str = checked("imagenet", base.STEM)  # or "cifar": 3x3/1 conv, no pool, for 32x32 inputs
    num_classes: int = checked(1000, base.NUM_CLASSES)
    in_chans: int = checked(3, POSITIVE)
    drop_rate: float = checked(0.0, FRACTION)
    bottleneck_ratio: float = checked(0.25, POSITIVE)
    # "same": the authors' TF SAME (asymmetric at even sizes); "symmetric": timm's nf_resnet*
    padding: str = checked("same", base.PADDING)


def make_conv(ws: bool, gamma: float = 1.0):
    if ws:
        return ScaledStdConv2d if gamma == 1.0 else partial(ScaledStdConv2d, gamma=gamma)
    return he_conv2d


class NFBottleneck(NFResidualBlock):
    def __init__(self, plan: BlockPlan, cfg: NFResNetConfig):
        super().__init__()
        in_ch, out_ch, stride, beta = plan.in_ch, plan.out_ch, plan.stride, plan.beta
        fold = cfg.ws and cfg.fold_gamma
        # every conv of the block reads an activation's output; conv0 and the shortcut conv
        # read the block's input, scaled by beta
        gamma = GAMMA[cfg.activation] if fold else 1.0
        conv = make_conv(cfg.ws, gamma)
        input_conv = make_conv(cfg.ws, gamma * beta if fold else 1.0)
        width = max(1, int(out_ch * cfg.bottleneck_ratio))
        self.beta, self.alpha = beta, cfg.alpha
        self.input_scale = 1.0 if fold else beta
        self.expected_var = plan.expected_var
        self.act = get_activation(cfg.activation, scaled=cfg.ws and not fold)
        self.conv0 = input_conv(in_ch, width, 1)
        self.conv1 = conv(width, width, 3, stride)
        self.conv2 = conv(width, out_ch, 1)
        projected = stride > 1 or in_ch != out_ch
        self.conv_shortcut = input_conv(in_ch, out_ch, 1, stride) if projected else None
        self.se = SqueezeExcite(out_ch, out_ch, cfg.se_ratio) if cfg.use_se else None
        self.add_residual(plan, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block_input(x)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        out = self.conv2(self.act(out))
        if self.se is not None:
            out = self.se(out)
        return self.residual(shortcut, out)


class NFResNet(ResidualNet):
    config_class = NFResNetConfig

    def build(self, cfg: NFResNetConfig, widths: list[int]) -> None:
        conv = make_conv(cfg.ws)
        ch = max(1, widths[0] // 4)
        # The stem conv has a bias (zero at init), as every conv of the authors' (and timm's).
        if cfg.stem == "imagenet":
            self.stem = nn.Sequential(
                OrderedDict(
                    conv=conv(cfg.in_chans, ch, 7, 2),
                    pool=MaxPool2dPadded(3, 2),
                )
            )
        else:
            self.stem = nn.Sequential(OrderedDict(conv=conv(cfg.in_chans, ch, 3, 1)))

        self.stages = build_stages(
            ch, widths, cfg.depths, lambda plan: NFBottleneck(plan, cfg),
            alpha=cfg.alpha, stochdepth_rate=cfg.stochdepth_rate,
        )
        self.final_act = get_activation(cfg.activation, scaled=cfg.ws)
        self.build_head(widths[-1], weight_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.forward_stages(x))


register_variants(
    "nf_resnet", NFResNet, NFResNetConfig,
    [Variant(f"nf_resnet{depth}", {"depths": depths}) for depth, depths in RESNET_DEPTHS.items()],
)

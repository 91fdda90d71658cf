"""BatchNorm ResNet baseline (the authors' resnet.py): v2 pre-activation by default, v1 option.

v2 is He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016, arXiv
1603.05027); v1 is their "Deep Residual Learning for Image Recognition" (CVPR 2016, arXiv
1512.03385). The baseline and its ablations are those of Brock, De, Smith, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets" (ICLR 2021, arXiv
2101.08692), "the NF-ResNet paper" below.

``norm="none"`` removes every normalization layer: the unnormalized ResNet ablation.
``order`` (v2 only) picks the NF-ResNet paper's Figure 1 orderings of the pre-activation branch:
"bn_act_conv" (BN-ReLU-Conv, the authors' v2) or "act_bn_conv" (ReLU-BN-Conv). He init
(gain sqrt(2)) assumes a ReLU right before the conv; in ReLU-BN-Conv the conv sees BN's
zero-mean unit-variance output instead, so its convs get the variance-preserving fan-in init
(gain 1). Then the residual branch variance is about 1 for ReLU-BN-Conv and 1 - 1/pi for
BN-ReLU-Conv (the ReLU's mean 1/sqrt(2 pi) goes into the channel means, not the variance).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from sigprop.fields import FRACTION, POSITIVE, checked, one_of
from sigprop.layers import (
    MaxPool2dPadded,
    SqueezeExcite,
    get_activation,
    he_conv2d,
)
from sigprop.models import base
from sigprop.models.base import (
    RESNET_DEPTHS,
    BlockPlan,
    ResidualNet,
    ResNetStages,
    build_stages,
)
from sigprop.models.registry import Variant, register_variants


@dataclass
class BNResNetConfig(ResNetStages):
    # "v2": BN-act-conv (pre-activation); "v1": conv-BN-act
    version: str = checked("v2", one_of(("v1", "v2")))
    # v2 only: or "act_bn_conv" (ReLU-BN-Conv, NF-ResNet paper Fig. 1)
    order: str = checked("bn_act_conv", one_of(("bn_act_conv", "act_bn_conv")))
    norm: str = checked("batch", one_of(("batch", "none")))
    activation: str = checked("relu", base.ACTIVATION)
    use_se: bool = False
    se_ratio: float = checked(0.25, POSITIVE)
    stem: str = checked("imagenet", base.STEM)
    num_classes: int = checked(1000, base.NUM_CLASSES)
    in_chans: int = checked(3, POSITIVE)
    drop_rate: float = checked(0.0, FRACTION)
    bottleneck_ratio: float = checked(0.25, POSITIVE)
    # the authors' TF SAME; "symmetric": PyTorch / torchvision style
    padding: str = checked("same", base.PADDING)

    def check_together(self) -> str | None:
        if self.order == "act_bn_conv" and self.version != "v2":
            return "order='act_bn_conv' is a pre-activation (v2) ordering"
        return super().check_together()


def make_norm(cfg: BNResNetConfig, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if cfg.norm == "batch" else nn.Identity()


def make_conv(cfg: BNResNetConfig, in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Conv2d:
    # Without BN there is no BN bias, so the conv keeps its own.
    gain = 1.0 if cfg.order == "act_bn_conv" else 2.0**0.5
    return he_conv2d(in_ch, out_ch, k, stride, bias=cfg.norm == "none", gain=gain)


class BNBottleneck(nn.Module):
    def __init__(self, plan: BlockPlan, cfg: BNResNetConfig):
        super().__init__()
        in_ch, out_ch, stride = plan.in_ch, plan.out_ch, plan.stride
        width = max(1, int(out_ch * cfg.bottleneck_ratio))
        self.preact = cfg.version == "v2"
        self.act_first = cfg.order == "act_bn_conv"
        self.act = get_activation(cfg.activation, scaled=False)
        self.bn0 = make_norm(cfg, in_ch if self.preact else width)
        self.conv0 = make_conv(cfg, in_ch, width, 1)
        self.bn1 = make_norm(cfg, width)
        self.conv1 = make_conv(cfg, width, width, 3, stride)
        self.bn2 = make_norm(cfg, width if self.preact else out_ch)
        self.conv2 = make_conv(cfg, width, out_ch, 1)
        projected = stride > 1 or in_ch != out_ch
        self.conv_shortcut = make_conv(cfg, in_ch, out_ch, 1, stride) if projected else None
        self.shortcut_bn = make_norm(cfg, out_ch) if projected and not self.preact else None
        self.se = SqueezeExcite(out_ch, out_ch, cfg.se_ratio, scale=1.0) if cfg.use_se else None
        self.branch_out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.pre(self.bn0, x)
            shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
            out = self.conv0(out)
            out = self.conv1(self.pre(self.bn1, out))
            out = self.conv2(self.pre(self.bn2, out))
        else:
            shortcut = x
            if self.conv_shortcut is not None:
                shortcut = self.shortcut_bn(self.conv_shortcut(x))
            out = self.act(self.bn0(self.conv0(x)))
            out = self.act(self.bn1(self.conv1(out)))
            out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        out = self.branch_out(out) + shortcut
        return out if self.preact else self.act(out)

    def pre(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The pre-activation of a v2 conv: BN-act or act-BN."""
        return norm(self.act(x)) if self.act_first else self.act(norm(x))


class BNResNet(ResidualNet):
    config_class = BNResNetConfig

    def build(self, cfg: BNResNetConfig, widths: list[int]) -> None:
        ch = max(1, widths[0] // 4)
        imagenet = cfg.stem == "imagenet"
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=he_conv2d(cfg.in_chans, ch, 7 if imagenet else 3, 2 if imagenet else 1, bias=False)
        )
        if cfg.version == "v1":
            layers["bn"] = make_norm(cfg, ch)
            layers["act"] = get_activation(cfg.activation, scaled=False)
        if imagenet:
            layers["pool"] = MaxPool2dPadded(3, 2)
        self.stem = nn.Sequential(layers)

        self.stages = build_stages(ch, widths, cfg.depths, lambda plan: BNBottleneck(plan, cfg))
        ch = widths[-1]
        if cfg.version == "v2":
            self.final_norm = make_norm(cfg, ch)
            self.final_act = get_activation(cfg.activation, scaled=False)
        else:
            self.final_norm, self.final_act = nn.Identity(), nn.Identity()
        self.build_head(ch, weight_std=0.0)  # the authors' baseline head init: zeros

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.final_norm(self.forward_stages(x)))


register_variants(
    "bn_resnet", BNResNet, BNResNetConfig,
    [Variant(f"bn_resnet{depth}_{version}", {"depths": depths, "version": version})
     for depth, depths in RESNET_DEPTHS.items() for version in ("v2", "v1")],
)

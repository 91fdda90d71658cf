"""NF-ResNet (paper A): pre-activation bottleneck ResNet without normalization.

h_{i+1} = h_i + alpha * skip_gain * f_i(h_i / beta_i), beta_i = sqrt(expected Var(h_i)).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from sigprop.layers import (
    GAMMA,
    MaxPool2dPadded,
    ScaledStdConv2d,
    SqueezeExcite,
    StochasticDepth,
    apply_padding,
    get_activation,
    he_conv2d,
)
from sigprop.models.base import ResidualNet, check_config, scaled
from sigprop.models.registry import ModelSpec, register

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
STAGE_STRIDES = (1, 2, 2, 2)


@dataclass
class NFResNetConfig:
    depths: tuple[int, ...] = RESNET_DEPTHS[50]
    widths: tuple[int, ...] = RESNET_WIDTHS
    width_mult: float = 1.0
    alpha: float = 0.2
    activation: str = "relu"
    skipinit_gain: float = 0.0  # the authors' SkipInit; 1.0 for signal-propagation studies
    stochdepth_rate: float = 0.1
    scale_by_keep: bool = False
    use_se: bool = False
    se_ratio: float = 0.25
    ws: bool = True  # False: plain He-init convs and plain activation (paper A's control)
    # True: each activation's gamma, and each block's input scale beta, move into the scale of
    # the convs they feed (same maths, two fewer passes over the activations per block); the
    # activations inside the blocks are then the unscaled ones. Off: gamma and beta multiply the
    # activations (the authors' layout).
    fold_gamma: bool = False
    stem: str = "imagenet"  # or "cifar": 3x3/1 conv, no pool, for 32x32 inputs
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    bottleneck_ratio: float = 0.25
    # "same": the authors' TF SAME (asymmetric at even sizes); "symmetric": timm's nf_resnet*
    padding: str = "same"

    def __post_init__(self) -> None:
        check_config(self)


def make_conv(ws: bool, gamma: float = 1.0):
    if ws:
        return ScaledStdConv2d if gamma == 1.0 else partial(ScaledStdConv2d, gamma=gamma)
    return he_conv2d


class NFBottleneck(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        beta: float,
        expected_var: float,
        cfg: NFResNetConfig,
        stochdepth_rate: float,
    ):
        super().__init__()
        fold = cfg.ws and cfg.fold_gamma
        # every conv of the block reads an activation's output; conv0 and the shortcut conv
        # read the block's input, scaled by beta
        gamma = GAMMA[cfg.activation] if fold else 1.0
        conv = make_conv(cfg.ws, gamma)
        input_conv = make_conv(cfg.ws, gamma * beta if fold else 1.0)
        width = max(1, int(out_ch * cfg.bottleneck_ratio))
        self.beta, self.alpha = beta, cfg.alpha
        self.input_scale = 1.0 if fold else beta
        self.expected_var = expected_var
        self.act = get_activation(cfg.activation, scaled=cfg.ws and not fold)
        self.conv0 = input_conv(in_ch, width, 1)
        self.conv1 = conv(width, width, 3, stride)
        self.conv2 = conv(width, out_ch, 1)
        projected = stride > 1 or in_ch != out_ch
        self.conv_shortcut = input_conv(in_ch, out_ch, 1, stride) if projected else None
        self.se = SqueezeExcite(out_ch, out_ch, cfg.se_ratio) if cfg.use_se else None
        self.branch_out = nn.Identity()
        self.stoch_depth = StochasticDepth(stochdepth_rate, cfg.scale_by_keep)
        self.skip_gain = nn.Parameter(torch.tensor(float(cfg.skipinit_gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x)
        if self.input_scale != 1.0:
            out = out * self.input_scale
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        out = self.conv2(self.act(out))
        if self.se is not None:
            out = self.se(out)
        out = self.stoch_depth(self.branch_out(out))
        return torch.addcmul(shortcut, out, self.skip_gain * self.alpha)  # one pass, not two


class NFResNet(ResidualNet):
    def __init__(self, cfg: NFResNetConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or NFResNetConfig(**overrides)
        self.cfg = cfg
        conv = make_conv(cfg.ws)
        widths = [scaled(w, cfg.width_mult) for w in cfg.widths]
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

        num_blocks, index, expected_var = sum(cfg.depths), 0, 1.0
        stages = []
        for s, (width, depth) in enumerate(zip(widths, cfg.depths)):
            blocks = []
            for j in range(depth):
                stride = STAGE_STRIDES[min(s, 3)] if j == 0 else 1
                projected = stride > 1 or ch != width
                out_var = (1.0 if projected else expected_var) + cfg.alpha**2
                blocks.append(
                    NFBottleneck(
                        ch, width, stride, beta=expected_var**-0.5, expected_var=out_var, cfg=cfg,
                        stochdepth_rate=cfg.stochdepth_rate * index / num_blocks,
                    )
                )
                ch, expected_var, index = width, out_var, index + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = ch
        self.final_act = get_activation(cfg.activation, scaled=cfg.ws)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(ch, cfg.num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)
        apply_padding(self, cfg.padding)  # every strided conv and the stem max-pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_act(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=(2, 3))))


for _depth, _pattern in RESNET_DEPTHS.items():
    register(
        ModelSpec(
            name=f"nf_resnet{_depth}",
            family="nf_resnet",
            build=NFResNet,
            config_cls=NFResNetConfig,
            defaults={"depths": _pattern},
            resolution="224",
        )
    )

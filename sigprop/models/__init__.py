"""Model families (NF-ResNet, NFNet, BN-ResNet) and the registry of named variants."""

from sigprop.models.base import BlockInfo, ResidualNet
from sigprop.models.bn_resnet import BNResNet, BNResNetConfig
from sigprop.models.nf_resnet import NFResNet, NFResNetConfig
from sigprop.models.nfnet import NFNET_VARIANTS, NFNet, NFNetConfig
from sigprop.models.registry import (
    ModelError,
    count_parameters,
    create_model,
    list_models,
    model_options,
    model_spec,
    resolve_config,
)

__all__ = [
    "BNResNet", "BNResNetConfig", "BlockInfo", "ModelError", "NFNET_VARIANTS", "NFNet",
    "NFNetConfig", "NFResNet", "NFResNetConfig", "ResidualNet", "count_parameters",
    "create_model", "list_models", "model_options", "model_spec", "resolve_config",
]

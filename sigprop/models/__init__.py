"""Model families and the registry of named variants.

- NF-ResNet: Brock, De, Smith, "Characterizing signal propagation to close the performance gap
  in unnormalized ResNets" (ICLR 2021, arXiv 2101.08692).
- NFNet: Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
  Normalization" (arXiv 2102.06171).
- BN-ResNet baseline: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks"
  (ECCV 2016, arXiv 1603.05027), v2 (pre-activation) by default.
"""

from sigprop.models.base import BlockInfo, ResidualNet
from sigprop.models.registry import (
    ModelError,
    count_parameters,
    create_model,
    list_models,
    model_options,
    model_spec,
    resolve_config,
)

# Each family registers its variants on import; this order is the order of list_models().
# isort: off
from sigprop.models.nf_resnet import NFResNet, NFResNetConfig
from sigprop.models.bn_resnet import BNResNet, BNResNetConfig
from sigprop.models.nfnet import NFNET_VARIANTS, NFNet, NFNetConfig
# isort: on

__all__ = [
    "BlockInfo", "ResidualNet",  # what every family shares
    "ModelError", "count_parameters", "create_model", "list_models", "model_options",
    "model_spec", "resolve_config",  # the registry
    "NFResNet", "NFResNetConfig", "BNResNet", "BNResNetConfig",  # the families
    "NFNET_VARIANTS", "NFNet", "NFNetConfig",
]

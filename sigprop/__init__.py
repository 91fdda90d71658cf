"""sigprop: signal-propagation analysis and ablation lab for normalizer-free networks."""

from sigprop.models import BlockInfo, ModelError, count_parameters, create_model, list_models

__version__ = "0.1.0"
__all__ = ["BlockInfo", "ModelError", "count_parameters", "create_model", "list_models"]

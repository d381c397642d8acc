"""Model registry: ``register_model`` / ``list_models`` / ``get_model``.

Every builder takes ``num_classes`` and ``in_channels`` so any model runs on any dataset.
Adding a model is one decorated function in one module of this package.
"""

from gkp.models import cifar_resnet, cifar_vgg, torchvision  # noqa: E402,F401  (registers)
from gkp.models._registry import (
    MODELS,
    ModelInfo,
    get_model,
    get_model_info,
    list_models,
    register_model,
    target_layers,
)

__all__ = [
    "MODELS",
    "ModelInfo",
    "get_model",
    "get_model_info",
    "list_models",
    "register_model",
    "target_layers",
]

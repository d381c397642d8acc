"""The model registry and the per-family choice of layers that grouped-kernel methods prune.

Names are case-insensitive (``ResNet20`` is ``resnet20``); ``ModelInfo.name`` is the canonical,
lower-case spelling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from gkp.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its builder and which convs are pruning targets.

    ``targets(model, all_bottleneck_convs)`` returns the names of the target convs, as
    METHODS.md defines them for the family (never the stem, shortcuts, BN or classifier).
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    targets: Callable[[nn.Module, bool], list[str]]
    model_type: type[nn.Module]


MODELS: Registry[ModelInfo] = Registry("model")


def register_model(
    name: str,
    family: str,
    targets: Callable[[nn.Module, bool], list[str]],
    model_type: type[nn.Module],
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes, in_channels) -> nn.Module``.

    ``model_type`` is the class the builder returns; it lets ``target_layers`` find the
    family's target rule from a model instance alone.
    """
    key = MODELS.normalise(name)
    return MODELS.decorator(key, lambda fn: ModelInfo(key, family, fn, targets, model_type))


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return MODELS.names()


def get_model_info(name: str) -> ModelInfo:
    """The registered model ``name`` (any case); an unknown name raises UnknownNameError."""
    return MODELS[name]


def get_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A freshly initialised ``name`` for ``num_classes`` classes and ``in_channels`` inputs."""
    return get_model_info(name).builder(num_classes=num_classes, in_channels=in_channels)


def target_layers(model: nn.Module, all_bottleneck_convs: bool = False) -> list[str]:
    """Names of the convs a grouped-kernel method prunes in ``model``, by its family's rule."""
    for info in MODELS.values():
        if isinstance(model, info.model_type):
            return info.targets(model, all_bottleneck_convs)
    raise ValueError(
        f"no target-layer rule for a {type(model).__name__}; register its model with "
        "register_model(..., targets=...) or pass the layer names explicitly (native knob 'layers')"
    )

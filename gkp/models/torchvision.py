"""torchvision's ImageNet ResNets with ``num_classes`` and ``in_channels`` adapters."""

from __future__ import annotations

from collections.abc import Callable

import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from gkp.models._registry import register_model


def _adapt(model: tvm.ResNet, in_channels: int) -> nn.Module:
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def resnet_targets(model: nn.Module, all_bottleneck_convs: bool = False) -> list[str]:
    """Basic blocks: both 3x3 convs. Bottlenecks: the 3x3 conv2 by default, or all three convs.

    Never the stem, the downsample branch or the classifier.
    """
    names = []
    for bname, block in model.named_modules():
        if isinstance(block, BasicBlock):
            names += [f"{bname}.conv1", f"{bname}.conv2"]
        elif isinstance(block, Bottleneck):
            convs = ("conv1", "conv2", "conv3") if all_bottleneck_convs else ("conv2",)
            names += [f"{bname}.{c}" for c in convs]
    return names


def _register(name: str, fn: Callable[..., tvm.ResNet]) -> None:
    @register_model(name, "torchvision_resnet", resnet_targets, tvm.ResNet)
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        return _adapt(fn(weights=None, num_classes=num_classes), in_channels)


for _name, _fn in (
    ("resnet18", tvm.resnet18),
    ("resnet34", tvm.resnet34),
    ("resnet50", tvm.resnet50),
):
    _register(_name, _fn)

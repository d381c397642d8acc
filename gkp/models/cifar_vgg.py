"""VGG-16 with batch norm for 32x32 inputs (the CIFAR variant common in pruning papers).

Thirteen 3x3 convs with BN and ReLU, five max-pools, then one linear classifier on the 512
features (no 4096-wide FC layers, as in the CIFAR pruning literature).
"""

from __future__ import annotations

from torch import Tensor, nn

from gkp.models._registry import register_model

CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # 28x28 inputs too
            else:
                layers += [
                    nn.Conv2d(c, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg_targets(model: nn.Module, _all: bool = False) -> list[str]:
    """Every conv but the first (whose few input channels leave nothing to group)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]


@register_model("vgg16_bn", "cifar_vgg", vgg_targets, CifarVGG)
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarVGG(num_classes, in_channels)

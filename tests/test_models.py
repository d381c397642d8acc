"""Every registered model builds, adapts, and has the MACs/params derived by hand below."""

import pytest
import torch

from gkp.api import UnknownNameError
from gkp.metrics import macs, params
from gkp.models import get_model, get_model_info, list_models, target_layers


def cifar_resnet_macs(n: int) -> int:
    """Hand count at 32x32, conv + FC: stem, stage 1, stages 2 and 3 (first conv strided)."""
    stem = 16 * 3 * 9 * 32 * 32
    same = 16 * 16 * 9 * 32 * 32  # 16->16 at 32x32 == 32->32 at 16x16 == 64->64 at 8x8
    down = 32 * 16 * 9 * 16 * 16  # 16->32 at 16x16 == 32->64 at 8x8
    return stem + 2 * n * same + 2 * (down + (2 * n - 1) * same) + 64 * 10


def cifar_resnet_params(n: int) -> int:
    """Hand count: conv weights, BN affine (2 per channel), FC weight + bias."""
    stem = 16 * 3 * 9 + 2 * 16
    s1 = 2 * n * (16 * 16 * 9 + 2 * 16)
    s2 = 32 * 16 * 9 + (2 * n - 1) * 32 * 32 * 9 + 2 * n * 2 * 32
    s3 = 64 * 32 * 9 + (2 * n - 1) * 64 * 64 * 9 + 2 * n * 2 * 64
    return stem + s1 + s2 + s3 + 64 * 10 + 10


@pytest.mark.parametrize(
    "name,n,macs_m,params_m",
    [
        ("resnet20", 3, 40.55, 0.2697),
        ("resnet32", 5, 68.86, 0.4642),
        ("resnet56", 9, 125.49, 0.8530),
        ("resnet110", 18, 252.89, 1.7280),
    ],
)
def test_cifar_resnets_pinned(name, n, macs_m, params_m):
    model = get_model(name)
    x = torch.zeros(1, 3, 32, 32)
    assert macs(model, x) == cifar_resnet_macs(n)
    assert params(model) == cifar_resnet_params(n)
    assert round(cifar_resnet_macs(n) / 1e6, 2) == macs_m
    assert round(cifar_resnet_params(n) / 1e6, 4) == params_m
    assert len(target_layers(model)) == 6 * n


def test_resnet50_imagenet():
    model = get_model("resnet50", num_classes=1000)
    assert params(model) == 25_557_032
    assert abs(macs(model, torch.zeros(1, 3, 224, 224)) / 1e9 - 4.09) < 0.005
    assert len(target_layers(model)) == 16
    assert len(target_layers(model, all_bottleneck_convs=True)) == 48
    assert not any("downsample" in t for t in target_layers(model, True))


def test_vgg16_bn_macs():
    # 13 convs at 32x32 input (hand count), plus the 512 -> 10 classifier
    cfg = [
        (3, 64, 32),
        (64, 64, 32),
        (64, 128, 16),
        (128, 128, 16),
        (128, 256, 8),
        (256, 256, 8),
        (256, 256, 8),
        (256, 512, 4),
        (512, 512, 4),
        (512, 512, 4),
        (512, 512, 2),
        (512, 512, 2),
        (512, 512, 2),
    ]
    want = sum(ci * co * 9 * s * s for ci, co, s in cfg) + 512 * 10
    assert macs(get_model("vgg16_bn"), torch.zeros(1, 3, 32, 32)) == want


@pytest.mark.parametrize("name", list_models())
def test_adapters(name):
    model = get_model(name, num_classes=7, in_channels=1).eval()
    size = 64 if name in {"resnet18", "resnet34", "resnet50"} else 28
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 7)
    assert all(isinstance(model.get_submodule(t), torch.nn.Conv2d) for t in target_layers(model))


def test_unknown_model_lists_known():
    with pytest.raises(UnknownNameError, match="resnet56"):
        get_model("resnet57")


def test_model_names_are_case_insensitive_and_info_has_the_canonical_name():
    info = get_model_info(" ResNet20 ")
    assert info is get_model_info("resnet20") and info.name == "resnet20"
    assert get_model_info("VGG16_BN").name == "vgg16_bn"
    model = get_model("ResNet20", num_classes=3)
    assert isinstance(model, info.model_type) and len(target_layers(model)) == 18
    assert all(name == name.lower() for name in list_models())

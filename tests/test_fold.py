"""BatchNorm folding for latency: same function, no BN left after a conv, per-channel order of
grouped-kernel and per-group layers respected, shared or BN-less convs left alone."""

import pytest
import torch
from torch import nn

from gkp.fold import fold_batchnorm
from gkp.nn import GroupedKernelConv2d, GroupPlan, PerGroupConv2d


def random_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    return bn


class Shared(nn.Module):
    """conv output used by a BN and by a skip: it must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), random_bn(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def nets():
    torch.manual_seed(0)
    plan = GroupPlan.from_lists([[5, 0, 3, 6], [1, 2, 4, 7]], [[0, 2, 5], [1, 3, 4]])
    uneven = GroupPlan.from_lists([[0, 4, 6], [1, 2, 3, 5, 7]], [[1, 2], [0, 3, 4, 5]])
    grouped = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), random_bn(6), nn.ReLU(),
                            GroupedKernelConv2d.from_conv(nn.Conv2d(6, 8, 3, padding=1), plan),
                            random_bn(8))  # fmt: skip
    per_group = nn.Sequential(nn.Conv2d(3, 6, 1), random_bn(6),
                              PerGroupConv2d.from_conv(nn.Conv2d(6, 8, 3, bias=True), uneven),
                              random_bn(8))  # fmt: skip
    return {"grouped": grouped, "per-group": per_group}


@pytest.mark.parametrize("name", ["grouped", "per-group"])
def test_folded_network_computes_the_same_without_bn(name):
    model = nets()[name].eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2  # input untouched
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_fused_and_dense_backends_use_the_folded_weights():
    from gkp.nn import set_backend

    model = nets()["grouped"].eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        want = model(x)
        for backend in ("fused", "dense", "per_group"):
            folded = fold_batchnorm(model)
            set_backend(folded, backend)
            assert torch.allclose(folded(x), want, atol=1e-4, rtol=1e-4), backend


def test_a_conv_whose_output_is_also_used_elsewhere_is_not_folded():
    torch.manual_seed(0)
    model = Shared().eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x))

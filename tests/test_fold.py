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


def gkp_layer(c_in: int, c_out: int, groups: int, keep: int, seed: int) -> GroupedKernelConv2d:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(c_out, generator=gen).tolist()
    d = c_out // groups
    kept = [torch.randperm(c_in, generator=gen)[:keep].tolist() for _ in range(groups)]
    plan = GroupPlan.from_lists([order[g * d : (g + 1) * d] for g in range(groups)], kept)
    return GroupedKernelConv2d.from_conv(nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), plan)


class Readers(nn.Module):
    """Grouped layers read by a plain conv (through BN and an in-place ReLU), by a grouped layer
    (through F.relu and an Identity), by a per-group layer, by two convs at once, and one whose
    output reaches a residual add (left alone), one read by a grouped plain conv (left alone)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        uneven = GroupPlan.from_lists([[0, 4, 6], [1, 2, 3, 5, 7]], [[1, 2], [0, 3, 4, 5]])
        self.a, self.bn_a, self.relu = gkp_layer(3, 16, 4, 2, 0), random_bn(16), nn.ReLU(True)
        self.plain = nn.Conv2d(16, 8, 1)
        self.b, self.keep = gkp_layer(8, 8, 2, 3, 1), nn.Identity()
        self.c = gkp_layer(8, 8, 2, 5, 2)
        self.per = PerGroupConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), uneven)
        self.d = gkp_layer(8, 8, 4, 3, 3)
        self.left, self.right = nn.Conv2d(8, 8, 1), gkp_layer(8, 8, 2, 4, 4)
        self.e = gkp_layer(8, 8, 2, 4, 5)
        self.f, self.grouped = gkp_layer(8, 8, 2, 4, 6), nn.Conv2d(8, 8, 1, groups=2)

    def forward(self, x):
        y = self.plain(self.relu(self.bn_a(self.a(x))))
        y = self.c(self.keep(torch.nn.functional.relu(self.b(y))))
        y = self.d(self.per(y))
        y = self.left(y) + self.right(y.relu())
        y = self.e(y) + y
        return self.grouped(self.f(y))


def test_permutations_fold_into_their_readers_and_the_function_is_kept():
    from gkp.fold import fold_permutations

    model = Readers().eval()
    folded = fold_permutations(fold_batchnorm(model))
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    for name in ("a", "b", "c", "per", "d"):
        layer = getattr(folded, name)
        assert layer.ordered_output, name
        assert torch.equal(layer.output_index, torch.arange(layer.out_channels)), name
    for name in ("e", "f"):  # read by a residual add / by a grouped plain conv: left alone
        layer, before = getattr(folded, name), getattr(model, name)
        assert not layer.ordered_output, name
        assert torch.equal(layer.output_index, before.output_index), name
    assert not any(m.ordered_output for m in model.modules() if hasattr(m, "ordered_output"))


@pytest.mark.parametrize("backend", ["torch", "fused", "fused_filters", "dense", "per_group",
                                     "channels_last"])  # fmt: skip
def test_every_backend_runs_the_folded_network_exactly(backend):
    from gkp.fold import fold_permutations
    from gkp.nn import set_backend

    model = Readers().eval()
    folded = fold_permutations(fold_batchnorm(model))
    set_backend(folded, backend)
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4), backend
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(folded(xc), model(x), atol=1e-4, rtol=1e-4), backend


class CalledTwice(nn.Module):
    """One grouped layer and one reader module called twice: neither may be folded."""

    def __init__(self):
        super().__init__()
        self.a, self.conv = gkp_layer(4, 8, 2, 2, 7), nn.Conv2d(8, 4, 1)
        self.b = gkp_layer(4, 8, 2, 3, 8)

    def forward(self, x):
        return self.conv(self.a(self.conv(self.a(x)))) + self.conv(self.b(x))


def test_layers_or_readers_called_more_than_once_are_not_folded():
    from gkp.fold import fold_permutations

    model = CalledTwice().eval()
    folded = fold_permutations(model)
    assert not folded.a.ordered_output and not folded.b.ordered_output
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_folded_layer_skips_the_unpermuting_copy():
    """What ONNX export and torch.compile see: one index_select (the gather), not two."""
    from gkp.fold import fold_permutations

    model = Readers().eval()
    folded = fold_permutations(fold_batchnorm(model))

    def selects(layer):
        graph = torch.fx.symbolic_trace(layer).graph
        return sum(n.target in ("index_select", torch.index_select) for n in graph.nodes)

    assert selects(model.a) == 2 and selects(folded.a) == 1

"""Fused conv epilogues (gkp.epilogue): the rewritten network computes the same function, every
ReLU and residual add of a ResNet is taken into its conv, module names are kept, and layers
whose kernel takes no epilogue (or autograd) run the plain ops."""

import random
import warnings

import pytest
import torch
from torch import nn

from gkp.epilogue import ConvEpilogue, fuse_epilogues, onednn_available
from gkp.fold import fold_batchnorm
from gkp.models import get_model, target_layers
from gkp.nn import GroupPlan, apply_plans, set_backend


def randomised(model: nn.Module) -> nn.Module:
    """Eval-mode ``model`` with random BN statistics (so folding and ReLUs matter)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


def gkp_plans(model: nn.Module, groups: int = 4, seed: int = 0) -> dict[str, GroupPlan]:
    rng = random.Random(seed)
    plans = {}
    for name in target_layers(model):
        conv = model.get_submodule(name)
        order = rng.sample(range(conv.out_channels), conv.out_channels)
        d = conv.out_channels // groups
        kept = [sorted(rng.sample(range(conv.in_channels), conv.in_channels // 2))
                for _ in range(groups)]  # fmt: skip
        filters = [order[g * d : (g + 1) * d] for g in range(groups)]
        plans[name] = GroupPlan.from_lists(filters, kept)
    return plans


def epilogue_calls(gm: nn.Module) -> tuple[int, int]:
    """(calls with a ReLU, calls with a residual) in a rewritten network's graph."""
    modules = dict(gm.named_modules())
    relu = residual = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], ConvEpilogue):
            relu += modules[node.target].relu
            residual += len(node.args) == 2
    return relu, residual


def resnet56_nets() -> dict[str, nn.Module]:
    dense = randomised(get_model("resnet56"))
    return {"dense": dense, "gkp": apply_plans(dense, gkp_plans(dense))}


@pytest.mark.parametrize("backend", ["fused", "torch", "dense", "channels_last"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_resnet56_with_fused_epilogues_computes_the_same(backend, layout):
    """Every ReLU of ResNet-56 (stem + 27 blocks x 2) is taken into a conv, every block's
    residual add (27) too, on each deploy backend of its grouped layers; outputs equal."""
    nets = resnet56_nets()
    net = fold_batchnorm(nets["gkp"]).to(memory_format=layout)
    set_backend(net, backend)
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=layout)
    fused_net = fuse_epilogues(net)
    assert epilogue_calls(fused_net) == (55, 27)
    with torch.inference_mode():
        want, got = net(x), fused_net(x)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-4)
    assert "layer1.0.conv1" in dict(fused_net.named_modules())  # names kept
    assert isinstance(fused_net.get_submodule("layer1.0.conv1"), ConvEpilogue)


def test_dense_resnet50_takes_every_relu_and_residual_add():
    """torchvision's Bottleneck: ReLUs after conv1, conv2 and the residual add (16 blocks), the
    stem's ReLU; downsample convs are wrapped with no epilogue. Batch 2 at 64x64."""
    net = fold_batchnorm(randomised(get_model("resnet50", num_classes=10)))
    fused_net = fuse_epilogues(net)
    assert epilogue_calls(fused_net) == (1 + 16 * 3, 16)
    wrapped = [m for m in fused_net.modules() if isinstance(m, ConvEpilogue)]
    assert len(wrapped) == 53 and sum(not m.relu for m in wrapped) == 4  # the downsample convs
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(fused_net(x), net(x), atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this PyTorch build")
def test_dense_convs_run_onednn_with_post_ops(monkeypatch):
    """On channels-last inputs a dense conv with an epilogue runs as one oneDNN call (no
    separate relu/add ops), on weights reordered once per input shape; in NCHW it does not (the
    output would come back channels-last)."""
    net = fold_batchnorm(resnet56_nets()["dense"]).to(memory_format=torch.channels_last)
    fused_net = fuse_epilogues(net)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fused_net(x)
        fused_net(x)
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_convolution_pointwise") == 2 * 55
    assert "aten::relu" not in names and "aten::add" not in names
    packed = [len(m._packed) for m in fused_net.modules() if isinstance(m, ConvEpilogue)]
    assert packed == [1] * 55  # reordered once, reused by the second call
    nchw = fuse_epilogues(fold_batchnorm(resnet56_nets()["dense"]))
    with torch.inference_mode(), torch.profiler.profile() as prof:
        y = nchw(x.contiguous())
    assert "mkldnn::_convolution_pointwise" not in [e.name for e in prof.events()]
    assert y.is_contiguous()


def test_with_autograd_on_it_runs_the_plain_ops():
    nets = resnet56_nets()
    net = fold_batchnorm(nets["gkp"])
    set_backend(net, "fused")
    fused_net = fuse_epilogues(net)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = fused_net(x)
    out.sum().backward()  # the fused op and oneDNN's post-op conv have no autograd
    assert x.grad is not None
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-3, rtol=1e-4)


def test_the_plain_ops_run_in_place_on_the_conv_output_only():
    """Without a kernel that takes the epilogue (NCHW dense conv), inference runs the add and
    ReLU in place on the conv's own output: the result is right and the residual untouched;
    with autograd on, out of place, so the gradient is right too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    wrapped = ConvEpilogue(conv, relu=True)
    x, r = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    keep = r.clone()
    want = torch.relu(conv(x) + r)
    with torch.inference_mode():
        got = wrapped(x, r)
    assert torch.equal(r, keep) and torch.allclose(got, want, atol=1e-6)
    x.requires_grad_(True)
    wrapped(x, r).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.relu(conv(ref) + r).sum().backward()
    assert torch.allclose(x.grad, ref.grad, atol=1e-6)


class Shared(nn.Module):
    """A conv output used twice, a ReLU on a sum of two non-conv tensors, a conv used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = torch.relu(y) + y  # y has two users: no epilogue for a
        return torch.relu(self.b(z) + self.b(z))


def test_only_sole_user_chains_are_fused():
    model = Shared().eval()
    fused_net = fuse_epilogues(model)
    assert epilogue_calls(fused_net) == (0, 0)  # a: two users; b: called twice, left as is
    assert isinstance(fused_net.get_submodule("a"), ConvEpilogue)
    assert isinstance(fused_net.get_submodule("b"), nn.Conv2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(fused_net(x), model(x), atol=1e-5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.relu(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow


def test_an_untraceable_network_is_left_unfused_with_a_warning():
    model = Untraceable().eval()
    with pytest.warns(RuntimeWarning, match="could not be traced.*epilogues left unfused"):
        out = fuse_epilogues(model)
    assert not any(isinstance(m, ConvEpilogue) for m in out.modules())
    x = torch.randn(1, 3, 4, 4).abs()
    with torch.inference_mode():
        assert torch.equal(out(x), model(x))


def test_a_fused_network_can_be_copied():
    import copy

    net = fuse_epilogues(fold_batchnorm(resnet56_nets()["dense"]))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        want = net(x)  # packs the weights
        twin = copy.deepcopy(net)  # packed oneDNN weights are not copied but rebuilt
        assert torch.equal(twin(x), want)


def test_autotune_times_wrapped_layers_with_their_epilogue(monkeypatch):
    """Inside a fused network each grouped layer is timed through its ConvEpilogue, with the
    residual it adds, so the choice is made on what will run; the picks keep the function."""
    from gkp import autotune as tune

    model = resnet56_nets()["gkp"].eval()
    net = fuse_epilogues(fold_batchnorm(model))
    seen = []

    def fake(layer, backends, x, rounds, threads, host=None, rest=()):
        seen.append((type(host).__name__, len(rest), x.shape == rest[0].shape if rest else None))
        return {b: 1.0 if b == "dense" else 2.0 for b in backends}

    monkeypatch.setattr(tune, "_median_ms", fake)
    choices = tune.autotune(net, torch.randn(2, 3, 32, 32), share=False, network_check=False)
    assert len(choices) == 54 and all(n.endswith(".conv") for n in choices)
    assert {h for h, _, _ in seen} == {"ConvEpilogue"}
    assert sum(r for _, r, _ in seen) == 27  # every block's conv2 adds its shortcut
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(net(x), model(x), atol=1e-3, rtol=1e-4)

"""Filter and channel baselines (gkp.structured + baselines/filter_*, channel_bn).

MACs are measured two ways, both stated where used: ``gkp.planning.layer_macs`` summed over the
target layers (the quantity ``--target`` names), and ``gkp.metrics.macs`` on the whole model.
"""

import copy
import json

import pytest
import torch
from torch import nn

from gkp.api import Granularity, PruneContext, PruneTarget, get_method
from gkp.depgraph import prunable_convs
from gkp.metrics import macs
from gkp.models import get_model, target_layers
from gkp.planning import layer_macs
from gkp.reshape import module_shapes, reshape_like
from gkp.structured import filter_counts, structured_setup

X = torch.zeros(1, 3, 32, 32)
METHODS = ("filter-l1", "filter-fpgm", "channel-bn", "filter-random")
PER_LAYER = ("filter-l1", "filter-fpgm", "filter-random")


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct |gamma| and non-trivial BN statistics: rankings and equivalence mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(
                    (torch.rand(n, generator=g) + 0.05) * torch.sign(torch.randn(n, generator=g))
                )
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = randomise_bn(get_model(name, num_classes=10)).eval()
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pruned(models):
    cache = {}

    def run(model_name, method, target, seed=0, **native):
        key = (model_name, method, target, seed, tuple(sorted(native.items())))
        if key not in cache:
            model = models(model_name)
            ctx = PruneContext(example_inputs=X, seed=seed)
            cache[key] = get_method(method)(model, PruneTarget(target, native), ctx)
        return cache[key]

    return run


def target_macs(model, names):
    """Target-layer MACs (gkp.planning.layer_macs: C_out * C_in * k*k per output pixel)."""
    return sum(layer_macs(model, names, X).values())


GRID = [
    *[("resnet56", m, t) for m in METHODS for t in (0.30, 0.60)],
    *[
        (n, m, t)
        for n in ("vgg16_bn", "resnet18")
        for m in ("filter-l1", "channel-bn")
        for t in (0.30, 0.60)
    ],
    ("vgg16_bn", "filter-fpgm", 0.60),
    ("resnet18", "filter-random", 0.60),
]


@pytest.mark.parametrize(("model_name", "method", "target"), GRID)
def test_target_met_within_one_point(models, pruned, model_name, method, target):
    model, result = models(model_name), pruned(model_name, method, target)
    names = target_layers(model)
    dense, left = target_macs(model, names), target_macs(result.model, names)
    achieved = 1 - left / dense
    assert abs(achieved - target) <= 0.01
    assert result.info["achieved"] == pytest.approx(achieved)
    assert result.info["target_layer_macs"] == {"dense": dense, "pruned": left}
    assert macs(result.model, X) < macs(model, X)  # whole model (fvcore): really smaller


@pytest.mark.parametrize(("model_name", "method", "target"), GRID)
def test_deploy_equals_masked_reference(models, pruned, model_name, method, target):
    result = pruned(model_name, method, target)
    assert result.reference is not None
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = result.model.eval()(x), result.reference.eval()(x)
    assert got.shape == want.shape == models(model_name)(x).shape
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    # the reference is dense: it really is a different model from the pruned one
    assert sum(p.numel() for p in result.reference.parameters()) > sum(
        p.numel() for p in result.model.parameters()
    )


@pytest.mark.parametrize("model_name", ["resnet56", "resnet18"])
def test_residual_stream_never_cut(models, pruned, model_name):
    model, result = models(model_name), pruned(model_name, "filter-l1", 0.60)
    names = target_layers(model)
    assert set(result.info["layers"]) == {n for n in names if n.endswith("conv1")}
    dense = dict(model.named_modules())
    for name, mod in result.model.named_modules():
        if isinstance(mod, nn.Conv2d) and name not in result.info["layers"]:
            assert mod.out_channels == dense[name].out_channels, name  # conv2, stem, downsample
        if isinstance(mod, nn.Conv2d) and name in result.info["layers"]:
            assert mod.out_channels < dense[name].out_channels, name
    assert result.model.fc.in_features == model.fc.in_features


def test_every_vgg_conv_and_bottleneck_inner_convs_are_prunable(models):
    vgg = models("vgg16_bn")
    assert set(prunable_convs(vgg, target_layers(vgg), X)) == set(target_layers(vgg))
    r50 = get_model("resnet50", num_classes=10)
    inner = [n for n in target_layers(r50, True) if not n.endswith("conv3")]
    assert list(prunable_convs(r50, target_layers(r50, True), X)) == inner
    assert list(prunable_convs(r50, target_layers(r50), X)) == target_layers(r50)  # conv2 only


def test_per_layer_methods_share_counts(pruned):
    counts = [
        {n: len(v["removed"]) for n, v in pruned("resnet56", m, 0.30).info["layers"].items()}
        for m in PER_LAYER
    ]
    assert counts[0] == counts[1] == counts[2]
    fractions = [
        k / pruned("resnet56", "filter-l1", 0.30).info["layers"][n]["c_out"]
        for n, k in counts[0].items()
    ]
    assert max(fractions) - min(fractions) <= 2 / 16  # one uniform fraction, ±1 corrections


def test_channel_bn_removes_globally_smallest_gamma(models, pruned):
    model, result = models("vgg16_bn"), pruned("vgg16_bn", "channel-bn", 0.30)
    removed, kept = [], []
    for layer in result.info["layers"].values():
        gamma = model.get_submodule(layer["bn"]).weight.detach().abs()
        gone = set(layer["removed"])
        removed += [gamma[c].item() for c in gone]
        kept += [gamma[c].item() for c in range(layer["c_out"]) if c not in gone]
    assert removed and max(removed) <= min(kept)


@pytest.mark.parametrize("method", METHODS)
def test_input_not_mutated(method):
    torch.manual_seed(0)
    model = randomise_bn(get_model("resnet20")).train()
    before = copy.deepcopy(model.state_dict())
    result = get_method(method)(model, PruneTarget(0.3), PruneContext(example_inputs=X))
    after = model.state_dict()
    assert model.training and result.model.training
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    json.dumps(result.info)
    assert result.info["prune_seconds"] >= 0 and result.info["target"] == 0.3


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    def run(seed):
        torch.manual_seed(0)
        model = randomise_bn(get_model("resnet20"))
        return get_method(method)(model, PruneTarget(0.4), PruneContext(X, seed=seed))

    a, b = run(3), run(3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.info["layers"] == b.info["layers"]
    other = run(4).info["layers"]
    assert (other != a.info["layers"]) == (method == "filter-random")  # only random uses the seed


# --- hand examples on a toy network: conv c1 -> bn -> relu -> conv c2 -> bn -> relu -> fc ----


class Toy(nn.Module):
    def __init__(self, c_in=2, c1=3, c2=4, k=1):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c1, k, padding=k // 2, bias=False)
        self.b1 = nn.BatchNorm2d(c1)
        self.c2 = nn.Conv2d(c1, c2, k, padding=k // 2, bias=False)
        self.b2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, 2)

    def forward(self, x):
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def prune_toy(method, model, x, **native):
    return get_method(method)(model, PruneTarget(native=native), PruneContext(example_inputs=x))


def test_l1_removes_the_smallest_l1_filters():
    torch.manual_seed(0)
    model, x = Toy(c_in=3, c1=4, k=3).eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():  # L1 norms 3, 1, 4, 2 times the same base filter's
        base = model.c1.weight[0].abs() + 0.01
        for o, s in enumerate((3.0, 1.0, 4.0, 2.0)):
            model.c1.weight[o] = s * base * torch.sign(torch.randn_like(base))
    result = prune_toy("filter-l1", model, x, layers=["c1"], rate=0.5)
    assert result.info["layers"]["c1"]["removed"] == [1, 3]
    assert torch.equal(result.model.c1.weight, model.c1.weight[[0, 2]])
    assert torch.equal(result.model.c2.weight, model.c2.weight[:, [0, 2]])
    assert torch.equal(result.model.b1.running_var, model.b1.running_var[[0, 2]])


def test_fpgm_removes_the_filter_nearest_the_geometric_median():
    # filters (10, 0), (6, 6), (0, 10): the middle one is nearest the others (sums of distances
    # 21.4, 14.4, 21.4) although its L1 norm is the largest (10, 12, 10)
    model, x = randomise_bn(Toy(c_in=2, c1=3)).eval(), torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        model.c1.weight.copy_(torch.tensor([[10.0, 0.0], [6.0, 6.0], [0.0, 10.0]])[..., None, None])
    fpgm = prune_toy("filter-fpgm", model, x, layers=["c1"], rate=0.3333)
    l1 = prune_toy("filter-l1", model, x, layers=["c1"], rate=0.3333)
    assert fpgm.info["layers"]["c1"]["removed"] == [1]
    assert l1.info["layers"]["c1"]["removed"] == [0]


def test_channel_bn_hand_example():
    # c1 and c2 both 4 -> 4, 3x3, same MACs. Ascending |gamma|: c2[2] .01, c1[1] .05, c2[0] .2.
    # Removing c2[2] takes 1/8 of the MACs, then c1[1] (c1 3x4, c2 3x3 left) 11/32 = 0.34375.
    model, x = Toy(c_in=4, c1=4, c2=4, k=3).eval(), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        model.b1.weight.copy_(torch.tensor([0.5, -0.05, 0.9, 0.3]))
        model.b2.weight.copy_(torch.tensor([0.2, 0.8, -0.01, 0.7]))
    result = prune_toy("channel-bn", model, x, layers=["c1", "c2"], rate=0.34375)
    assert {n: v["removed"] for n, v in result.info["layers"].items()} == {"c1": [1], "c2": [2]}
    assert result.info["achieved"] == 0.34375


def test_keeps_one_filter_per_layer_and_refuses_the_unreachable():
    model, x = Toy(c_in=2, c1=4).eval(), torch.randn(1, 2, 4, 4)
    result = prune_toy("filter-l1", model, x, layers=["c1"], rate=0.75)
    assert result.model.c1.out_channels == 1
    with pytest.raises(ValueError, match="at most 75.00%"):
        prune_toy("filter-l1", model, x, layers=["c1"], rate=0.9)


def test_coupled_convs_are_never_prunable():
    # c2 feeds the classifier through BN and a mean: local. A conv whose output is the model's
    # output, or one summed with another tensor, is not.
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.out = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.out(x + self.b(torch.relu(self.a(x))))

    x = torch.randn(1, 4, 8, 8)
    assert list(prunable_convs(Residual(), ["a", "b", "out"], x)) == ["a"]
    with pytest.raises(ValueError, match="residual"):
        prune_toy("filter-l1", Residual(), x, layers=["b", "out"])


def test_linear_after_flatten_loses_every_feature_of_a_removed_channel():
    # flatten of 4 channels x 2x2 pixels: channel c is features 4c..4c+3 of the linear
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)
    )
    model = randomise_bn(model).eval()
    x = torch.randn(3, 2, 2, 2)
    with torch.no_grad():  # filter 2 smallest, then 0
        model[0].weight.mul_(torch.tensor([2.0, 3.0, 0.1, 4.0])[:, None, None, None])
    result = prune_toy("filter-l1", model, x, layers=["0"], rate=0.25)
    assert result.info["layers"]["0"]["removed"] == [2]
    assert torch.equal(
        result.model[4].weight, model[4].weight[:, [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]]
    )
    with torch.no_grad():
        assert torch.allclose(result.model(x), result.reference(x), atol=1e-5)
        assert torch.count_nonzero(result.reference[4].weight[:, 8:12]) == 0


# --- checkpoints: module_shapes + reshape_like + load_state_dict --------------------------


@pytest.mark.parametrize(
    ("model_name", "method"), [("resnet56", "filter-fpgm"), ("vgg16_bn", "channel-bn")]
)
def test_checkpoint_round_trip(pruned, model_name, method):
    result = pruned(model_name, method, 0.60)
    shapes = json.loads(json.dumps(module_shapes(result.model)))  # plain data
    rebuilt = reshape_like(get_model(model_name, num_classes=10), shapes)
    rebuilt.load_state_dict(result.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), result.model.eval()(x))
    assert module_shapes(rebuilt) == shapes


def test_reshape_like_refuses_foreign_shapes():
    fresh = get_model("resnet20")
    shapes = module_shapes(fresh)
    with pytest.raises(ValueError, match="do not describe"):
        reshape_like(fresh, {**shapes, "nope": [3]})
    with pytest.raises(ValueError, match="kernel"):
        reshape_like(fresh, {**shapes, "conv1": [16, 3, 5, 5]})
    with pytest.raises(ValueError, match="positive integers"):
        reshape_like(fresh, {**shapes, "bn1": [16.5]})
    assert module_shapes(reshape_like(fresh, shapes)) == shapes


# --- registration and knobs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "granularity", "faithfulness", "color"),
    [
        ("filter-l1", Granularity.FILTER, "faithful", "#2ca02c"),
        ("filter-fpgm", Granularity.FILTER, "faithful", "#17becf"),
        ("channel-bn", Granularity.CHANNEL, "variant", "#bcbd22"),
        ("filter-random", Granularity.FILTER, "baseline", "#ff7f0e"),
    ],
)
def test_registered_info(method, granularity, faithfulness, color):
    info = get_method(method).info
    assert (info.granularity, info.faithfulness, info.color) == (granularity, faithfulness, color)
    assert set(info.native_knobs) == {"rate", "all_bottleneck_convs"}


@pytest.mark.parametrize("method", METHODS)
def test_bad_knobs_raise_before_pruning(method):
    model, m = get_model("resnet20"), get_method(method)
    for native, match in [
        ({"groups": 8}, "unknown option"),
        ({"rate": 1.5}, "outside"),
        ({"rate": "0.5"}, "must be a number"),
        ({"all_bottleneck_convs": 1}, "true or false"),
        ({"layers": ["fc"]}, "not an ungrouped"),
    ]:
        with pytest.raises(ValueError, match=match):
            m.check(model, PruneTarget(native=native), X)
        with pytest.raises(ValueError, match=match):
            m(model, PruneTarget(native=native), PruneContext(X))
    with pytest.raises(ValueError, match="not both"):
        m.check(model, PruneTarget(0.3, {"rate": 0.3}), X)
    m.check(model, PruneTarget(0.3), X)  # a good one passes


def test_setup_counts_meet_target_exactly_in_the_model(models):
    model = models("resnet56")
    setup = structured_setup(
        model, PruneTarget(0.4375), {"rate": 0.4375, "all_bottleneck_convs": False}, X
    )
    counts = filter_counts(setup)
    assert all(0 <= counts[n] < p.c_out for n, p in setup.prunable.items())
    assert abs(float(setup.removed_fraction(counts)) - 0.4375) <= 0.005

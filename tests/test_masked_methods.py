"""The masked granularity baselines (weight-magnitude, kernel-l2) and the plan-less masked form.

Expected masks in the small cases are derived by hand in the comments next to them.
"""

import copy
import io

import pytest
import torch
from torch import nn

from gkp.api import Granularity, PruneContext, PruneTarget, get_method, list_methods
from gkp.masked import MaskedConv2d, deploy_form, mask_layers, masked_layers, training_form
from gkp.metrics import macs, macs_nonzero
from gkp.models import get_model, target_layers
from gkp.planning import layer_macs

METHODS = ("weight-magnitude", "kernel-l2")
X = torch.zeros(1, 3, 32, 32)


def masked_convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedConv2d)}


def prune(name, model, x, target=None, **native):
    return get_method(name)(model, PruneTarget(target, native), PruneContext(example_inputs=x))


# --- MACs target on ResNet-56 ------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("target", [0.30, 0.60])
def test_macs_target_met_on_resnet56(name, target, resnet56_with_snapshots, prune_resnet56):
    model, _ = resnet56_with_snapshots
    result = prune_resnet56(name, target)
    names = target_layers(model)
    dense_target_macs = sum(layer_macs(model, names, X).values())
    removed = macs_nonzero(model, X) - macs_nonzero(result.model, X)
    assert abs(removed / dense_target_macs - target) <= 0.01
    assert result.info["macs_removed"] == pytest.approx(target, abs=0.01)
    # only the target convs are masked, and what runs is still dense
    assert sorted(masked_layers(result.model)) == sorted(names)
    assert macs(deploy_form(result.model), X) == macs(model, X)


@pytest.mark.parametrize("name", METHODS)
def test_rate_knob_is_the_macs_fraction(name, resnet56_with_snapshots, prune_resnet56):
    by_target = prune_resnet56(name, 0.3).model.state_dict()
    by_rate = prune_resnet56(name, None, rate=0.3)
    assert by_rate.info["options"]["rate"] == 0.3 and by_rate.info["target"] is None
    got = by_rate.model.state_dict()
    assert all(torch.equal(got[k], by_target[k]) for k in by_target)


def test_kernel_l2_same_count_per_filter(prune_resnet56):
    result = prune_resnet56("kernel-l2", 0.3)
    for name, conv in masked_convs(result.model).items():
        m = conv.mask
        assert torch.equal(m, m[:, :, :1, :1].expand_as(m)), name  # whole kernels only
        kept = m[:, :, 0, 0].sum(1)
        assert torch.all(kept == kept[0]) and 1 <= kept[0] < conv.in_channels, name
        frac = result.info["layers"][name]["kept_fraction"]
        assert frac == pytest.approx(kept[0].item() / conv.in_channels)


# --- hand-made examples ------------------------------------------------------------------------


def two_convs(wa, wb):
    """a: 1x1, 1->2 on 4x4 (16 MACs per weight); b: 1x1 stride 2, 2->1 (2x2 out: 4 per weight)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1, stride=2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(wa).view(2, 1, 1, 1))
        model[1].weight.copy_(torch.tensor(wb).view(1, 2, 1, 1))
    return model


def test_weight_magnitude_removes_smallest_weights_by_macs():
    # |w| order: 0.1 (a), 0.2 (a), 0.3 (b), 5 (b); total MACs 2*16 + 2*4 = 40.
    model = two_convs([-0.1, 0.2], [0.3, -5.0])
    x = torch.zeros(1, 1, 4, 4)
    layers = ["0", "1"]
    # 0.3 -> goal 12: the first weight (16 MACs) reaches it.
    r = prune("weight-magnitude", model, x, 0.3, layers=layers)
    assert r.model[0].mask.flatten().tolist() == [False, True]
    assert r.model[1].mask.flatten().tolist() == [True, True]
    # 0.75 -> goal 30: 16 + 16 = 32 reaches it with two weights (counting weights would take 3).
    r = prune("weight-magnitude", model, x, 0.75, layers=layers)
    assert r.model[0].mask.flatten().tolist() == [False, False]
    assert r.model[1].mask.flatten().tolist() == [True, True]
    assert r.info["macs_removed"] == 32 / 40
    # 0.85 -> goal 34: 32 + 4 (the 0.3 of b) = 36.
    r = prune("weight-magnitude", model, x, 0.85, layers=layers)
    assert r.model[1].mask.flatten().tolist() == [False, True]
    assert r.model[1].weight.flatten().tolist() == [0.0, -5.0]
    assert r.info["layers"]["1"]["kept_fraction"] == 0.5


def hand_kernels():
    """Conv 3->2, 2x2 kernels; per-kernel L2 (L1) norms in the comments."""
    conv = nn.Conv2d(3, 2, 2, bias=False)
    one = [[1.0, 1.0], [1.0, 1.0]]
    with torch.no_grad():
        conv.weight.copy_(
            torch.tensor(
                [
                    [one, [[3.0, 0], [0, 0]], [[0, 0], [0, 2.5]]],  # L2 2, 3, 2.5 (L1 4, 3, 2.5)
                    [[[-4.0, 0], [0, 0]], [[0, 0.5], [0, 0]], one],  # L2 4, 0.5, 2
                ]
            )
        )
    return nn.Sequential(conv)


@pytest.mark.parametrize(
    "rate, kept",
    [
        # one kernel per filter (round(0.34 * 3) = 1): filter 0 drops c0, filter 1 drops c1
        (0.34, [[False, True, True], [True, False, True]]),
        # two (round(0.66 * 3) = 2): filter 0 keeps c1 (L2 3), filter 1 keeps c0 (L2 4)
        (0.66, [[False, True, False], [True, False, False]]),
    ],
)
def test_kernel_l2_removes_lowest_l2_kernels_per_filter(rate, kept):
    model = hand_kernels()
    r = prune("kernel-l2", model, torch.zeros(1, 3, 4, 4), rate=rate, layers=["0"])
    mask = r.model[0].mask
    assert mask.shape == (2, 3, 2, 2)
    assert mask[:, :, 0, 0].tolist() == kept
    assert torch.equal(mask, mask[:, :, :1, :1].expand_as(mask))
    assert torch.equal(r.model[0].weight, model[0].weight * mask)


# --- the masked form ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_model_equals_reference_and_weights_are_zeroed(name, prune_resnet56):
    result = prune_resnet56(name, 0.6)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = result.model.eval()(x), result.reference.eval()(x)
    assert torch.allclose(got, want, atol=1e-5)
    for conv_name, conv in masked_convs(result.model).items():
        assert torch.all(conv.weight[~conv.mask] == 0), conv_name
        ref = result.reference.get_submodule(conv_name)
        assert type(ref) is nn.Conv2d and torch.equal(ref.weight, conv.weight)


@pytest.mark.parametrize("name", METHODS)
def test_training_form_keeps_zeros_after_sgd_step(name, prune_resnet56):
    result = prune_resnet56(name, 0.3)
    train = training_form(result.model)
    assert masked_layers(train) == masked_layers(result.model)
    opt = torch.optim.SGD(train.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    train.train()
    for _ in range(2):  # the second step also uses the momentum buffer
        opt.zero_grad()
        train(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
    for conv_name, conv in masked_convs(train).items():
        before = result.model.get_submodule(conv_name).weight
        assert torch.all(conv.weight.grad[~conv.mask] == 0), conv_name
        assert torch.all(conv.weight[~conv.mask] == 0), conv_name
        assert not torch.equal(conv.weight[conv.mask], before[conv.mask]), conv_name


@pytest.mark.parametrize("name", METHODS)
def test_deploy_form_is_plain_dense_conv(name, prune_resnet56):
    result = prune_resnet56(name, 0.3)
    deployed = deploy_form(result.model)
    assert masked_layers(deployed) == [] and not masked_convs(deployed)
    for conv_name, conv in masked_convs(result.model).items():
        plain = deployed.get_submodule(conv_name)
        assert type(plain) is nn.Conv2d
        assert torch.equal(plain.weight, conv.weight * conv.mask)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed.eval()(x), result.model.eval()(x), atol=1e-6)
    assert macs_nonzero(deployed, X) == macs_nonzero(result.model, X)


def test_deploy_uses_weight_times_mask_even_after_masked_weights_change():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    mask = torch.rand(4, 3, 3, 3) > 0.5
    m = MaskedConv2d.from_conv(conv, mask)
    with torch.no_grad():
        m.weight.add_(1.0)  # masked entries become non-zero in the raw parameter
    dense = m.to_dense()
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(dense.weight, m.weight * mask)
    assert torch.allclose(dense(x), m(x), atol=1e-6)
    with pytest.raises(ValueError, match="no grouped form"):
        m.to_grouped()


@pytest.mark.parametrize("name", METHODS)
def test_mask_layers_and_load_state_dict_round_trip(name, prune_resnet56):
    result = prune_resnet56(name, 0.3)
    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    rebuilt = mask_layers(get_model("resnet56"), masked_layers(result.model))
    assert all(m.mask.all() for m in masked_convs(rebuilt).values())  # all True before loading
    rebuilt.load_state_dict(state)  # strict: same keys and shapes
    for conv_name, conv in masked_convs(result.model).items():
        assert torch.equal(rebuilt.get_submodule(conv_name).mask, conv.mask)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), result.model.eval()(x))


def test_mask_layers_rejects_unknown_or_non_conv_names():
    model = get_model("resnet20")
    with pytest.raises(ValueError, match="not a plain nn.Conv2d"):
        mask_layers(model, ["nope"])
    with pytest.raises(ValueError, match="not a plain nn.Conv2d"):
        mask_layers(model, ["bn1"])
    assert masked_layers(model) == []


def test_from_conv_mask_shapes():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    kernels = torch.tensor([True, False, True]).view(1, 3, 1, 1).expand(4, 3, 1, 1)
    m = MaskedConv2d.from_conv(conv, kernels)
    assert m.mask.shape == (4, 3, 3, 3) and m.plan is None
    assert torch.all(m.weight[:, 1] == 0) and torch.equal(m.weight[:, 0], conv.weight[:, 0])
    with pytest.raises(ValueError, match="does not fit"):
        MaskedConv2d.from_conv(conv, torch.ones(4, 2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        MaskedConv2d.from_conv(conv, torch.ones(4, 3, 3, 3))


# --- contract facts ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_same_input_same_masks_and_input_not_mutated(name):
    torch.manual_seed(0)
    model = get_model("resnet20")
    before = copy.deepcopy(model.state_dict())
    a = prune(name, model, X, 0.4).model.state_dict()
    b = prune(name, model, X, 0.4).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not masked_convs(model)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "target, native, match",
    [
        (None, {"groups": 8}, "unknown option"),
        (None, {"rate": 1.5}, "outside"),
        (None, {"rate": 0.0}, "outside"),
        (None, {"rate": "0.3"}, "must be a number"),
        (None, {"all_bottleneck_convs": "yes"}, "true or false"),
        (None, {"layers": ["nope"]}, "not an ungrouped nn.Conv2d"),
        (0.3, {"rate": 0.3}, "not both"),
    ],
)
def test_bad_knobs_raise_in_check_and_in_pruning(name, target, native, match):
    model = get_model("resnet20")
    method = get_method(name)
    with pytest.raises(ValueError, match=match):
        method.check(model, PruneTarget(target, native), X)
    with pytest.raises(ValueError, match=match):
        prune(name, model, X, target, **native)


@pytest.mark.parametrize("name", METHODS)
def test_check_accepts_good_knobs_and_leaves_model(name):
    model = get_model("resnet20")
    method = get_method(name)
    method.check(model, PruneTarget(0.3), X)
    method.check(model, PruneTarget(native={"rate": 0.5, "all_bottleneck_convs": True}), X)
    assert not masked_convs(model)


def test_registered_facts():
    weight, kernel = get_method("weight-magnitude").info, get_method("kernel-l2").info
    assert (weight.granularity, kernel.granularity) == (Granularity.WEIGHT, Granularity.KERNEL)
    assert (weight.color, kernel.color) == ("#8c564b", "#e377c2")
    assert weight.faithfulness == kernel.faithfulness == "baseline"
    others = {get_method(n).info.color for n in list_methods() if n not in METHODS}
    assert not others & {weight.color, kernel.color}

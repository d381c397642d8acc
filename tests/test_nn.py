"""GroupedKernelConv2d equals the masked dense conv it came from, and survives the usual trips."""

import copy
import io
import random

import pytest
import torch
from torch import nn

from gkp.nn import (
    GroupedKernelConv2d,
    GroupPlan,
    apply_plans,
    densify,
    grouped_plans,
    masked_conv,
    masked_reference,
)


def random_plan(rng: random.Random, c_out: int, c_in: int, g: int, n_keep: int) -> GroupPlan:
    order = list(range(c_out))
    rng.shuffle(order)
    d = c_out // g
    groups = [order[i * d : (i + 1) * d] for i in range(g)]
    kept = [rng.sample(range(c_in), n_keep) for _ in range(g)]
    return GroupPlan.from_lists(groups, kept)


def random_case(seed: int):
    rng = random.Random(seed)
    g = rng.randint(1, 8)
    c_out = g * rng.randint(1, 4)
    c_in = rng.randint(1, 12)
    n_keep = rng.randint(1, c_in)
    k = rng.choice([1, 3])
    stride = rng.choice([1, 2])
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=rng.random() < 0.5)
    plan = random_plan(rng, c_out, c_in, g, n_keep)
    x = torch.randn(rng.choice([1, 3]), c_in, rng.randint(5, 9), rng.randint(5, 9))
    return conv, plan, x


@pytest.mark.parametrize("seed", range(80))
def test_grouped_equals_masked_dense(seed):
    torch.manual_seed(seed)
    conv, plan, x = random_case(seed)
    mod = GroupedKernelConv2d.from_conv(conv, plan)
    ref = masked_conv(x, conv, plan.mask(conv.out_channels, conv.in_channels))
    assert (mod(x) - ref).abs().max().item() <= 1e-5
    assert (mod.to_dense()(x) - ref).abs().max().item() <= 1e-5
    assert mod.plan() == plan


def test_repeated_and_missing_channels():
    # channel 0 kept by both groups, channel 3 by none
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    plan = GroupPlan.from_lists([[3, 0], [1, 2]], [[0, 1], [0, 2]])
    mod = GroupedKernelConv2d.from_conv(conv, plan)
    assert mod.gather_index.tolist() == [0, 1, 0, 2]
    x = torch.randn(2, 4, 6, 6)
    ref = masked_conv(x, conv, plan.mask(4, 4))
    assert torch.allclose(mod(x), ref, atol=1e-5)
    x2 = x.clone()
    x2[:, 3] += 100.0  # a channel nobody keeps cannot change the output
    assert torch.allclose(mod(x2), mod(x))


def test_macs_shape_matches_methods_table():
    # METHODS.md: a 16->16 conv at G=8, n_keep=9 becomes in 72, out 16, weight 16x9x3x3
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    plan = random_plan(random.Random(1), 16, 16, 8, 9)
    mod = GroupedKernelConv2d.from_conv(conv, plan)
    assert mod.conv.in_channels == 72 and mod.conv.out_channels == 16
    assert tuple(mod.conv.weight.shape) == (16, 9, 3, 3)


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    ).eval()
    plans = {"3": random_plan(random.Random(3), 8, 8, 4, 5)}
    return model, plans


def test_apply_plans_matches_reference_and_leaves_input():
    model, plans = small_model()
    before = copy.deepcopy(model.state_dict())
    pruned = apply_plans(model, plans).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(pruned(x), masked_reference(model, plans)(x), atol=1e-5)
    assert torch.allclose(densify(pruned)(x), pruned(x), atol=1e-5)
    assert grouped_plans(pruned) == plans
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_state_dict_save_load_deepcopy_to():
    model, plans = small_model()
    pruned = apply_plans(model, plans).eval()
    x = torch.randn(1, 3, 8, 8)
    want = pruned(x)
    rebuilt = apply_plans(small_model()[0], plans).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    assert torch.equal(rebuilt(x), want)
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), want)
    assert torch.equal(copy.deepcopy(pruned)(x), want)
    moved = copy.deepcopy(pruned).to(torch.float64)
    assert torch.allclose(moved(x.double()).float(), want, atol=1e-5)
    assert moved.get_submodule("3").gather_index.dtype == torch.long


def test_torch_export():
    model, plans = small_model()
    pruned = apply_plans(model, plans).eval()
    x = torch.randn(1, 3, 8, 8)
    exported = torch.export.export(pruned, (x,))
    assert torch.allclose(exported.module()(x), pruned(x), atol=1e-6)


@pytest.mark.parametrize(
    "groups,kept,match",
    [
        ([[0, 1, 2], [3, 4, 5], [6, 7]], [[0], [1], [2]], "equal parts|do not divide"),
        ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0], [1], [2], [2, 3]], "same number"),
        ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0], [1], [2], [9]], "distinct indices"),
        ([[0, 1], [2, 3], [4, 5], [6, 6]], [[0], [1], [2], [3]], "equal parts"),
    ],
)
def test_bad_plans_raise(groups, kept, match):
    conv = nn.Conv2d(8, 8, 3)
    with pytest.raises(ValueError, match=match):
        GroupedKernelConv2d.from_conv(conv, GroupPlan.from_lists(groups, kept), "layer1.0.conv1")


def test_groups_not_dividing_filters_message():
    plan = GroupPlan.from_lists([[0, 1, 2], [3, 4]], [[0], [1]])
    with pytest.raises(ValueError, match="do not divide its 5 filters"):
        plan.validate(5, 4, "conv")


def test_plan_dict_round_trip():
    plan = random_plan(random.Random(5), 16, 16, 8, 9)
    assert GroupPlan.from_dict(plan.to_dict()) == plan


def test_training_form_round_trip_and_masked_gradients():
    from gkp.masked import MaskedConv2d, deploy_form, training_form

    model, plans = small_model()
    pruned = apply_plans(model, plans).eval()
    x = torch.randn(2, 3, 8, 8)
    train = training_form(pruned)
    masked = train.get_submodule("3")
    assert isinstance(masked, MaskedConv2d)
    assert torch.allclose(train.eval()(x), pruned(x), atol=1e-5)
    # one SGD step: masked-out kernels get exactly zero gradient
    train.train()
    train(torch.randn(4, 3, 8, 8)).square().mean().backward()
    assert torch.all(masked.weight.grad[~masked.mask] == 0)
    assert masked.weight.grad[masked.mask].abs().sum() > 0
    with torch.no_grad():
        masked.weight.add_(torch.randn_like(masked.weight))  # change kept and dropped weights
    back = deploy_form(train).eval()
    assert isinstance(back.get_submodule("3"), GroupedKernelConv2d)
    assert grouped_plans(back) == plans
    assert torch.allclose(back(x), train.eval()(x), atol=1e-5)

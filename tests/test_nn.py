"""GroupedKernelConv2d equals the masked dense conv it came from, and survives the usual trips."""

import copy
import io
import random

import numpy as np
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


def test_conv_like_copies_geometry_and_sets_channels():
    from gkp.masked import MaskedConv2d
    from gkp.nn import ConvGeometry, conv_like

    src = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 3), bias=True)
    src = src.to(torch.float64)
    for new, c_in, c_out, groups in (
        (conv_like(src), 6, 8, 1),
        (conv_like(src, in_channels=4, out_channels=12, groups=2), 4, 12, 2),
        (conv_like(src, cls=MaskedConv2d), 6, 8, 1),
        (conv_like(ConvGeometry.of(src), in_channels=3, out_channels=8), 3, 8, 1),
    ):
        assert (new.in_channels, new.out_channels, new.groups) == (c_in, c_out, groups)
        assert new.kernel_size == (3, 5) and new.stride == (2, 1)
        assert new.padding == (2, 1) and new.dilation == (2, 3)
        assert new.bias is not None and new.weight.dtype == torch.float64
        assert new.weight.device == src.weight.device
    assert isinstance(conv_like(src, cls=MaskedConv2d), MaskedConv2d)
    assert conv_like(nn.Conv2d(2, 2, 3, bias=False)).bias is None
    reflect = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    assert conv_like(reflect).padding_mode == "reflect"
    with pytest.raises(ValueError, match="in_channels and out_channels"):
        conv_like(ConvGeometry(3), in_channels=2)


def test_all_four_rebuilds_keep_geometry_dtype_and_output():
    # float64, non-square kernel, stride, dilation, bias: every form must agree exactly
    from gkp.masked import MaskedConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 1), stride=(2, 1), padding=(2, 0), dilation=(2, 1), bias=True)
    conv = conv.double()
    plan = random_plan(random.Random(7), 8, 6, 4, 3)
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    ref = masked_conv(x, conv, plan.mask(8, 6))
    grouped = GroupedKernelConv2d.from_conv(conv, plan)
    dense = grouped.to_dense()
    masked = MaskedConv2d.from_grouped(grouped)
    back = masked.to_grouped()
    for mod in (grouped.conv, dense, masked, back.conv):
        assert mod.stride == (2, 1) and mod.padding == (2, 0) and mod.dilation == (2, 1)
        assert mod.kernel_size == (3, 1) and mod.weight.dtype == torch.float64
        assert mod.bias is not None
    assert grouped.conv.groups == 4 and dense.groups == 1 and masked.groups == 1
    for mod in (grouped, dense, masked, back):
        assert torch.allclose(mod(x), ref, atol=1e-12)
    assert back.plan() == plan and back.gather_index.dtype == torch.long


def test_grouped_constructor_device_and_dtype():
    mod = GroupedKernelConv2d(8, 8, 3, 4, 2, padding=1, bias=True, dtype=torch.float64)
    assert mod.conv.weight.dtype == torch.float64 and mod.conv.bias.dtype == torch.float64
    assert mod.conv.in_channels == 8 and mod.conv.groups == 4
    assert mod.gather_index.dtype == torch.long and mod.output_index.tolist() == list(range(8))


def test_plan_from_dict_accepts_plain_data():
    plan = random_plan(random.Random(5), 8, 6, 4, 3)
    d = plan.to_dict()
    as_floats = {k: [[float(i) for i in row] for row in v] for k, v in d.items()}  # JSON-like
    as_tuples = {k: tuple(tuple(row) for row in v) for k, v in d.items()}
    as_numpy_ints = {k: [[np.int64(i) for i in row] for row in v] for k, v in d.items()}
    for data in (d, as_floats, as_tuples, as_numpy_ints):
        got = GroupPlan.from_dict(data)
        assert got == plan and all(type(i) is int for g in got.groups for i in g)


GOOD = {"groups": [[0, 1], [2, 3]], "kept": [[0, 2], [1, 3]]}


@pytest.mark.parametrize(
    "bad,match",
    [
        ([[0, 1]], "must be a dict"),
        ({"groups": [[0, 1], [2, 3]]}, "exactly the keys"),
        ({**GOOD, "extra": 1}, "exactly the keys"),
        ({**GOOD, "kept": "0123"}, r"plan\['kept'\] must be a non-empty list"),
        ({**GOOD, "kept": []}, r"plan\['kept'\] must be a non-empty list"),
        ({**GOOD, "kept": None}, r"plan\['kept'\] must be a non-empty list"),
        ({**GOOD, "groups": [[0, 1], "23"]}, r"plan\['groups'\]\[1\] must be a list"),
        ({**GOOD, "groups": [[0, 1], {2: 3}]}, r"plan\['groups'\]\[1\] must be a list"),
        ({**GOOD, "kept": [[0, "2"], [1, 3]]}, r"plan\['kept'\]\[0\]\[1\] must be an integer"),
        ({**GOOD, "kept": [[0, 2.5], [1, 3]]}, r"plan\['kept'\]\[0\]\[1\] must be an integer"),
        ({**GOOD, "kept": [[0, float("nan")], [1, 3]]}, r"must be an integer"),
        ({**GOOD, "kept": [[0, 2], [1, [3]]]}, r"plan\['kept'\]\[1\]\[1\] must be an integer"),
        ({**GOOD, "kept": [[0, 2], [1, None]]}, r"plan\['kept'\]\[1\]\[1\] must be an integer"),
        ({**GOOD, "groups": [[True, 1], [2, 3]]}, r"plan\['groups'\]\[0\]\[0\] must be an integer"),
        ({**GOOD, "groups": [[-1, 1], [2, 3]]}, r"plan\['groups'\]\[0\]\[0\] must be a non-neg"),
    ],
)
def test_plan_from_dict_rejects_junk(bad, match):
    with pytest.raises(ValueError, match=match):
        GroupPlan.from_dict(bad)


def test_dense_backend_copy_takes_the_input_layout_and_is_kept():
    """The masked dense conv that backend "dense" runs is built outside the module, so
    ``model.to(memory_format=...)`` cannot reach it: it takes each input's layout itself (NCHW
    weights on a channels-last input would be converted on every call) and is rebuilt only
    when the layout, device or dtype changes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    plan = GroupPlan.from_lists([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4], [1, 3, 5]])
    layer = GroupedKernelConv2d.from_conv(conv, plan).eval()
    layer.backend = "dense"
    x = torch.randn(2, 8, 6, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = layer.to_dense()(x)
        assert torch.allclose(layer(cl), want, atol=1e-5)
        built = layer.__dict__["_dense"]
        assert built.weight.is_contiguous(memory_format=torch.channels_last)
        assert not built.weight.is_contiguous()
        layer(cl)
        assert layer.__dict__["_dense"] is built  # same layout: kept
        assert torch.allclose(layer(x), want, atol=1e-5)
        assert layer.__dict__["_dense"].weight.is_contiguous()  # NCHW input: NCHW weights

"""TMI-GKP / SR-GKP / gkp-random: METHODS.md's grouped shapes and MACs, and their own knobs."""

import pytest
import torch

from gkp.api import PruneContext, PruneTarget, get_method
from gkp.methods import select_snapshots
from gkp.metrics import macs, macs_bn
from gkp.models import get_model
from gkp.nn import GroupedKernelConv2d
from gkp.planning import n_keep_for, rate_for_target

X = torch.zeros(1, 3, 32, 32)

# METHODS.md, G = 8, p = 0.4375: (C_in, C_out) -> (grouped conv in_channels, weight shape)
SHAPES = {
    (16, 16): (72, (16, 9, 3, 3)),
    (16, 32): (72, (32, 9, 3, 3)),
    (32, 32): (144, (32, 18, 3, 3)),
    (32, 64): (144, (64, 18, 3, 3)),
    (64, 64): (288, (64, 36, 3, 3)),
}


def grouped_layers(model):
    return [m for m in model.modules() if isinstance(m, GroupedKernelConv2d)]


def check_shapes(model, n_layers):
    layers = grouped_layers(model)
    assert len(layers) == n_layers
    for m in layers:
        in_ch, shape = SHAPES[(m.in_channels, m.out_channels)]
        assert m.conv.in_channels == in_ch and tuple(m.conv.weight.shape) == shape
        assert m.conv.groups == 8


@pytest.mark.parametrize("method", ["tmi-gkp", "sr-gkp", "gkp-random"])
def test_resnet56_shapes_and_macs(prune_resnet56, resnet56_with_snapshots, method):
    dense, _ = resnet56_with_snapshots
    pruned = prune_resnet56(method).model  # defaults: rate 0.4375, groups 8
    check_shapes(pruned, 54)
    # by hand: stem 16*3*9*32*32 = 442368 and FC 640 stay; every target conv keeps 9/16 = 18/32
    # = 36/64 of its MACs: 442368 + 640 + 0.5625 * (125485696 - 442368 - 640) = 70.78 M
    assert macs(pruned, X) == 442_368 + 640 + (125_485_696 - 442_368 - 640) * 9 // 16
    assert 100 * (1 - macs(pruned, X) / macs(dense, X)) == pytest.approx(43.60, abs=0.02)
    assert 100 * (1 - macs_bn(pruned, X) / macs_bn(dense, X)) == pytest.approx(43.23, abs=0.02)


@pytest.mark.parametrize(
    "name,n_layers,macs_m",
    [("resnet20", 18, 23.00), ("resnet32", 30, 38.93), ("resnet110", 108, 142.44)],
)
def test_other_cifar_resnets(name, n_layers, macs_m):
    torch.manual_seed(0)
    model = get_model(name)
    pruned = get_method("sr-gkp")(model, PruneTarget(), PruneContext(example_inputs=X)).model
    check_shapes(pruned, n_layers)
    assert round(macs(pruned, X) / 1e6, 2) == macs_m


def test_tmi_on_resnet20_records_choices(tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet20")
    paths = []
    for e in (2, 3, 4):
        paths.append(tmp_path / f"epoch_{e:03d}.pt")
        torch.save({k: v * (1 + 0.1 * e) for k, v in model.state_dict().items()}, paths[-1])
    ctx = PruneContext(example_inputs=X, snapshots=tuple(paths))
    result = get_method("tmi-gkp")(model, PruneTarget(native={"snapshot_window": [3, 4]}), ctx)
    assert result.info["snapshots"] == ["epoch_003.pt", "epoch_004.pt"]
    check_shapes(result.model, 18)
    for layer in result.info["layers"].values():
        assert layer["grouping"] in {"kpca", "spectral", "dbscan"}
        assert sum(layer["vote"]["counts"].values()) == 2  # one winner per snapshot epoch
        assert layer["e"] == n_keep_for(layer["c_in"], 0.4375) // 5
    with pytest.raises(ValueError, match="snapshots"):
        get_method("tmi-gkp")(model, PruneTarget(), PruneContext(example_inputs=X))


def test_select_snapshots_window(tmp_path):
    ctx = PruneContext(
        example_inputs=X, snapshots=tuple(tmp_path / f"epoch_{e:03d}.pt" for e in range(1, 9))
    )
    assert [p.name for p in select_snapshots(ctx, (3, 5)).snapshots] == [
        "epoch_003.pt",
        "epoch_004.pt",
        "epoch_005.pt",
    ]
    assert select_snapshots(ctx, None) is ctx


def test_n_keep_and_target_mapping():
    assert [n_keep_for(c, 0.4375) for c in (16, 32, 64)] == [9, 18, 36]
    layers = [(16, 100), (32, 100), (64, 100)]
    rate = rate_for_target(layers, 0.4375)
    assert [n_keep_for(c, rate) for c in (16, 32, 64)] == [9, 18, 36]
    assert n_keep_for(16, 0.99) == 1  # never zero channels


def resnet20_with_snapshot(tmp_path):
    """A seeded resnet20 and a context holding one (scaled) snapshot of it."""
    torch.manual_seed(0)
    model = get_model("resnet20")
    path = tmp_path / "epoch_001.pt"
    torch.save({k: v * 0.5 for k, v in model.state_dict().items()}, path)
    return model, PruneContext(example_inputs=X, snapshots=(path,))


def test_e_zero_drops_outer_term(tmp_path):
    # rate 0.75 keeps floor(0.25 * 17) = 4 of 16 channels: e = floor(0.8) = 0 in stage 1
    model, ctx = resnet20_with_snapshot(tmp_path)
    info = get_method("tmi-gkp")(model, PruneTarget(native={"rate": 0.75}), ctx).info["layers"]
    first = info["layer1.0.conv1"]
    assert first["n_keep"] == 4 and first["e"] == 0 and first["outer_term_dropped"]
    assert first["lambda"] == 0.0
    assert info["layer3.1.conv1"]["e"] == 3  # 64 channels keep 16: e = floor(3.2)


def test_equal_size_option_reaches_the_clustering(tmp_path):
    model, ctx = resnet20_with_snapshot(tmp_path)
    knobs = {"equal_size": "heuristic", "layers": ["layer1.0.conv1"]}
    result = get_method("tmi-gkp")(model, PruneTarget(native=knobs), ctx)
    assert result.info["options"]["equal_size"] == "heuristic"
    bad = {"equal_size": "greedy", "layers": ["layer1.0.conv1"]}
    with pytest.raises(ValueError, match="heuristic"):
        get_method("tmi-gkp")(model, PruneTarget(native=bad), ctx)


@pytest.mark.parametrize("method", ["sr-gkp", "tmi-gkp"])
def test_plans_do_not_depend_on_the_number_of_planning_threads(tmp_path, monkeypatch, method):
    """Layers planned on two threads (forced: ResNet-20 is narrower than the parallel floor)
    give the same plans, in the same order, as one at a time."""
    from gkp import planning

    torch.manual_seed(0)
    model = get_model("resnet20")
    paths = []
    for e in (1, 2):
        paths.append(tmp_path / f"epoch_{e:03d}.pt")
        torch.save({k: v * (1 + 0.1 * e) for k, v in model.state_dict().items()}, paths[-1])
    ctx = PruneContext(example_inputs=X, snapshots=tuple(paths))
    runs = []
    for workers in ("1", "2"):
        monkeypatch.setenv("GKP_PLAN_WORKERS", workers)
        monkeypatch.setattr(planning, "PARALLEL_MIN_CHANNELS", 1)
        runs.append(get_method(method)(model, PruneTarget(), ctx).info)
    one, two = runs
    assert list(one["plans"]) == list(two["plans"]) and one["plans"] == two["plans"]
    assert list(one["layers"]) == list(two["layers"]) and one["layers"] == two["layers"]


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_planning_thread_count_is_refused(monkeypatch, value):
    from gkp.errors import UsageError
    from gkp.planning import plan_workers

    monkeypatch.setenv("GKP_PLAN_WORKERS", value)
    with pytest.raises(UsageError, match="GKP_PLAN_WORKERS must be a whole number >= 1"):
        plan_workers()

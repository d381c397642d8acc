"""SG-CNN [2]: hand-derived thresholds and patterns, the per-group deploy form, the fine-tuning
budget a method spends while it prunes, and the runner's split of that budget."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from baselines import sgcnn as sg
from benchmarks.cli import main
from benchmarks.leaderboard import read_leaderboard
from gkp.api import PruneContext, PruneTarget, get_method
from gkp.budget import FineTuneBudget
from gkp.checkpoint import load_weights, rebuild, structure_of
from gkp.loaders import TensorLoader
from gkp.masked import MaskedConv2d, MaskedLinear, deploy_form, training_form
from gkp.metrics import macs, macs_nonzero
from gkp.models import get_model
from gkp.nn import GroupPlan, PerGroupConv2d, masked_conv
from gkp.recipes import get_recipe
from gkp.train import fit

X = torch.zeros(1, 3, 32, 32)


def unequal_plan(rng, c_out, c_in, n_groups):
    order = list(range(c_out))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, c_out), n_groups - 1))
    groups = [order[a:b] for a, b in zip([0, *cuts], [*cuts, c_out], strict=True)]
    kept = [rng.sample(range(c_in), rng.randint(1, c_in)) for _ in groups]
    return GroupPlan.from_lists(groups, kept)


# ------------------------------------------------------------------ the per-group deploy form


@pytest.mark.parametrize("seed", range(4))
def test_per_group_conv_equals_masked_conv(seed):
    rng = random.Random(seed)
    conv = nn.Conv2d(12, 10, 3, stride=1 + seed % 2, padding=1, bias=seed % 2 == 0)
    plan = unequal_plan(rng, 10, 12, 4)
    layer = PerGroupConv2d.from_conv(conv, plan)
    x = torch.randn(2, 12, 9, 9)
    want = masked_conv(x, conv, plan.mask(10, 12))
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert layer.plan() == plan
    assert torch.allclose(layer.to_dense()(x), want, atol=1e-5)
    kernels = sum(len(g) * len(k) for g, k in zip(plan.groups, plan.kept, strict=True))
    pixels = 81 if seed % 2 == 0 else 25  # 9x9 or 5x5 outputs, batch of 2
    assert macs_nonzero(layer, x) <= macs(layer, x) == 2 * kernels * 9 * pixels


def test_per_group_conv_survives_training_form_checkpoint_and_export(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    plan = GroupPlan.from_lists([[0, 4], [1, 2, 3, 5]], [[1, 7], [0, 2, 3, 4, 6]])
    model[2] = PerGroupConv2d.from_conv(model[2], plan)
    x = torch.randn(2, 3, 8, 8)
    trainable = training_form(model)
    assert isinstance(trainable[2], MaskedConv2d) and trainable[2].plan == plan
    back = deploy_form(trainable)
    assert isinstance(back[2], PerGroupConv2d) and torch.allclose(back(x), model(x), atol=1e-6)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    structure = json.loads(json.dumps(structure_of(model)))
    assert structure["per_group"] == {"2": plan.to_dict()}
    loaded = load_weights(rebuild(fresh, structure), model.state_dict(), "test")
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    exported = torch.export.export(model.eval(), (x,))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-6)


def test_per_group_plans_validate_partitions():
    conv = nn.Conv2d(4, 4, 1)
    with pytest.raises(ValueError, match="non-empty parts"):
        PerGroupConv2d.from_conv(conv, GroupPlan.from_lists([[0, 1], [1, 2, 3]], [[0], [1]]))
    with pytest.raises(ValueError, match="distinct indices"):
        PerGroupConv2d.from_conv(conv, GroupPlan.from_lists([[0], [1, 2, 3]], [[0], [5]]))


def test_older_structures_keep_their_digest_keys():
    """A model without per-group layers records no ``per_group`` key (digests unchanged)."""
    assert "per_group" not in structure_of(get_model("resnet20"))


# ----------------------------------------------------------------- the method, by hand


def test_threshold_and_shared_patterns_on_a_hand_example():
    # 4 filters x 3 channels; clusters {0, 1} and {2, 3} with centroids [4, 2, 0.5], [1, 3, 0]
    labels = np.array([0, 0, 1, 1])
    centroids = np.array([[4.0, 2.0, 0.5], [1.0, 3.0, 0.0]])
    kept_frac = np.ones((4, 3))
    kept_frac[2, 2] = 0.0  # filter 2 already lost channel 2
    # scores: rows 0,1 = [4, 2, .5]; row 2 = [1, 3, 0]; row 3 = [1, 3, 0] -> sorted
    # [0, 0, .5, .5, 1, 1, 2, 2, 3, 3, 4, 4]; p = 1/3 removes 4 pairs: threshold 0.5
    keep, t = sg.sg_step(None, kept_frac, 1 / 3, labels, centroids)
    assert t == 0.5
    assert keep.tolist() == [[True, True, False], [True, True, False]]
    # p = 1/2 removes 6: threshold 1 -> cluster 1 keeps only channel 1
    keep, t = sg.sg_step(None, kept_frac, 0.5, labels, centroids)
    assert t == 1.0 and keep.tolist() == [[True, True, False], [False, True, False]]
    # a cluster whose centroid never exceeds the threshold keeps its largest entry
    keep, _ = sg.sg_step(None, kept_frac, 11 / 12, labels, centroids)
    assert keep.tolist() == [[True, False, False], [False, True, False]]


def test_importance_is_the_l1_norm_of_each_masked_kernel():
    w = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).view(2, 2, 2, 2) - 7
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[1, 0] = False
    v = sg.importance(w, mask)
    assert v.tolist() == [[22.0, 6.0], [0.0, 26.0]]  # |-7-6-5-4|, |-3-2-1+0|, masked, 5+6+7+8


def test_schedule_steps_ten_percent_then_the_target():
    from fractions import Fraction

    assert sg.schedule(Fraction(436, 1000), 0.1) == [0.1, 0.2, 0.3, 0.4, 0.436]
    assert sg.schedule(Fraction(3, 10), 0.1) == [0.1, 0.2, 0.3]
    assert sg.schedule(Fraction(5, 100), 0.1) == [0.05]


@pytest.fixture(scope="module")
def pruned20():
    torch.manual_seed(0)
    model = get_model("resnet20")
    calls = []

    def finetune(m, steps, desc=""):
        calls.append((steps, desc))
        with torch.no_grad():  # what training may do: move every weight (masks must hold)
            for p in m.parameters():
                p.add_(0.01)
        return {"steps": steps}

    finetune.total_steps = 100
    ctx = PruneContext(X, finetune=finetune)
    result = get_method("sgcnn")(model, PruneTarget(0.75), ctx)
    return model, result, calls


def test_masks_only_shrink_and_every_cluster_shares_its_pattern(pruned20):
    model, result, _ = pruned20
    steps = result.info["steps"]
    for name in steps[0]["layers"]:
        kept = [s["layers"][name]["kept_fraction"] for s in steps]
        assert kept == sorted(kept, reverse=True) and kept[-1] < 0.3
    for name, plan in result.info["plans"].items():
        plan = GroupPlan.from_dict(plan)
        layer = result.model.get_submodule(name)
        assert isinstance(layer, PerGroupConv2d)
        w = layer.to_dense().weight.detach().abs().flatten(2).sum(2) > 0
        for grp, k in zip(plan.groups, plan.kept, strict=True):
            outside = [c for c in range(w.shape[1]) if c not in k]
            assert not w[list(grp)][:, outside].any()  # every filter of a group reads only K_g


def test_fc_is_pruned_the_same_way_but_capped(pruned20):
    _, result, _ = pruned20
    fc = result.model.fc
    assert isinstance(fc, MaskedLinear)
    assert abs(float(fc.mask.double().mean()) - 0.4) <= 0.02  # target 0.75, cap 0.6
    assert result.info["steps"][-1]["fc"]["kept_fraction"] == float(fc.mask.double().mean())


def test_local_fine_tunes_take_their_share_of_the_budget(pruned20):
    _, result, calls = pruned20
    n = len(result.info["schedule"])
    assert n == 8  # 0.1 ... 0.7, then 0.75
    assert calls == [(100 // 4 // n, f"sgcnn step {s + 1}") for s in range(n)]
    assert (
        result.info["local_finetune"]
        == f"done: {100 // 4 // n} steps after each of the 8 pruning steps"
    )


def test_target_met_and_deploy_equals_reference(pruned20):
    model, result, _ = pruned20
    achieved = 1 - macs(result.model, X) / macs(model, X)
    assert abs(achieved - 0.75) <= 0.01
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.model.eval()(x), result.reference.eval()(x), atol=1e-4)


def test_global_only_variant_and_missing_budget_are_recorded():
    model = get_model("resnet20")
    native = {"layers": ["layer1.0.conv1"], "local_finetune": False}
    off = get_method("sgcnn")(model, PruneTarget(native=native), PruneContext(X))
    assert off.info["local_finetune"] == "off (global-only variant)"
    on = get_method("sgcnn")(
        model, PruneTarget(native={"layers": ["layer1.0.conv1"]}), PruneContext(X)
    )
    assert on.info["local_finetune"].startswith("skipped")


def test_equalize_variant_uses_the_shared_grouped_form():
    from gkp.nn import GroupedKernelConv2d

    model = get_model("resnet20")
    result = get_method("sgcnn")(model, PruneTarget(0.436, {"equalize": True}), PruneContext(X))
    layers = [m for m in result.model.modules() if isinstance(m, GroupedKernelConv2d)]
    assert len(layers) == 18 and {m.n_groups for m in layers} == {16}
    assert result.info["variant"].startswith("equalize")
    assert abs(1 - macs(result.model, X) / macs(model, X) - 0.436) <= 0.01


# ------------------------------------------------------------------ the fine-tuning budget


def tiny_loader(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorLoader(x, y, batch_size=batch, shuffle=True, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_budget_spends_steps_keeps_masks_and_caps_at_what_is_left():
    conv = nn.Conv2d(3, 4, 3)
    mask = torch.rand(conv.weight.shape) > 0.5
    model = nn.Sequential(MaskedConv2d.from_conv(conv, mask), nn.Flatten(), nn.Linear(4 * 36, 10))
    budget = FineTuneBudget(tiny_loader(), get_recipe("smoke"), total_steps=7)
    before = [p.detach().clone() for p in model.parameters()]
    assert budget(model, 5)["steps"] == 5
    assert budget(model, 5)["steps"] == 2  # only 2 left
    assert budget(model, 5) == {"steps": 0}
    assert budget.record() == {
        "total_steps": 7, "steps_per_epoch": 4, "in_pruning_steps": 7, "global_steps": 0,
        "calls": [5, 2],
    }  # fmt: skip
    assert not model[0].weight[~mask].any()  # masked weights stay zero through training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fit_trains_exactly_the_steps_left():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 10))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    recipe = get_recipe("smoke")
    out = fit(model, tiny_loader(), tiny_loader(), recipe, __import__("tempfile").mkdtemp(),
              phase="finetune", steps=6, progress=False)  # fmt: skip
    assert sum(seen) == 6  # 4 steps in epoch 1, 2 in epoch 2 (training forwards only)
    assert len(out["history"]) == 2


def test_runner_records_the_budget_split_and_both_latencies(tmp_path):
    args = ["--dataset", "synthetic", "--recipe", "smoke", "--runs", str(tmp_path / "runs"),
            "--ft-epochs", "5", "--no-progress"]  # fmt: skip
    assert main(["train", *args]) == 0
    out = ["--out", str(tmp_path / "results"), "--bench-rounds", "2"]
    assert main(["prune", *args, *out, "--method", "sgcnn", "--target", "0.436"]) == 0
    row = read_leaderboard(tmp_path / "results" / "leaderboard.csv").iloc[0]
    info = json.loads(row["prune_info"])
    split = info["finetune_budget"]
    assert split["in_pruning_steps"] + split["global_steps"] == split["total_steps"]
    assert split["total_steps"] == row["finetune_epochs"] * split["steps_per_epoch"]
    assert split["in_pruning_steps"] == sum(split["calls"]) > 0
    assert info["timed_form"].startswith("per-group")
    assert info["latency_masked_dense"]["speedup_b1"] > 0
    assert row["faithfulness"] == "faithful"
    variant = ["--method", "sgcnn", "--target", "0.436", "--option", "equalize=true"]
    assert main(["prune", *args, *out, *variant]) == 0
    row = read_leaderboard(tmp_path / "results" / "leaderboard.csv").iloc[1]
    assert row["faithfulness"] == "variant" and '"equalize": true' in row["options"]
    assert json.loads(row["prune_info"])["timed_form"] == "grouped conv"

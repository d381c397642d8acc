"""The contract, checked for every registered method at once (parametrized over the registry)."""

import copy

import pytest
import torch

from gkp.api import Granularity, PruneContext, PruneTarget, get_method, list_methods
from gkp.data import random_calibration
from gkp.metrics import macs, macs_nonzero
from gkp.models import get_model

X = torch.zeros(1, 3, 32, 32)
TARGETS = (0.30, 0.60)  # both differ from every method's default: a method ignoring --target fails


@pytest.fixture(scope="module", params=list_methods())
def pruned(request, resnet56_with_snapshots, prune_resnet56):
    model, _ = resnet56_with_snapshots
    before = copy.deepcopy(model.state_dict())
    result = prune_resnet56(request.param, TARGETS[0])
    return request.param, model, before, result


def test_output_shape_unchanged(pruned):
    _, model, _, result = pruned
    x = torch.randn(2, 3, 32, 32)
    assert result.model.eval()(x).shape == model.eval()(x).shape


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("target", TARGETS)
def test_macs_target_met_on_resnet56(name, target, resnet56_with_snapshots, prune_resnet56):
    """Whole-model MACs (non-zero ones for masked methods) within 1 point of the target; the
    stem and classifier are 0.4% of resnet56's MACs."""
    model, _ = resnet56_with_snapshots
    result = prune_resnet56(name, target)
    achieved = 1 - macs_nonzero(result.model, X) / macs(model, X)
    assert abs(achieved - target) <= 0.01, (name, target, achieved)
    if get_method(name).info.granularity in (Granularity.WEIGHT, Granularity.KERNEL):
        assert macs(result.model, X) == macs(model, X)  # masked: what runs is dense


def test_deploy_equals_masked_form(pruned):
    _, _, _, result = pruned
    assert result.reference is not None, "every method must give its masked reference form"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = result.model.eval()(x), result.reference.eval()(x)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_input_model_not_mutated(pruned):
    _, model, before, _ = pruned
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_info_is_recorded(pruned):
    _, _, _, result = pruned
    assert "options" in result.info and result.info["prune_seconds"] >= 0


def prune20(name, seed, tmp_path, **native):
    torch.manual_seed(0)
    model = get_model("resnet20")
    path = tmp_path / "epoch_001.pt"
    torch.save({k: v * 0.9 for k, v in model.state_dict().items()}, path)
    ctx = PruneContext(
        example_inputs=X,
        snapshots=(path, path),
        calib_batches=random_calibration(X.shape[1:], seed=seed),
        teacher=model,
        seed=seed,
    )
    return get_method(name)(model, PruneTarget(native=native), ctx)


@pytest.mark.parametrize("name", list_methods())
def test_same_seed_same_model(name, tmp_path):
    ra, rb = prune20(name, 3, tmp_path), prune20(name, 3, tmp_path)
    a, b = ra.model.state_dict(), rb.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ra.info.get("plans") == rb.info.get("plans")


@pytest.mark.parametrize("name", list_methods())
def test_bad_knobs_raise(name, tmp_path):
    with pytest.raises(ValueError, match="outside"):
        PruneTarget(macs=1.2)
    info = get_method(name).info
    if info.granularity == Granularity.GROUPED_KERNEL:
        # SG-CNN's unequal clusters need no divisor; its equal-groups variant does
        equal = {"equalize": True} if "equalize" in info.native_knobs else {}
        with pytest.raises(ValueError, match="do not divide"):
            prune20(name, 0, tmp_path, groups=5, **equal)
    with pytest.raises(ValueError, match="outside"):
        prune20(name, 0, tmp_path, rate=1.0)
    with pytest.raises(ValueError, match="unknown option"):
        prune20(name, 0, tmp_path, colour="red")


@pytest.mark.parametrize("name", list_methods())
def test_every_method_checks_its_knobs_up_front(name):
    method = get_method(name)
    assert method.check is not None, "register the method with check=... (see gkp.api.Method)"
    model = get_model("resnet20")
    method.check(model, PruneTarget(macs=0.3), X)
    with pytest.raises(ValueError, match="unknown option"):
        method.check(model, PruneTarget(native={"colour": "red"}), X)


def test_method_colours_are_unique():
    colours = [get_method(n).info.color.lower() for n in list_methods()]
    assert len(set(colours)) == len(colours)

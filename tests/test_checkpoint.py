"""Checkpoints are state dicts plus plain data: hostile, foreign and old files are refused."""

import os
import pickle

import pytest
import torch

from gkp.api import PruneContext, PruneTarget, get_method
from gkp.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_weights,
    rebuild,
    save_checkpoint,
    state_digest,
    structure_of,
)
from gkp.fsio import orphaned_temps
from gkp.models import get_model

X = torch.randn(2, 3, 32, 32)


class Boom:
    """Unpickling this calls ``os.mkdir(marker)``: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_hostile_checkpoint_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "final.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT, "kind": "baseline", "x": Boom(marker)}, f)
    with pytest.raises(CheckpointError, match="unsafe to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same payload through torch.save (zip format) is refused too
    torch.save({"format": FORMAT, "x": Boom(marker)}, path)
    with pytest.raises(CheckpointError, match="unsafe to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickled_modules_of_old_versions_are_refused(tmp_path):
    path = tmp_path / "pruned.pt"
    torch.save({"model": get_model("resnet20"), "info": {}}, path)
    with pytest.raises(CheckpointError, match="unsafe to load|not a GKP-Bench"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)  # loadable, but not this format
    with pytest.raises(CheckpointError, match="older versions"):
        load_checkpoint(path)


def test_kind_and_meta_must_match(tmp_path):
    path = tmp_path / "final.pt"
    save_checkpoint(path, {"kind": "baseline", "meta": {"model": "resnet32", "dataset": "x"}})
    assert load_checkpoint(path, "baseline", {"model": "resnet32"})["kind"] == "baseline"
    with pytest.raises(CheckpointError, match="model 'resnet32', this run needs 'resnet20'"):
        load_checkpoint(path, "baseline", {"model": "resnet20"})
    with pytest.raises(CheckpointError, match="not 'pruned'"):
        load_checkpoint(path, "pruned")


def test_pruned_model_round_trips_through_plain_data(tmp_path):
    torch.manual_seed(0)
    dense = get_model("resnet20")
    ctx = PruneContext(example_inputs=X[:1])
    pruned = get_method("gkp-l2")(dense, PruneTarget(native={"groups": 4}), ctx).model.eval()
    path = tmp_path / "pruned.pt"
    save_checkpoint(
        path,
        {"kind": "pruned", "structure": structure_of(pruned), "state_dict": pruned.state_dict()},
    )
    saved = load_checkpoint(path, "pruned")
    torch.manual_seed(1)  # other initial weights: everything must come from the file
    again = load_weights(
        rebuild(get_model("resnet20"), saved["structure"]), saved["state_dict"], "f"
    )
    assert torch.equal(again.eval()(X), pruned(X))
    assert state_digest(again) == state_digest(pruned)
    with torch.no_grad():
        next(again.parameters()).add_(1.0)
    assert state_digest(again) != state_digest(pruned)


def test_a_pruned_state_does_not_fit_another_model(tmp_path):
    torch.manual_seed(0)
    ctx = PruneContext(example_inputs=X[:1])
    pruned32 = get_method("gkp-l2")(get_model("resnet32"), PruneTarget(), ctx).model
    with pytest.raises(CheckpointError, match="do not fit|does not fit"):
        model = rebuild(get_model("resnet20"), structure_of(pruned32))
        load_weights(model, pruned32.state_dict(), "pruned.pt")
    bad = {"grouped_kernel": {"layer1.0.conv1": {"groups": "x", "kept": [[0]]}}}
    with pytest.raises(CheckpointError):
        rebuild(get_model("resnet20"), bad)
    with pytest.raises(CheckpointError, match="unknown model structure"):
        rebuild(get_model("resnet20"), {"sparse": {}})


def test_save_is_atomic_and_cleans_orphans(tmp_path):
    path = tmp_path / "checkpoint.pt"
    orphan = tmp_path / ".checkpoint.pt.abc123.tmp"  # what a killed save leaves behind
    orphan.write_bytes(b"half")
    save_checkpoint(path, {"kind": "progress", "epoch": 1})
    assert not orphan.exists() and orphaned_temps(path) == []
    assert load_checkpoint(path, "progress")["epoch"] == 1


def test_masked_model_round_trips_with_its_masks(tmp_path):
    torch.manual_seed(0)
    ctx = PruneContext(example_inputs=X[:1])
    pruned = get_method("weight-magnitude")(get_model("resnet20"), PruneTarget(0.5), ctx).model
    path = tmp_path / "pruned.pt"
    save_checkpoint(
        path,
        {"kind": "pruned", "structure": structure_of(pruned), "state_dict": pruned.state_dict()},
    )
    saved = load_checkpoint(path, "pruned")
    assert saved["structure"]["masked"]  # the masked convs are named
    again = load_weights(
        rebuild(get_model("resnet20"), saved["structure"]), saved["state_dict"], "f"
    )
    assert torch.equal(again.eval()(X), pruned.eval()(X))
    names = saved["structure"]["masked"]
    for name in names:
        assert torch.equal(again.get_submodule(name).mask, pruned.get_submodule(name).mask)


def test_physically_pruned_model_round_trips_through_its_shapes(tmp_path):
    torch.manual_seed(0)
    ctx = PruneContext(example_inputs=X[:1])
    pruned = get_method("filter-l1")(get_model("resnet20"), PruneTarget(0.5), ctx).model.eval()
    path = tmp_path / "pruned.pt"
    save_checkpoint(
        path,
        {"kind": "pruned", "structure": structure_of(pruned), "state_dict": pruned.state_dict()},
    )
    saved = load_checkpoint(path, "pruned")
    assert saved["structure"]["shapes"]["layer1.0.conv1"][0] < 16  # filters were removed
    again = load_weights(
        rebuild(get_model("resnet20"), saved["structure"]), saved["state_dict"], "f"
    )
    assert torch.equal(again.eval()(X), pruned(X))

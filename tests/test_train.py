"""Training: learns, checkpoints every epoch, resumes without repeating, snapshots, errors."""

import dataclasses

import pytest
import torch

from gkp.data import load_data
from gkp.models import get_model
from gkp.recipes import RECIPES, get_recipe
from gkp.train import CheckpointError, fit, load_checkpoint, lr_factor

SMOKE = dataclasses.replace(RECIPES["smoke"], epochs=3, subset=96, test_subset=64)


def loaders(seed=0):
    train, test, spec = load_data(
        "synthetic",
        subset=SMOKE.subset,
        test_subset=SMOKE.test_subset,
        batch_size=SMOKE.batch_size,
        seed=seed,
    )
    return train, test, spec


def fresh_model():
    torch.manual_seed(0)
    return get_model("resnet20", num_classes=10, in_channels=3)


class Interrupting:
    """A train loader that dies (like Ctrl-C) when asked for epoch index ``at_epoch``."""

    def __init__(self, loader, at_epoch):
        self.loader, self.at_epoch = loader, at_epoch

    def set_epoch(self, epoch):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def test_fit_resume_equals_uninterrupted(tmp_path):
    train, test, _ = loaders()
    full = fresh_model()
    res_full = fit(full, train, test, SMOKE, tmp_path / "a", progress=False, snapshot_epochs=(2,))
    assert [h["epoch"] for h in res_full["history"]] == [1, 2, 3]
    assert (tmp_path / "a" / "snapshots" / "epoch_002.pt").exists()

    # interrupted while starting epoch 3, then resumed
    with pytest.raises(KeyboardInterrupt):
        fit(
            fresh_model(),
            Interrupting(train, at_epoch=2),
            test,
            SMOKE,
            tmp_path / "b",
            progress=False,
        )
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    resumed = fresh_model()
    res = fit(resumed, train, test, SMOKE, tmp_path / "b", progress=False)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    for k, v in full.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-5), k

    # a finished phase does nothing more
    again = fit(fresh_model(), train, test, SMOKE, tmp_path / "a", progress=False)
    assert again["history"] == res_full["history"]


def test_corrupt_and_foreign_checkpoints(tmp_path):
    train, test, _ = loaders()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(fresh_model(), train, test, SMOKE, tmp_path / "c", progress=False)
    fit(fresh_model(), train, test, SMOKE, tmp_path / "d", progress=False, phase="finetune")
    with pytest.raises(CheckpointError, match="different run"):
        fit(fresh_model(), train, test, SMOKE, tmp_path / "d", progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_learns_synthetic(tmp_path):
    train, test, _ = load_data("synthetic", subset=512, test_subset=256, batch_size=64)
    recipe = dataclasses.replace(RECIPES["smoke"], epochs=4, lr=0.05, subset=512)
    res = fit(fresh_model(), train, test, recipe, tmp_path, progress=False)
    assert res["top1"] > 50.0  # 10 classes: chance is 10%


def test_schedules_and_windows():
    paper = get_recipe("paper")
    assert paper.window() == (35, 70)
    assert lr_factor(paper, 0, 300) == 1.0
    assert lr_factor(paper, 100, 300) == pytest.approx(0.1)
    assert lr_factor(paper, 200, 300) == pytest.approx(0.01)
    short = get_recipe("short")
    lo, hi = short.window()
    assert 1 <= lo <= hi <= short.epochs
    cos = dataclasses.replace(short, schedule="cosine")
    assert lr_factor(cos, 5, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("long")


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    train, test, _ = loaders()
    one = dataclasses.replace(SMOKE, epochs=1)
    fit(fresh_model(), train, test, one, tmp_path, progress=False, identity={"model": "resnet20"})
    with pytest.raises(CheckpointError, match="model 'resnet20', this run needs 'resnet32'"):
        fit(
            fresh_model(),
            train,
            test,
            one,
            tmp_path,
            progress=False,
            identity={"model": "resnet32"},
        )
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["meta"] == {"model": "resnet20"} and ckpt["epoch"] == 1  # left as it was


@pytest.mark.parametrize("field,value", [("epochs", 0), ("epochs", -2), ("ft_epochs", -1)])
def test_phase_without_epochs_is_refused(tmp_path, field, value):
    train, test, _ = loaders()
    recipe = dataclasses.replace(SMOKE, **{field: value})
    phase = "train" if field == "epochs" else "finetune"
    with pytest.raises(ValueError, match="must be at least"):
        fit(fresh_model(), train, test, recipe, tmp_path, progress=False, phase=phase)
    assert not (tmp_path / "checkpoint.pt").exists()

"""Shared fixtures: one pruned ResNet-56 per method, computed once per test session."""

import pytest
import torch

from gkp.api import PruneContext, PruneTarget, get_method
from gkp.data import random_calibration
from gkp.models import get_model

X32 = torch.zeros(1, 3, 32, 32)


@pytest.fixture(autouse=True)
def _fresh_layer_timings():
    """Each test starts without the per-shape layer timings an earlier test's autotune kept
    (:func:`gkp.autotune.clear_shared_timings`): tests that fake the timings stay independent."""
    from gkp.autotune import clear_shared_timings

    clear_shared_timings()
    yield
    clear_shared_timings()


@pytest.fixture(scope="session")
def resnet56_with_snapshots(tmp_path_factory):
    """A seeded resnet56 and three fake training snapshots (noisy copies of its weights)."""
    torch.manual_seed(1)
    model = get_model("resnet56")
    folder = tmp_path_factory.mktemp("snapshots")
    paths = []
    for e in range(3):
        state = {
            k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
        paths.append(folder / f"epoch_{e + 1:03d}.pt")
        torch.save(state, paths[-1])
    return model, tuple(paths)


@pytest.fixture(scope="session")
def prune_resnet56(resnet56_with_snapshots):
    """``prune_resnet56(method, target=None, **native)`` -> PruneResult, cached per arguments."""
    model, paths = resnet56_with_snapshots
    cache = {}

    def run(method, target=None, **native):
        key = (method, target, tuple(sorted(native.items())))
        if key not in cache:
            ctx = PruneContext(
                example_inputs=X32,
                snapshots=paths,
                calib_batches=random_calibration(X32.shape[1:]),
                teacher=model,
                seed=0,
            )
            cache[key] = get_method(method)(model, PruneTarget(target, native), ctx)
        return cache[key]

    return run

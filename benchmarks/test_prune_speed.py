"""How long each grouped-kernel method takes to prune ResNet-56 (reported, not asserted).

``pytest benchmarks/test_prune_speed.py --benchmark-only``. TMI-GKP gets 36 snapshots, as the
paper's window (epochs 35..70 of 300) gives. The original implementation took about 2.5 hours.
Skipped under ``--benchmark-disable`` (a single untimed run would only slow the test suite).
"""

from __future__ import annotations

import pytest
import torch

from gkp.api import PruneContext, PruneTarget, get_method
from gkp.models import get_model

X = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet56_and_snapshots(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("resnet56")
    folder = tmp_path_factory.mktemp("snapshots36")
    paths = []
    for epoch in range(35, 71):
        state = {k: v * (1 + 0.01 * epoch) for k, v in model.state_dict().items()}
        paths.append(folder / f"epoch_{epoch:03d}.pt")
        torch.save(state, paths[-1])
    return model, tuple(paths)


@pytest.mark.parametrize("method", ["tmi-gkp", "sr-gkp", "gkp-l2", "gkp-random"])
def test_prune_resnet56_seconds(benchmark, resnet56_and_snapshots, method):
    if benchmark.disabled:
        pytest.skip("a timing benchmark: run with --benchmark-only")
    model, paths = resnet56_and_snapshots
    ctx = PruneContext(example_inputs=X, snapshots=paths)
    benchmark.group = "prune resnet56"
    benchmark.extra_info.update(
        model="resnet56", method=method, snapshots=len(paths), threads=torch.get_num_threads()
    )
    result = benchmark.pedantic(
        get_method(method), args=(model, PruneTarget(), ctx), rounds=1, iterations=1
    )
    assert result.info["prune_seconds"] > 0

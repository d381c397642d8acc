"""Latency suite: dense vs gkp-l2-pruned ResNet-56 on CPU at batch 1 and 32.

Run ``pytest benchmarks --benchmark-only --benchmark-json out.json``; ``gkp-bench bench
--from-json out.json`` turns the medians into speed-ups. Weights are untrained: latency does
not depend on them. Protocol: eval(), inference_mode, warm-up rounds, a fixed thread count
(recorded in extra_info), median and IQR over many rounds; compare ratios within one run only.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.measure import bench_key
from gkp import metrics
from gkp.api import PruneContext, PruneTarget, get_method
from gkp.models import get_model

THREADS = int(os.environ.get("GKP_BENCH_THREADS", torch.get_num_threads()))
X1 = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = get_model("resnet56").eval()
    pruned = get_method("gkp-l2")(
        dense, PruneTarget(native={"rate": 0.4375, "groups": 8}), PruneContext(example_inputs=X1)
    ).model.eval()
    return {"dense": dense, "gkp-l2": pruned}


KNOBS = {"dense": None, "gkp-l2": {"rate": 0.4375, "groups": 8}}


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("variant", ["dense", "gkp-l2"])
def test_resnet56_cpu_latency(benchmark, models, variant, batch, memory_format):
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = models[variant].to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    torch.set_num_threads(THREADS)
    benchmark.group = f"resnet56 batch {batch} {memory_format}"
    benchmark.extra_info.update(
        model="resnet56",
        method=variant,
        config=bench_key(variant, None, KNOBS[variant]) if KNOBS[variant] else None,
        input_shape=list(X1.shape[1:]),
        batch=batch,
        memory_format=memory_format,
        threads=THREADS,
        macs=metrics.macs(model, X1),
        params=metrics.params(model),
        device="cpu",
        torch_version=torch.__version__,
    )
    with torch.inference_mode():
        out = benchmark.pedantic(model, args=(x,), rounds=20, warmup_rounds=3, iterations=1)
    assert out.shape == (batch, 10)

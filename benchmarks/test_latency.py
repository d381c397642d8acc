"""Latency suite: every registered method (and dense) x {ResNet-56 at 32x32, ResNet-50 at 224x224}
x backends x batch {1, 64 (16 for ResNet-50)}, untrained weights (latency does not depend on them).

    pytest --benchmark-only                         # the whole suite, from the project root
    pytest --benchmark-only -k "resnet56 and b1"    # a subset: any -k expression of the ids
    pytest --benchmark-only --benchmark-json out.json && gkp-bench bench --from-json out.json

Test ids read ``test_latency[<model>-<method>-<backend>-b<batch>]``. Every method is pruned at
the same MACs target (0.436, the GKP paper's ResNet-56 setting; GKP-family methods with G = 8).

Environment: ``GKP_BENCH_THREADS`` (default: all cores); ``GKP_BENCH_BACKENDS`` (comma list,
default ``eager,autotune,onnxruntime,openvino``; add ``fused``, ``compile``);
``GKP_BENCH_SECONDS`` (timing budget per benchmark, default 1: rounds = budget / one round, at
least 3, at most 30, and at least 6 where 6 fit in twice the budget:
:func:`benchmarks.latency.suite_rounds`); ``GKP_BENCH_CACHE`` (folder caching each pruned
structure, default ``~/.cache/gkp-bench/structures``; ``0`` prunes and tunes every time:
ResNet-50 with sr-gkp or tmi-gkp takes minutes, so the first run is the slow one). Beside each
structure a ``.tune.json`` keeps the tuning choices (autotune's per-layer backends, the runtimes'
network form) per backend, engine version, processor, batch shape and threads: a later run on the
same machine reuses them untimed (``backend_info["cached"]``) and only times the networks.

Each result carries model, method, config, backend, form, batch, threads, MACs, dense MACs and
the ideal speed-up in ``extra_info``; ``gkp-bench bench --from-json`` pairs each with dense on
the same backend, batch and threads. Protocol: eval(), inference_mode, warm-up, fixed thread
count, median and IQR over the rounds; compare ratios within one run only. ``speedup`` is the
ratio of the two medians; ``speedup_paired`` the median of the per-round speed-ups and
``speedup_low``, ``speedup_high`` its 95% interval (:func:`gkp.metrics.paired_speedup`; None under
6 rounds, as ResNet-50 at batch 16 gets with the default budget: raise ``GKP_BENCH_SECONDS``).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from benchmarks.backends import missing, prepare, structure_digest, version
from benchmarks.bench import (
    cached_untrained,
    load_tune_cache,
    save_tune_cache,
    suite_config,
    tune_cache_path,
)
from benchmarks.environment import cpu_name
from benchmarks.latency import paired_columns, suite_rounds
from gkp import metrics
from gkp.api import list_methods

THREADS = int(os.environ.get("GKP_BENCH_THREADS", torch.get_num_threads()))
BACKENDS = os.environ.get("GKP_BENCH_BACKENDS", "eager,autotune,onnxruntime,openvino").split(",")
SECONDS = float(os.environ.get("GKP_BENCH_SECONDS", "1"))
CACHE = os.environ.get("GKP_BENCH_CACHE", str(Path.home() / ".cache" / "gkp-bench" / "structures"))
TUNE_ROUNDS = 5  # per candidate when a backend chooses (autotune, network form): keeps it short
BATCHES = {"resnet56": (1, 64), "resnet50": (1, 16)}  # datasets and target: bench.suite_config
CASES = [
    pytest.param(model, method, backend, batch, id=f"{model}-{method}-{backend}-b{batch}")
    for model, batches in BATCHES.items()
    for method in list_methods()
    for backend in BACKENDS
    for batch in batches
]


@functools.lru_cache(maxsize=2)
def networks(model: str, method: str) -> tuple[torch.nn.Module, torch.nn.Module, dict, tuple]:
    """(dense, pruned at the suite's target, info, sample shape) for (model, method), untrained
    weights (:func:`benchmarks.bench.suite_config`)."""
    cfg = suite_config(model, method)
    cache = None if CACHE == "0" else Path(CACHE)
    dense, pruned, x = cached_untrained(cfg, cache)
    info = {"config": cfg.bench_key(), "macs": metrics.macs(pruned, x),
            "macs_dense": metrics.macs(dense, x),
            "tune_cache": tune_cache_path(cfg, cache),
            "dense_structure": structure_digest(dense)}  # fmt: skip
    return dense, pruned, info, tuple(x.shape[1:])


@functools.cache
def dense_on(model: str, backend: str, batch: int):
    """Dense prepared on the backend (the same for every method of a model: prepared once per
    model, backend and batch for the whole session; a few ONNX sessions stay in memory)."""
    dense, _, _, shape = networks(model, list_methods()[0])
    return prepare(backend, dense, torch.randn(batch, *shape), THREADS)


DENSE_SECONDS: dict[tuple[str, str, int], float] = {}  # last median of each prepared dense


@pytest.mark.parametrize("model,method,backend,batch", CASES)
def test_latency(benchmark, model, method, backend, batch):
    """One round = dense and pruned once each (order alternating), so both medians come from
    the same stretch of time; ``extra_info`` has both and the speed-up."""
    why = missing(backend)
    if why:
        pytest.skip(f"backend {backend}: {why}")
    _, pruned, info, shape = networks(model, method)
    x = torch.randn(batch, *shape)
    run_dense, dense_info = dense_on(model, backend, batch)
    tuned = load_tune_cache(info["tune_cache"])
    before = json.dumps(tuned, sort_keys=True)
    layout = dense_info.get("layout")  # masked dense races in dense's faster layout only
    run_pruned, picked = prepare(backend, pruned, x, THREADS, TUNE_ROUNDS, tuned, layout,
                                 info["dense_structure"])  # fmt: skip
    if layout is not None:
        picked["dense_layout"] = layout
    if json.dumps(tuned, sort_keys=True) != before:
        save_tune_cache(info["tune_cache"], tuned)
    torch.set_num_threads(THREADS)
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    order = [("dense", run_dense), ("pruned", run_pruned)]

    def one_round():
        order.reverse()
        for name, fn in order:
            t0 = time.perf_counter()
            out = fn(x)
            times[name].append(time.perf_counter() - t0)
        return out

    with torch.inference_mode():
        key = (model, backend, batch)
        if key in DENSE_SECONDS:  # dense is warm from an earlier test: warm up pruned alone
            t0 = time.perf_counter()
            run_pruned(x)
            once = DENSE_SECONDS[key] + time.perf_counter() - t0
        else:
            one_round()  # warm-up, and the cost of one round
            once = times["dense"].pop() + times["pruned"].pop()
        rounds = suite_rounds(SECONDS, once)
        out = benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    dense_ms, pruned_ms = (statistics.median(times[k][-rounds:]) * 1e3 for k in times)
    DENSE_SECONDS[key] = dense_ms / 1e3
    benchmark.group = f"{model} {backend} batch {batch}"
    benchmark.extra_info.update(
        model=model, method=method, config=info["config"], backend=backend,
        form=picked.pop("form"), backend_info=picked, input_shape=list(shape), batch=batch,
        threads=THREADS, macs=info["macs"], macs_dense=info["macs_dense"],
        ideal=info["macs_dense"] / info["macs"], device="cpu", engine=version(backend),
        interleaved=True, rounds=rounds, dense_ms=dense_ms, pruned_ms=pruned_ms,
        dense_iqr_ms=_iqr(times["dense"][-rounds:]), pruned_iqr_ms=_iqr(times["pruned"][-rounds:]),
        speedup=dense_ms / pruned_ms, cpu_name=cpu_name(),
        **paired_columns(times["dense"][-rounds:], times["pruned"][-rounds:]),
    )  # fmt: skip
    assert tuple(out.shape)[0] == batch


def _iqr(seconds: list[float]) -> float:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return (q[2] - q[0]) * 1e3


def test_every_registered_method_is_in_the_suite():
    assert {c.values[1] for c in CASES} == set(list_methods())

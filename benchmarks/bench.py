"""Latency of dense vs pruned networks, as ratios measured in one run.

Latency needs no trained weights, so ``bench_untrained`` prunes a freshly initialised model
(methods that calibrate on data get seeded random batches: only the structure is timed).
The JSON that ``pytest benchmarks --benchmark-only --benchmark-json FILE`` writes is read by
``benchmarks.measure.bench_from_json`` (pure JSON handling, re-exported here).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.latency import paired_columns
from benchmarks.measure import bench_from_json, timed_forms
from benchmarks.runner import RunConfig, fresh_model
from gkp import metrics
from gkp.api import PruneContext, PruneTarget, get_method
from gkp.checkpoint import CheckpointError, load_checkpoint, rebuild, save_checkpoint, structure_of
from gkp.data import example_input, random_calibration
from gkp.fsio import atomic_write_bytes
from gkp.masked import deploy_form


def prune_untrained(cfg: RunConfig) -> tuple[nn.Module, nn.Module, Tensor]:
    """(dense, pruned, one example input) for ``cfg`` with freshly initialised weights; pruned
    in the form that is deployed (:func:`gkp.masked.deploy_form`: a masked conv becomes a plain
    conv with the zeros in its weights, as the pipeline times it)."""
    dense = fresh_model(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x = example_input(cfg.dataset, 1)
        result = get_method(cfg.method)(
            dense,
            PruneTarget(cfg.target, dict(cfg.native)),
            PruneContext(
                example_inputs=x,
                calib_batches=random_calibration(x.shape[1:], seed=cfg.seed),
                teacher=dense,
                seed=cfg.seed,
                progress=cfg.progress,
                snapshots=_snapshots(dense, cfg.seed, folder)
                if "snapshots" in get_method(cfg.method).info.needs
                else (),
            ),
        )
    return dense, deploy_form(result.model).eval(), x


def _snapshots(dense: nn.Module, seed: int, folder: Path, count: int = 4) -> tuple[Path, ...]:
    """Stand-in training snapshots for an untrained network (TMI-GKP's input): the initial
    weights plus growing seeded noise. Only the pruned *structure* is used (latency)."""
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        state = {k: v + 0.05 * (i + 1) * torch.randn(v.shape, generator=gen) * v.std()
                 if v.is_floating_point() and v.numel() > 1 else v
                 for k, v in dense.state_dict().items()}  # fmt: skip
        paths.append(folder / f"snapshot_{i}.pt")
        torch.save(state, paths[-1])
    return tuple(paths)


def _structure_key(cfg: RunConfig) -> str:
    """What decides a pruned structure: model, dataset, seed, configuration, method source."""
    method = get_method(cfg.method)
    source = inspect.getsourcefile(inspect.unwrap(method.fn)) or ""
    code = Path(source).read_bytes() if source and Path(source).exists() else b""
    key = json.dumps([cfg.model, cfg.dataset, cfg.seed, cfg.bench_key()], sort_keys=True)
    return hashlib.sha256(key.encode() + hashlib.sha256(code).digest()).hexdigest()[:16]


def cached_untrained(cfg: RunConfig, cache: Path | None) -> tuple[nn.Module, nn.Module, Tensor]:
    """:func:`prune_untrained`, with the pruned structure cached in ``cache`` (None: no cache).

    Latency depends on the structure only, so a cached structure applied to a fresh model times
    the same network without pruning again (ResNet-50 with sr-gkp or tmi-gkp takes minutes).
    The key covers the model, dataset, seed, method configuration and the method's source file;
    an unreadable cache file is ignored and rewritten.
    """
    if cache is None:
        return prune_untrained(cfg)
    path = cache / f"{cfg.model}-{cfg.method}-{_structure_key(cfg)}.pt"
    if path.exists():
        try:
            structure = load_checkpoint(path, kind="structure")["structure"]
            dense = fresh_model(cfg).eval()
            pruned = rebuild(copy.deepcopy(dense), structure, str(path))
            return dense, deploy_form(pruned).eval(), example_input(cfg.dataset, 1)
        except CheckpointError:
            pass
    dense, pruned, x = prune_untrained(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"kind": "structure", "structure": structure_of(pruned)})
    return dense, pruned, x


def tune_cache_path(cfg: RunConfig, cache: Path | None) -> Path | None:
    """Where the tuning choices (per-layer autotune, runtime network form) of ``cfg``'s cached
    structure live: a JSON file beside it (None without a cache)."""
    return (
        None
        if cache is None
        else cache / f"{cfg.model}-{cfg.method}-{_structure_key(cfg)}.tune.json"
    )


def load_tune_cache(path: Path | None) -> dict[str, Any]:
    """The choices saved at ``path`` ({} when there is none, or it is unreadable: re-tuned)."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_tune_cache(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


# The latency suite's networks (benchmarks/test_latency.py): each model on its dataset's input,
# every method at the GKP paper's ResNet-56 MACs target, GKP-family methods with G = 8
SUITE_DATASETS = {"resnet56": "synthetic", "resnet50": "imagenet"}
SUITE_TARGET = 0.436


def suite_config(model: str, method: str) -> RunConfig:
    """The latency suite's configuration of ``method`` on ``model`` (:data:`SUITE_DATASETS`)."""
    native = {"groups": 8} if method.startswith(("gkp", "tmi-gkp", "sr-gkp")) else {}
    return RunConfig(model=model, dataset=SUITE_DATASETS[model], method=method,
                     target=SUITE_TARGET, native=native, progress=False)  # fmt: skip


def suite_autotune_pair(
    model: str,
    method: str,
    batch: int,
    threads: int,
    cache: Path | None,
    rate: float | None = None,
) -> tuple[Tensor, Any, Any, dict[str, Any]]:
    """``(x, dense, pruned, pruned_info)``: the suite's dense and ``method`` networks prepared on
    the ``autotune`` backend for a random batch ``x`` of ``batch``, as the suite prepares them
    (the structure and tuning choices from ``cache``, as ``GKP_BENCH_CACHE``; new choices saved
    there), for the scripts that look into the suite's timings. ``rate``: the method's native
    pruning rate instead of the suite's MACs target (as ``gkp-bench bench --rate``)."""
    from benchmarks.backends import prepare, structure_digest

    cfg = suite_config(model, method)
    if rate is not None:
        cfg = dataclasses.replace(cfg, target=None, native={**cfg.native, "rate": rate})
    dense, pruned, x = cached_untrained(cfg, cache)
    x = torch.randn(batch, *x.shape[1:])
    run_dense, info = prepare("autotune", dense, x, threads)
    path = tune_cache_path(cfg, cache)
    tuned = load_tune_cache(path)
    run_pruned, picked = prepare("autotune", pruned, x, threads, 5, tuned, info.get("layout"),
                                 structure_digest(dense))  # fmt: skip
    save_tune_cache(path, tuned)
    return x, run_dense, run_pruned, picked


def suite_pair_arguments(parser: Any, model: str, batch: int) -> None:
    """``--model``, ``--batch``, ``--threads`` and ``--method`` on ``parser`` (an argparse
    parser): what :func:`suite_pair_from` needs, for the scripts that time a suite pair."""
    parser.add_argument("--model", default=model, choices=["resnet50", "resnet56"])
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="gkp-l2")
    parser.add_argument(
        "--rate", type=float, default=None,
        help="the method's native pruning rate (default: the suite's MACs target)",
    )  # fmt: skip


def suite_cache() -> Path | None:
    """The suite's cache folder as the scripts take it, ``GKP_BENCH_CACHE`` (unset or ``0``:
    none)."""
    env = os.environ.get("GKP_BENCH_CACHE")
    return Path(env) if env and env != "0" else None


def suite_pair_from(args: Any) -> tuple[Tensor, Any, Any, dict[str, Any]]:
    """:func:`suite_autotune_pair` for parsed :func:`suite_pair_arguments`, on ``args.threads``
    threads, with :func:`suite_cache`."""
    torch.set_num_threads(args.threads)
    return suite_autotune_pair(
        args.model, args.method, args.batch, args.threads, suite_cache(), args.rate
    )


def bench_backends(cfg: RunConfig) -> list[dict[str, Any]]:
    """Long-format latency rows (``results/latency.csv``) of the untrained pruned network on
    ``cfg.backends`` at batch 1 and ``cfg.bench_batch``."""
    from benchmarks.latency import untrained_run_id
    from benchmarks.runner import backend_latency

    dense, pruned, x = prune_untrained(cfg)
    rid = untrained_run_id(cfg.model, cfg.bench_key(), x.shape[1:])
    return backend_latency(cfg, dense, pruned, x.shape[1:], rid)


def bench_untrained(cfg: RunConfig) -> list[dict[str, Any]]:
    dense, pruned, x = prune_untrained(cfg)
    macs_dense, macs = metrics.macs(dense, x), metrics.macs(pruned, x)
    threads = cfg.threads or torch.get_num_threads()
    rows = []
    for batch in (1, cfg.bench_batch):
        xb = torch.randn(batch, *x.shape[1:], device=cfg.torch_device)
        fns, picked = timed_forms(dense, pruned, cfg.deploy, xb, threads)
        stats = metrics.time_interleaved(
            fns, xb, rounds=cfg.bench_rounds, warmup=5, threads=threads
        )
        d, p = stats["dense"], stats["pruned"]
        rows.append(
            {
                "model": cfg.model,
                "dataset": cfg.dataset,
                "method": cfg.method,
                "config": cfg.bench_key(),
                "batch": batch,
                "dense_ms": d.median_ms,
                "pruned_ms": p.median_ms,
                "dense_iqr_ms": d.iqr_ms,
                "pruned_iqr_ms": p.iqr_ms,
                "speedup": d.median_ms / p.median_ms,
                **paired_columns(d.times_ms, p.times_ms),
                "macs_dense": macs_dense,
                "macs": macs,
                "ideal": macs_dense / macs,
                "fraction_of_ideal": d.median_ms / p.median_ms / (macs_dense / macs),
                "deploy": cfg.deploy,
                "deploy_choices": picked,
                "threads": p.threads,
                "device": p.device,
                "rounds": p.rounds,
            }
        )
    return rows


__all__ = ["bench_from_json", "bench_untrained"]

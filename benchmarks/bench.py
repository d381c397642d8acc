"""Latency of dense vs pruned networks, as ratios measured in one run.

Latency needs no trained weights, so ``bench_untrained`` prunes a freshly initialised model.
``bench_from_json`` reads the JSON that ``pytest benchmarks --benchmark-only
--benchmark-json FILE`` writes and turns it into the same dense-vs-pruned ratios.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.runner import RunConfig, _fresh_model
from gkp import metrics
from gkp.api import PruneContext, PruneTarget, get_method
from gkp.data import example_input


def bench_untrained(cfg: RunConfig) -> list[dict[str, Any]]:
    dense = _fresh_model(cfg).eval()
    x = example_input(cfg.dataset, 1)
    result = get_method(cfg.method)(
        dense,
        PruneTarget(cfg.target, dict(cfg.native)),
        PruneContext(example_inputs=x, seed=cfg.seed),
    )
    rows = []
    for batch in (1, cfg.bench_batch):
        stats = metrics.compare_latency(
            {"dense": dense, "pruned": result.model},
            (batch, *x.shape[1:]),
            rounds=cfg.bench_rounds,
            device=cfg.torch_device,
            threads=cfg.threads,
        )
        d, p = stats["dense"], stats["pruned"]
        rows.append(
            {
                "model": cfg.model,
                "dataset": cfg.dataset,
                "method": cfg.method,
                "batch": batch,
                "dense_ms": d.median_ms,
                "pruned_ms": p.median_ms,
                "dense_iqr_ms": d.iqr_ms,
                "pruned_iqr_ms": p.iqr_ms,
                "speedup": d.median_ms / p.median_ms,
                "threads": p.threads,
                "device": p.device,
                "rounds": p.rounds,
            }
        )
    return rows


def bench_from_json(path: Path) -> list[dict[str, Any]]:
    """Dense-vs-method ratios from a pytest-benchmark JSON file (medians, same run)."""
    try:
        data = json.loads(Path(path).read_text())
        entries = data["benchmarks"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a pytest-benchmark JSON file ({err}); create one with "
            "`pytest benchmarks --benchmark-only --benchmark-json FILE`"
        ) from err
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in entries:
        info = b.get("extra_info", {})
        if "method" not in info:
            continue
        key = (info["model"], info["batch"], info.get("memory_format", "nchw"))
        groups[key][info["method"]] = {
            "median": b["stats"]["median"] * 1e3,
            "iqr": b["stats"]["iqr"] * 1e3,
            **info,
        }
    rows = []
    for (model, batch, fmt), by_method in sorted(groups.items()):
        dense = by_method.get("dense")
        for method, m in sorted(by_method.items()):
            if method == "dense" or dense is None:
                continue
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "batch": batch,
                    "memory_format": fmt,
                    "dense_ms": dense["median"],
                    "pruned_ms": m["median"],
                    "pruned_iqr_ms": m["iqr"],
                    "speedup": dense["median"] / m["median"],
                    "threads": m.get("threads"),
                    "macs": m.get("macs"),
                    "params": m.get("params"),
                }
            )
    return rows


def latency_columns_from_json(path: Path, model: str, method: str) -> dict[str, Any]:
    """The leaderboard's latency columns for ``model``/``method`` from a pytest-benchmark JSON.

    Batch 1 fills the ``b1`` columns and the largest other batch the ``bN`` ones (NCHW rows);
    speed-ups are dense / pruned medians of the same benchmark run.
    """
    rows = [
        r
        for r in bench_from_json(path)
        if r["model"] == model and r["method"] == method and r["memory_format"] == "nchw"
    ]
    by_batch = {r["batch"]: r for r in rows}
    if 1 not in by_batch or len(by_batch) < 2:
        raise ValueError(
            f"{path} has no batch-1 and throughput timings of {method} on {model}; "
            "run `pytest benchmarks --benchmark-only --benchmark-json FILE` for them"
        )
    big = max(by_batch)
    cols: dict[str, Any] = {"device": "cpu", "bench_batch": big, "threads": by_batch[1]["threads"]}
    for tag, r in (("b1", by_batch[1]), ("bN", by_batch[big])):
        cols.update(
            {
                f"latency_{tag}_ms": r["pruned_ms"],
                f"latency_{tag}_iqr_ms": r["pruned_iqr_ms"],
                f"latency_{tag}_dense_ms": r["dense_ms"],
                f"speedup_{tag}": r["speedup"],
            }
        )
    return cols

"""Leaderboard columns measured from models: sizes (MACs, params) and latency vs dense."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gkp import metrics


def _pct(dense: float, pruned: float) -> float:
    return 100.0 * (1.0 - pruned / dense)


def size_columns(dense: nn.Module, pruned: nn.Module, x: torch.Tensor) -> dict[str, float | int]:
    """MACs (conv + linear; + BN), params and non-zero counts of both models on input ``x``."""
    cols: dict[str, float | int] = {}
    for key, fn in (("macs", metrics.macs), ("macs_bn", metrics.macs_bn)):
        d, p = fn(dense, x), fn(pruned, x)
        cols.update({f"{key}_dense": d, key: p, f"{key}_reduction_pct": _pct(d, p)})
    d, p = metrics.params(dense), metrics.params(pruned)
    cols.update(params_dense=d, params=p, params_reduction_pct=_pct(d, p))
    cols["macs_nonzero"] = metrics.macs_nonzero(pruned, x)
    cols["params_nonzero"] = metrics.params_nonzero(pruned)
    return cols


def latency_columns(
    dense: nn.Module,
    pruned: nn.Module,
    sample_shape: Sequence[int],
    batch: int,
    rounds: int,
    device: torch.device,
    threads: int | None = None,
) -> dict[str, float | int | str]:
    """Median/IQR latency of pruned and dense at batch 1 and ``batch``, timed in one run."""
    cols: dict[str, float | int | str] = {"device": device.type, "bench_batch": batch}
    for tag, b in (("b1", 1), ("bN", batch)):
        stats = metrics.compare_latency(
            {"dense": dense, "pruned": pruned},
            (b, *sample_shape),
            rounds=rounds,
            device=device,
            threads=threads,
        )
        cols["threads"] = stats["pruned"].threads
        cols[f"latency_{tag}_ms"] = stats["pruned"].median_ms
        cols[f"latency_{tag}_iqr_ms"] = stats["pruned"].iqr_ms
        cols[f"latency_{tag}_dense_ms"] = stats["dense"].median_ms
        cols[f"speedup_{tag}"] = stats["dense"].median_ms / stats["pruned"].median_ms
    return cols

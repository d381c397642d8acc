"""The main job: one dense baseline, several methods at one MACs target and one fine-tuning budget.

``gkp-bench run`` with no arguments compares one method per granularity (weight, kernel, grouped
kernel = TMI-GKP, filter = L1, channel = BN scale) and the grouped-kernel and filter random
controls, each pruned to the same fraction of the target layers' MACs (``DEFAULT_TARGET``, the
MACs TMI-GKP removes at the paper's G = 8, p = 0.4375) and fine-tuned with the same recipe.
``--methods all`` runs the whole registry, ``--methods a,b`` a list.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.runconfig import RunConfig
from gkp.api import get_method, list_methods
from gkp.errors import UsageError

DEFAULT_METHODS = (
    "weight-magnitude",
    "kernel-l2",
    "tmi-gkp",
    "filter-l1",
    "channel-bn",
    "gkp-random",
    "filter-random",
)
DEFAULT_TARGET = 0.436  # resnet20: TMI-GKP at G = 8, p = 0.4375 removes 43.6% of the target MACs


def method_list(text: str | None, single: str | None = None) -> list[str]:
    """Canonical method names from ``--methods`` ("all", "a,b,c") or ``--method`` (one name)."""
    if text is None:
        return (
            [get_method(single).name] if single else [get_method(m).name for m in DEFAULT_METHODS]
        )
    if text.strip().lower() == "all":
        return list_methods()
    names = [n for n in (part.strip() for part in text.split(",")) if n]
    if not names:
        raise UsageError("--methods is empty; give 'all' or a comma-separated list of methods")
    canonical = [get_method(n).name for n in names]
    if len(set(canonical)) != len(canonical):
        raise UsageError(f"--methods {text!r} names a method twice")
    return canonical


def per_method(cfg: RunConfig, methods: Sequence[str]) -> list[RunConfig]:
    """One config per method; without ``--target`` or native knobs, the common default target."""
    target = cfg.target
    if target is None and not cfg.native:
        target = DEFAULT_TARGET
    return [dataclasses.replace(cfg, method=m, target=target) for m in methods]


def run_all(
    cfgs: Sequence[RunConfig],
    prune: Callable[[RunConfig], dict[str, Any]],
    record: Callable[[RunConfig, dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Prune, fine-tune and record each configuration in turn (each resumable on its own)."""
    rows = []
    for i, c in enumerate(cfgs, 1):
        if c.progress:
            print(f"[{i}/{len(cfgs)}] {c.method} at target {c.target}", file=sys.stderr, flush=True)
        rows.append(record(c, prune(c)))
    return rows


def _num(value: Any, fmt: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else format(v, fmt)


def macs_removed(row: dict[str, Any]) -> tuple[float, bool]:
    """Percent of MACs removed and whether the row is masked (then: non-zero MACs removed)."""
    masked = float(row["macs_nonzero"]) < float(row["macs"])
    if masked:
        return 100.0 * (1.0 - float(row["macs_nonzero"]) / float(row["macs_dense"])), True
    return float(row["macs_reduction_pct"]), False


def comparison_text(rows: Sequence[dict[str, Any]]) -> str:
    """The table the main job prints: one line per method."""
    head = ("method", "granularity", "MACs -%", "top-1 pruned", "top-1 tuned", "Δ vs dense")
    batch = next((r.get("bench_batch") for r in rows if r.get("bench_batch")), "N")
    head += ("speed-up b1", f"speed-up b{batch}")
    lines = [head]
    for r in rows:
        removed, masked = macs_removed(r)
        delta = float(r["top1"]) - float(r["top1_dense"])
        lines.append(
            (
                str(r["method"]),
                str(r["granularity"]),
                _num(removed, ".1f") + (" (masked)" if masked else ""),
                _num(r["top1_pruned_before_ft"], ".2f"),
                _num(r["top1"], ".2f"),
                f"{delta:+.2f}",
                "x" + _num(r["speedup_b1"], ".2f"),
                "x" + _num(r["speedup_bN"], ".2f"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    dense = rows[0]["top1_dense"] if rows else None
    footer = f"dense top-1 {_num(dense, '.2f')}%; masked rows: non-zero MACs, no dense speed-up"
    return "\n".join([*text, footer])

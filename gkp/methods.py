"""TMI-GKP (Zhong et al., ICLR 2022) and SR-GKP (Zhong et al., NeurIPS 2023), as METHODS.md says.

Both are one-shot grouped kernel pruning: per target layer, split the filters into ``G`` equal
groups, keep ``n_keep`` grouped kernels per group, deploy as one dense grouped convolution.

- TMI-GKP groups with the lottery vote between three clusterings (K-PCA, spectral, t-SNE ×
  DBSCAN), scored on the baseline's training snapshots, and selects with greedy dispersion chains
  (``cost = inner − λ·outer``, ``e = floor(0.2·n_keep)``; ``e = 0`` drops the outer term).
- SR-GKP is data-free: smoothness snaking groups, beam-search selection (width 2, re-rank every 3
  by ``0.9·rank(cost) + 0.1·rank(roughness)``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.grouping import kernel_roughness, smoothness_snake, tmi_candidates
from gkp.nn import GroupPlan
from gkp.planning import GKP_DEFAULTS, LayerJob, grouped_check, prune_grouped, resolve_knobs
from gkp.selection import beam_select, greedy_select, grouped_kernels
from gkp.tmi import ticket_scores, vote

TMI_DEFAULTS = {
    **GKP_DEFAULTS,
    "cost_balancer": "auto",
    "snapshot_window": None,
    "equal_size": "exact",  # "heuristic": the original's greedy same-size k-means
}
SR_DEFAULTS = {**GKP_DEFAULTS, "cost_balancer": "auto", "beam_width": 2, "rerank_every": 3}


def _groups(labels: np.ndarray, n_groups: int) -> list[np.ndarray]:
    return [np.flatnonzero(labels == g) for g in range(n_groups)]


def tmi_plan_layer(job: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
    """TMI-GKP steps B–D for one layer: candidates, the lottery vote, greedy selection."""
    w = job.weight
    candidates, failures = tmi_candidates(
        w.reshape(w.shape[0], -1), job.n_groups, seed=job.seed, kmeans=job.knobs["equal_size"]
    )
    if not candidates:
        raise RuntimeError(f"{job.name}: every clustering candidate failed: {failures}")
    winner, votes = vote(candidates, ticket_scores(w, job.history), job.n_groups)
    kept, costs = [], []
    for filters in _groups(candidates[winner], job.n_groups):
        k, info = greedy_select(grouped_kernels(w, filters), job.n_keep, job.knobs["cost_balancer"])
        kept.append(k)
        costs.append(info)
    info = {
        "grouping": winner,
        "dropped_candidates": failures,
        "vote": {"counts": votes["counts"], "tie_break": votes["tie_break"]},
        "e": costs[0]["e"],
        "lambda": costs[0]["lambda"],
        "outer_term_dropped": costs[0]["outer_term_dropped"],
    }
    return GroupPlan.from_labels(candidates[winner], kept), info


def _epoch(path: Path) -> int | None:
    m = re.search(r"epoch_(\d+)", Path(path).stem)
    return int(m.group(1)) if m else None


def select_snapshots(ctx: PruneContext, window: Any) -> PruneContext:
    """Keep the snapshots whose file-name epoch lies in ``window`` = (first, last), inclusive."""
    if window is None:
        return ctx
    lo, hi = (int(v) for v in window)
    kept = [p for p in ctx.snapshots if (e := _epoch(p)) is not None and lo <= e <= hi]
    return dataclasses.replace(ctx, snapshots=tuple(sorted(kept, key=_epoch)))


@register_method(
    MethodInfo(
        name="tmi-gkp",
        granularity=Granularity.GROUPED_KERNEL,
        faithfulness="faithful",
        reference="Zhong et al., ICLR 2022",
        description="TMI-GKP: lottery vote over K-PCA/spectral/DBSCAN groupings, greedy chains",
        color="#d62728",
        needs=frozenset({"snapshots"}),
        native_knobs=tuple(TMI_DEFAULTS),
    ),
    check=grouped_check(TMI_DEFAULTS),
)
def tmi_gkp(model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    window = resolve_knobs(target, TMI_DEFAULTS)["snapshot_window"]
    ctx = select_snapshots(ctx, window)
    if not ctx.snapshots:
        raise ValueError(
            "tmi-gkp needs training snapshots (PruneContext.snapshots"
            + (f" within epochs {window}" if window else "")
            + "); `gkp-bench train` records them in the recipe's window"
        )
    result = prune_grouped(model, target, ctx, tmi_plan_layer, TMI_DEFAULTS, with_history=True)
    result.info["snapshots"] = [Path(p).name for p in ctx.snapshots]
    return result


def sr_plan_layer(job: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
    """SR-GKP for one layer: smoothness snaking, then beam search per group."""
    w = job.weight
    labels = smoothness_snake(w, job.n_groups)
    kept, infos = [], []
    for filters in _groups(labels, job.n_groups):
        rough = kernel_roughness(w[filters]).sum(axis=0)  # grouped-kernel roughness, per channel
        k, info = beam_select(
            grouped_kernels(w, filters), job.n_keep, rough,
            width=int(job.knobs["beam_width"]), rerank_every=int(job.knobs["rerank_every"]),
            cost_balancer=job.knobs["cost_balancer"],
        )  # fmt: skip
        kept.append(k)
        infos.append(info)
    summary = {key: infos[0][key] for key in ("e", "lambda", "width", "rerank_every")}
    return GroupPlan.from_labels(labels, kept), {**summary, "cost": [i["cost"] for i in infos]}


@register_method(
    MethodInfo(
        name="sr-gkp",
        granularity=Granularity.GROUPED_KERNEL,
        faithfulness="faithful",
        reference="Zhong et al., NeurIPS 2023",
        description="SR-GKP: smoothness snaking groups, beam-search grouped-kernel selection",
        color="#9467bd",
        native_knobs=tuple(SR_DEFAULTS),
    ),
    check=grouped_check(SR_DEFAULTS),
)
def sr_gkp(model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_grouped(model, target, ctx, sr_plan_layer, SR_DEFAULTS)

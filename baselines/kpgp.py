"""[3] KPGP (Zhang et al., Applied Intelligence 2022) — RECONSTRUCTED.

Known from the abstract: filters are reduced with kernel PCA, clustered nonlinearly into groups,
each group is pruned, and the layer becomes a grouped convolution in which every group keeps the
same number of input channels. The kernel, clustering, importance score and recipe are not public.
METHODS.md's reconstruction (the path the co-author's GKP code has), built from the shared blocks:

* grouping: TMI-GKP's K-PCA candidate (``gkp.grouping.kpca_candidate``: kernel
  ``0.5·(F Fᵀ)∘² + 0.5·RBF``, every non-zero component, equal-size k-means into ``G`` groups);
* selection: per group the ``n_keep`` grouped kernels of largest L2 norm
  (``gkp.selection.l2_select``);
* the shared deploy form, then the common fine-tuning.

If kernel PCA fails numerically on a layer the run stops with the layer's name (there is no
other candidate to fall back on, and silently substituting one would change the method).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.grouping import CandidateFailed, kpca_candidate
from gkp.nn import GroupPlan
from gkp.planning import GKP_DEFAULTS, LayerJob, grouped_check, prune_grouped
from gkp.selection import grouped_kernels, l2_select

INFO = MethodInfo(
    name="kpgp",
    granularity=Granularity.GROUPED_KERNEL,
    faithfulness="reconstructed",
    reference="Zhang et al., Applied Intelligence 2022 (reconstructed)",
    description="RECONSTRUCTED KPGP: K-PCA equal-size grouping, largest-L2 grouped kernels",
    color="#637939",
    native_knobs=tuple(GKP_DEFAULTS),
)


def plan_layer(job: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
    w = job.weight
    found: dict[str, Any] = {}
    try:
        labels = kpca_candidate(w.reshape(w.shape[0], -1), job.n_groups, seed=job.seed, info=found)
    except CandidateFailed as err:
        raise RuntimeError(f"kpgp: kernel PCA grouping failed on {job.name}: {err}") from err
    kept = [
        l2_select(grouped_kernels(w, np.flatnonzero(labels == g)), job.n_keep)
        for g in range(job.n_groups)
    ]
    return GroupPlan.from_labels(labels, kept), {"kpca_components": found.get("n_components")}


@register_method(INFO, check=grouped_check(GKP_DEFAULTS))
def kpgp(model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_grouped(model, target, ctx, plan_layer, GKP_DEFAULTS)

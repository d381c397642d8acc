"""gkp-l2: the simplest grouped-kernel method, built only from the shared pieces.

Equal-size k-means on the flattened filters, then in each group keep the ``n_keep`` grouped
kernels with the largest L2 norm. A variant (no paper specifies exactly this); it isolates what
GKP's grouping and selection criteria add over magnitude.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.grouping import equal_size_kmeans
from gkp.nn import GroupPlan
from gkp.planning import GKP_DEFAULTS, LayerJob, grouped_check, prune_grouped
from gkp.selection import grouped_kernels, l2_select

INFO = MethodInfo(
    name="gkp-l2",
    granularity=Granularity.GROUPED_KERNEL,
    faithfulness="variant",
    reference="variant of Zhong et al., ICLR 2022",
    description=(
        "equal-size k-means on flattened filters; per group keep the largest-L2 grouped kernels"
    ),
    color="#1f77b4",
    native_knobs=("rate", "groups", "all_bottleneck_convs"),
)


def plan_layer(job: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
    w = job.weight
    labels = equal_size_kmeans(w.reshape(w.shape[0], -1), job.n_groups, seed=job.seed)
    kept = [
        l2_select(grouped_kernels(w, np.flatnonzero(labels == g)), job.n_keep)
        for g in range(job.n_groups)
    ]
    return GroupPlan.from_labels(labels, kept), {}


@register_method(INFO, check=grouped_check(GKP_DEFAULTS))
def gkp_l2(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_grouped(model, target, ctx, plan_layer, GKP_DEFAULTS)

"""gkp-random: the control for every grouped-kernel method.

Random equal groups and random kept sets with exactly the shapes a GKP method would produce
(same ``groups``, same ``n_keep`` per layer). A grouping or selection criterion that does not
beat this at the same MACs has not shown anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.nn import GroupPlan
from gkp.planning import GKP_DEFAULTS, LayerJob, grouped_check, prune_grouped

INFO = MethodInfo(
    name="gkp-random",
    granularity=Granularity.GROUPED_KERNEL,
    faithfulness="baseline",
    reference="random control (METHODS.md, granularity baselines)",
    description="random equal filter groups, random kept grouped kernels: the control",
    color="#7f7f7f",
    native_knobs=tuple(GKP_DEFAULTS),
)


def plan_layer(job: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
    rng = np.random.default_rng(job.seed)
    c_out, c_in = job.weight.shape[:2]
    labels = rng.permutation(np.arange(c_out) % job.n_groups)
    kept = [np.sort(rng.choice(c_in, job.n_keep, replace=False)) for _ in range(job.n_groups)]
    return GroupPlan.from_labels(labels, kept), {}


@register_method(INFO, check=grouped_check(GKP_DEFAULTS))
def gkp_random(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_grouped(model, target, ctx, plan_layer, GKP_DEFAULTS)

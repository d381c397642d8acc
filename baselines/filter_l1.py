"""filter-l1: L1-norm filter pruning (Li et al., ICLR 2017), physically removing filters.

In each prunable conv (residual-safe, see :mod:`gkp.structured`) remove the filters of smallest
L1 norm ``sum |W[o]|`` (ties: lower index first), with the matching BN channels and consumer
input channels, through torch-pruning's dependency graph. Per-layer counts: one uniform fraction
of each layer's filters, rounded per layer, then greedy ±1 corrections until the removed MACs of
the target layers are closest to the target (:func:`gkp.structured.filter_counts`). Li et al.
chose per-layer rates by sensitivity analysis; a uniform rate meeting a common MACs target is
the comparison this benchmark needs, and their criterion is kept exactly.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.structured import STRUCTURED_DEFAULTS, per_layer, prune_structured, structured_check

INFO = MethodInfo(
    name="filter-l1",
    granularity=Granularity.FILTER,
    faithfulness="faithful",
    reference="Li et al., ICLR 2017 (L1-norm filter pruning)",
    description="per layer remove the smallest-L1 filters and the matching input channels",
    color="#2ca02c",
    native_knobs=tuple(STRUCTURED_DEFAULTS),
)


def l1_score(weight: Tensor, _rng: np.random.Generator) -> Tensor:
    """Each filter's L1 norm; the smallest go."""
    return weight.abs().sum(dim=tuple(range(1, weight.dim())))


@register_method(INFO, check=structured_check(STRUCTURED_DEFAULTS))
def filter_l1(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_structured(model, target, ctx, per_layer(l1_score), STRUCTURED_DEFAULTS)

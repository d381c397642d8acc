"""filter-random: the control for filter pruning.

Random filters (generator seeded by ``(ctx.seed, layer index)``) with exactly filter-l1's
per-layer counts, removed the same residual-safe way (:mod:`gkp.structured`). A filter criterion
that does not beat this at the same MACs has not shown anything.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.structured import STRUCTURED_DEFAULTS, per_layer, prune_structured, structured_check

INFO = MethodInfo(
    name="filter-random",
    granularity=Granularity.FILTER,
    faithfulness="baseline",
    reference="random filter control",
    description="random filters with filter-l1's per-layer counts: the control",
    color="#ff7f0e",
    native_knobs=tuple(STRUCTURED_DEFAULTS),
)


def random_score(weight: Tensor, rng: np.random.Generator) -> Tensor:
    """A random permutation of the filters' ranks; the lowest go."""
    return torch.from_numpy(rng.permutation(weight.shape[0]))


@register_method(INFO, check=structured_check(STRUCTURED_DEFAULTS))
def filter_random(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_structured(model, target, ctx, per_layer(random_score), STRUCTURED_DEFAULTS)

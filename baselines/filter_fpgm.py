"""filter-fpgm: filter pruning via geometric median (He et al., CVPR 2019), physically.

In each prunable conv (residual-safe, see :mod:`gkp.structured`) remove the filters nearest the
geometric median of the layer's filters, i.e. those with the smallest sum of Euclidean distances
to the layer's other filters (the paper's approximation; ties: lower index first): they are the
most replaceable by the rest. Per-layer counts as filter-l1 (uniform fraction, per-layer
rounding, greedy correction to the MACs target). The paper's soft pruning schedule during
training is not used here: filters are removed once, then the runner fine-tunes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.structured import STRUCTURED_DEFAULTS, per_layer, prune_structured, structured_check

INFO = MethodInfo(
    name="filter-fpgm",
    granularity=Granularity.FILTER,
    faithfulness="faithful",
    reference="He et al., CVPR 2019 (FPGM)",
    description="per layer remove the filters nearest the geometric median of the layer's filters",
    color="#17becf",
    native_knobs=tuple(STRUCTURED_DEFAULTS),
)


def fpgm_score(weight: Tensor, _rng: np.random.Generator) -> Tensor:
    """Each filter's summed Euclidean distance to the layer's other filters; the smallest go."""
    flat = weight.reshape(weight.shape[0], -1)
    return torch.cdist(flat, flat).sum(dim=1)


@register_method(INFO, check=structured_check(STRUCTURED_DEFAULTS))
def filter_fpgm(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_structured(model, target, ctx, per_layer(fpgm_score), STRUCTURED_DEFAULTS)

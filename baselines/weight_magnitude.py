"""weight-magnitude: unstructured global magnitude pruning of the target convs' weights.

Han et al., NeurIPS 2015 (global magnitude): rank every weight of every target conv by |w| in
one global list and zero the smallest until the removed MACs reach the target. A weight of conv
``n`` costs ``H_out * W_out`` MACs per image, so the stop counts MACs, not weights: the first
prefix of the ranking whose summed cost reaches ``fraction * (target layers' MACs)`` (it
overshoots by less than one weight's cost). Ties in |w| go by layer order, then weight index.
Masked: the deployed conv is dense, so only ``macs_nonzero`` drops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.masked import MASKED_DEFAULTS, MaskedSetup, masked_check, prune_masked

INFO = MethodInfo(
    name="weight-magnitude",
    granularity=Granularity.WEIGHT,
    faithfulness="baseline",
    reference="Han et al., NeurIPS 2015 (global magnitude)",
    description="zero the globally smallest-|w| weights of the target convs until the MACs target",
    color="#8c564b",
    native_knobs=tuple(MASKED_DEFAULTS),
)


def choose_masks(setup: MaskedSetup) -> dict[str, Tensor]:
    weights = [setup.convs[n].weight.detach() for n in setup.names]
    magnitude = torch.cat([w.abs().flatten().double().cpu() for w in weights])
    counts = torch.tensor([w.numel() for w in weights])
    cost = torch.tensor(
        [setup.sizes[n] // w.numel() for n, w in zip(setup.names, weights, strict=True)]
    )
    order = torch.sort(magnitude, stable=True).indices
    spent = torch.cumsum(torch.repeat_interleave(cost, counts)[order], 0)
    goal = math.ceil(setup.fraction * setup.total)  # exact: Fraction times int
    n_removed = int(torch.searchsorted(spent, goal)) + 1  # first prefix with spent >= goal
    keep = torch.ones(magnitude.numel(), dtype=torch.bool)
    keep[order[:n_removed]] = False
    parts = keep.split(counts.tolist())
    pairs = zip(setup.names, parts, weights, strict=True)
    return {n: m.view(w.shape).to(w.device) for n, m, w in pairs}


@register_method(INFO, check=masked_check(MASKED_DEFAULTS))
def weight_magnitude(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_masked(model, target, ctx, choose_masks, MASKED_DEFAULTS)

"""kernel-l2: kernel (2D) pruning by L2 norm, independently per filter (masked).

Kernel pruning by L2 norm, e.g. Mao et al., CVPRW 2017: every filter ``W[o]`` of a target conv
drops its ``n`` kernels ``W[o, c]`` of smallest L2 norm (ties: lowest ``c`` first), the same
``n`` for every filter of a layer and no group structure, so there is no dense speed-up; it
shows what the group constraint of grouped-kernel pruning costs in accuracy.

Per-layer counts: ``n = round(fraction * C_in)`` (at most ``C_in - 1``: every filter keeps a
kernel), then greedy ±1 corrections, one layer at a time, while they bring the removed MACs
closer to ``fraction * (target layers' MACs)``; among equal moves the layer whose pruned
fraction stays closest to uniform goes first, then layer order. Dropping one kernel per filter
of conv ``l`` removes ``MACs_l / C_in`` MACs, so the result is within half the smallest such
step of the target.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.masked import MASKED_DEFAULTS, MaskedSetup, masked_check, prune_masked

INFO = MethodInfo(
    name="kernel-l2",
    granularity=Granularity.KERNEL,
    faithfulness="baseline",
    reference="kernel (2D) pruning by L2 norm, e.g. Mao et al., CVPRW 2017",
    description="per filter drop the smallest-L2 k×k kernels, same count per filter in a layer",
    color="#e377c2",
    native_knobs=tuple(MASKED_DEFAULTS),
)


def kernels_to_remove(setup: MaskedSetup) -> dict[str, int]:
    """Kernels each filter of each target conv drops, meeting ``setup.fraction`` of the MACs."""
    c_in = {n: setup.convs[n].in_channels for n in setup.names}
    step = {n: setup.sizes[n] // c_in[n] for n in setup.names}  # MACs of one kernel per filter
    count = {n: min(c_in[n] - 1, round(setup.fraction * c_in[n])) for n in setup.names}
    error = sum(count[n] * step[n] for n in setup.names) - setup.fraction * setup.total
    while error:
        d = 1 if error < 0 else -1
        moves = [
            (abs(error + d * step[n]), d * Fraction(count[n] + d, c_in[n]), i, n)
            for i, n in enumerate(setup.names)
            if 0 <= count[n] + d <= c_in[n] - 1
        ]
        best = min(moves, default=None)
        if best is None or best[0] >= abs(error):
            break
        count[best[3]] += d
        error += d * step[best[3]]
    return count


def kernel_mask(weight: Tensor, n_remove: int) -> Tensor:
    """Bool (C_out, C_in, 1, 1): False for each filter's ``n_remove`` lowest-L2 kernels."""
    norms = weight.detach().double().flatten(2).norm(dim=2)
    order = torch.sort(norms, dim=1, stable=True).indices
    mask = torch.ones(norms.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(1, order[:, :n_remove], False)
    return mask[:, :, None, None]


def choose_masks(setup: MaskedSetup) -> dict[str, Tensor]:
    counts = kernels_to_remove(setup)
    return {n: kernel_mask(setup.convs[n].weight, counts[n]) for n in setup.names}


@register_method(INFO, check=masked_check(MASKED_DEFAULTS))
def kernel_l2(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_masked(model, target, ctx, choose_masks, MASKED_DEFAULTS)

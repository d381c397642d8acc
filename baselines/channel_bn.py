"""channel-bn: Network Slimming's channel ranking (Liu et al., ICCV 2017), without its training.

A variant: Network Slimming trains with an L1 penalty on the BatchNorm scales (sparsity
training), then removes the channels whose ``|gamma|`` falls below one global threshold. Here
only the ranking is used, on the model as given (no sparsity training, so small ``|gamma|`` is
a weaker signal than in the paper). Channels of every prunable conv that a BatchNorm follows
(residual-safe, see :mod:`gkp.structured`) are ranked together by ``|gamma|`` (ties: earlier
layer, then lower index) and removed smallest first, keeping one per layer, until the removed
MACs of the target layers come closest to the target. Removal is physical, through
torch-pruning's dependency graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from torch import nn

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.structured import STRUCTURED_DEFAULTS, StructuredSetup, prune_structured, structured_check

INFO = MethodInfo(
    name="channel-bn",
    granularity=Granularity.CHANNEL,
    faithfulness="variant",
    reference="Liu et al., ICCV 2017 (Network Slimming)",
    description=(
        "global |BN gamma| channel ranking of Network Slimming, without its sparsity training"
    ),
    color="#bcbd22",
    native_knobs=tuple(STRUCTURED_DEFAULTS),
)


def ranked_channels(setup: StructuredSetup, model: nn.Module) -> list[tuple[str, int]]:
    """(conv, channel) of every prunable channel, smallest ``|gamma|`` first."""
    keyed = []
    for i, p in enumerate(setup.prunable.values()):
        gamma = model.get_submodule(p.bn).weight.detach().abs().double().cpu().tolist()
        keyed += [(g, i, c, p.name) for c, g in enumerate(gamma)]
    return [(name, c) for _, _, c, name in sorted(keyed)]


def global_removal(
    setup: StructuredSetup, order: Sequence[tuple[str, int]]
) -> dict[str, list[int]]:
    """The prefix of ``order`` (one filter per layer always kept) whose removed MACs come
    closest to the target; a tie goes to the shorter prefix."""
    goal = Fraction(str(setup.fraction))
    counts = dict.fromkeys(setup.prunable, 0)
    taken: list[tuple[str, int]] = []
    best = (abs(setup.removed_fraction(counts) - goal), 0)
    for name, c in order:
        if counts[name] + 1 >= setup.prunable[name].c_out:
            continue
        counts[name] += 1
        taken.append((name, c))
        error = setup.removed_fraction(counts) - goal
        best = min(best, (abs(error), len(taken)))
        if error >= 0:
            break
    out: dict[str, list[int]] = {n: [] for n in setup.prunable}
    for name, c in taken[: best[1]]:
        out[name].append(c)
    return out


def choose(setup: StructuredSetup, model: nn.Module, _ctx: PruneContext) -> dict[str, list[int]]:
    return global_removal(setup, ranked_channels(setup, model))


@register_method(INFO, check=structured_check(STRUCTURED_DEFAULTS, need_bn=True))
def channel_bn(model, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    return prune_structured(model, target, ctx, choose, STRUCTURED_DEFAULTS, need_bn=True)

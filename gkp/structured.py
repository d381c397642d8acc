"""Filter and channel pruning that physically removes filters: what those methods share.

Removal goes through torch-pruning's dependency graph (``tp.DependencyGraph``): pruning output
channels of a conv also prunes its BatchNorm and the matching input channels of every consumer.
Residual-safe: a conv is *prunable* only when its dependency group stays inside its block, i.e.
holds nothing but the conv itself, BatchNorms, single-input element-wise ops (ReLU, pooling),
reshapes and the input channels of ungrouped convs / linears. A group that reaches another conv's
output channels, a residual add (an element-wise op with two inputs), a concat, or the model
output is coupled and left alone, so the residual stream keeps its width. This is read from the
graph, never from layer names: conv1 of a basic block, conv1/conv2 of a bottleneck and every VGG
conv are prunable; a block's last conv and the stem are not.

Counting convention: the target is the fraction of the *target layers'* MACs removed
(``gkp.models.target_layers``), each conv counted as ``C_out * C_in * k*k`` per output pixel
(:func:`gkp.planning.layer_macs`). Only target layers are pruned; removing ``k`` of ``n``
filters of a conv removes ``k/n`` of its MACs and ``k/n`` of each consumer's, and both count
when both are target layers. The plan is checked against the measured MACs of the result.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gkp.api import PruneContext, PruneResult, PruneTarget
from gkp.depgraph import PrunableConv, first_sample, prunable_convs, remove_filters
from gkp.errors import UsageError
from gkp.planning import layer_macs, resolve_knobs, target_convs

STRUCTURED_DEFAULTS: dict[str, Any] = {"rate": 0.4375, "all_bottleneck_convs": False}
TOLERANCE = 0.01  # achieved MACs reduction must be within one percentage point of the target
_GRID = 2000  # uniform fractions k / 2000 tried before the greedy correction


@dataclass(frozen=True)
class StructuredSetup:
    """Knobs, target layers and their MACs, and the prunable convs, settled before pruning."""

    knobs: dict[str, Any]
    fraction: float  # of the target layers' MACs to remove
    names: list[str]  # target layers
    sizes: dict[str, int]  # dense MACs of each target layer
    channels: dict[str, tuple[int, int]]  # (C_out, C_in) of each target layer
    prunable: dict[str, PrunableConv]  # in model order
    producer: dict[str, str]  # target layer -> the prunable conv feeding its input channels

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def macs_left(self, counts: Mapping[str, int]) -> int:
        """Target-layer MACs after removing ``counts[name]`` filters of each prunable conv."""
        left = 0
        for n in self.names:
            c_out, c_in = self.channels[n]
            p = self.producer.get(n)
            out = c_out - counts.get(n, 0)
            inp = c_in - (counts.get(p, 0) if p else 0)
            left += self.sizes[n] // (c_out * c_in) * out * inp
        return left

    def removed_fraction(self, counts: Mapping[str, int]) -> Fraction:
        return Fraction(self.total - self.macs_left(counts), self.total)


def structured_setup(
    model: nn.Module,
    target: PruneTarget,
    defaults: Mapping[str, Any],
    example_inputs: Tensor,
    need_bn: bool = False,
) -> StructuredSetup:
    """Check knobs and layers, find the prunable convs; raises UsageError before any pruning.

    ``need_bn``: only convs followed by a BatchNorm count as prunable (BN-scale ranking).
    """
    knobs = resolve_knobs(target, defaults)
    convs = target_convs(model, knobs)
    names = list(convs)
    prunable = prunable_convs(model, names, example_inputs)
    if need_bn:
        prunable = {n: p for n, p in prunable.items() if p.bn is not None}
    if not prunable:
        raise UsageError(
            f"{type(model).__name__} has no target conv whose filters can be removed without "
            "cutting a residual connection" + (" and that a BatchNorm follows" if need_bn else "")
        )
    producer = {c: p.name for p in prunable.values() for c in p.consumers if c in convs}
    setup = StructuredSetup(
        knobs=knobs,
        fraction=float(target.macs if target.macs is not None else knobs["rate"]),
        names=names,
        sizes=layer_macs(model, names, example_inputs),
        channels={n: (c.out_channels, c.in_channels) for n, c in convs.items()},
        prunable=prunable,
        producer=producer,
    )
    most = float(setup.removed_fraction({n: p.c_out - 1 for n, p in prunable.items()}))
    if setup.fraction > most + TOLERANCE:
        raise UsageError(
            f"cannot remove {setup.fraction:.2%} of the target layers' MACs by pruning filters "
            f"of {type(model).__name__} residual-safely: at most {most:.2%} (one filter kept per "
            "layer); choose a smaller --target"
        )
    return setup


def structured_check(
    defaults: Mapping[str, Any], need_bn: bool = False
) -> Callable[[nn.Module, PruneTarget, Tensor], None]:
    """A method's up-front check: :func:`structured_setup` without the pruning."""

    def check(model: nn.Module, target: PruneTarget, example_inputs: Tensor) -> None:
        structured_setup(model, target, defaults, example_inputs, need_bn)

    return check


def filter_counts(setup: StructuredSetup) -> dict[str, int]:
    """Filters to remove per prunable conv so the removed MACs come closest to the target.

    One uniform fraction ``f`` (grid ``k/2000``, per-layer ``round(f * C_out)``, at most
    ``C_out - 1``), then greedy ±1 corrections while they bring the removed MACs closer to the
    target; among equal moves the layer staying closest to ``f`` goes first, then model order.
    """
    goal = Fraction(str(setup.fraction))
    layers = list(setup.prunable.values())

    def error(counts: Mapping[str, int]) -> int:  # removed - goal, scaled to an integer
        removed = setup.total - setup.macs_left(counts)
        return removed * goal.denominator - goal.numerator * setup.total

    def uniform(k: int) -> dict[str, int]:
        return {p.name: min(p.c_out - 1, (2 * k * p.c_out + _GRID) // (2 * _GRID)) for p in layers}

    k = min(
        range(_GRID + 1), key=lambda k: (abs(error(uniform(k))), abs(Fraction(k, _GRID) - goal))
    )
    f, counts = Fraction(k, _GRID), uniform(k)
    err = error(counts)
    while err:
        d = 1 if err < 0 else -1
        moves = [
            (
                abs(error({**counts, p.name: counts[p.name] + d})),
                abs(Fraction(counts[p.name] + d, p.c_out) - f),
                i,
                p.name,
            )
            for i, p in enumerate(layers)
            if 0 <= counts[p.name] + d <= p.c_out - 1
        ]
        best = min(moves, default=None)
        if best is None or best[0] >= abs(err):
            break
        counts[best[3]] += d
        err = error(counts)
    return counts


def lowest(scores: Tensor, k: int) -> list[int]:
    """Indices (ascending) of the ``k`` smallest scores; ties go to the lower index."""
    return sorted(torch.sort(scores.detach().cpu(), stable=True).indices[:k].tolist())


Score = Callable[[Tensor, np.random.Generator], Tensor]


def per_layer(score: Score) -> Callable[[StructuredSetup, nn.Module, PruneContext], dict]:
    """A chooser removing, in each prunable conv, the ``filter_counts`` filters scoring lowest.

    ``score(weight, rng)`` gets the conv's weight (float64, on CPU) and a generator seeded by
    ``(ctx.seed, layer index)``, and returns one score per filter.
    """

    def choose(setup: StructuredSetup, model: nn.Module, ctx: PruneContext) -> dict[str, list]:
        counts = filter_counts(setup)
        out = {}
        for i, (name, k) in enumerate(counts.items()):
            weight = model.get_submodule(name).weight.detach().double().cpu()
            out[name] = lowest(score(weight, np.random.default_rng([ctx.seed, i])), k)
        return out

    return choose


def masked_copy(
    model: nn.Module, prunable: Mapping[str, PrunableConv], removed: Mapping[str, Sequence[int]]
) -> nn.Module:
    """A dense copy whose consumers ignore the removed channels (their input weights zeroed).

    Built without torch-pruning, so it checks the physical removal: the removed channels still
    exist but no consumer reads them. A linear after a flatten reads ``in_features / C_out``
    consecutive features per channel.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, idxs in removed.items():
            c_out = prunable[name].c_out
            idx = torch.as_tensor(sorted(idxs), dtype=torch.long)
            for cname in prunable[name].consumers:
                mod = out.get_submodule(cname)
                width = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                if width % c_out or (isinstance(mod, nn.Conv2d) and width != c_out):
                    raise ValueError(f"{cname} does not read {name}'s {c_out} channels 1:1")
                per = width // c_out
                cols = (idx[:, None] * per + torch.arange(per)).flatten()
                mod.weight[:, cols.to(mod.weight.device)] = 0
    return out


def _check_removed(setup: StructuredSetup, removed: Mapping[str, Sequence[int]]) -> dict:
    clean = {}
    for name, idxs in removed.items():
        if name not in setup.prunable:
            raise RuntimeError(f"{name} is not a prunable conv of this model")
        c = setup.prunable[name].c_out
        ids = sorted({int(i) for i in idxs})
        if len(ids) != len(idxs) or (ids and not 0 <= ids[0] <= ids[-1] < c) or len(ids) >= c:
            raise RuntimeError(f"{name}: bad filter choice {list(idxs)[:10]} of {c} filters")
        clean[name] = ids
    return clean


def _verify(model: nn.Module, pruned: nn.Module, reference: nn.Module, x: Tensor) -> None:
    """Deploy form against the masked copy on ``x``: same shape and values, else a bug."""
    x = first_sample(model, x)
    modes = [(m, m.training) for net in (pruned, reference) for m in net.modules()]
    with torch.no_grad():
        got, want = pruned.eval()(x), reference.eval()(x)
    for m, mode in modes:
        m.training = mode
    scale = max(1.0, want.abs().max().item())
    if got.shape != want.shape or (got - want).abs().max().item() > 1e-4 * scale:
        raise RuntimeError("the pruned model does not compute what its masked copy computes")


Chooser = Callable[[StructuredSetup, nn.Module, PruneContext], Mapping[str, Sequence[int]]]


def prune_structured(
    model: nn.Module,
    target: PruneTarget,
    ctx: PruneContext,
    choose: Chooser,
    defaults: Mapping[str, Any] = STRUCTURED_DEFAULTS,
    need_bn: bool = False,
) -> PruneResult:
    """Remove the filters ``choose`` picks; the result is a smaller deep copy of ``model``.

    ``info``: options, target, ``layers`` (per prunable conv: ``c_out``, ``removed`` indices,
    its ``bn`` and ``consumers``), the target layers' MACs dense and pruned (measured), and
    the achieved fraction of them removed.
    Missing the target by more than one point raises UsageError (filters too coarse).
    """
    setup = structured_setup(model, target, defaults, ctx.example_inputs, need_bn)
    t0 = time.perf_counter()
    removed = _check_removed(setup, choose(setup, model, ctx))
    pruned = remove_filters(model, removed, ctx.example_inputs)
    seconds = time.perf_counter() - t0
    reference = masked_copy(model, setup.prunable, removed)
    _verify(model, pruned, reference, ctx.example_inputs)
    left = sum(layer_macs(pruned, setup.names, ctx.example_inputs).values())
    counts = {n: len(i) for n, i in removed.items()}
    if left != setup.macs_left(counts):
        raise RuntimeError(f"measured {left} target-layer MACs, planned {setup.macs_left(counts)}")
    achieved = 1 - left / setup.total
    if abs(achieved - setup.fraction) > TOLERANCE:
        raise UsageError(
            f"filters are too coarse here: the closest reduction found is {achieved:.2%} of the "
            f"target layers' MACs, not {setup.fraction:.2%}"
        )
    layers = {
        n: {
            "c_out": p.c_out,
            "removed": removed.get(n, []),
            "bn": p.bn,
            "consumers": list(p.consumers),
        }
        for n, p in setup.prunable.items()
    }
    info = {
        "options": {k: v for k, v in setup.knobs.items() if k != "layers" or v is not None},
        "target": target.macs,
        "layers": layers,
        "target_layer_macs": {"dense": setup.total, "pruned": left},
        "achieved": achieved,
        "prune_seconds": seconds,
    }
    return PruneResult(pruned, info, reference)

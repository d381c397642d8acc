"""[2] SG-CNN: self-grouping convolutional networks (Guo, Wu, Kittler, Feng; Neural Networks 2020).

Faithful to the authors' public code as METHODS.md lays it out. Per target conv, per step:

* importance vectors ``v_n[c] = Σ|W[n,c] ⊙ M[n,c]|`` (L1 norm of each masked kernel);
* k-means (``groups`` = 16 clusters, random init, 10 restarts; fewer clusters when the layer has
  fewer distinct vectors) on them: unequal clusters;
* one threshold per layer, the ``p``-th percentile of ``μ_{label(n)}[c] · mean(M[n,c])`` over
  all (filter, channel) pairs (the value at rank ``round(p·N)``, ties removed together); a
  cluster keeps channel ``c`` iff its centroid value exceeds it (at least one channel per
  cluster); all filters of a cluster share that pattern; masks only shrink.

Schedule: ``p`` = 10%, 20%, … then the target itself (the fraction of the target layers' MACs
to remove, ``--target``); after each step a short local fine-tune (``local_share`` of the run's
fine-tuning budget, split evenly over the steps, through ``PruneContext.finetune``); the FC layer
is pruned the same way (its rows' ``|W[n,:] ⊙ M[n,:]|``) at ``min(p, fc_cap = 0.6)``; then the
runner's global fine-tune spends the rest of the budget. ``local_finetune=false`` is the paper's
global-only variant (no intermediate retraining; the pruning steps stay the same).

Deploy: each layer's final clusters are its groups and a group keeps the channels any of its
filters still reads (= those its centroid keeps), so the layer becomes one conv per group
(``gkp.nn.PerGroupConv2d``); kernels a filter lost at an earlier step stay zero inside its
group's conv (``shared_pattern_zero_kernels`` counts them; the global fine-tune may regrow them,
as the shared pattern allows). The FC layer stays a masked dense linear. The runner times the
per-group form and the masked-dense form beside it.

``equalize=true`` is a labelled *variant*, not the paper's method: the last step instead splits
the filters into ``groups`` equal clusters (equal-size k-means on the importance vectors) and
trims every group to the same ``n_keep`` channels (largest centroid importance), so the shared
grouped deploy form applies; ``groups`` must then divide every target layer's filters.

Without a ``PruneContext.finetune`` (tests, latency benchmarks, API use) the local fine-tunes are
skipped and ``info["local_finetune"]`` says so.
"""

from __future__ import annotations

import copy
import time
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor, nn

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.grouping import equal_size_kmeans
from gkp.masked import MASKED_DEFAULTS, MaskedConv2d, MaskedLinear, masked_setup
from gkp.nn import GroupPlan, apply_per_group, apply_plans, masked_reference, set_module
from gkp.planning import exact_rate, grouped_setup, n_keep_for

DEFAULTS: dict[str, Any] = {
    **MASKED_DEFAULTS,
    "groups": 16,
    "step": 0.1,
    "restarts": 10,
    "fc": True,
    "fc_cap": 0.6,
    "local_finetune": True,
    "local_share": 0.25,
    "equalize": False,
}

INFO = MethodInfo(
    name="sgcnn",
    granularity=Granularity.GROUPED_KERNEL,
    faithfulness="faithful",
    reference="Guo et al., Neural Networks 2020 (SG-CNN, authors' code)",
    description="SG-CNN: k-means self-grouping, percentile thresholds, iterative 10% steps",
    color="#8c6d31",
    needs=frozenset({"finetune"}),
    native_knobs=tuple(DEFAULTS),
)


def importance(weight: Tensor, mask: Tensor) -> np.ndarray:
    """``v[n, c]``: L1 norm of masked kernel ``W[n, c]`` (a conv) or ``|W[n, c]·M[n, c]|`` (FC)."""
    w = (weight.detach() * mask.to(weight.dtype)).abs().double().cpu()
    return (w.flatten(2).sum(2) if w.dim() == 4 else w).numpy()


def self_group(v: np.ndarray, groups: int, restarts: int, seed: int) -> tuple[np.ndarray, ...]:
    """k-means (random init) on the rows of ``v``: labels (n,), centroids (k, c).

    ``k = min(groups, distinct rows)``: k-means cannot place more centres than distinct points.
    """
    k = max(1, min(groups, len(np.unique(v, axis=0))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(k, init="random", n_init=restarts, random_state=seed).fit(v)
    return km.labels_.astype(np.int64), km.cluster_centers_


def threshold(scores: np.ndarray, p: float) -> float:
    """The ``p``-th percentile of ``scores``: the value at rank ``round(p·N)`` (1-based)."""
    n_remove = round(p * scores.size)
    return -np.inf if n_remove == 0 else float(np.sort(scores, axis=None)[n_remove - 1])


def sg_step(
    v: np.ndarray, kept_frac: np.ndarray, p: float, labels: np.ndarray, centroids: np.ndarray
) -> tuple[np.ndarray, float]:
    """One SG-CNN step on one layer: the clusters' kept channels (k, c) and the threshold.

    ``kept_frac[n, c]`` = ``mean(M[n, c])``. A cluster keeps ``c`` iff ``centroids[g, c]``
    exceeds the threshold; a cluster that would keep nothing keeps its largest centroid entry.
    """
    t = threshold(centroids[labels] * kept_frac, p)
    keep = centroids > t
    empty = ~keep.any(1)
    keep[empty, np.argmax(centroids[empty], axis=1)] = True
    return keep, t


def layer_mask(layer: nn.Module) -> Tensor:
    """(out, in) bool: True where filter/row ``n`` still reads input ``c`` (any weight kept)."""
    m = getattr(layer, "mask", None)
    if m is None:
        return torch.ones(layer.weight.shape[:2], dtype=torch.bool)
    return (m.flatten(2).any(2) if m.dim() == 4 else m).cpu()


def prune_layer(
    model: nn.Module, name: str, p: float, knobs: dict, seed: int
) -> tuple[GroupPlan, dict[str, Any]]:
    """Apply one step to layer ``name`` of ``model`` in place (as a masked layer)."""
    layer = model.get_submodule(name)
    old = layer_mask(layer)
    full = getattr(layer, "mask", torch.ones_like(layer.weight, dtype=torch.bool))
    kept_frac = full.double().flatten(2).mean(2).cpu().numpy() if full.dim() == 4 else old.numpy()
    v = importance(layer.weight, full)
    labels, centroids = self_group(v, int(knobs["groups"]), int(knobs["restarts"]), seed)
    keep, t = sg_step(v, kept_frac, p, labels, centroids)
    new = old & torch.from_numpy(keep[labels])
    groups = [np.flatnonzero(labels == g).tolist() for g in range(len(centroids))]
    kept = [np.flatnonzero(keep[g]).tolist() for g in range(len(centroids))]
    new = new.to(layer.weight.device)  # masked weights are already zero: masks only shrink
    if isinstance(layer, nn.Linear):
        set_module(model, name, MaskedLinear.from_linear(layer, new))
    else:
        set_module(model, name, MaskedConv2d.from_conv(layer, new[:, :, None, None]))
    info = {"threshold": t, "clusters": len(groups), "kept_fraction": float(new.double().mean())}
    return GroupPlan.from_lists(groups, kept), info


def schedule(target: Fraction, step: float) -> list[float]:
    """``step, 2·step, …`` below the target, then the target itself."""
    ps, i, exact = [], 1, exact_rate(step)
    while exact * i < target:
        ps.append(float(exact * i))
        i += 1
    return [*ps, float(target)]


def equal_plan(model: nn.Module, name: str, n_groups: int, n_keep: int, seed: int) -> GroupPlan:
    """The ``equalize`` variant's last step: equal clusters, the same ``n_keep`` per group."""
    layer = model.get_submodule(name)
    v = importance(layer.weight, getattr(layer, "mask", torch.ones_like(layer.weight)))
    labels = equal_size_kmeans(v, n_groups, seed=seed)
    kept = [
        np.argsort(-v[labels == g].mean(0), kind="stable")[:n_keep].tolist()
        for g in range(n_groups)
    ]
    return GroupPlan.from_labels(labels, kept)


def _check(model: nn.Module, target: PruneTarget, example_inputs: Tensor):
    setup = masked_setup(model, target, DEFAULTS, example_inputs)
    if setup.knobs["equalize"]:
        grouped_setup(model, target, DEFAULTS, example_inputs)
    return setup


def _local_steps(ctx: PruneContext, knobs: dict, n_steps: int) -> int:
    budget = getattr(ctx.finetune, "total_steps", 0)
    return int(float(knobs["local_share"]) * budget) // n_steps


def _local_status(knobs: dict, ctx: PruneContext, per_step: int, n_steps: int) -> str:
    if not knobs["local_finetune"]:
        return "off (global-only variant)"
    if ctx.finetune is None:
        return "skipped: no fine-tuning budget in PruneContext"
    if per_step == 0:
        return "skipped: the local share of the budget is under one step per pruning step"
    return f"done: {per_step} steps after each of the {n_steps} pruning steps"


def _fc_name(model: nn.Module) -> str | None:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def check(model: nn.Module, target: PruneTarget, example_inputs: Tensor) -> None:
    """Knobs and target layers, before any work (``groups`` must divide with ``equalize``)."""
    _check(model, target, example_inputs)


@register_method(INFO, check=check)
def sgcnn(model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    setup = _check(model, target, ctx.example_inputs)
    knobs = setup.knobs
    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    ps = schedule(setup.fraction, float(knobs["step"]))
    fc = _fc_name(work) if knobs["fc"] else None
    local = bool(knobs["local_finetune"]) and ctx.finetune is not None
    per_step = _local_steps(ctx, knobs, len(ps)) if local else 0
    steps: list[dict[str, Any]] = []
    plans: dict[str, GroupPlan] = {}
    for s, p in enumerate(ps):
        record: dict[str, Any] = {"p": p, "layers": {}}
        for i, name in enumerate(setup.names):
            plans[name], record["layers"][name] = prune_layer(work, name, p, knobs, ctx.seed + i)
        if fc is not None:
            p_fc = min(p, float(knobs["fc_cap"]))
            _, record["fc"] = prune_layer(work, fc, p_fc, knobs, ctx.seed + len(setup.names))
        if local and per_step:
            record["local_finetune"] = ctx.finetune(work, per_step, desc=f"sgcnn step {s + 1}")
        steps.append(record)
    if knobs["equalize"]:
        rate = grouped_setup(model, target, DEFAULTS, ctx.example_inputs).knobs["rate"]
        groups = int(knobs["groups"])
        plans = {
            n: equal_plan(work, n, groups, n_keep_for(setup.convs[n].in_channels, rate), ctx.seed)
            for n in setup.names
        }
    base = _unmasked(work, setup.names)
    deploy = apply_plans if knobs["equalize"] else apply_per_group
    pruned = deploy(base, plans)
    kept = {
        n: int(pl.mask(*layer_mask(work.get_submodule(n)).shape).sum()) for n, pl in plans.items()
    }
    removed = sum(
        setup.sizes[n] * (1 - Fraction(kept[n], layer_mask(work.get_submodule(n)).numel()))
        for n in plans
    )
    info = {
        "options": {k: v for k, v in knobs.items() if k != "layers" or v is not None},
        "target": target.macs,
        "schedule": ps,
        "steps": steps,
        "local_finetune": _local_status(knobs, ctx, per_step, len(ps)),
        "variant": "equalize (not the paper's method)" if knobs["equalize"] else "",
        "plans": {n: p.to_dict() for n, p in plans.items()},
        "layers": {
            n: {
                "c_in": setup.convs[n].in_channels,
                "c_out": setup.convs[n].out_channels,
                "groups": [len(g) for g in pl.groups],
                "kept": [len(k) for k in pl.kept],
            }
            for n, pl in plans.items()
        },
        "shared_pattern_zero_kernels": sum(
            kept[n] - int(layer_mask(work.get_submodule(n)).sum()) for n in plans
        ),
        "macs_removed": float(removed / setup.total),
        "prune_seconds": time.perf_counter() - t0,
    }
    return PruneResult(pruned, info, masked_reference(base, plans))


def _unmasked(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy with the target convs back as plain convs (zeros kept); the FC stays masked."""
    out = copy.deepcopy(model)
    for name in names:
        layer = out.get_submodule(name)
        if isinstance(layer, MaskedConv2d):
            set_module(out, name, layer.to_dense())
    return out

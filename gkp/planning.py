"""What every grouped-kernel method shares: knobs, the rate for a MACs target, the layer loop.

A grouped-kernel method is a function from one layer's weights to a ``GroupPlan``
(``plan_layer``); ``prune_grouped`` runs it over the model's target layers, builds the shared
deploy form with ``apply_plans`` and the masked reference it must equal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gkp.api import PruneContext, PruneResult, PruneTarget
from gkp.models import target_layers
from gkp.nn import GroupPlan, apply_plans, masked_reference

GKP_DEFAULTS: dict[str, Any] = {"rate": 0.4375, "groups": 8, "all_bottleneck_convs": False}


def n_keep_for(c_in: int, rate: float) -> int:
    """Grouped kernels each group keeps: ``floor((1 - rate) * (C_in + 1))`` (METHODS.md).

    The +1 only guards rounding (9 of 16, 18 of 32, 36 of 64 at rate 0.4375); clipped to
    ``[1, C_in]``.
    """
    return max(1, min(c_in, math.floor((1.0 - rate) * (c_in + 1))))


def achieved_reduction(layers: Sequence[tuple[int, int]], rate: float) -> float:
    """Fraction of the target layers' MACs removed at ``rate``; ``layers`` = (C_in, MACs) pairs."""
    total = sum(m for _, m in layers)
    removed = sum(m * (c - n_keep_for(c, rate)) / c for c, m in layers)
    return removed / total


def rate_for_target(layers: Sequence[tuple[int, int]], target: float) -> float:
    """The rate whose achieved MACs reduction of the target layers is closest to ``target``.

    Scans rates in steps of 0.0005, finer than any n_keep step for C_in < 2000.
    """
    grid = np.round(np.linspace(0.0005, 0.9995, 1999), 4)
    errors = [abs(achieved_reduction(layers, float(r)) - target) for r in grid]
    best = min(errors)
    candidates = [float(r) for r, e in zip(grid, errors, strict=True) if e <= best + 1e-12]
    return min(candidates, key=lambda r: abs(r - target))


def resolve_knobs(target: PruneTarget, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by the native knobs; unknown knobs and conflicts raise ValueError."""
    unknown = set(target.native) - set(defaults) - {"layers"}
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)}; this method accepts {sorted(defaults)}"
        )
    if target.macs is not None and "rate" in target.native:
        raise ValueError("give either a MACs target (--target) or a native rate (--rate), not both")
    knobs = {**defaults, **target.native}
    rate = float(knobs["rate"])
    if not 0.0 < rate < 1.0:
        raise ValueError(
            f"rate {rate} is outside (0, 1): it is the fraction of grouped kernels pruned"
        )
    groups = knobs["groups"]
    if isinstance(groups, bool) or not float(groups).is_integer() or int(groups) < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    return knobs


def layer_macs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, int]:
    """MACs of each named conv on ``x`` (weight size times output pixels)."""
    out: dict[str, int] = {}
    hooks = []
    for name in names:
        conv = model.get_submodule(name)

        def hook(mod: nn.Module, _i: tuple, y: torch.Tensor, name: str = name) -> None:
            out[name] = mod.weight.numel() * y.shape[-1] * y.shape[-2]

        hooks.append(conv.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model.eval()(x[:1].to(device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


@dataclass(frozen=True)
class LayerJob:
    """One layer's input to a method's ``plan_layer``: final weights and, if needed, history."""

    name: str
    weight: np.ndarray  # (C_out, C_in, k, k), float64
    n_groups: int
    n_keep: int
    seed: int
    knobs: Mapping[str, Any]
    history: Sequence[np.ndarray] = field(default_factory=tuple)


PlanLayer = Callable[[LayerJob], tuple[GroupPlan, dict[str, Any]]]


def load_history(
    snapshots: Sequence[Path], model: nn.Module, names: Sequence[str]
) -> dict[str, list[np.ndarray]]:
    """Each target layer's weight at every snapshot (files are state dicts or {'model': ...})."""
    history: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for path in snapshots:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"snapshot {path} cannot be read ({err}); retrain the baseline"
            ) from err
        state = state.get("model", state)
        for n in names:
            w = state.get(f"{n}.weight")
            if w is None or w.shape != model.get_submodule(n).weight.shape:
                raise ValueError(
                    f"snapshot {path} has no weight of the model's shape for layer {n}: it "
                    "belongs to another model; snapshots must come from this model's training"
                )
            history[n].append(w.double().numpy())
    return history


def prune_grouped(
    model: nn.Module,
    target: PruneTarget,
    ctx: PruneContext,
    plan_layer: PlanLayer,
    defaults: Mapping[str, Any] = GKP_DEFAULTS,
    with_history: bool = False,
) -> PruneResult:
    """Plan every target layer with ``plan_layer`` and build the shared deploy form."""
    knobs = resolve_knobs(target, defaults)
    names = list(knobs.get("layers") or target_layers(model, bool(knobs["all_bottleneck_convs"])))
    sizes = layer_macs(model, names, ctx.example_inputs)
    convs = {n: model.get_submodule(n) for n in names}
    if target.macs is not None:
        knobs["rate"] = rate_for_target(
            [(convs[n].in_channels, sizes[n]) for n in names], target.macs
        )
    t0 = time.perf_counter()
    history = load_history(ctx.snapshots, model, names) if with_history else {}
    plans: dict[str, GroupPlan] = {}
    layers: dict[str, Any] = {}
    for i, name in enumerate(tqdm(names, desc="planning layers", leave=False, unit="layer")):
        conv = convs[name]
        n_groups, n_keep = int(knobs["groups"]), n_keep_for(conv.in_channels, float(knobs["rate"]))
        if conv.out_channels % n_groups:
            raise ValueError(
                f"{name}: {n_groups} groups do not divide its {conv.out_channels} filters; "
                f"choose --groups among the divisors of {conv.out_channels}"
            )
        weight = conv.weight.detach().double().cpu().numpy()
        job = LayerJob(name, weight, n_groups, n_keep, ctx.seed + i, knobs, history.get(name, ()))
        plans[name], extra = plan_layer(job)
        layers[name] = {
            "c_in": conv.in_channels,
            "c_out": conv.out_channels,
            "n_keep": n_keep,
            **extra,
        }
    seconds = time.perf_counter() - t0
    info = {
        "options": {k: v for k, v in knobs.items() if k != "layers"},
        "target": target.macs,
        "layers": layers,
        "plans": {n: p.to_dict() for n, p in plans.items()},
        "prune_seconds": seconds,
    }
    return PruneResult(apply_plans(model, plans), info, masked_reference(model, plans))

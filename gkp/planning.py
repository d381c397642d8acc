"""What every grouped-kernel method shares: knobs, the rate for a MACs target, the layer loop.

A grouped-kernel method is a function from one layer's weights to a ``GroupPlan``
(``plan_layer``); ``prune_grouped`` runs it over the model's target layers, builds the shared
deploy form with ``apply_plans`` and the masked reference it must equal.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from tqdm.auto import tqdm

from gkp.api import PruneContext, PruneResult, PruneTarget
from gkp.errors import UsageError
from gkp.knobs import check_knobs
from gkp.models import target_layers
from gkp.nn import GroupPlan, apply_plans, masked_reference

GKP_DEFAULTS: dict[str, Any] = {"rate": 0.4375, "groups": 8, "all_bottleneck_convs": False}


def exact_rate(rate: Real | Decimal) -> Fraction:
    """``rate`` as the exact decimal the user wrote, checked to lie in (0, 1).

    A float is read through its shortest repr (``0.8`` is 4/5, not the binary double just
    below it), so ``n_keep`` never loses a channel to rounding; Fractions and Decimals are
    exact already. Anything that is not a finite real in (0, 1) raises ValueError naming it.
    """
    if isinstance(rate, bool) or not isinstance(rate, (Real, Decimal)):
        raise ValueError(f"rate {rate!r} is not a real number in (0, 1)")
    if isinstance(rate, (Fraction, Decimal, Integral)):
        exact = None if isinstance(rate, Decimal) and not rate.is_finite() else Fraction(rate)
    else:
        exact = Fraction(str(rate)) if math.isfinite(float(rate)) else None
    if exact is None or not 0 < exact < 1:
        raise ValueError(
            f"rate {rate!r} is outside (0, 1): it is the fraction of grouped kernels pruned"
        )
    return exact


def _n_keep(c_in: int, num: int, den: int) -> int:
    """``floor((1 - num/den) * (C_in + 1))`` in integers, clipped to ``[1, C_in]``."""
    return max(1, min(c_in, (den - num) * (c_in + 1) // den))


def n_keep_for(c_in: int, rate: Real | Decimal) -> int:
    """Grouped kernels each group keeps: ``floor((1 - rate) * (C_in + 1))`` (METHODS.md).

    Exact: ``rate`` is the decimal as written (see :func:`exact_rate`), so 0.8 of 64 keeps
    ``0.2 * 65 = 13``. The +1 only guards rounding (9 of 16, 18 of 32, 36 of 64 at rate 0.4375);
    clipped to ``[1, C_in]``.
    """
    if isinstance(c_in, bool) or not isinstance(c_in, Integral) or c_in < 1:
        raise ValueError(f"C_in must be a positive integer, got {c_in!r}")
    p = exact_rate(rate)
    return _n_keep(int(c_in), p.numerator, p.denominator)


class _Widths:
    """Target-layer MACs per distinct ``C_in``, scaled to integers for exact comparisons.

    ``removed(keep)`` is the removed MACs times ``lcm(C_in's)``, an integer, so comparing
    reductions needs no division and no rounding; ``scale`` turns it into a fraction of the total.
    """

    def __init__(self, layers: Sequence[tuple[int, int]]) -> None:
        macs: dict[int, int] = {}
        for c, m in layers:
            if int(c) < 1:
                raise ValueError(f"layer with C_in = {c} has no channels to keep")
            macs[int(c)] = macs.get(int(c), 0) + int(m)
        if not macs or sum(macs.values()) <= 0:
            raise ValueError("no target layers with MACs to reduce")
        lcm = math.lcm(*macs)
        self.weights = {c: m * (lcm // c) for c, m in macs.items()}
        self.scale = lcm * sum(macs.values())

    def removed(self, keep: Mapping[int, int]) -> int:
        return sum(w * (c - keep[c]) for c, w in self.weights.items())


def achieved_reduction(layers: Sequence[tuple[int, int]], rate: Real | Decimal) -> float:
    """Fraction of the target layers' MACs removed at ``rate``; ``layers`` = (C_in, MACs) pairs.

    Computed exactly (same n_keep as :func:`n_keep_for`), rounded to float once at the end.
    """
    p = exact_rate(rate)
    widths = _Widths(layers)
    keep = {c: _n_keep(c, p.numerator, p.denominator) for c in widths.weights}
    return float(Fraction(widths.removed(keep), widths.scale))


_GRID_DENOMINATOR = 2000  # rates k / 2000, k = 1..1999: steps of 0.0005


def rate_for_target(layers: Sequence[tuple[int, int]], target: float) -> float:
    """The grid rate whose achieved MACs reduction of the target layers is closest to ``target``.

    Scans rates ``k / 2000`` (steps of 0.0005, finer than any n_keep step for C_in < 2000) in
    exact integer arithmetic, n_keep computed once per distinct C_in and rate. Ties (rates giving
    the same n_keep everywhere) go to the rate closest to ``target``, then the smaller one. The
    returned float reads back (:func:`n_keep_for`) as exactly the grid rate that was scored.
    """
    if isinstance(target, bool) or not isinstance(target, Real) or not math.isfinite(target):
        raise ValueError(f"MACs target {target!r} is not a finite number")
    widths = _Widths(layers)
    goal = Fraction(str(target))  # both distances below are scaled by constants: compare as ints
    den = _GRID_DENOMINATOR
    want = goal.numerator * widths.scale
    best: tuple[int, int, int] | None = None
    for k in range(1, den):
        keep = {c: _n_keep(c, k, den) for c in widths.weights}
        error = abs(widths.removed(keep) * goal.denominator - want)
        key = (error, abs(k * goal.denominator - goal.numerator * den), k)
        best = key if best is None or key < best else best
    assert best is not None
    return best[2] / den


def resolve_knobs(target: PruneTarget, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by the native knobs, each checked for type and range
    (``gkp.knobs``); unknown knobs and conflicts raise UsageError (a ValueError)."""
    given = check_knobs(target.native, defaults)
    if target.macs is not None and "rate" in given:
        raise UsageError("give either a MACs target (--target) or a native rate (--rate), not both")
    knobs = {**defaults, **given}
    exact_rate(knobs["rate"])
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


@dataclass(frozen=True)
class GroupedSetup:
    """What a grouped-kernel method settles before planning: knobs, layers and their MACs."""

    knobs: dict[str, Any]
    names: list[str]
    convs: dict[str, nn.Conv2d]
    sizes: dict[str, int]


def target_convs(model: nn.Module, knobs: Mapping[str, Any]) -> dict[str, nn.Conv2d]:
    """The convs a method prunes: the ``layers`` knob, else the model family's target rule.

    Each must be an ungrouped ``nn.Conv2d`` of the model; anything else raises UsageError.
    """
    names = knobs.get("layers") or target_layers(model, bool(knobs["all_bottleneck_convs"]))
    convs = {}
    for name in names:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise UsageError(
                f"option layers: {name[:80]!r} is not an ungrouped nn.Conv2d of "
                f"{type(model).__name__}; name convs as model.named_modules() does"
            )
        convs[name] = conv
    return convs


def grouped_setup(
    model: nn.Module, target: PruneTarget, defaults: Mapping[str, Any], example_inputs: Tensor
) -> GroupedSetup:
    """Check every knob and every target layer, and turn a MACs target into a rate.

    Raises UsageError before any planning: ``groups`` must divide every target layer's filters.
    """
    knobs = resolve_knobs(target, defaults)
    convs = target_convs(model, knobs)
    groups = int(knobs["groups"])
    for name, conv in convs.items():
        if conv.out_channels % groups:
            raise UsageError(
                f"{name}: {groups} groups do not divide its {conv.out_channels} filters; "
                f"choose --groups among the divisors of {conv.out_channels}"
            )
    names = list(convs)
    sizes = layer_macs(model, names, example_inputs)
    if target.macs is not None:
        knobs["rate"] = rate_for_target(
            [(convs[n].in_channels, sizes[n]) for n in names], target.macs
        )
    return GroupedSetup(knobs, names, convs, sizes)


def grouped_check(defaults: Mapping[str, Any]) -> Callable[[nn.Module, PruneTarget, Tensor], None]:
    """A method's up-front check: :func:`grouped_setup` without the planning."""

    def check(model: nn.Module, target: PruneTarget, example_inputs: Tensor) -> None:
        grouped_setup(model, target, defaults, example_inputs)

    return check


PARALLEL_MIN_CHANNELS = 128  # networks whose widest layer reads fewer channels plan on one thread:
# their layers are so small that Python's lock, not the arithmetic, bounds them (ResNet-56's TMI-GKP
# took 14 s on one thread, 18 s on two; ResNet-50's SR-GKP 199 s on one, 123 s on two)


def plan_workers() -> int:
    """Threads that plan layers: ``GKP_PLAN_WORKERS`` when set (1 plans one layer at a time),
    else the usable cores."""
    value = os.environ.get("GKP_PLAN_WORKERS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"GKP_PLAN_WORKERS must be a whole number >= 1, got {value!r}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prune_grouped(
    model: nn.Module,
    target: PruneTarget,
    ctx: PruneContext,
    plan_layer: PlanLayer,
    defaults: Mapping[str, Any] = GKP_DEFAULTS,
    with_history: bool = False,
) -> PruneResult:
    """Plan every target layer with ``plan_layer`` and build the shared deploy form.

    Layers are planned independently (each from its own weights and seed ``ctx.seed + i``), on
    :func:`plan_workers` threads when some layer reads at least :data:`PARALLEL_MIN_CHANNELS`
    channels: the selections are then numpy/scipy/scikit-learn work on large arrays, which runs
    outside Python's lock (one BLAS thread per worker). The plans do not depend on the number of
    workers.
    """
    setup = grouped_setup(model, target, defaults, ctx.example_inputs)
    knobs, names, convs = setup.knobs, setup.names, setup.convs
    t0 = time.perf_counter()
    history = load_history(ctx.snapshots, model, names) if with_history else {}

    def job(i: int, name: str) -> LayerJob:
        conv = convs[name]
        n_groups, n_keep = int(knobs["groups"]), n_keep_for(conv.in_channels, knobs["rate"])
        weight = conv.weight.detach().double().cpu().numpy()
        return LayerJob(name, weight, n_groups, n_keep, ctx.seed + i, knobs, history.get(name, ()))

    jobs = [job(i, name) for i, name in enumerate(names)]
    small = max(j.weight.shape[1] for j in jobs) < PARALLEL_MIN_CHANNELS if jobs else True
    workers = 1 if small else min(plan_workers(), len(jobs))
    bar = tqdm(total=len(jobs), desc="planning layers", leave=False, unit="layer",
               disable=not ctx.progress)  # fmt: skip

    def planned(j: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
        out = plan_layer(j)
        bar.update()
        return out

    ordered = sorted(jobs, key=lambda j: -j.weight.size)  # largest first: they finish together
    pool = ThreadPoolExecutor(workers, thread_name_prefix="gkp-plan")
    try:  # one BLAS thread per worker: the workers already fill the cores
        with bar, threadpool_limits(1 if workers > 1 else None):
            results = dict(zip([j.name for j in ordered], pool.map(planned, ordered), strict=True))
    finally:  # on an error (or Ctrl-C) the layers not started yet are dropped, not planned
        pool.shutdown(wait=True, cancel_futures=True)
    plans: dict[str, GroupPlan] = {}
    layers: dict[str, Any] = {}
    for j in jobs:
        plans[j.name], extra = results[j.name]
        layers[j.name] = {"c_in": j.weight.shape[1], "c_out": j.weight.shape[0], "n_keep": j.n_keep,
                          **extra}  # fmt: skip
    seconds = time.perf_counter() - t0
    info = {
        "options": {k: v for k, v in knobs.items() if k != "layers" or v is not None},
        "target": target.macs,
        "layers": layers,
        "plans": {n: p.to_dict() for n, p in plans.items()},
        "prune_seconds": seconds,
    }
    return PruneResult(apply_plans(model, plans), info, masked_reference(model, plans))

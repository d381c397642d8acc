"""[1] Group-wise 2D-filter pruning (Yu, Qiu, Hu, Li; IJCNN 2017) — RECONSTRUCTED.

Only the abstract is known: the filters of a group share one kernel-removal pattern learned from
data, the result runs on standard convolutions, and fine-tuning distils from the unpruned network.
The rest is METHODS.md's reconstruction, and this module follows it:

* the filters are split into ``G`` equal groups by index (contiguous blocks);
* per group, greedy forward selection of the ``n_keep`` input channels whose contributions best
  reconstruct that group's outputs (ThiNet-style): the dense network's inputs to the layer on the
  calibration batches (``ctx.calib_batches``, drawn by the runner from the training set), sampled
  at ``positions`` output locations per image, and at each step the channel that minimises
  ``‖Y_g − Σ_{c∈K} Z_{g,c}‖²`` joins the kept set (``Z_{g,c}``: what channel ``c`` contributes to
  the group's outputs; lowest index on ties);
* optionally (``refit``, off by default) a least-squares refit of every kept filter's weights to
  the dense outputs on the same samples (ridge ``1e-6·mean diag``);
* the shared deploy form (one dense grouped convolution);
* fine-tuning with ``CE + α·T²·KL`` against the unpruned network (``kd_alpha`` 0.9,
  ``kd_temperature`` 4): the method declares ``needs={"teacher", "calib"}`` and records the loss in
  ``info["distill"]``; the runner owns the loop.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkp.api import Granularity, MethodInfo, PruneContext, PruneResult, PruneTarget, register_method
from gkp.nn import GroupPlan, apply_plans, masked_reference
from gkp.planning import GKP_DEFAULTS, LayerJob, grouped_check, grouped_setup, prune_grouped

DEFAULTS: dict[str, Any] = {
    **GKP_DEFAULTS,
    "positions": 10,  # sampled output locations per calibration image (ThiNet samples 10)
    "refit": False,
    "kd_alpha": 0.9,
    "kd_temperature": 4.0,
}

INFO = MethodInfo(
    name="group2d",
    granularity=Granularity.GROUPED_KERNEL,
    faithfulness="reconstructed",
    reference="Yu et al., IJCNN 2017 (reconstructed)",
    description=(
        "RECONSTRUCTED group-wise 2D-filter pruning: index groups, greedy output-reconstruction "
        "channel selection on calibration data, fine-tuned with distillation"
    ),
    color="#393b79",
    needs=frozenset({"calib", "teacher"}),
    native_knobs=tuple(DEFAULTS),
)


@torch.no_grad()
def conv_patches(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[tuple[Tensor, Tensor]],
    positions: int,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Each named conv's input patches at sampled output locations, float64 on the CPU.

    The dense ``model`` runs (eval mode) on every calibration batch; for each image ``positions``
    output locations of each conv are drawn without replacement (all of them when the map is
    smaller). Returns ``name -> (samples, C_in, k·k)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    found: dict[str, list[Tensor]] = {n: [] for n in names}

    def hook(conv: nn.Conv2d, args: tuple, _out: Tensor, name: str) -> None:
        x = args[0]
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        n, _, locations = cols.shape
        take = min(positions, locations)
        pick = torch.stack([torch.randperm(locations, generator=gen)[:take] for _ in range(n)])
        cols = cols.gather(2, pick.to(cols.device)[:, None, :].expand(-1, cols.shape[1], -1))
        cols = cols.permute(0, 2, 1).reshape(n * take, conv.in_channels, -1)
        found[name].append(cols.double().cpu())

    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: hook(m, a, o, n)  # type: ignore[misc]
        )
        for n in names
    ]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for x, _ in batches:
            model(x.to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in found.items()}


def contributions(patches: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``Z[c]``: what input channel ``c`` adds to the filters' outputs on the samples.

    ``patches`` (samples, C_in, k·k), ``weight`` (d, C_in, k, k); returns (C_in, samples·d), so
    the filters' outputs are ``Z.sum(0)``.
    """
    w = weight.reshape(weight.shape[0], weight.shape[1], -1)
    return np.einsum("mck,dck->cmd", patches, w).reshape(weight.shape[1], -1)


def greedy_reconstruction(Z: np.ndarray, n_keep: int) -> tuple[np.ndarray, float]:
    """Greedy forward selection of ``n_keep`` rows of ``Z`` whose sum best reconstructs
    ``Z.sum(0)``; returns the sorted kept rows and the relative squared error left."""
    Z = np.asarray(Z, dtype=np.float64)
    if not 1 <= n_keep <= Z.shape[0]:
        raise ValueError(f"n_keep {n_keep} is outside 1..{Z.shape[0]}")
    target = Z.sum(axis=0)
    residual = target.copy()
    energy = np.einsum("cm,cm->c", Z, Z)
    free = np.ones(Z.shape[0], dtype=bool)
    for _ in range(n_keep):
        # ‖r − z_c‖² − ‖r‖² = ‖z_c‖² − 2·z_c·r; argmin takes the lowest index on ties
        score = np.where(free, energy - 2.0 * (Z @ residual), np.inf)
        c = int(np.argmin(score))
        free[c] = False
        residual -= Z[c]
    total = float(target @ target)
    return np.flatnonzero(~free), float(residual @ residual) / total if total > 0 else 0.0


def refit_weights(
    patches: np.ndarray, weight: np.ndarray, kept: np.ndarray, ridge: float = 1e-6
) -> np.ndarray:
    """Least-squares weights of the kept channels reproducing each filter's dense output.

    ``weight`` (d, C_in, k, k); returns a new (d, C_in, k, k) with the dropped channels zero.
    """
    d, c_in = weight.shape[:2]
    a = patches[:, kept, :].reshape(patches.shape[0], -1)
    y = patches.reshape(patches.shape[0], -1) @ weight.reshape(d, -1).T  # (samples, d)
    gram = a.T @ a
    gram[np.diag_indices_from(gram)] += ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    solved = np.linalg.solve(gram, a.T @ y)  # (n_keep·k·k, d)
    out = np.zeros_like(weight)
    out[:, kept] = solved.T.reshape(d, len(kept), *weight.shape[2:])
    return out


def plan_layer(
    job: LayerJob, patches: np.ndarray, refit: bool
) -> tuple[GroupPlan, dict[str, Any], np.ndarray | None]:
    """Index groups, greedy reconstruction per group, and (if asked) the refit weight."""
    w = job.weight
    d = w.shape[0] // job.n_groups
    labels = np.arange(w.shape[0]) // d
    kept, errors = [], []
    new = np.zeros_like(w) if refit else None
    for g in range(job.n_groups):
        rows = slice(g * d, (g + 1) * d)
        k, err = greedy_reconstruction(contributions(patches, w[rows]), job.n_keep)
        kept.append(k)
        errors.append(err)
        if new is not None:
            new[rows] = refit_weights(patches, w[rows], k)
    info = {"reconstruction_error": float(np.mean(errors)), "samples": int(patches.shape[0])}
    return GroupPlan.from_labels(labels, kept), info, new


def _with_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            conv = out.get_submodule(name)
            conv.weight.copy_(torch.as_tensor(w, dtype=conv.weight.dtype))
    return out


@register_method(INFO, check=grouped_check(DEFAULTS))
def group2d(model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
    setup = grouped_setup(model, target, DEFAULTS, ctx.example_inputs)  # knobs checked first
    if not ctx.calib_batches:
        raise ValueError(
            "group2d needs calibration batches (PruneContext.calib_batches); the runner draws "
            "them from the training set"
        )
    knobs = setup.knobs
    t0 = time.perf_counter()
    patches = conv_patches(model, setup.names, ctx.calib_batches, knobs["positions"], ctx.seed)
    capture_seconds = time.perf_counter() - t0
    refit = bool(knobs["refit"])
    plans: dict[str, GroupPlan] = {}
    weights: dict[str, np.ndarray] = {}

    def plan(job: LayerJob) -> tuple[GroupPlan, dict[str, Any]]:
        plans[job.name], info, new = plan_layer(job, patches[job.name].numpy(), refit)
        if new is not None:
            weights[job.name] = new
        return plans[job.name], info

    result = prune_grouped(model, target, ctx, plan, DEFAULTS)
    if refit:
        source = _with_weights(model, weights)
        result.model = apply_plans(source, plans)
        result.reference = masked_reference(source, plans)
    images = sum(len(x) for x, _ in ctx.calib_batches)
    result.info["calibration"] = {
        "batches": len(ctx.calib_batches),
        "images": images,
        "positions": int(knobs["positions"]),
        "inputs": "dense network",
        "refit": refit,
    }
    result.info["distill"] = {
        "alpha": float(knobs["kd_alpha"]),
        "temperature": float(knobs["kd_temperature"]),
    }
    result.info["prune_seconds"] += capture_seconds
    return result

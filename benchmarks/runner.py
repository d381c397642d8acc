"""The pipeline behind the CLI: train a baseline, prune, fine-tune, evaluate, time, record.

Everything lands under ``runs/`` (models, checkpoints, snapshots) and ``results/`` (the
leaderboard row). Each step is resumable: a finished step is loaded, not redone.

Where files go is in :mod:`benchmarks.runconfig`. Every file is a state dict plus plain data
(``gkp.checkpoint``), bound to the run it belongs to.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.environment import git_commit
from benchmarks.measure import latency_columns, latency_columns_from_json, size_columns
from benchmarks.runconfig import RunConfig, file_digest, recipe_tag
from gkp.api import MethodInfo, PruneContext, PruneTarget, get_method
from gkp.budget import FineTuneBudget
from gkp.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    rebuild,
    save_checkpoint,
    state_digest,
    structure_of,
)
from gkp.data import example_input, get_dataset_spec, load_data
from gkp.masked import MaskedConv2d, deploy_form, training_form
from gkp.models import get_model
from gkp.nn import densify, grouped_plans, per_group_plans
from gkp.recipes import Recipe
from gkp.train import Distill, evaluate, fit, phase_recipe

CALIB_BATCHES = 4  # training batches drawn for methods that need calibration data ("calib")

__all__ = ["RunConfig", "check_method", "fresh_model", "prune_run", "recipe_tag", "train_baseline"]


def _data(cfg: RunConfig):
    r = cfg.recipe
    return load_data(
        cfg.dataset,
        data_dir=cfg.data_dir,
        download=cfg.download,
        subset=r.subset,
        test_subset=r.test_subset,
        batch_size=r.batch_size,
        seed=cfg.seed,
    )


def fresh_model(cfg: RunConfig) -> nn.Module:
    """A newly initialised ``cfg.model`` shaped for ``cfg.dataset`` (seeded by ``cfg.seed``)."""
    spec = get_dataset_spec(cfg.dataset)
    torch.manual_seed(cfg.seed)
    return get_model(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels)


def plain(obj: Any) -> Any:
    """``obj`` as JSON-able plain data (numpy scalars, paths, tuples become numbers, text, lists),
    so that checkpoints load with ``weights_only=True``."""
    return json.loads(json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def check_method(cfg: RunConfig) -> None:
    """The method's knobs, checked against a fresh model of this run before any work starts.

    A method registered with a ``check`` (every grouped-kernel method) validates its knobs'
    types and ranges and, e.g., that ``groups`` divides every target layer's filters.
    """
    method = get_method(cfg.method)
    target = PruneTarget(cfg.target, dict(cfg.native))
    check = getattr(method, "check", None)
    if check is not None:
        check(fresh_model(cfg), target, example_input(cfg.dataset, 1))


def train_baseline(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume, or load) the dense baseline, with snapshots in the recipe's window."""
    out = cfg.baseline_dir()
    final = out / "final.pt"
    if final.exists() and not cfg.restart:
        return _baseline_file(cfg, final)["summary"]
    if cfg.restart:  # snapshots of an older run must not reach TMI-GKP's vote
        shutil.rmtree(out / "snapshots", ignore_errors=True)
    train, test, _ = _data(cfg)
    model = fresh_model(cfg)
    lo, hi = cfg.recipe.window()
    summary = fit(
        model,
        train,
        test,
        cfg.recipe,
        out,
        phase="train",
        device=cfg.torch_device,
        seed=cfg.seed,
        snapshot_epochs=range(lo, hi + 1),
        progress=cfg.progress,
        restart=cfg.restart,
        identity=cfg.baseline_meta(),
    )
    if summary["top1"] is None:
        raise CheckpointError(f"{out}: the baseline finished without a test accuracy; --restart")
    summary["snapshot_window"] = cfg.recipe.window_label()
    summary["window"] = [lo, hi]
    save_checkpoint(
        final,
        {
            "kind": "baseline",
            "meta": cfg.baseline_meta(),
            "state_dict": model.state_dict(),
            "summary": plain(summary),
            "recipe": plain(phase_recipe(cfg.recipe, "train")),
        },
    )
    return summary


def _baseline_file(cfg: RunConfig, final: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(final, kind="baseline", expect=cfg.baseline_meta())
    summary = ckpt.get("summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("top1"), (int, float)):
        raise CheckpointError(f"{final} has no baseline accuracy; pass --restart to retrain it")
    return ckpt


def load_baseline(cfg: RunConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The trained dense model; a missing one raises with the command that creates it."""
    final = cfg.baseline_dir() / "final.pt"
    if not final.exists():
        raise CheckpointError(
            f"no trained baseline at {final}; create it with: gkp-bench train --model {cfg.model} "
            f"--dataset {cfg.dataset} --recipe {cfg.recipe.name} --seed {cfg.seed}"
        )
    ckpt = _baseline_file(cfg, final)
    model = load_weights(fresh_model(cfg), ckpt.get("state_dict"), str(final))
    return model, ckpt["summary"]


def snapshots(cfg: RunConfig, window: tuple[int, int]) -> list[Path]:
    """The baseline's snapshot files inside its recorded window, in epoch order.

    Each must be a snapshot of this run's model (checked here, before any pruning work).
    """
    lo, hi = window
    found = sorted((cfg.baseline_dir() / "snapshots").glob("epoch_*.pt"))
    picked = [p for p in found if lo <= int(p.stem.split("_")[1]) <= hi]
    for p in picked:
        load_checkpoint(p, kind="snapshot", expect=cfg.baseline_meta())
    return picked


@dataclass
class Pruned:
    """The model right after pruning, what the method decided, and the commit that pruned it."""

    model: nn.Module
    info: dict[str, Any]
    commit: str


def _prune(cfg: RunConfig, dense: nn.Module, base: dict[str, Any], info: MethodInfo) -> Pruned:
    """Prune once and keep the result in ``pruned.pt``; later calls load it."""
    path = cfg.prune_dir() / "pruned.pt"
    baseline_id = file_digest(cfg.baseline_dir() / "final.pt")
    if path.exists() and not cfg.restart:
        saved = load_checkpoint(path, kind="pruned", expect=cfg.pruned_meta())
        if saved.get("baseline") != baseline_id:
            raise CheckpointError(
                f"{path} was pruned from an older baseline than {cfg.baseline_dir()}/final.pt; "
                "pass --restart to prune and fine-tune again"
            )
        model = rebuild(fresh_model(cfg), saved.get("structure"), str(path))
        model = load_weights(model, saved.get("state_dict"), str(path))
        return Pruned(model, saved["info"], str(saved.get("commit", "")))
    snaps = snapshots(cfg, tuple(base.get("window", (0, 10**9))))
    if "snapshots" in info.needs and not snaps:
        raise CheckpointError(
            f"{info.name} needs training snapshots, and {cfg.baseline_dir()}/snapshots has none; "
            f"create them with: gkp-bench train --model {cfg.model} --dataset {cfg.dataset} "
            f"--recipe {cfg.recipe.name} --seed {cfg.seed} --restart"
        )
    x = example_input(cfg.dataset, 1)
    budget = finetune_budget(cfg) if "finetune" in info.needs else None
    ctx = PruneContext(
        example_inputs=x,
        snapshots=tuple(snaps),
        calib_batches=calibration_batches(cfg) if "calib" in info.needs else (),
        teacher=dense if "teacher" in info.needs else None,
        seed=cfg.seed,
        finetune=budget,
        progress=cfg.progress,
    )
    t0 = time.perf_counter()
    result = get_method(cfg.method)(dense, PruneTarget(cfg.target, dict(cfg.native)), ctx)
    spent = {"finetune_budget": budget.record()} if budget is not None else {}
    prune_info = plain({**result.info, **spent, "prune_seconds": time.perf_counter() - t0})
    pruned = Pruned(result.model, prune_info, git_commit())
    save_checkpoint(
        path,
        {
            "kind": "pruned",
            "meta": cfg.pruned_meta(),
            "structure": structure_of(result.model),
            "state_dict": result.model.state_dict(),
            "info": prune_info,
            "baseline": baseline_id,
            "commit": pruned.commit,
        },
    )
    return pruned


def calibration_batches(cfg: RunConfig, n: int = CALIB_BATCHES) -> tuple:
    """The first ``n`` batches of the training set's first (seeded) epoch, on the CPU."""
    train, _, _ = _data(cfg)
    train.set_epoch(0)
    return tuple((x.cpu(), y.cpu()) for x, y in itertools.islice(train, n))


def finetune_budget(cfg: RunConfig) -> FineTuneBudget:
    """The run's whole fine-tuning budget (``ft_epochs`` epochs of steps), for a method that
    fine-tunes while it prunes; the global fine-tune gets what it leaves."""
    train, _, _ = _data(cfg)
    return FineTuneBudget(
        train, cfg.recipe, cfg.recipe.ft_epochs * len(train), cfg.torch_device, cfg.progress
    )


def global_steps(info: dict[str, Any]) -> int | None:
    """Steps left for the global fine-tune when the method spent some while pruning."""
    budget = info.get("finetune_budget")
    return None if not budget else int(budget["global_steps"])


def distillation(info: MethodInfo, pruned: dict[str, Any]) -> Distill | None:
    """The fine-tuning loss a method that needs a teacher gets: its recorded ``distill`` knobs."""
    if "teacher" not in info.needs:
        return None
    return Distill(**pruned.get("distill", {}))


def _window_used(info: dict[str, Any], recipe: Recipe) -> str:
    """'first-last of epochs' for the snapshots the method actually used ('' if none)."""
    epochs = [int(Path(n).stem.split("_")[1]) for n in info.get("snapshots", [])]
    return f"{min(epochs)}-{max(epochs)} of {recipe.epochs}" if epochs else ""


def decisions(info: dict[str, Any]) -> dict[str, Any]:
    """What the method decided beyond its knobs, for the row's ``prune_info`` column.

    Clustering candidates a method dropped (per layer), snapshots it used, the calibration
    data it read and the distillation loss it fine-tunes with.
    """
    dropped = {
        name: layer["dropped_candidates"]
        for name, layer in info.get("layers", {}).items()
        if isinstance(layer, dict) and layer.get("dropped_candidates")
    }
    out: dict[str, Any] = {"dropped_candidates": dropped} if dropped else {}
    if info.get("snapshots"):
        out["snapshots"] = len(info["snapshots"])
    for key in ("calibration", "distill", "finetune_budget"):
        if info.get(key):
            out[key] = info[key]
    return out


def run_id(cfg: RunConfig, baseline_id: str, pruned_digest: str) -> str:
    """Same baseline, configuration, pruned model, fine-tuning recipe and deploy: same id.

    The deploy (how the latency columns were timed) joins the key only when it is not
    ``torch`` and the columns are timed here (not taken from ``--latency-json``), so rows timed
    with the PyTorch ops keep the ids they were recorded under."""
    key = [baseline_id, cfg.bench_key(), pruned_digest, phase_recipe(cfg.recipe, "finetune")]
    if cfg.deploy != "torch" and cfg.latency_json is None:
        key.append({"deploy": cfg.deploy})
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prune_run(cfg: RunConfig, recorded: Mapping[str, dict] | None = None) -> dict[str, Any]:
    """Prune the baseline, fine-tune, evaluate, time against dense; returns a leaderboard row.

    ``recorded`` maps run ids to rows already in the leaderboard: a run found there (same
    baseline, configuration, pruned model and fine-tuning) is returned as it is, not redone.
    """
    method = get_method(cfg.method)
    dense, base = load_baseline(cfg)
    device = cfg.torch_device
    pruned = _prune(cfg, dense, base, method.info)
    info = pruned.info
    digest = state_digest(pruned.model)
    rid = run_id(cfg, file_digest(cfg.baseline_dir() / "final.pt"), digest)
    if recorded and rid in recorded:
        return recorded[rid]
    train, test, _ = _data(cfg)
    before = evaluate(pruned.model.to(device), test, device)["top1"]
    trainable = training_form(pruned.model)  # same function, trains faster than the grouped form
    kd = distillation(method.info, info)
    steps = global_steps(info)
    ft = fit(
        trainable,
        train,
        test,
        cfg.recipe,
        cfg.prune_dir(),
        phase="finetune",
        device=device,
        seed=cfg.seed,
        progress=cfg.progress,
        restart=cfg.restart,
        identity={
            **cfg.pruned_meta(),
            "pruned": digest,
            **({"steps": steps} if steps is not None else {}),
        },
        teacher=dense if kd is not None else None,
        distill=kd,
        steps=steps,
    )
    deployed = deploy_form(trainable)
    final = evaluate(deployed, test, device)  # the deployed network is what gets reported
    payload = {
        "kind": "finetuned",
        "meta": {**cfg.pruned_meta(), "pruned": digest},
        "structure": structure_of(deployed),
        "state_dict": deployed.state_dict(),
        "summary": plain(ft),
        "info": info,
    }
    save_checkpoint(cfg.prune_dir() / "final.pt", payload)
    x = example_input(cfg.dataset, 1)
    commit = git_commit()
    tune_cache: dict[str, dict[str, str]] = {}
    latency = _latency(cfg, dense, deployed, x, device, tune_cache)
    if tune_cache:  # --deploy autotune: its choices go with the model they were tuned for
        save_checkpoint(cfg.prune_dir() / "final.pt", {**payload, "autotune": tune_cache})
    timed = {"timed_form": timed_form(deployed)}
    if "also" in latency:
        timed["latency_masked_dense"] = latency.pop("also")["masked_dense"]
    deploy = latency.pop("deploy", {"deploy": "torch"})
    if deploy["deploy"] != "torch":  # rows timed with the PyTorch ops say nothing (as before)
        timed["deploy"] = deploy
    row = {
        "source": "measured",
        "run_id": rid,
        "method": cfg.method,
        "granularity": method.info.granularity.value,
        "faithfulness": "variant" if info.get("variant") else method.info.faithfulness,
        "reference": method.info.reference,
        "options": json.dumps(info.get("options", {}), sort_keys=True, default=str),
        "prune_info": json.dumps({**decisions(info), **timed}, sort_keys=True),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "recipe": cfg.recipe.name,
        "seed": cfg.seed,
        "target": cfg.target,
        "finetune_epochs": cfg.recipe.ft_epochs,
        "snapshot_window": _window_used(info, cfg.recipe),
        "top1_dense": base["top1"],
        "top1_pruned_before_ft": before,
        "top1": final["top1"],
        "top1_best": ft["top1_best"],
        "top5": final["top5"],
        "prune_seconds": info["prune_seconds"],
        "train_seconds": ft["seconds"],
        "command": cfg.command,
        "git_commit": commit,
        "prune_commit": pruned.commit if pruned.commit != commit else "",
        **size_columns(dense.cpu(), deployed.cpu(), x),
        **latency,
    }
    if cfg.backends:  # appended to latency.csv once the leaderboard row is (commands._record)
        row[LATENCY_ROWS] = backend_latency(cfg, dense.cpu(), deployed.cpu(), x.shape[1:], rid)
    return row


LATENCY_ROWS = "_latency_rows"  # key of a row's long-format latency rows (not a column)


def backend_latency(
    cfg: RunConfig, dense: nn.Module, pruned: nn.Module, sample_shape, rid: str
) -> list[dict[str, Any]]:
    """Long-format latency rows of ``pruned`` vs ``dense`` on ``cfg.backends`` (batch 1 and
    ``cfg.bench_batch``, CPU), identified by run id ``rid``."""
    from benchmarks.latency import latency_rows

    return latency_rows(
        dense, pruned, sample_shape=sample_shape, backends=cfg.backends,
        batches=sorted({1, cfg.bench_batch}), threads=cfg.threads or torch.get_num_threads(),
        rounds=cfg.bench_rounds, command=cfg.command,
        ident={"run_id": rid, "model": cfg.model, "method": cfg.method, "config": cfg.bench_key()},
    )  # fmt: skip


def _latency(
    cfg: RunConfig, dense: nn.Module, pruned: nn.Module, x, device, tune_cache: dict | None = None
) -> dict[str, Any]:
    if cfg.latency_json is not None:
        return latency_columns_from_json(
            cfg.latency_json,
            model=cfg.model,
            config=cfg.bench_key(),
            input_shape=x.shape[1:],
            device=device.type,
        )
    also = {"masked_dense": densify(pruned)} if per_group_plans(pruned) else None
    return latency_columns(
        dense, pruned, x.shape[1:], cfg.bench_batch, cfg.bench_rounds, device, cfg.threads, also,
        cfg.deploy, tune_cache,
    )  # fmt: skip


def timed_form(model: nn.Module) -> str:
    """Which form of the pruned layers the latency columns timed."""
    if per_group_plans(model):
        return "per-group convs (one conv per group); masked-dense timed beside it"
    if grouped_plans(model):
        return "grouped conv"
    return "masked dense" if any(isinstance(m, MaskedConv2d) for m in model.modules()) else "dense"

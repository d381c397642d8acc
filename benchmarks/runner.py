"""The pipeline behind the CLI: train a baseline, prune, fine-tune, evaluate, time, record.

Everything lands under ``runs/`` (models, checkpoints, snapshots) and ``results/`` (the
leaderboard row). Each step is resumable: a finished step is loaded, not redone.

Layout: ``runs/<dataset>-<model>-<recipe>-s<seed>/`` holds the baseline (``checkpoint.pt``,
``final.pt``, ``snapshots/``); ``.../pruned/<method>-<knobs>/`` holds ``pruned.pt`` (the model
right after pruning) and the fine-tuning checkpoint and ``final.pt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.measure import latency_columns, size_columns
from gkp.api import MethodInfo, PruneContext, PruneTarget, get_method
from gkp.data import example_input, get_dataset_spec, load_data
from gkp.masked import deploy_form, training_form
from gkp.models import get_model
from gkp.recipes import RECIPES, Recipe
from gkp.train import CheckpointError, evaluate, fit, load_checkpoint, resolve_device, save_atomic


@dataclass
class RunConfig:
    """One benchmark run's settings (the CLI's common flags)."""

    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    method: str = "gkp-l2"
    recipe: Recipe | None = None
    target: float | None = None
    native: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str | None = None
    data_dir: str | None = None
    download: bool = False
    runs_dir: Path = Path("runs")
    results_dir: Path = Path("results")
    bench_batch: int = 32
    bench_rounds: int = 30
    threads: int | None = None
    latency_json: Path | None = None  # take latency columns from a pytest-benchmark JSON
    progress: bool = True
    restart: bool = False
    command: str = ""

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def baseline_dir(self) -> Path:
        return self.runs_dir / f"{self.dataset}-{self.model}-{recipe_tag(self.recipe)}-s{self.seed}"

    def prune_tag(self) -> str:
        knobs = "-".join(f"{k}{v}" for k, v in sorted(self.native.items()))
        return "-".join(
            x for x in (self.method, f"t{self.target}" if self.target else "", knobs) if x
        )

    def prune_dir(self) -> Path:
        return self.baseline_dir() / "pruned" / self.prune_tag()


def recipe_tag(recipe: Recipe) -> str:
    """The recipe's name, plus a short hash when command-line overrides changed any field."""
    named = RECIPES.get(recipe.name)
    if named == recipe:
        return recipe.name
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    return f"{recipe.name}-{digest.hexdigest()[:8]}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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


def _fresh_model(cfg: RunConfig) -> nn.Module:
    spec = get_dataset_spec(cfg.dataset)
    torch.manual_seed(cfg.seed)
    return get_model(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels)


def train_baseline(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume, or load) the dense baseline, with snapshots in the recipe's window."""
    out = cfg.baseline_dir()
    final = out / "final.pt"
    if final.exists() and not cfg.restart:
        return load_checkpoint(final)["summary"]
    if cfg.restart:  # snapshots of an older run must not reach TMI-GKP's vote
        shutil.rmtree(out / "snapshots", ignore_errors=True)
    train, test, _ = _data(cfg)
    model = _fresh_model(cfg)
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
    )
    summary["snapshot_window"] = cfg.recipe.window_label()
    summary["window"] = [lo, hi]
    save_atomic(
        {"model": model.state_dict(), "summary": summary, "recipe": dataclasses.asdict(cfg.recipe)},
        final,
    )
    return summary


def load_baseline(cfg: RunConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The trained dense model; a missing one raises with the command that creates it."""
    final = cfg.baseline_dir() / "final.pt"
    if not final.exists():
        raise CheckpointError(
            f"no trained baseline at {final}; create it with: gkp-bench train --model {cfg.model} "
            f"--dataset {cfg.dataset} --recipe {cfg.recipe.name} --seed {cfg.seed}"
        )
    ckpt = load_checkpoint(final)
    model = _fresh_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{final} does not hold a {cfg.model} for {cfg.dataset}: {err}"
        ) from err
    return model, ckpt["summary"]


def snapshots(cfg: RunConfig, window: tuple[int, int]) -> list[Path]:
    """The baseline's snapshot files inside its recorded window, in epoch order."""
    lo, hi = window
    found = sorted((cfg.baseline_dir() / "snapshots").glob("epoch_*.pt"))
    return [p for p in found if lo <= int(p.stem.split("_")[1]) <= hi]


def _prune(
    cfg: RunConfig, dense: nn.Module, base: dict[str, Any], info: MethodInfo
) -> tuple[nn.Module, dict]:
    """Prune once and keep the result in ``pruned.pt``; later calls load it."""
    path = cfg.prune_dir() / "pruned.pt"
    baseline_id = file_digest(cfg.baseline_dir() / "final.pt")
    if path.exists() and not cfg.restart:
        saved = load_checkpoint(path)
        if saved.get("baseline") != baseline_id:
            raise CheckpointError(
                f"{path} was pruned from an older baseline than {cfg.baseline_dir()}/final.pt; "
                "pass --restart to prune and fine-tune again"
            )
        return saved["model"], saved["info"]
    snaps = snapshots(cfg, tuple(base.get("window", (0, 10**9))))
    if "snapshots" in info.needs and not snaps:
        raise CheckpointError(
            f"{info.name} needs training snapshots, and {cfg.baseline_dir()}/snapshots has none; "
            f"create them with: gkp-bench train --model {cfg.model} --dataset {cfg.dataset} "
            f"--recipe {cfg.recipe.name} --seed {cfg.seed} --restart"
        )
    x = example_input(cfg.dataset, 1)
    ctx = PruneContext(example_inputs=x, snapshots=tuple(snaps), seed=cfg.seed)
    t0 = time.perf_counter()
    result = get_method(cfg.method)(dense, PruneTarget(cfg.target, dict(cfg.native)), ctx)
    prune_info = {**result.info, "prune_seconds": time.perf_counter() - t0}
    save_atomic({"model": result.model, "info": prune_info, "baseline": baseline_id}, path)
    return result.model, prune_info


def _window_used(info: dict[str, Any], recipe: Recipe) -> str:
    """'first-last of epochs' for the snapshots the method actually used ('' if none)."""
    epochs = [int(Path(n).stem.split("_")[1]) for n in info.get("snapshots", [])]
    return f"{min(epochs)}-{max(epochs)} of {recipe.epochs}" if epochs else ""


def prune_run(cfg: RunConfig) -> dict[str, Any]:
    """Prune the baseline, fine-tune, evaluate, time against dense; returns a leaderboard row."""
    method = get_method(cfg.method)
    dense, base = load_baseline(cfg)
    device = cfg.torch_device
    train, test, _ = _data(cfg)
    pruned, info = _prune(cfg, dense, base, method.info)
    before = evaluate(pruned.to(device), test, device)["top1"]
    trainable = training_form(pruned)  # same function, trains faster than the grouped form
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
    )
    pruned = deploy_form(trainable)
    final = evaluate(pruned, test, device)  # the deployed network is what gets reported
    save_atomic({"model": pruned, "summary": ft, "info": info}, cfg.prune_dir() / "final.pt")
    x = example_input(cfg.dataset, 1)
    row = {
        "source": "measured",
        "method": cfg.method,
        "granularity": method.info.granularity.value,
        "faithfulness": method.info.faithfulness,
        "reference": method.info.reference,
        "options": json.dumps(info.get("options", {}), sort_keys=True, default=str),
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
        **size_columns(dense.cpu(), pruned.cpu(), x),
        **_latency(cfg, dense, pruned, x, device),
    }
    return row


def _latency(cfg: RunConfig, dense: nn.Module, pruned: nn.Module, x, device) -> dict[str, Any]:
    if cfg.latency_json is not None:
        from benchmarks.bench import latency_columns_from_json

        return latency_columns_from_json(cfg.latency_json, cfg.model, cfg.method)
    return latency_columns(
        dense, pruned, x.shape[1:], cfg.bench_batch, cfg.bench_rounds, device, cfg.threads
    )

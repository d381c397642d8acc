"""Train, fine-tune and evaluate, with per-epoch checkpoints, resume, snapshots and progress.

A run directory holds ``checkpoint.pt`` (rewritten atomically after every epoch), optional
``snapshots/epoch_NNN.pt`` (the weights after chosen epochs, for TMI-GKP's tickets) and, when
the phase is done, ``final.pt``. Calling ``fit`` again on the same directory resumes after the
last finished epoch without repeating it; a finished phase returns at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gkp.metrics import topk_correct
from gkp.recipes import Recipe


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a file written by this module; a missing or corrupt one raises CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; run `gkp-bench train` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(
            f"{path} is corrupt or not a GKP-Bench checkpoint ({type(err).__name__}: {err}); "
            "delete it (or pass --restart) to start that phase again"
        ) from err


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole loader."""
    model.eval()
    n, loss, hits = 0, 0.0, {1: 0, 5: 0}
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        for k, v in topk_correct(out, y, (1, 5)).items():
            hits[k] += v
        n += len(y)
    return {"top1": 100.0 * hits[1] / n, "top5": 100.0 * hits[5] / n, "loss": loss / n, "n": n}


def lr_factor(recipe: Recipe, step: int, total: int) -> float:
    """Multiplier of the initial lr after ``step`` of ``total`` optimizer steps."""
    t = step / max(1, total)
    if recipe.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if recipe.schedule == "step":
        return recipe.gamma ** sum(t >= m for m in recipe.milestones)
    raise ValueError(f"unknown schedule {recipe.schedule!r}; use 'step' or 'cosine'")


def _optimizer(model: nn.Module, lr: float, recipe: Recipe, total_steps: int):
    opt = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(recipe, s, total_steps))
    return opt, sched


def _train_epoch(model, loader, opt, sched, device, bar) -> dict[str, float]:
    model.train()
    n, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        n += len(y)
        loss_sum += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_sum / n:.3f}",
            acc=f"{100 * correct / n:.1f}%",
            lr=f"{sched.get_last_lr()[0]:.4f}",
            refresh=False,
        )
    return {"train_loss": loss_sum / n, "train_acc": 100.0 * correct / n}


def _resume(ckpt_path: Path, phase: str, recipe: Recipe, model, opt, sched) -> tuple[int, list]:
    if not ckpt_path.exists():
        return 0, []
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("phase") != phase or ckpt.get("recipe") != dataclasses.asdict(recipe):
        raise CheckpointError(
            f"{ckpt_path} belongs to a different run (phase {ckpt.get('phase')!r}, another "
            "recipe); use another --out folder or pass --restart to overwrite it"
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["torch_rng"])
    return int(ckpt["epoch"]), list(ckpt["history"])


def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    recipe: Recipe,
    run_dir: Path,
    *,
    phase: str = "train",
    device: torch.device | None = None,
    seed: int = 0,
    snapshot_epochs: Sequence[int] = (),
    progress: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place for the phase's epochs ("train" or "finetune"), resumably.

    Evaluates after every fine-tuning epoch (so ``top1_best`` exists) and, for the baseline,
    every ``recipe.eval_every`` epochs and at the end. Returns the per-epoch history, the final
    and best test accuracy, and the seconds spent training in this call.
    """
    if phase not in ("train", "finetune"):
        raise ValueError(f"phase must be 'train' or 'finetune', got {phase!r}")
    device = device or resolve_device()
    epochs, lr = (
        (recipe.epochs, recipe.lr) if phase == "train" else (recipe.ft_epochs, recipe.ft_lr)
    )
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if restart:
        ckpt_path.unlink(missing_ok=True)
    seed_everything(seed)
    model.to(device)
    opt, sched = _optimizer(model, lr, recipe, epochs * len(train_loader))
    start, history = _resume(ckpt_path, phase, recipe, model, opt, sched)
    bar = tqdm(
        total=epochs * len(train_loader),
        initial=start * len(train_loader),
        desc=f"{phase} {run_dir.name}",
        unit="batch",
        disable=not progress,
        mininterval=1.0,
    )
    for epoch in range(start + 1, epochs + 1):
        bar.set_description(f"{phase} {run_dir.name} epoch {epoch}/{epochs}")
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch - 1)
        row: dict[str, Any] = {
            "epoch": epoch,
            **_train_epoch(model, train_loader, opt, sched, device, bar),
        }
        if (
            phase == "finetune"
            or epoch == epochs
            or (recipe.eval_every and epoch % recipe.eval_every == 0)
        ):
            test = evaluate(model, test_loader, device)
            row.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"])
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if epoch in snapshot_epochs:
            save_atomic(model.state_dict(), run_dir / "snapshots" / f"epoch_{epoch:03d}.pt")
        save_atomic(
            {
                "phase": phase,
                "recipe": dataclasses.asdict(recipe),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "torch_rng": torch.get_rng_state(),
            },
            ckpt_path,
        )
        if progress and "test_top1" in row:
            bar.write(f"{phase} epoch {epoch}/{epochs}: test top-1 {row['test_top1']:.2f}%")
    bar.close()
    return summarize(history)


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best test accuracy of a phase's history, and its total training seconds."""
    tested = [h for h in history if "test_top1" in h]
    last = tested[-1] if tested else {}
    return {
        "history": history,
        "top1": last.get("test_top1"),
        "top5": last.get("test_top5"),
        "top1_best": max((h["test_top1"] for h in tested), default=None),
        "seconds": sum(h.get("seconds", 0.0) for h in history),
    }

"""Train, fine-tune and evaluate, with per-epoch checkpoints, resume, snapshots and progress.

A run directory holds ``checkpoint.pt`` (rewritten atomically after every epoch), optional
``snapshots/epoch_NNN.pt`` (the weights after chosen epochs, for TMI-GKP's tickets) and, when
the phase is done, ``final.pt``. Calling ``fit`` again on the same directory resumes after the
last finished epoch without repeating it; a finished phase returns at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gkp.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from gkp.metrics import topk_correct
from gkp.recipes import Recipe

__all__ = [
    "CheckpointError",
    "Distill",
    "distill_loss",
    "evaluate",
    "fit",
    "load_checkpoint",
    "make_optimizer",
    "phase_recipe",
    "resolve_device",
    "summarize",
    "train_batches",
]

FINETUNE_FIELDS = ("ft_epochs", "ft_lr")  # recipe fields only the fine-tuning phase reads


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU. A device this machine lacks raises."""
    if device is None or str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).strip().lower())
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def phase_recipe(recipe: Recipe, phase: str) -> dict[str, Any]:
    """The recipe fields a phase depends on: the baseline ignores the fine-tuning ones."""
    fields = dataclasses.asdict(recipe)
    if phase == "train":
        return {k: v for k, v in fields.items() if k not in FINETUNE_FIELDS}
    return fields


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def make_optimizer(model: nn.Module, lr: float, recipe: Recipe, total_steps: int | None):
    """SGD with the recipe's momentum and weight decay; the recipe's lr schedule over
    ``total_steps`` steps, or a constant lr when ``total_steps`` is None."""
    opt = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=False,
    )
    if total_steps is None:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(recipe, s, total_steps))
    return opt, sched


@dataclasses.dataclass(frozen=True)
class Distill:
    """Knowledge distillation from a teacher: ``loss = CE + α·T²·KL(p_teacher/T ‖ p_student/T)``.

    As METHODS.md writes it for group-wise 2D-filter pruning [1] (the hard-label term is not
    down-weighted by ``1-α``); α = 0.9 and T = 4 are its defaults.
    """

    alpha: float = 0.9
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distillation alpha {self.alpha!r} is outside [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"distillation temperature {self.temperature!r} must be positive")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, kd: Distill):
    """The :class:`Distill` loss of one batch (``teacher`` logits carry no gradient)."""
    t = kd.temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean"
    )
    return F.cross_entropy(student, y) + kd.alpha * t * t * soft


def train_batches(model, loader, opt, sched, device, bar, teacher=None, kd=None) -> dict:
    """One pass over ``loader`` (any iterable of batches): forward, loss, step; mean loss/acc."""
    model.train()
    n, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        if teacher is None:
            loss = F.cross_entropy(out, y)
        else:
            with torch.no_grad():
                soft_targets = teacher(x)
            loss = distill_loss(out, soft_targets, y, kd)
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


def _resume(
    ckpt_path: Path, phase: str, recipe: Recipe, identity: Mapping[str, Any], model, opt, sched
) -> tuple[int, list]:
    """Load the progress checkpoint of this exact run, if there is one; refuse another run's."""
    if not ckpt_path.exists():
        return 0, []
    ckpt = load_checkpoint(ckpt_path, kind="progress", expect=dict(identity))
    if ckpt.get("phase") != phase or ckpt.get("recipe") != phase_recipe(recipe, phase):
        raise CheckpointError(
            f"{ckpt_path} belongs to a different run (phase {ckpt.get('phase')!r}, another "
            "recipe); use another --runs folder or pass --restart to overwrite it"
        )
    load_weights(model, ckpt.get("model"), str(ckpt_path))
    try:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        return int(ckpt["epoch"]), list(ckpt["history"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"{ckpt_path} is incomplete ({type(err).__name__}: {err}); pass --restart"
        ) from err


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
    identity: Mapping[str, Any] | None = None,
    teacher: nn.Module | None = None,
    distill: Distill | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for the phase's epochs ("train" or "finetune"), resumably.

    Evaluates after every fine-tuning epoch (so ``top1_best`` exists) and, for the baseline,
    every ``recipe.eval_every`` epochs and at the end. Returns the per-epoch history, the final
    and best test accuracy, and the seconds spent training in this call.

    ``identity`` (plain data: model, dataset, and for fine-tuning the pruned model's digest and
    the method's options) is stored in the progress checkpoint; resuming from a checkpoint with
    another identity raises CheckpointError instead of silently continuing another run.

    ``teacher``: train against :func:`distill_loss` with ``distill`` (default :class:`Distill`)
    instead of plain cross-entropy; the teacher stays in eval mode and is never updated.

    ``steps``: train this many optimizer steps instead of the phase's ``epochs × batches``
    (what is left of a fine-tuning budget a method spent partly while pruning, see
    :class:`gkp.budget.FineTuneBudget`); the last epoch stops early, the lr schedule spans
    ``steps``. The caller puts ``steps`` into ``identity``.
    """
    identity = dict(identity or {})
    if phase not in ("train", "finetune"):
        raise ValueError(f"phase must be 'train' or 'finetune', got {phase!r}")
    device = device or resolve_device()
    epochs, lr = (
        (recipe.epochs, recipe.lr) if phase == "train" else (recipe.ft_epochs, recipe.ft_lr)
    )
    if epochs < (1 if phase == "train" else 0):
        flag = "--epochs" if phase == "train" else "--ft-epochs"
        raise ValueError(f"{flag} must be at least {1 if phase == 'train' else 0}, got {epochs}")
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if restart:
        ckpt_path.unlink(missing_ok=True)
    seed_everything(seed)
    model.to(device)
    kd = distill or Distill()
    if teacher is not None:
        teacher = teacher.to(device).eval()
    per_epoch = len(train_loader)
    total = epochs * per_epoch if steps is None else int(steps)
    if steps is not None:
        if total < 0:
            raise ValueError(f"steps must be at least 0, got {steps}")
        epochs = math.ceil(total / per_epoch)
    opt, sched = make_optimizer(model, lr, recipe, total)
    start, history = _resume(ckpt_path, phase, recipe, identity, model, opt, sched)
    bar = tqdm(
        total=total,
        initial=min(total, start * per_epoch),
        desc=f"{phase} {run_dir.name}",
        unit="batch",
        disable=not progress,
        mininterval=1.0,
    )
    for epoch in range(start + 1, epochs + 1):
        bar.set_description(f"{phase} {run_dir.name} epoch {epoch}/{epochs}")
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch - 1)
        batches = itertools.islice(train_loader, min(per_epoch, total - (epoch - 1) * per_epoch))
        row: dict[str, Any] = {
            "epoch": epoch,
            **train_batches(model, batches, opt, sched, device, bar, teacher, kd),
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
            save_checkpoint(
                run_dir / "snapshots" / f"epoch_{epoch:03d}.pt",
                {"kind": "snapshot", "meta": identity, "epoch": epoch, "model": model.state_dict()},
            )
        save_checkpoint(
            ckpt_path,
            {
                "kind": "progress",
                "meta": identity,
                "phase": phase,
                "recipe": phase_recipe(recipe, phase),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "torch_rng": torch.get_rng_state(),
            },
        )
        if progress and "test_top1" in row:
            msg = f"{phase} epoch {epoch}/{epochs}: test top-1 {row['test_top1']:.2f}%"
            bar.write(msg, file=sys.stderr)  # stdout is kept for the result (and --json)
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

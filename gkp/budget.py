"""The fine-tuning a method may do while it prunes: ``PruneContext.finetune``.

Methods that retrain between pruning steps (SG-CNN's "local" fine-tunes) never own a training
loop. A method that declares ``needs={"finetune"}`` gets a :class:`FineTuneBudget` from the
runner: calling it trains a model in place for a number of optimizer steps with the recipe's
fine-tuning optimizer (SGD at ``ft_lr``, held constant, the recipe's momentum and weight decay),
on the run's training batches and device, with a progress bar. Every step is taken from the
run's one fine-tuning budget, ``ft_epochs × batches per epoch`` steps, the same for every
method; the global fine-tune after pruning gets what is left, and the row records the split
(``prune_info.finetune_budget``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gkp.recipes import Recipe
from gkp.train import make_optimizer, train_batches

__all__ = ["FineTuneBudget"]


@dataclass
class FineTuneBudget:
    """``budget(model, steps)`` trains ``model`` in place for at most ``steps`` steps.

    ``train``: the run's training loader (``set_epoch``-addressable); its epochs are read in
    order across calls, so one run's local fine-tunes see a seeded, reproducible stream.
    ``total_steps``: the run's whole fine-tuning budget; a call asking for more than is left
    gets what is left. The model comes back on the device it was on.
    """

    train: Any
    recipe: Recipe
    total_steps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    spent: int = 0
    calls: list[int] = field(default_factory=list)
    _stream: Iterator | None = field(default=None, repr=False)

    @property
    def left(self) -> int:
        return self.total_steps - self.spent

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)

    def _batches(self) -> Iterator:
        epoch = 0
        while True:
            self.train.set_epoch(epoch)
            yield from self.train
            epoch += 1

    def __call__(self, model: nn.Module, steps: int, desc: str = "local fine-tune") -> dict:
        steps = max(0, min(int(steps), self.left))
        if steps == 0:
            return {"steps": 0}
        if self._stream is None:
            self._stream = self._batches()
        home = next(model.parameters()).device
        model.to(self.device)
        opt, sched = make_optimizer(model, self.recipe.ft_lr, self.recipe, None)  # constant lr
        bar = tqdm(total=steps, desc=desc, unit="batch", disable=not self.progress, file=sys.stderr)
        t0 = time.perf_counter()
        stats = train_batches(
            model, (next(self._stream) for _ in range(steps)), opt, sched, self.device, bar
        )
        bar.close()
        model.to(home)
        self.spent += steps
        self.calls.append(steps)
        return {"steps": steps, **stats, "seconds": time.perf_counter() - t0}

    def record(self) -> dict[str, Any]:
        """The split, for the row: steps spent while pruning and those left for the global one."""
        return {
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "in_pruning_steps": self.spent,
            "global_steps": self.left,
            "calls": list(self.calls),
        }

"""One run's settings and where its files go.

Layout: ``runs/<dataset>-<model>-<recipe>-s<seed>/`` holds the baseline (``checkpoint.pt``,
``final.pt``, ``snapshots/``); ``.../pruned/<method>-<readable knobs>-<digest>/`` holds
``pruned.pt`` (the model right after pruning) and the fine-tuning checkpoint and ``final.pt``.
Folder names never contain raw option text: the readable part is filtered to ``[A-Za-z0-9.=_+-]``
and the digest of the canonical options decides. Fine-tuning overrides change only the pruned
folder, never the baseline's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import DEFAULT_DEPLOY, bench_key
from gkp.recipes import RECIPES, Recipe
from gkp.train import phase_recipe, resolve_device

READABLE_CHARS = re.compile(r"[^A-Za-z0-9.=_+-]")


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
    deploy: str = DEFAULT_DEPLOY  # how the networks run when timed (benchmarks.measure.DEPLOYS)
    latency_json: Path | None = None  # take latency columns from a pytest-benchmark JSON
    backends: tuple[str, ...] = ()  # also time on these (benchmarks.backends) -> latency.csv
    progress: bool = True
    restart: bool = False
    command: str = ""

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def baseline_meta(self) -> dict[str, Any]:
        """What a baseline file must belong to (stored in it, checked on load)."""
        return {"model": self.model, "dataset": self.dataset, "seed": self.seed}

    def pruned_meta(self) -> dict[str, Any]:
        """What a pruned file must belong to: the baseline's identity plus method and knobs."""
        return {**self.baseline_meta(), "config": self.bench_key()}

    def bench_key(self) -> str:
        return bench_key(self.method, self.target, self.native)

    def baseline_dir(self) -> Path:
        return self.runs_dir / f"{self.dataset}-{self.model}-{recipe_tag(self.recipe)}-s{self.seed}"

    def prune_tag(self) -> str:
        """``<method>[-t<target>][-<knobs>]-<digest>``: readable prefix, digest decides."""
        knobs = "-".join(f"{k}{v}" for k, v in sorted(self.native.items()))
        readable = "-".join(
            x for x in (self.method, f"t{self.target}" if self.target else "", knobs) if x
        )
        readable = re.sub(r"\.{2,}", ".", READABLE_CHARS.sub("", readable))[:48].strip(".-")
        canonical = {
            "config": self.bench_key(),
            "finetune": finetune_fields(self.recipe) if self.recipe else None,
        }
        digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
        return f"{readable}-{digest[:10]}"

    def prune_dir(self) -> Path:
        return self.baseline_dir() / "pruned" / self.prune_tag()


def finetune_fields(recipe: Recipe) -> dict[str, Any] | None:
    """The fine-tuning fields where they differ from the named recipe's (None: unchanged)."""
    named = RECIPES.get(recipe.name)

    def ft(r: Recipe) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(r).items() if k.startswith("ft_")}

    return None if named is not None and ft(named) == ft(recipe) else ft(recipe)


def recipe_tag(recipe: Recipe) -> str:
    """The recipe's name, plus a short hash when overrides changed a field the baseline uses.

    Fine-tuning fields (``--ft-epochs``) do not count: they must not orphan the baseline.
    """
    named = RECIPES.get(recipe.name)
    mine = phase_recipe(recipe, "train")
    if named is not None and phase_recipe(named, "train") == mine:
        return recipe.name
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode())
    return f"{recipe.name}-{digest.hexdigest()[:8]}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]

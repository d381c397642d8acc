"""Training recipes as data: every number with its unit and a one-line reason.

``paper`` is the GKP paper's schedule (baseline and fine-tuning) for GPU users; ``short`` fits
the 2-core CPU in minutes on a subset; ``smoke`` is for tests. Pick with ``--recipe``; any
field can be overridden from the command line (``--epochs``, ``--subset``, ...). ``RECIPES`` is
a :class:`~gkp.registry.Registry` (a read-only mapping): names are case-insensitive, and
:func:`register_recipe` adds one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gkp.registry import Registry

PAPER_EPOCHS = 300
PAPER_WINDOW = (35, 70)  # snapshot epochs of the GKP paper's 300-epoch baseline


@dataclass(frozen=True)
class Recipe:
    """One training + fine-tuning schedule. Epoch numbers are 1-based; lr in SGD units."""

    name: str
    why: str
    epochs: int  # baseline training epochs
    lr: float  # baseline peak learning rate
    ft_epochs: int  # fine-tuning epochs after pruning
    ft_lr: float  # fine-tuning initial learning rate
    batch_size: int = 64  # images per SGD step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step": x gamma at each milestone; "cosine": to 0 over the phase
    milestones: tuple[float, ...] = (1 / 3, 2 / 3)  # step epochs, as fractions of the phase
    gamma: float = 0.1
    subset: int | None = None  # training images (None: the whole training split)
    test_subset: int | None = None  # test images (None: the whole test split)
    eval_every: int = 0  # evaluate the baseline every N epochs (0: only at the end)
    snapshot_window: tuple[int, int] | None = None  # epochs to snapshot; None: scaled 35..70/300

    def window(self) -> tuple[int, int]:
        """Snapshot epochs (inclusive): the paper's 35..70 of 300 scaled to ``epochs``."""
        if self.snapshot_window is not None:
            return self.snapshot_window
        lo = max(1, round(PAPER_WINDOW[0] * self.epochs / PAPER_EPOCHS))
        hi = max(lo, round(PAPER_WINDOW[1] * self.epochs / PAPER_EPOCHS))
        return lo, min(hi, self.epochs)

    def window_label(self) -> str:
        lo, hi = self.window()
        return f"{lo}-{hi} of {self.epochs}"

    def with_overrides(self, **kw: object) -> Recipe:
        """A copy with the non-None keyword fields replaced (CLI options default to None)."""
        changes = {k: v for k, v in kw.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown recipe field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


RECIPES: Registry[Recipe] = Registry("recipe")


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` under its name (stored in canonical, lower-case form); duplicates raise."""
    recipe = dataclasses.replace(recipe, name=RECIPES.normalise(recipe.name))
    return RECIPES.register(recipe.name, recipe)


for _recipe in (
    Recipe(
        "smoke",
        "tests: seconds on a CPU, just exercises every step",
        epochs=2,
        lr=0.05,
        ft_epochs=1,
        ft_lr=0.01,
        batch_size=32,
        schedule="cosine",
        subset=128,
        test_subset=128,
    ),
    Recipe(
        "quick",
        "the main job's default: 7 methods compared on a 2-core CPU in about 10 minutes",
        epochs=4,
        lr=0.1,
        ft_epochs=2,
        ft_lr=0.01,
        batch_size=128,
        schedule="cosine",
        subset=5_000,
        test_subset=2_000,
    ),
    Recipe(
        "short",
        "2-core CPU: resnet20 on a 10k-image subset learns well past chance in minutes",
        epochs=6,
        lr=0.1,
        ft_epochs=3,
        ft_lr=0.01,
        batch_size=128,
        schedule="cosine",
        subset=10_000,
        test_subset=None,
    ),
    Recipe(
        "paper",
        "GKP (ICLR 2022): baseline lr 0.1, fine-tune lr 0.01, both x0.1 every 100 of 300",
        epochs=300,
        lr=0.1,
        ft_epochs=300,
        ft_lr=0.01,
        batch_size=64,
        schedule="step",
        milestones=(1 / 3, 2 / 3),
        eval_every=10,
    ),
):
    register_recipe(_recipe)


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (any case); an unknown name raises UnknownNameError."""
    return RECIPES[name]

"""The pruning contract every method implements, and the method registry.

A method is a callable ``(model, target, ctx) -> PruneResult`` registered with
``@register_method(MethodInfo(...))``. Adding a method is one decorated function in one file:
the registry imports ``gkp.methods`` and every module of ``baselines`` on first use. Names are
case-insensitive; ``MethodInfo.name`` is always the canonical (lower-case) spelling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from gkp.registry import PluginError, Registry, UnknownNameError, canonical

__all__ = [
    "FAITHFULNESS",
    "METHODS",
    "NEEDS",
    "Granularity",
    "Method",
    "MethodInfo",
    "PluginError",
    "PruneContext",
    "PruneResult",
    "PruneTarget",
    "Pruner",
    "UnknownNameError",
    "get_method",
    "list_methods",
    "register_method",
]


class Granularity(str, Enum):
    """What one pruning decision removes."""

    WEIGHT = "weight"
    KERNEL = "kernel"
    GROUPED_KERNEL = "grouped_kernel"
    FILTER = "filter"
    CHANNEL = "channel"


FAITHFULNESS = ("faithful", "reconstructed", "variant", "baseline")
NEEDS = ("calib", "snapshots", "teacher", "finetune", "sparse_training")


@dataclass(frozen=True)
class PruneTarget:
    """How much to prune.

    ``macs``: fraction of the *target layers'* MACs to remove, in (0, 1); the one meaning every
    method shares. ``native``: the method's own knobs (e.g. ``rate``, ``groups``) that reproduce a
    paper's setting exactly; when ``macs`` is None the native knobs alone decide.
    """

    macs: float | None = None
    native: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.macs is not None and not 0.0 < float(self.macs) < 1.0:
            raise ValueError(
                f"target {self.macs!r} is outside (0, 1): it is the fraction of the target "
                "layers' MACs to remove, e.g. --target 0.4375"
            )


@dataclass(frozen=True)
class PruneContext:
    """What a method may use besides the model.

    What the runner fills in follows the method's ``needs``: ``calib`` → ``calib_batches``
    (training batches, their number recorded), ``snapshots`` → the baseline's training
    snapshots, ``teacher`` → the unpruned network (its fine-tune distils from it),
    ``finetune`` → ``finetune(model, steps)``, a :class:`gkp.budget.FineTuneBudget` that trains
    in place and takes its steps from the run's fine-tuning budget. A method must also run
    without a ``finetune`` (None: tests, benchmarks, API use) and record that it skipped it.
    ``progress``: False hides the method's own progress bars (``--no-progress``).
    """

    example_inputs: Tensor
    calib_batches: Sequence[tuple[Tensor, Tensor]] = ()
    snapshots: Sequence[Path] = ()
    teacher: nn.Module | None = None
    seed: int = 0
    finetune: Callable[..., dict[str, Any]] | None = None
    progress: bool = True  # progress bars of the method's own long steps (layer planning)


@dataclass
class PruneResult:
    """The deployable model plus what the method decided.

    ``model`` is physically smaller for structured methods and masked for weight/kernel methods.
    ``reference``, when given, is a masked copy of the input model that ``model`` must reproduce
    exactly (the contract tests compare their outputs). ``info`` holds per-layer decisions,
    options actually used and timings; it must be JSON-serialisable.
    """

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    reference: nn.Module | None = None


class Pruner(Protocol):
    def __call__(self, model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult: ...


@dataclass(frozen=True)
class MethodInfo:
    """Static facts about a method, shown by ``gkp-bench methods`` and written to rows."""

    name: str
    granularity: Granularity
    faithfulness: str
    reference: str
    description: str
    color: str
    needs: frozenset[str] = frozenset()
    native_knobs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", canonical(self.name))  # "GKP-L2" is "gkp-l2"
        if self.faithfulness not in FAITHFULNESS:
            raise ValueError(
                f"faithfulness must be one of {FAITHFULNESS}, got {self.faithfulness!r}"
            )
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"unknown needs {sorted(unknown)}; known: {NEEDS}")


Check = Callable[[nn.Module, PruneTarget, Tensor], None]


@dataclass(frozen=True)
class Method:
    """A registered method: its facts, its pruning function and its up-front check.

    ``check(model, target, example_inputs)``, when given, validates the knobs against the model
    (types, ranges, groups dividing the layers) without pruning, and raises ValueError; the
    runner calls it before any training, so bad input never costs a training run.
    """

    info: MethodInfo
    fn: Pruner
    check: Check | None = None

    @property
    def name(self) -> str:
        """The canonical name (lower case), as rows and folder names record it."""
        return self.info.name

    def __call__(self, model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
        return self.fn(model, target, ctx)


METHODS: Registry[Method] = Registry("method", plugins=("gkp.methods", "baselines"))


def register_method(info: MethodInfo, check: Check | None = None) -> Callable[[Pruner], Pruner]:
    """Decorator registering ``fn`` under ``info.name``; a duplicate name raises ValueError.

    ``check``: see :class:`Method`.
    """
    return METHODS.decorator(info.name, lambda fn: Method(info, fn, check))


def list_methods() -> list[str]:
    """Names of every registered method, sorted (imports the plugin modules on first use)."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """The registered method ``name`` (any case); an unknown name raises UnknownNameError.

    A plugin module that fails to import raises :class:`PluginError` naming it.
    """
    return METHODS[name]

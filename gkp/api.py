"""The pruning contract every method implements, and the method registry.

A method is a callable ``(model, target, ctx) -> PruneResult`` registered with
``@register_method(MethodInfo(...))``. Adding a method is one decorated function in one file:
the registry imports ``gkp.methods`` and every module of ``baselines`` on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn


class Granularity(str, Enum):
    """What one pruning decision removes."""

    WEIGHT = "weight"
    KERNEL = "kernel"
    GROUPED_KERNEL = "grouped_kernel"
    FILTER = "filter"
    CHANNEL = "channel"


FAITHFULNESS = ("faithful", "reconstructed", "variant", "baseline")
NEEDS = ("calib", "snapshots", "teacher", "sparse_training")


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
    """What a method may use besides the model."""

    example_inputs: Tensor
    calib_batches: Sequence[tuple[Tensor, Tensor]] = ()
    snapshots: Sequence[Path] = ()
    teacher: nn.Module | None = None
    seed: int = 0


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
        if self.faithfulness not in FAITHFULNESS:
            raise ValueError(
                f"faithfulness must be one of {FAITHFULNESS}, got {self.faithfulness!r}"
            )
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"unknown needs {sorted(unknown)}; known: {NEEDS}")


@dataclass(frozen=True)
class Method:
    info: MethodInfo
    fn: Pruner

    def __call__(self, model: nn.Module, target: PruneTarget, ctx: PruneContext) -> PruneResult:
        return self.fn(model, target, ctx)


_METHODS: dict[str, Method] = {}
_PLUGIN_PACKAGES = ("gkp.methods", "baselines")
_loaded = False


def register_method(info: MethodInfo) -> Callable[[Pruner], Pruner]:
    """Decorator registering ``fn`` under ``info.name``; a duplicate name raises ValueError."""

    def deco(fn: Pruner) -> Pruner:
        if info.name in _METHODS:
            raise ValueError(f"method {info.name!r} is already registered")
        _METHODS[info.name] = Method(info, fn)
        return fn

    return deco


def _load_plugins() -> None:
    """Import the built-in method modules once, so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _PLUGIN_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except ModuleNotFoundError as err:
            if err.name != pkg_name:
                raise
            continue
        for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{mod.name}")


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_plugins()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises KeyError listing the known ones."""
    _load_plugins()
    if name not in _METHODS:
        raise UnknownNameError("method", name, sorted(_METHODS))
    return _METHODS[name]


class UnknownNameError(KeyError, ValueError):
    """An unknown method, model or dataset name; the message lists the known ones."""

    def __init__(self, kind: str, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(known)}")
        self.message = self.args[0]

    def __str__(self) -> str:
        return self.message

"""One registry type for every kind of named thing: methods, models, datasets, recipes.

A :class:`Registry` maps names to entries: ``register`` (or its decorator form) adds one and
raises on a duplicate, ``registry[name]`` looks one up and raises :class:`UnknownNameError`
listing the known names, ``names()`` lists them sorted. It is a read-only ``Mapping`` besides, so
``in``, ``get``, ``values()`` and ``items()`` work as on a dict (iteration follows registration
order, as a dict's).

Names are case-normalised: every name is stored and compared in canonical form (:func:`canonical`:
blanks stripped, lower case; a registry may normalise further, as datasets treat ``_`` and ``-``
alike). ``ResNet20`` finds ``resnet20``; ``canonical_name(name)`` gives the registered spelling,
which is what callers should write into folder names and result rows.

A registry may name plugin packages: on first use it imports each one and every public module
in it, so their decorators run. A plugin that fails to import raises :class:`PluginError` naming
the module and its file, and the registry is rolled back to its state before loading, so the next
use tries again instead of running on a half-filled registry.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")
F = TypeVar("F")

__all__ = ["PluginError", "Registry", "UnknownNameError", "canonical"]


def canonical(name: str) -> str:
    """The canonical form of a name: surrounding blanks stripped, lower case."""
    return name.strip().lower()


class UnknownNameError(KeyError, ValueError):
    """An unknown method, model, dataset or recipe name; the message lists the known ones."""

    def __init__(self, kind: str, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(known)}")
        self.message = self.args[0]
        self.kind, self.name, self.known = kind, name, tuple(known)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str, str, tuple[str, ...]]]:
        return type(self), (self.kind, self.name, self.known)  # picklable across processes


class PluginError(ImportError):
    """A registry's plugin module failed to import; the original error is ``__cause__``."""


class Registry(Mapping[str, T]):
    """Entries of one ``kind`` (e.g. ``"method"``) by canonical name; see the module docstring.

    ``normalise`` maps a name to its canonical form (default :func:`canonical`). ``plugins`` are
    package or module names imported, with every public module of a package, on first use.
    """

    def __init__(
        self,
        kind: str,
        *,
        normalise: Callable[[str], str] = canonical,
        plugins: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.plugins = tuple(plugins)
        self._normalise = normalise
        self._entries: dict[str, T] = {}
        self._loaded = not self.plugins
        self._loading = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"

    # ------------------------------------------------------------ adding and removing

    def normalise(self, name: str) -> str:
        """``name`` in this registry's canonical form, registered or not."""
        return self._normalise(name)

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under the canonical form of ``name``; a taken name raises ValueError."""
        key = self.normalise(name)
        if not key:
            raise ValueError(f"a {self.kind} name must not be empty, got {name!r}")
        with self._lock:
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = entry
        return entry

    def decorator(self, name: str, wrap: Callable[[F], T] | None = None) -> Callable[[F], F]:
        """Decorator registering ``wrap(fn)`` (default ``fn`` itself) and returning ``fn``."""

        def deco(fn: F) -> F:
            self.register(name, fn if wrap is None else wrap(fn))  # type: ignore[arg-type]
            return fn

        return deco

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (for tests and plugin reloads)."""
        key = self.canonical_name(name)
        with self._lock:
            return self._entries.pop(key)

    # ------------------------------------------------------------ looking up

    def canonical_name(self, name: str) -> str:
        """The registered name ``name`` refers to; UnknownNameError if none."""
        self.load_plugins()
        key = self.normalise(name)
        if key not in self._entries:
            raise UnknownNameError(self.kind, name, self.names())
        return key

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load_plugins()
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[self.canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return isinstance(name, str) and self.normalise(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)

    # ------------------------------------------------------------ plugins

    def load_plugins(self) -> None:
        """Import the plugin modules once; on failure roll back and raise :class:`PluginError`.

        Rolling back restores the entries and forgets the plugin modules imported by this attempt,
        so the next call imports them again. A plugin that looks names up while loading sees the
        entries registered so far (no recursive loading).
        """
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            entries, modules = dict(self._entries), set(sys.modules)
            try:
                for module in self._plugin_modules():
                    self._import(module)
            except BaseException:
                self._entries.clear()
                self._entries.update(entries)
                for name in set(sys.modules) - modules:
                    if self._is_plugin(name):
                        del sys.modules[name]
                raise
            finally:
                self._loading = False
            self._loaded = True

    def _is_plugin(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.plugins)

    def _plugin_modules(self) -> Iterator[str]:
        """Each plugin package that exists, then its public modules (a missing package is fine)."""
        for package in self.plugins:
            try:
                found = importlib.util.find_spec(package)
            except ModuleNotFoundError:  # its parent package is missing
                found = None
            if found is None:
                continue
            yield package
            for mod in pkgutil.iter_modules(found.submodule_search_locations or []):
                if not mod.name.startswith("_"):
                    yield f"{package}.{mod.name}"

    def _import(self, module: str) -> None:
        try:
            importlib.import_module(module)
        except Exception as err:
            where = _source_file(module)
            raise PluginError(
                f"{self.kind} plugin {module} failed to import: {type(err).__name__}: {err}; "
                f"fix or remove {where}",
                name=module,
                path=where,
            ) from err


def _source_file(module: str) -> str:
    """The file of ``module``, relative to the working directory when it lies below it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None and spec.origin else module.replace(".", "/") + ".py"
    try:
        relative = os.path.relpath(origin)
    except ValueError:  # another drive (Windows)
        return origin
    return origin if relative.startswith("..") else relative

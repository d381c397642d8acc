"""A CPU allocator that keeps freed blocks, so forward passes stop page-faulting activations in.

PyTorch's default CPU allocator gives every freed tensor back to ``malloc``, and glibc returns
large blocks to the system (``munmap``, heap trimming), so every forward pass maps its
activations again and faults each 4 KiB page of them in. On this project's 2-core machine that
was about 85 thousand faults per forward pass of ResNet-50 at batch 16 and several thousand for
ResNet-56 at batch 64, more for a dense network than for its grouped-kernel deploy, and how many
depended on what ran before, so dense timings jumped between runs (``scripts/malloc_effect.py``
measures it; README, "Deploy speed"). glibc's own switches (``mallopt``: no ``mmap``, no
trimming) do not cure it: 64-byte-aligned blocks freed next to the heap top are not merged back,
and the heap grew by a block on every repeat.

:func:`keep_freed_memory` makes PyTorch's CPU allocator a caching one
(``gkp/csrc/caching_allocator.cpp``, the op library ``gkp_memory``, built like the fused op):
a freed block is kept, up to a limit of kept bytes, and the next request of exactly its size
takes it, so a repeated forward pass allocates nothing new: what the allocators deployments
preload for PyTorch (jemalloc, tcmalloc) and the runtimes' arenas (ONNX Runtime, OpenVINO) give.
Only new CPU tensors come from it; nothing else changes. The latency backends
(:func:`benchmarks.backends.prepare`) and every other timing of the harness install it and
record it (``"allocator"``: ``"caching"`` or ``"default"``).

``GKP_CPU_CACHE`` (environment): unset or ``on``, a limit of :data:`DEFAULT_LIMIT_MB` MB kept;
a number, that limit in MB (a lower one than before frees kept blocks down to it); ``off`` or
``0``, no caching. Without a C++ compiler it warns once and keeps the default allocator. Once
built and installed it stays PyTorch's CPU allocator for the process (turned off, every freed
block goes straight back to ``free``, as with the default one): handing the slot back could let
oneDNN free a block of its table elsewhere (``gkp/csrc/caching_allocator.cpp``). Not reported to
PyTorch's memory profiler.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_LIMIT_MB",
    "ENV",
    "MAX_LIMIT_MB",
    "allocator",
    "keep_freed_memory",
    "limit_mb",
    "stats",
    "uninstall",
]

ENV = "GKP_CPU_CACHE"
DEFAULT_LIMIT_MB = 4096
MAX_LIMIT_MB = 1 << 20  # 1 TiB
SOURCE = Path(__file__).with_name("csrc") / "caching_allocator.cpp"
_lock = threading.Lock()
_built: dict[str, bool] = {}


def limit_mb() -> int | None:
    """The limit ``GKP_CPU_CACHE`` asks for, in MB (None: ``off`` or ``0``). ValueError for a
    value that is none of ``on``, ``off`` or a whole number of MB up to :data:`MAX_LIMIT_MB`, so
    a command can refuse it up front."""
    raw = os.environ.get(ENV, "on").strip().lower()
    if raw in ("", "on"):
        return DEFAULT_LIMIT_MB
    if raw == "off":
        return None
    if raw.isascii() and raw.isdigit() and int(raw) <= MAX_LIMIT_MB:
        return int(raw) or None
    raise ValueError(
        f"{ENV}={raw!r} is not a setting: use on (a {DEFAULT_LIMIT_MB} MB cache), off (PyTorch's "
        f"default CPU allocator) or a limit in MB (at most {MAX_LIMIT_MB})"
    )


def _load() -> bool:
    with _lock:
        if "ok" not in _built:
            from gkp.fused import compile_or_warn

            _built["ok"] = compile_or_warn(
                "gkp_memory", SOURCE, "the caching CPU allocator",
                "timings run on PyTorch's default allocator and page-fault their activations in "
                "on every call",
            )  # fmt: skip
        return _built["ok"]


def keep_freed_memory() -> str:
    """Install the caching CPU allocator (limit from ``GKP_CPU_CACHE``) unless that is ``off``
    or it cannot be built; returns :func:`allocator`. Calling it again is cheap and applies a
    changed limit. Raises ValueError for a bad ``GKP_CPU_CACHE``."""
    limit = limit_mb()
    if limit is None:
        if _built.get("ok"):
            torch.ops.gkp_memory.uninstall()
        return allocator()
    if _load():
        torch.ops.gkp_memory.install(limit << 20)
    return allocator()


def allocator() -> str:
    """``"caching"`` while freed CPU blocks are kept for reuse, else ``"default"``."""
    return "caching" if _built.get("ok") and torch.ops.gkp_memory.stats()[0] else "default"


def stats() -> dict[str, int]:
    """The caching allocator's counters (all 0 before it is built): ``installed`` (1 while
    caching), ``kept_bytes``
    (freed blocks kept), ``limit_bytes``, ``hits`` (requests served from them), ``misses``,
    ``live`` (blocks handed out)."""
    keys = ("installed", "kept_bytes", "limit_bytes", "hits", "misses", "live")
    values = torch.ops.gkp_memory.stats() if _built.get("ok") else [0] * len(keys)
    return dict(zip(keys, values, strict=True))


def uninstall() -> None:
    """Stop caching: the kept blocks are freed, and every block freed from now on goes straight
    back to ``free`` (the allocator stays installed; :func:`allocator` says ``"default"``)."""
    if _built.get("ok"):
        torch.ops.gkp_memory.uninstall()

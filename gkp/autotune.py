"""Per-layer deploy autotuning for grouped-kernel networks (like ``cudnn.benchmark``).

Every ``GroupedKernelConv2d`` has exact equivalents that run at very different speeds depending
on the layer's shape, the batch, the device and the thread count: the PyTorch ops (gather →
grouped conv → un-permute), the fused CPU op (:mod:`gkp.fused`) and the masked dense conv.
:func:`autotune` runs one forward pass of an example batch to capture each layer's real input,
times every candidate on it (median of interleaved rounds, fixed thread count, inference mode)
and keeps the fastest in ``layer.backend``. Because the masked dense conv is a candidate, no
tuned layer is slower than its dense counterpart beyond timing noise. Per-group layers
(``PerGroupConv2d``) are not tuned; their masked-dense timing is reported beside them.

Tune for the batch size and threads you will run with; the choices are returned (for the row)
and are not part of the state dict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gkp import fused
from gkp.nn import GroupedKernelConv2d

__all__ = ["autotune", "candidates"]


def candidates(x: Tensor) -> list[str]:
    """The backends worth timing for input ``x``: the fused op for float32 on a CPU, the Triton
    kernel for float32/bfloat16 on a CUDA GPU (where Triton is installed)."""
    out = ["torch", "dense"]
    if x.device.type == "cpu" and x.dtype == torch.float32 and fused.load():
        out.insert(1, "fused")
    if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16):
        from gkp import triton_conv

        if triton_conv.available():
            out.insert(1, "triton")
    return out


def _inputs(model: nn.Module, example: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, GroupedKernelConv2d)
    ]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _median_ms(layer: GroupedKernelConv2d, backends: Sequence[str], x: Tensor, rounds: int):
    times: dict[str, list[float]] = {b: [] for b in backends}
    for r in range(rounds + 2):  # two untimed warm-up rounds
        order = list(backends[r % len(backends) :]) + list(backends[: r % len(backends)])
        for b in order:
            layer.backend = b
            t0 = time.perf_counter()
            layer(x)
            if r >= 2:
                times[b].append((time.perf_counter() - t0) * 1e3)
    return {b: statistics.median(v) for b, v in times.items()}


def autotune(
    model: nn.Module, example: Tensor, *, rounds: int = 15, threads: int | None = None
) -> dict[str, dict[str, Any]]:
    """Pick the fastest exact backend of every grouped layer of ``model`` for ``example``.

    Returns ``{layer: {"backend": choice, "ms": {backend: median ms}}}``. ``model`` must be in
    eval mode (BN statistics would move otherwise); ``threads`` fixes the thread count while
    timing (default: the current one).
    """
    if model.training:
        raise ValueError("autotune a model in eval() mode: it runs forward passes")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            inputs = _inputs(model, example)
            layers = dict(model.named_modules())
            choices = {}
            for name, x in inputs.items():
                layer = layers[name]
                ms = _median_ms(layer, candidates(x), x, rounds)
                layer.backend = min(ms, key=ms.get)
                choices[name] = {"backend": layer.backend, "ms": ms}
    finally:
        torch.set_num_threads(before)
    return choices

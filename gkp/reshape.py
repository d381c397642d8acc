"""Rebuilding a physically pruned network from plain data: the shape of every layer.

A checkpoint of a filter- or channel-pruned model stores ``module_shapes(model)``; loading builds
a fresh dense model, ``reshape_like`` gives it those shapes, and ``load_state_dict`` fills it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from gkp.nn import conv_like

_SHAPED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Plain data for a checkpoint: every Conv2d's and Linear's weight shape (``[C_out,
    C_in/groups, kh, kw]``, ``[out, in]``) and every BatchNorm2d's ``[num_features]``."""
    return {
        name: [m.num_features] if isinstance(m, nn.BatchNorm2d) else list(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, _SHAPED)
    }


def _shaped_like(old: nn.Module, shape: list[int], name: str) -> nn.Module:
    if isinstance(old, nn.BatchNorm2d):
        (n,) = shape
        return type(old)(
            n, old.eps, old.momentum, old.affine, old.track_running_stats,
            device=_device(old), dtype=_dtype(old),
        )  # fmt: skip
    if isinstance(old, nn.Linear):
        out_f, in_f = shape
        return nn.Linear(
            in_f, out_f, old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
    if list(shape[2:]) != list(old.weight.shape[2:]):
        raise ValueError(
            f"{name}: kernel {shape[2:]} does not fit this model's {list(old.weight.shape[2:])}"
        )
    return conv_like(
        old, in_channels=shape[1] * old.groups, out_channels=shape[0], groups=old.groups
    )


def _tensor(m: nn.Module) -> Tensor | None:
    for t in (*m.parameters(), *m.buffers()):
        return t
    return None


def _device(m: nn.Module) -> torch.device | None:
    t = _tensor(m)
    return t.device if t is not None else None


def _dtype(m: nn.Module) -> torch.dtype | None:
    t = next(iter(m.parameters()), None)
    return t.dtype if t is not None else None


def reshape_like(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """A deep copy of ``model`` (a fresh dense one) with its convs, BNs and linears replaced by
    freshly initialised ones of the recorded ``shapes`` (:func:`module_shapes`), ready for the
    pruned state dict. Shapes naming other modules, or missing one, raise ValueError."""
    if not isinstance(shapes, Mapping):
        raise ValueError(
            f"module shapes must be a dict of name -> list of ints, got {shapes!r:.100}"
        )
    out = copy.deepcopy(model)
    have = {n: m for n, m in out.named_modules() if isinstance(m, _SHAPED)}
    if set(shapes) != set(have):
        odd = sorted(set(shapes) ^ set(have))[:5]
        raise ValueError(f"module shapes do not describe this model's layers (e.g. {odd})")
    for name, shape in shapes.items():
        old = have[name]
        want = 1 if isinstance(old, nn.BatchNorm2d) else old.weight.dim()
        ok = isinstance(shape, (list, tuple)) and len(shape) == want
        if not ok or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
        ):
            raise ValueError(f"{name}: shape {shape!r:.60} is not {want} positive integers")
        parent, _, child = name.rpartition(".")
        setattr(
            out.get_submodule(parent) if parent else out,
            child,
            _shaped_like(old, list(shape), name),
        )
    return out

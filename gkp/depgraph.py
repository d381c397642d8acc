"""Which filters can go, and removing them, through torch-pruning's dependency graph.

A conv is *prunable* when its dependency group (``tp.DependencyGraph``) stays inside its block:
the conv itself, BatchNorms, single-input element-wise ops (ReLU, pooling), reshapes and the
input channels of ungrouped convs / linears. A group that reaches another conv's output channels,
a residual add, a concat or the model output is coupled and left alone (see gkp.structured).

torch-pruning 1.6 quirks handled here: tracing calls ``model(*x)`` (so a ``forward_fn`` is
given), switches the model to eval mode (modes are restored), needs gradients, and treats unknown
ops such as the option-A shortcut's ``F.pad`` as channel-preserving (those groups are coupled
and never pruned).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn


@dataclass(frozen=True)
class PrunableConv:
    """A target conv whose filters can go without touching anything outside its block."""

    name: str
    c_out: int
    bn: str | None  # the BatchNorm2d reading this conv's output directly, if any
    consumers: tuple[str, ...]  # convs / linears whose input channels shrink with it


def _graph(model: nn.Module, x: Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` (a copy: tracing puts it in eval mode)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # tracing follows grad_fn: frozen weights would hide convs
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # forward_fn: without it torch-pruning calls model(*x) first, i.e. on x[0] unbatched
            return tp.DependencyGraph().build_dependency(
                model, x, forward_fn=lambda m, inp: m(inp), verbose=False
            )
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def _one_operand(node: Any) -> bool:
    """An op reading one tensor: ``x + t`` counts two even when ``t`` is no graph node (a
    model input or a buffer), which the dependency graph would miss."""
    return len(node.inputs) <= 1 and len(getattr(node.grad_fn, "next_functions", ())) <= 1


def _local(
    dg: tp.DependencyGraph, conv: nn.Conv2d, names: Mapping[Any, str]
) -> PrunableConv | None:
    """``conv``'s group if it stays inside the block (see the module docstring), else None."""
    if conv.groups != 1 or conv not in dg.module2node:
        return None
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    root, bn, consumers = dg.module2node[conv], None, []
    for dep, _ in group:
        node, mod, fn = dep.target, dep.target.module, dep.handler
        if mod is conv and dg.is_out_channel_pruning_fn(fn):
            continue
        if node.type == tp.ops.OPTYPE.BN:
            bn = names[mod] if bn is None and root in node.inputs else bn
        elif node.type == tp.ops.OPTYPE.ELEMENTWISE and _one_operand(node):
            continue  # ReLU, pooling, a scalar op: channels pass through
        elif node.type == tp.ops.OPTYPE.RESHAPE:
            continue  # flatten before a linear
        elif node.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR) and (
            dg.is_in_channel_pruning_fn(fn) and getattr(mod, "groups", 1) == 1
        ):
            consumers.append(names[mod])
        else:
            return None  # a residual add, concat, another conv's outputs, the model output
    if not consumers:
        return None
    name = names[conv]
    return PrunableConv(name, conv.out_channels, bn, tuple(dict.fromkeys(consumers)))


def prunable_convs(
    model: nn.Module, candidates: Sequence[str], x: Tensor
) -> dict[str, PrunableConv]:
    """Those of ``candidates`` (conv names) whose filters can be removed residual-safely."""
    work = copy.deepcopy(model)
    dg = _graph(work, first_sample(work, x))
    names = {m: n for n, m in work.named_modules()}
    found = (_local(dg, work.get_submodule(n), names) for n in candidates)
    return {p.name: p for p in found if p is not None}


def first_sample(model: nn.Module, x: Tensor) -> Tensor:
    param = next(model.parameters(), None)
    return x[:1].to(param.device) if param is not None else x[:1]


def remove_filters(model: nn.Module, removed: Mapping[str, Sequence[int]], x: Tensor) -> nn.Module:
    """A deep copy of ``model`` without the ``removed`` filters of each named conv.

    Each removal is one torch-pruning group (conv, its BN, the consumers' input channels); a
    conv whose group is not local (see the module docstring) raises ValueError.
    """
    out = copy.deepcopy(model)
    modes = [(m, m.training) for m in out.modules()]  # tracing switches to eval mode
    dg = _graph(out, first_sample(out, x))
    names = {m: n for n, m in out.named_modules()}
    for name, idxs in removed.items():
        conv = out.get_submodule(name)
        if not isinstance(conv, nn.Conv2d) or _local(dg, conv, names) is None:
            raise ValueError(f"{name}: its filters cannot be removed without leaving its block")
        if idxs:
            group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, sorted(idxs))
            if not dg.check_pruning_group(group):
                raise ValueError(f"{name}: removing {len(idxs)} filters leaves none")
            group.prune()
    for m, mode in modes:
        m.training = mode
    return out

"""Fold inference BatchNorm into the conv before it, for dense and deploy-form layers alike.

In eval mode ``bn(conv(x))`` is ``conv'(x)`` with ``w'[o] = w[o]·s[o]`` and
``b'[o] = (b[o] − mean[o])·s[o] + beta[o]``, ``s = gamma / sqrt(var + eps)``
(``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes them). Every deployment
runtime does this (ONNX Runtime and OpenVINO fold it on load); :func:`fold_batchnorm` does it
for eager PyTorch so a latency comparison times the convolutions, not a BN pass that dense and
pruned networks share. Grouped-kernel layers fold per final output channel (through their
output permutation), per-group layers per group; the folded network computes the same function
(within float rounding) and keeps its module names (each folded BN becomes ``nn.Identity``).

Which BN follows which conv comes from a ``torch.fx`` trace (deploy-form layers as leaves): a
conv whose output feeds exactly one BN, and nothing else, is folded into it. A network that
cannot be traced is returned unchanged (a warning says so).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from gkp.nn import DEPLOY_FORMS, GroupedKernelConv2d, set_module

__all__ = ["fold_batchnorm"]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DEPLOY_FORMS) or super().is_leaf_module(m, qualname)


def trace_or_warn(model: nn.Module, caller: str, left: str) -> fx.Graph | None:
    """``model``'s ``torch.fx`` graph (deploy-form layers as leaves), or None with a
    RuntimeWarning naming ``caller`` and what is ``left`` undone when fx cannot trace it (some
    control flow): such a network runs unchanged."""
    try:
        return _Tracer().trace(model)
    except Exception as err:
        warnings.warn(
            f"{caller}: {type(model).__name__} could not be traced ({type(err).__name__}: "
            f"{err}); {left}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    out = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        conv = modules.get(node.target)
        if not isinstance(conv, (nn.Conv2d, *DEPLOY_FORMS)):
            continue
        (user,) = node.users
        bn = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and not bn.training:
            out.append((node.target, user.target))
    return out


def _fold_rows(conv: nn.Conv2d, bn: nn.BatchNorm2d, rows: Tensor | None = None) -> None:
    """Fold ``bn``'s channels ``rows`` (all when None) into ``conv``'s output rows, in order."""

    def pick(t: Tensor | None) -> Tensor | None:
        return t if t is None or rows is None else t[rows]

    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, pick(bn.running_mean), pick(bn.running_var), bn.eps,
        pick(bn.weight), pick(bn.bias),
    )  # fmt: skip


def _fold(layer: nn.Module, bn: nn.BatchNorm2d) -> None:
    if isinstance(layer, nn.Conv2d):
        _fold_rows(layer, bn)
        return
    # final channel o comes from row output_index[o] of the grouped (or concatenated) convs
    order = torch.argsort(layer.output_index)  # row q -> the final channel it feeds
    if isinstance(layer, GroupedKernelConv2d):
        _fold_rows(layer.conv, bn, order)
    else:  # PerGroupConv2d: group g owns the next group_sizes[g] rows
        for sub, rows in zip(layer.convs, order.split(layer.group_sizes), strict=True):
            _fold_rows(sub, bn, rows)
    layer.drop_built()  # built forms are rebuilt from the folded weights


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of eval-mode ``model`` with every BN that directly follows a conv folded into it."""
    out = copy.deepcopy(model).eval()
    graph = trace_or_warn(out, "fold_batchnorm", "BatchNorm left unfolded")
    if graph is None:
        return out
    pairs = _pairs(out, graph)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            _fold(out.get_submodule(conv_name), out.get_submodule(bn_name))
            set_module(out, bn_name, nn.Identity())
    return out

"""Fold inference BatchNorm into the conv before it, for dense and deploy-form layers alike.

In eval mode ``bn(conv(x))`` is ``conv'(x)`` with ``w'[o] = w[o]·s[o]`` and
``b'[o] = (b[o] − mean[o])·s[o] + beta[o]``, ``s = gamma / sqrt(var + eps)``. Every deployment
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

from gkp.nn import DEPLOY_FORMS, GroupedKernelConv2d, PerGroupConv2d, set_module

__all__ = ["fold_batchnorm"]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, DEPLOY_FORMS) or super().is_leaf_module(m, qualname)


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
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


def _scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    s = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight
    shift = -bn.running_mean * s
    if bn.bias is not None:
        shift = shift + bn.bias
    return s, shift


def _fold_conv(conv: nn.Conv2d, s: Tensor, shift: Tensor) -> None:
    """Fold per-output-channel ``y·s + shift`` into ``conv`` (rows in conv's own order)."""
    bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
    conv.weight.mul_(s.reshape(-1, 1, 1, 1).to(conv.weight))
    new_bias = (bias * s + shift).to(conv.weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _fold(layer: nn.Module, bn: nn.BatchNorm2d) -> None:
    s, shift = _scale_shift(bn)
    if isinstance(layer, nn.Conv2d):
        _fold_conv(layer, s, shift)
    elif isinstance(layer, GroupedKernelConv2d):
        # final channel o comes from grouped filter output_index[o]: reorder into grouped rows
        order = torch.argsort(layer.output_index)  # grouped filter q -> final channel
        _fold_conv(layer.conv, s[order], shift[order])
    elif isinstance(layer, PerGroupConv2d):
        order = torch.argsort(layer.output_index)
        start = 0
        for sub, d in zip(layer.convs, layer.group_sizes, strict=True):
            rows = order[start : start + d]
            _fold_conv(sub, s[rows], shift[rows])
            start += d
    for slot in ("_dense", "_per_group"):  # built forms are rebuilt from the folded weights
        layer.__dict__.pop(slot, None)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of eval-mode ``model`` with every BN that directly follows a conv folded into it."""
    out = copy.deepcopy(model).eval()
    try:
        pairs = _pairs(out)
    except Exception as err:  # fx cannot trace some control flow: time it unfolded
        warnings.warn(
            f"fold_batchnorm: {type(out).__name__} could not be traced ({type(err).__name__}: "
            f"{err}); BatchNorm left unfolded",
            RuntimeWarning,
            stacklevel=2,
        )
        return out
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            _fold(out.get_submodule(conv_name), out.get_submodule(bn_name))
            set_module(out, bn_name, nn.Identity())
    return out

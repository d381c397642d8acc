"""Fold inference BatchNorm into the conv before it, for dense and deploy-form layers alike, and
grouped layers' output permutations into the convs that read them.

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

A deploy-form layer computes its filters in group order and puts them back in the original
channel order (``output_index``: final channel ``f`` is grouped row ``output_index[f]``), a
scattered store on every output pixel. :func:`fold_permutations` drops that step where only
convs read the layer's output (through ReLUs and identities, channel by channel): the layer
then writes group order (``output_index`` the identity) and each reader takes its input
channels in that order, a plain conv's weight columns ``W[:, argsort(output_index)]``, a
grouped layer's gather index ``output_index[gather_index]``. The network computes the same
function; a layer whose output reaches anything else (a residual add, pooling, the output) keeps
its permutation.
"""

from __future__ import annotations

import collections
import copy
import warnings

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from gkp.nn import DEPLOY_FORMS, GroupedKernelConv2d, set_module

__all__ = ["fold_batchnorm", "fold_permutations"]


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


_CHANNELWISE_MODULES = (nn.ReLU, nn.Identity)
_CHANNELWISE_FUNCTIONS = (torch.relu, torch.relu_, nn.functional.relu)
_CHANNELWISE_METHODS = ("relu", "relu_")


def _channelwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies a channel-by-channel op to its first argument alone."""
    if len(node.args) != 1:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _CHANNELWISE_METHODS


def _reads_in_any_order(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a conv taking ``source`` as its only input, whose input channel order
    can be changed: a plain conv without groups, or a deploy-form layer (its gather index)."""
    if node.op != "call_module" or node.args != (source,) or node.kwargs:
        return False
    m = modules.get(node.target)
    return isinstance(m, DEPLOY_FORMS) or isinstance(m, nn.Conv2d) and m.groups == 1


def _readers(node: fx.Node, modules: dict[str, nn.Module]) -> list[str]:
    """The convs that read ``node``'s output through channel-wise ops alone; none where anything
    else reads it (or a channel-wise op on the way)."""
    readers, todo = [], [node]
    while todo:
        source = todo.pop()
        for user in source.users:
            if _reads_in_any_order(user, source, modules):
                readers.append(user.target)
            elif _channelwise(user, modules) and user.args[0] is source:
                todo.append(user)
            else:
                return []
    return readers


def _permute_input(reader: nn.Module, output_index: Tensor) -> None:
    """Make ``reader`` take the grouped rows of a layer with ``output_index`` as its input."""
    if isinstance(reader, nn.Conv2d):
        reader.weight.copy_(reader.weight[:, torch.argsort(output_index)])
        return
    # each group's kept channels stay sorted (GroupPlan's rule: plan() and to_dense() read them
    # so), the group's weight columns moving with them
    if isinstance(reader, GroupedKernelConv2d):
        counts = [reader.n_keep] * reader.n_groups
        weights = reader.conv.weight.split(reader.filters_per_group)
    else:
        counts, weights = reader.keep_counts, [sub.weight for sub in reader.convs]
    gathers = reader.gather_index.split(counts)  # views: written in place
    for gather, w in zip(gathers, weights, strict=True):
        kept, order = output_index[gather].sort()
        w.copy_(w[:, order])
        gather.copy_(kept)
    reader.drop_built()


def fold_permutations(model: nn.Module) -> nn.Module:
    """A copy of eval-mode ``model`` in which each deploy-form layer whose output only convs read
    (through ReLUs and identities) writes its grouped rows in order and its readers take their
    input channels in that order (the module docstring); the same function, fewer scattered
    stores. Fold BatchNorm first (:func:`fold_batchnorm`): a BN between them stops the fold."""
    out = copy.deepcopy(model).eval()
    graph = trace_or_warn(out, "fold_permutations", "output permutations left in place")
    if graph is None:
        return out
    modules = dict(out.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    folds = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, DEPLOY_FORMS) or calls[node.target] > 1:
            continue  # a layer called more than once: its other outputs' readers keep the order
        readers = _readers(node, modules)
        if readers and all(calls[r] == 1 for r in readers):
            folds.append((layer, [modules[r] for r in readers]))
    with torch.no_grad():
        for layer, readers in folds:
            index = layer.output_index.clone()
            identity = torch.arange(len(index), device=index.device)
            if not torch.equal(index, identity):
                for reader in readers:
                    _permute_input(reader, index)
                layer.output_index.copy_(identity)
                layer.drop_built()
            layer.ordered_output = True
    return out

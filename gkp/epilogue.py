"""Fuse each conv's epilogue (ReLU, or residual add then ReLU) into the conv call, for inference.

A ResNet block runs ``relu(conv1(x))`` and ``relu(conv2(h) + shortcut)``: after BatchNorm
folding (:mod:`gkp.fold`) each ReLU and add is a pass of its own over the activations, which
at ResNet-56's batch 64 costs about a sixth of the network's time, the same for dense and
pruned networks, so it dilutes every speed-up. Deployment runtimes fuse these epilogues into
the convolution (ONNX Runtime and OpenVINO do, as does ``torch.compile`` with freezing), and
:func:`fuse_epilogues` does it for eager PyTorch, for dense and deploy-form layers alike:

- a dense ``nn.Conv2d`` (and a deploy-form layer whose tuned backend is the masked dense conv)
  on a channels-last input runs as oneDNN's convolution with post-ops
  (``torch.ops.mkldnn._convolution_pointwise``, the op ``torch.compile``'s CPU fusions call) on
  weights reordered once per input shape into oneDNN's blocked layout, as those runtimes keep
  them (its output is channels-last whatever the input's layout, so an NCHW network keeps
  PyTorch's conv and separate add and ReLU, and stays NCHW);
- a :class:`gkp.nn.GroupedKernelConv2d` on the ``"fused"`` or ``"fused_filters"`` backend passes
  the residual and the ReLU to the fused kernel, which applies them as results reach the output
  (:mod:`gkp.fused`);
- any other layer (PyTorch's grouped conv, per-group convs, GPU inputs, autograd on) runs its
  conv and then the add and ReLU as before.

Every conv is wrapped, with or without an epilogue, so dense convs all take the same oneDNN
path. The rewritten network computes the same function (within float rounding: oneDNN may pick
another algorithm) and keeps its module names (``layer1.0.conv1`` becomes a
:class:`ConvEpilogue` whose ``conv`` is the original layer). The latency backend ``autotune``
applies it to dense, masked-dense and tuned networks alike (``benchmarks/backends.py``), so its
speed-ups compare like with like.

Patterns, on a ``torch.fx`` trace with deploy-form layers as leaves (``nn.Identity`` layers
left by BN folding are looked through): ``conv → relu`` and ``conv → add(·, r) → relu`` where
each intermediate has no other user. A network that cannot be traced is returned unchanged
(a warning says so).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from gkp import fused
from gkp.fold import trace_or_warn
from gkp.nn import DEPLOY_FORMS, GroupedKernelConv2d, set_module

__all__ = ["ConvEpilogue", "fuse_epilogues", "onednn_available"]

_RELUS = (F.relu, torch.relu)
_ADDS = (operator.add, operator.iadd, torch.add)


def onednn_available() -> bool:
    """Whether oneDNN's fused convolution op is in this PyTorch build."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


class ConvEpilogue(nn.Module):
    """``relu?(conv(x) + residual?)`` in one kernel call where the layer's kernel takes it.

    ``conv``: an ``nn.Conv2d`` or a deploy-form layer (kept as is, so its tuned backend still
    applies); ``relu``: whether a ReLU follows. ``forward(x, residual=None)``.
    """

    def __init__(self, conv: nn.Module, relu: bool) -> None:
        super().__init__()
        self.conv = conv
        self.relu = relu
        self._packed: dict[Any, tuple[Any, Tensor]] = {}  # (conv, shape) -> (version, weight)

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvEpilogue:
        new = ConvEpilogue(copy.deepcopy(self.conv, memo), self.relu)  # packed weights rebuilt
        new.train(self.training)
        return new

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        c = self.conv
        if not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
            if isinstance(c, GroupedKernelConv2d) and c.runs_fused(x):
                return c.fused_call(x, residual, self.relu)
            dense = c._dense_copy(x) if isinstance(c, DEPLOY_FORMS) and c.backend == "dense" else c
            if isinstance(dense, nn.Conv2d) and _onednn_takes(dense, x, residual):
                return self._onednn(dense, x, residual)
        y = c(x)
        # in place on the conv's fresh output when nothing needs it for a gradient: a new
        # tensor per op costs page faults on large activations (ResNet-50 at batch 16, NCHW:
        # out-of-place ops made the network 18% slower than its plain form)
        inplace = not torch.is_grad_enabled() and y is not x
        if residual is not None:
            y = y.add_(residual) if inplace and residual.shape == y.shape else y + residual
        if self.relu:
            y = F.relu_(y) if inplace else F.relu(y)
        return y

    def _onednn(self, conv: nn.Conv2d, x: Tensor, residual: Tensor | None) -> Tensor:
        w = conv.weight
        key = (id(conv), tuple(x.shape), fused.layout_of(x))
        version = (w.data_ptr(), None if w.is_inference() else w._version)  # edits repack
        hit = self._packed.get(key)
        if hit is None or hit[0] != version:  # reordered once per input shape (and weight edit)
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups, list(x.shape),
            )  # fmt: skip
            self._packed[key] = hit = (version, packed)
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        ops = torch.ops.mkldnn
        if residual is None:
            unary = "relu" if self.relu else "none"
            return ops._convolution_pointwise(x, hit[1], conv.bias, *args, unary, [], "")
        residual = residual.contiguous(memory_format=fused.layout_of(x))
        unary = "relu" if self.relu else None
        return ops._convolution_pointwise.binary(
            x, residual, hit[1], conv.bias, *args, "add", 1.0, unary, [], ""
        )

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _onednn_takes(conv: nn.Conv2d, x: Tensor, residual: Tensor | None) -> bool:
    return (
        onednn_available()
        and fused.layout_of(x) == torch.channels_last  # its output is channels-last
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype == torch.float32
        and (residual is None or residual.dtype == torch.float32)
    )


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS and len(node.args) == 1 and not node.kwargs.get("inplace")
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    return node.op == "call_method" and node.target == "relu"


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def fuse_epilogues(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (inference) with every conv wrapped in :class:`ConvEpilogue`, taking
    the ReLU or add-and-ReLU that follows it. Module names are kept; the copy is a
    ``torch.fx.GraphModule`` (or, when ``model`` cannot be traced, a plain copy, unchanged)."""
    model = copy.deepcopy(model).eval()
    graph = trace_or_warn(model, "fuse_epilogues", "epilogues left unfused")
    if graph is None:
        return model
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, (nn.Conv2d, *DEPLOY_FORMS)) or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        chain = [node]  # the conv and the Identity layers after it
        user = _sole_user(node)
        while (
            user is not None
            and user.op == "call_module"
            and isinstance(modules.get(user.target), nn.Identity)
        ):
            chain.append(user)
            user = _sole_user(user)
        tail, residual, last, relu = chain[-1], None, chain[-1], False
        if user is not None and _is_relu(user, modules):
            last, relu = user, True
        elif (
            user is not None
            and user.op == "call_function"
            and user.target in _ADDS
            and len(user.args) == 2
            and not user.kwargs
        ):
            after = _sole_user(user)
            if after is not None and _is_relu(after, modules):
                residual = user.args[1] if user.args[0] is tail else user.args[0]
                if isinstance(residual, fx.Node) and residual is not tail:
                    chain.append(user)
                    last, relu = after, True
                else:
                    residual = None
        set_module(gm, node.target, ConvEpilogue(conv, relu))
        if last is tail:  # no epilogue: the wrapped conv takes the same place
            continue
        args = (node.args[0],) if residual is None else (node.args[0], residual)
        with graph.inserting_before(last):
            fused_node = graph.call_module(node.target, args)
        last.replace_all_uses_with(fused_node)
        graph.erase_node(last)
        for dead in reversed(chain):
            graph.erase_node(dead)
    graph.lint()
    gm.recompile()
    return gm

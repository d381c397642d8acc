"""The masked form: a dense conv computing with ``weight * mask``.

Two uses, one module (``MaskedConv2d``):

- *Training form of a grouped-kernel layer* (carries its ``GroupPlan``; mask (C_out, C_in)).
  Fine-tuning the deploy form (gather → grouped conv → un-permute) is mathematically the same as
  fine-tuning the masked dense conv: the masked weights get zero gradient and never reach the
  output. On CPUs the masked form trains several times faster, because PyTorch's grouped-conv
  backward with few channels per group is slow. So the pipeline fine-tunes ``training_form``
  and converts back with ``deploy_form`` (exactly, tested) before it evaluates and times.
- *Weight and kernel (2D) pruning* (no plan; bool mask of the weight's full shape
  (C_out, C_in, kh, kw)). Such a layer has no smaller dense form: it deploys as a plain
  ``nn.Conv2d`` holding ``weight * mask``, zeros included. Its MACs executed are the dense
  layer's; only ``macs_nonzero`` (MACs that touch a non-zero weight) drops.

``prune_masked`` is what every masked method shares (knobs, target layers, the MACs each weight
costs, the masked model and its reference), as ``gkp.planning.prune_grouped`` is for GKP methods.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkp.api import Check, PruneContext, PruneResult, PruneTarget
from gkp.nn import (
    DEPLOY_FORMS,
    GroupedKernelConv2d,
    GroupPlan,
    PerGroupConv2d,
    conv_like,
    set_module,
)
from gkp.planning import exact_rate, layer_macs, resolve_knobs, target_convs

MASKED_DEFAULTS: dict[str, Any] = {"rate": 0.4375, "all_bottleneck_convs": False}


class MaskedConv2d(nn.Conv2d):
    """``Conv2d`` computing with ``weight * mask``; masked weights get zero gradient.

    ``plan`` is the ``GroupPlan`` of a grouped-kernel layer's training form (its ``mask`` is
    (C_out, C_in)), or None for a weight/kernel-pruned layer (``mask`` has the weight's shape).
    """

    plan: GroupPlan | None = None
    deploy: type[GroupedKernelConv2d] | type[PerGroupConv2d] = GroupedKernelConv2d
    mask: Tensor

    @classmethod
    def from_grouped(cls, g: GroupedKernelConv2d | PerGroupConv2d) -> MaskedConv2d:
        c = g.to_dense()
        new = conv_like(c, cls=cls)
        new.load_state_dict(c.state_dict())
        new.plan = g.plan()
        new.deploy = type(g)
        new.register_buffer(
            "mask", new.plan.mask(c.out_channels, c.in_channels).to(c.weight.device)
        )
        return new

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: Tensor | None = None) -> MaskedConv2d:
        """A plan-less copy of ``conv`` whose weights are zero where ``mask`` is False.

        ``mask``: bool, the weight's shape or broadcastable to it (e.g. (C_out, C_in, 1, 1) for
        whole kernels); stored expanded to the weight's full shape, so every plan-less layer's
        state dict has the same keys and shapes (see :func:`mask_layers`). None keeps all.
        """
        w = conv.weight
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        if mask.dtype != torch.bool:
            raise ValueError(f"a mask must be a bool tensor, got {mask.dtype}")
        try:
            full = mask.to(w.device).expand_as(w).clone()
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit the weight {tuple(w.shape)}"
            ) from err
        new = conv_like(conv, groups=conv.groups, cls=cls)
        new.register_buffer("mask", full)
        with torch.no_grad():
            new.weight.copy_(w * full.to(w.dtype))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return new

    def masked_weight(self) -> Tensor:
        """``weight * mask`` (differentiable: zero gradient where the mask is False)."""
        m = self.mask if self.mask.dim() == 4 else self.mask[:, :, None, None]
        return self.weight * m.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding ``weight * mask``: what actually runs, zeros included."""
        conv = conv_like(self, groups=self.groups)
        with torch.no_grad():
            conv.weight.copy_(self.masked_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_grouped(self) -> GroupedKernelConv2d | PerGroupConv2d:
        """The deploy form it came from (grouped, or one conv per group)."""
        if self.plan is None:
            raise ValueError("a MaskedConv2d without a GroupPlan has no grouped form")
        return self.deploy.from_conv(self.to_dense(), self.plan)

    def to_deploy(self) -> nn.Module:
        """The grouped form when the layer carries a plan, else the plain dense conv."""
        return self.to_dense() if self.plan is None else self.to_grouped()


class MaskedLinear(nn.Linear):
    """``Linear`` computing with ``weight * mask`` (bool, the weight's shape); masked weights
    get zero gradient. Deploys as a plain ``nn.Linear`` holding the zeros (e.g. SG-CNN's FC)."""

    mask: Tensor

    @classmethod
    def from_linear(cls, fc: nn.Linear, mask: Tensor | None = None) -> MaskedLinear:
        w = fc.weight
        full = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(w.device)
        if full.dtype != torch.bool or full.shape != w.shape:
            raise ValueError(f"a linear mask must be bool of shape {tuple(w.shape)}")
        new = cls(fc.in_features, fc.out_features, fc.bias is not None, w.device, w.dtype)
        new.register_buffer("mask", full.clone())
        with torch.no_grad():
            new.weight.copy_(w * full.to(w.dtype))
            if fc.bias is not None:
                new.bias.copy_(fc.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)

    def to_deploy(self) -> nn.Linear:
        fc = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        fc.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            fc.weight.copy_(self.weight * self.mask.to(self.weight.dtype))
            if self.bias is not None:
                fc.bias.copy_(self.bias)
        return fc


def _swap(
    model: nn.Module, kind: type | tuple[type, ...], convert: Callable[[Any], nn.Module]
) -> nn.Module:
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, kind):
            set_module(out, name, convert(mod))
    return out


def training_form(model: nn.Module) -> nn.Module:
    """A copy with every grouped (or per-group) conv as an equivalent ``MaskedConv2d``.

    Plan-less ``MaskedConv2d`` layers (weight/kernel pruning) already train masked: kept as is.
    """
    return _swap(model, DEPLOY_FORMS, MaskedConv2d.from_grouped)


def deploy_form(model: nn.Module) -> nn.Module:
    """A copy with every ``MaskedConv2d`` in the form that runs.

    A plan-carrying layer goes back to its grouped deploy form; a plan-less one becomes a plain
    ``nn.Conv2d`` with ``weight * mask`` (dense: the zeros are still computed).
    """
    convs = _swap(model, MaskedConv2d, MaskedConv2d.to_deploy)
    return _swap(convs, MaskedLinear, MaskedLinear.to_deploy)


def masked_layers(model: nn.Module) -> list[str]:
    """Names of the plan-less ``MaskedConv2d`` and the ``MaskedLinear`` layers of ``model``
    (to save and rebuild it)."""
    return [
        n
        for n, m in model.named_modules()
        if (isinstance(m, MaskedConv2d) and m.plan is None) or isinstance(m, MaskedLinear)
    ]


def mask_layers(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` with the named convs as plan-less ``MaskedConv2d`` (all-True masks).

    Named ``nn.Linear`` layers become ``MaskedLinear``. ``load_state_dict`` then restores the
    saved weights and masks. A name that is not a plain ``nn.Conv2d`` or ``nn.Linear`` raises
    ValueError.
    """
    out = copy.deepcopy(model)
    for name in names:
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            layer = None
        if type(layer) is nn.Linear:
            set_module(out, name, MaskedLinear.from_linear(layer))
            continue
        if not isinstance(layer, nn.Conv2d) or isinstance(layer, MaskedConv2d):
            raise ValueError(f"masked layer {name!r} is not a plain nn.Conv2d of the model")
        set_module(out, name, MaskedConv2d.from_conv(layer))
    return out


@dataclass(frozen=True)
class MaskedSetup:
    """What a masked method settles before choosing masks.

    ``fraction``: the exact fraction of the target layers' MACs to remove (the MACs target, or
    the native ``rate`` when no target is given). ``sizes``: each conv's MACs per image (weight
    count × output pixels), so every weight of conv ``n`` costs ``sizes[n] // numel`` MACs.
    """

    knobs: dict[str, Any]
    names: list[str]
    convs: dict[str, nn.Conv2d]
    sizes: dict[str, int]
    fraction: Fraction

    @property
    def total(self) -> int:
        """MACs of all target layers per image."""
        return sum(self.sizes.values())


def masked_setup(
    model: nn.Module, target: PruneTarget, defaults: Mapping[str, Any], example_inputs: Tensor
) -> MaskedSetup:
    """Check every knob and target layer; a MACs target replaces the ``rate`` knob.

    Raises UsageError (a ValueError) before any pruning.
    """
    knobs = resolve_knobs(target, defaults)
    if target.macs is not None:
        knobs["rate"] = float(target.macs)
    convs = target_convs(model, knobs)
    names = list(convs)
    sizes = layer_macs(model, names, example_inputs)
    return MaskedSetup(knobs, names, convs, sizes, exact_rate(knobs["rate"]))


def masked_check(defaults: Mapping[str, Any] = MASKED_DEFAULTS) -> Check:
    """A masked method's up-front check: :func:`masked_setup` without choosing masks."""

    def check(model: nn.Module, target: PruneTarget, example_inputs: Tensor) -> None:
        masked_setup(model, target, defaults, example_inputs)

    return check


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with each named conv as a plan-less ``MaskedConv2d``."""
    out = copy.deepcopy(model)
    for name, mask in masks.items():
        set_module(out, name, MaskedConv2d.from_conv(out.get_submodule(name), mask))
    return out


def zeroed_reference(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """A dense copy of ``model`` whose named convs' weights are multiplied by their masks.

    Built without ``MaskedConv2d``, so comparing the two checks the masked form.
    """
    out = copy.deepcopy(model)
    for name, mask in masks.items():
        conv = out.get_submodule(name)
        with torch.no_grad():
            conv.weight.mul_(mask.to(conv.weight.device, conv.weight.dtype))
    return out


ChooseMasks = Callable[[MaskedSetup], dict[str, Tensor]]


def prune_masked(
    model: nn.Module,
    target: PruneTarget,
    ctx: PruneContext,
    choose_masks: ChooseMasks,
    defaults: Mapping[str, Any] = MASKED_DEFAULTS,
) -> PruneResult:
    """Mask the target layers as ``choose_masks`` says (bool, True = keep).

    ``info["macs_removed"]``: fraction of the target layers' MACs whose weight is masked.
    """
    setup = masked_setup(model, target, defaults, ctx.example_inputs)
    t0 = time.perf_counter()
    masks = choose_masks(setup)
    pruned = apply_masks(model, masks)
    seconds = time.perf_counter() - t0
    layers: dict[str, Any] = {}
    removed = 0
    for name, mask in masks.items():
        conv = setup.convs[name]
        full = mask.expand_as(conv.weight)
        kept = int(full.sum())
        removed += (full.numel() - kept) * (setup.sizes[name] // full.numel())
        layers[name] = {
            "c_in": conv.in_channels,
            "c_out": conv.out_channels,
            "kept_fraction": kept / full.numel(),
        }
    info = {
        "options": {k: v for k, v in setup.knobs.items() if k != "layers" or v is not None},
        "target": target.macs,
        "layers": layers,
        "macs_removed": removed / setup.total,
        "prune_seconds": seconds,
    }
    return PruneResult(pruned, info, zeroed_reference(model, masks))

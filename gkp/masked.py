"""The training form of a grouped-kernel layer: a dense conv whose weight is multiplied by a mask.

Fine-tuning the deploy form (gather → grouped conv → un-permute) is mathematically the same as
fine-tuning the masked dense conv: the masked weights get zero gradient and never reach the
output. On CPUs the masked form trains several times faster, because PyTorch's grouped-conv
backward with few channels per group is slow. So the pipeline fine-tunes ``training_form``
and converts back with ``deploy_form`` (exactly, tested) before it evaluates and times.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkp.nn import GroupedKernelConv2d, GroupPlan, conv_like


class MaskedConv2d(nn.Conv2d):
    """``Conv2d`` computing with ``weight * mask``; remembers the ``GroupPlan`` it came from."""

    plan: GroupPlan

    @classmethod
    def from_grouped(cls, g: GroupedKernelConv2d) -> MaskedConv2d:
        c = g.to_dense()
        new = conv_like(c, cls=cls)
        new.load_state_dict(c.state_dict())
        new.plan = g.plan()
        new.register_buffer(
            "mask", new.plan.mask(c.out_channels, c.in_channels).to(c.weight.device)
        )
        return new

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * self.mask[:, :, None, None].to(self.weight.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def to_grouped(self) -> GroupedKernelConv2d:
        conv = conv_like(self)  # a plain Conv2d holding the masked weight
        with torch.no_grad():
            conv.weight.copy_(self.weight * self.mask[:, :, None, None].to(self.weight.dtype))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return GroupedKernelConv2d.from_conv(conv, self.plan)


def _swap(model: nn.Module, kind: type, convert) -> nn.Module:
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, kind):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, convert(mod))
    return out


def training_form(model: nn.Module) -> nn.Module:
    """A copy with every ``GroupedKernelConv2d`` as an equivalent ``MaskedConv2d``."""
    return _swap(model, GroupedKernelConv2d, MaskedConv2d.from_grouped)


def deploy_form(model: nn.Module) -> nn.Module:
    """A copy with every ``MaskedConv2d`` back in the grouped deploy form."""
    return _swap(model, MaskedConv2d, MaskedConv2d.to_grouped)

"""The shared deploy form of every grouped-kernel method: one dense grouped convolution.

A layer whose ``C_out`` filters are split into ``G`` equal groups, each keeping the same number
``n_keep`` of input channels (sets may differ and overlap between groups), is computed exactly by

1. gathering the input channels ``concat_g(sorted K_g)`` (a channel may repeat across groups),
2. ``Conv2d(G*n_keep, C_out, groups=G)`` whose block ``g`` is ``W[filters of g][:, K_g]``,
3. putting the outputs back into the original filter order.

Gather and un-permute cost no MACs (memory traffic only). A plan whose groups differ in size or
kept count (SG-CNN) deploys as ``PerGroupConv2d``, one conv per group, exact in the same way.
Both index vectors are buffers, so the modules survive ``state_dict``, ``torch.save``,
``deepcopy``, ``.to()`` and ``torch.export``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkp import fused


def _index(value: object, where: str) -> int:
    """``value`` as a non-negative int; floats only when integral (JSON may write 3.0)."""
    if isinstance(value, bool) or not isinstance(value, (Integral, float)):
        raise ValueError(f"plan[{where}] must be an integer index, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"plan[{where}] must be an integer index, got {value!r}")
    if value < 0:
        raise ValueError(f"plan[{where}] must be a non-negative index, got {value!r}")
    return int(value)


def _index_lists(value: object, key: str) -> list[list[int]]:
    """``value`` as a non-empty list of lists of indices, or a ValueError naming the bad entry."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"plan[{key!r}] must be a non-empty list of index lists, got {value!r}")
    out = []
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"plan[{key!r}][{i}] must be a list of indices, got {row!r}")
        out.append([_index(v, f"{key!r}][{i}][{j}") for j, v in enumerate(row)])
    return out


@dataclass(frozen=True)
class GroupPlan:
    """One layer's decision: which filters form each group and which input channels each keeps.

    ``groups[g]`` lists the filter indices of group ``g`` (all groups the same size);
    ``kept[g]`` lists, sorted and without repeats, the input channels group ``g`` keeps
    (all groups the same count ``n_keep``).
    """

    groups: tuple[tuple[int, ...], ...]
    kept: tuple[tuple[int, ...], ...]

    @classmethod
    def from_lists(
        cls, groups: Sequence[Sequence[int]], kept: Sequence[Sequence[int]]
    ) -> GroupPlan:
        return cls(
            tuple(tuple(int(i) for i in g) for g in groups),
            tuple(tuple(sorted(int(c) for c in k)) for k in kept),
        )

    @classmethod
    def from_labels(cls, labels: Sequence[int], kept: Sequence[Sequence[int]]) -> GroupPlan:
        """Build from a per-filter group label (``labels[o]`` = group of filter ``o``)."""
        labels = [int(v) for v in labels]
        groups = [[o for o, g in enumerate(labels) if g == gi] for gi in range(len(kept))]
        return cls.from_lists(groups, kept)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_keep(self) -> int:
        return len(self.kept[0]) if self.kept else 0

    @property
    def uniform(self) -> bool:
        """Equal group sizes and equal kept counts: the shared grouped deploy form applies."""
        return len({len(g) for g in self.groups}) == 1 and len({len(k) for k in self.kept}) == 1

    def validate(
        self, out_channels: int, in_channels: int, layer: str = "layer", *, equal: bool = True
    ) -> None:
        """Raise ValueError, naming the layer, unless the plan fits a (C_out, C_in) conv.

        ``equal=False`` (the per-group form) allows groups of any size and kept sets of any
        length (>= 1); the groups must still partition the filters.
        """
        g = self.n_groups
        if g < 1 or len(self.kept) != g:
            raise ValueError(f"{layer}: plan has {g} groups but {len(self.kept)} kept sets")
        if not equal:
            self._validate_partition(out_channels, in_channels, layer)
            return
        if out_channels % g:
            raise ValueError(
                f"{layer}: {g} groups do not divide its {out_channels} filters; "
                f"choose --groups among the divisors of {out_channels}"
            )
        flat = sorted(o for grp in self.groups for o in grp)
        if flat != list(range(out_channels)) or any(
            len(grp) != out_channels // g for grp in self.groups
        ):
            raise ValueError(
                f"{layer}: groups must split its {out_channels} filters into {g} equal parts"
            )
        sizes = {len(k) for k in self.kept}
        if len(sizes) != 1 or self.n_keep < 1:
            raise ValueError(f"{layer}: every group must keep the same number (>= 1) of channels")
        self._check_kept(in_channels, layer)

    def _validate_partition(self, out_channels: int, in_channels: int, layer: str) -> None:
        flat = sorted(o for grp in self.groups for o in grp)
        if flat != list(range(out_channels)) or any(not grp for grp in self.groups):
            raise ValueError(
                f"{layer}: groups must split its {out_channels} filters into non-empty parts"
            )
        if any(not k for k in self.kept):
            raise ValueError(f"{layer}: every group must keep at least one input channel")
        self._check_kept(in_channels, layer)

    def _check_kept(self, in_channels: int, layer: str) -> None:
        for k in self.kept:
            if len(set(k)) != len(k) or min(k) < 0 or max(k) >= in_channels:
                raise ValueError(
                    f"{layer}: kept channels {k} are not distinct indices < {in_channels}"
                )

    def mask(self, out_channels: int, in_channels: int) -> Tensor:
        """Bool (C_out, C_in): True where filter ``o`` still reads input channel ``c``."""
        m = torch.zeros(out_channels, in_channels, dtype=torch.bool)
        for grp, k in zip(self.groups, self.kept, strict=True):
            m[torch.tensor(grp).unsqueeze(1), torch.tensor(k).unsqueeze(0)] = True
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups], "kept": [list(k) for k in self.kept]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupPlan:
        """Inverse of ``to_dict``, for plans read back as plain data (checkpoints, JSON).

        Checks the types, not the fit to a layer (``validate`` does that): exactly the keys
        ``groups`` and ``kept``, each a non-empty list of lists of non-negative integers
        (integral floats such as JSON's ``3.0`` are accepted). Anything else raises ValueError
        saying where it is.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a dict with 'groups' and 'kept', got {d!r}")
        if set(d) != {"groups", "kept"}:
            raise ValueError(f"a plan has exactly the keys 'groups' and 'kept', got {sorted(d)}")
        return cls.from_lists(_index_lists(d["groups"], "groups"), _index_lists(d["kept"], "kept"))


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a rebuilt conv copies from the conv it stands for, except its channels."""

    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    bias: bool = False
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        w = conv.weight
        bias = conv.bias is not None
        return cls(
            conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias, w.device, w.dtype
        )

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (those of ``GroupedKernelConv2d``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def conv_like(
    like: nn.Conv2d | ConvGeometry,
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
    groups: int = 1,
    cls: type[nn.Conv2d] = nn.Conv2d,
) -> nn.Conv2d:
    """A new ``cls`` conv with the geometry of ``like`` and the given channels and ``groups``.

    Geometry: kernel size, stride, padding, dilation, bias or not, device, dtype, and
    ``like``'s padding mode (zeros for a ``ConvGeometry``). The channel counts default to
    ``like``'s (a ``ConvGeometry`` has none: give both). Weights get ``cls``'s usual
    initialisation; every caller here overwrites them. The one place the deploy, dense and
    masked forms build convs, so they cannot drift apart.
    """
    if isinstance(like, ConvGeometry):
        if in_channels is None or out_channels is None:
            raise ValueError("conv_like(ConvGeometry) needs in_channels and out_channels")
        geo, padding_mode = like, "zeros"
    else:
        geo, padding_mode = ConvGeometry.of(like), like.padding_mode
        in_channels = like.in_channels if in_channels is None else in_channels
        out_channels = like.out_channels if out_channels is None else out_channels
    return cls(
        in_channels,
        out_channels,
        geo.kernel_size,
        geo.stride,
        geo.padding,
        geo.dilation,
        groups=groups,
        bias=geo.bias,
        padding_mode=padding_mode,
        device=geo.device,
        dtype=geo.dtype,
    )


def _check_splittable(conv: nn.Conv2d, layer: str) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{layer}: only ungrouped convs with numeric zero padding can be grouped")


def _dense_from(
    like: nn.Conv2d, in_channels: int, plan: GroupPlan, weights: Sequence[Tensor], biases
) -> nn.Conv2d:
    """The masked dense conv of a plan whose group ``g`` holds ``weights[g]`` (|g| x |K_g|)."""
    out_channels = sum(len(g) for g in plan.groups)
    dense = conv_like(like, in_channels=in_channels, out_channels=out_channels, groups=1)
    dev = dense.weight.device
    with torch.no_grad():
        dense.weight.zero_()
        for w, b, grp, k in zip(weights, biases, plan.groups, plan.kept, strict=True):
            rows, cols = torch.tensor(grp, device=dev), torch.tensor(k, device=dev)
            dense.weight[rows.unsqueeze(1), cols.unsqueeze(0)] = w
            if b is not None:
                dense.bias[rows] = b
    return dense


class _DeployForm(nn.Module):
    """What the two deploy forms share: an inference ``backend`` (not in the state dict) and
    the exact masked dense conv built on demand for the ``"dense"`` backend."""

    backend: str = "torch"
    # True where gkp.fold.fold_permutations made output_index the identity: the PyTorch ops
    # then skip the un-permuting copy (a class default; not in the state dict, so a loaded
    # checkpoint copies again, correctly; whoever edits output_index after the fold clears it)
    ordered_output: bool = False

    def to_dense(self) -> nn.Conv2d:
        raise NotImplementedError

    def _unpermute(self, y: Tensor) -> Tensor:
        """The grouped rows ``y`` in final channel order (``output_index``)."""
        return y if self.ordered_output else y.index_select(1, self.output_index)

    def _dense_copy(self, x: Tensor) -> nn.Module:
        """The masked dense conv, built on first use and kept outside the module's state."""
        return self._copy("_dense", self.to_dense, x)

    def drop_built(self) -> None:
        """Forget what was built for the ``"dense"``, ``"per_group"`` and ``"fused_filters"``
        backends (after a backend change or an edit of the weights: rebuilt on next use)."""
        for slot in ("_dense", "_per_group", "_filters"):
            self.__dict__.pop(slot, None)

    def _copy(self, slot: str, build, x: Tensor) -> nn.Module:
        """An equivalent module built by ``build()`` on first use (and again when ``x`` moves to
        another device, dtype or memory layout), kept outside the module's state (no state-dict
        keys). Its weights take ``x``'s layout: a channels-last input gets channels-last
        weights, as ``model.to(memory_format=torch.channels_last)`` gives a plain conv (this
        copy is outside the modules that call reaches; NCHW weights would make every call on a
        channels-last input convert them first)."""
        cached = self.__dict__.get(slot)
        w = None if cached is None else next(cached.parameters())
        layout = fused.layout_of(x)
        fits = w is not None and (w.dim() != 4 or w.is_contiguous(memory_format=layout))
        if not fits or w.device != x.device or w.dtype != x.dtype:
            cached = build().to(x.device, x.dtype, memory_format=layout)
            object.__setattr__(self, slot, cached)
        return cached


class GroupedKernelConv2d(_DeployForm):
    """gather → grouped conv → un-permute; equal to the masked dense conv it came from.

    ``backend``: how inference runs (autograd off, e.g. under ``torch.inference_mode``; with
    autograd on it is always the PyTorch ops): ``"torch"`` (gather → grouped conv → un-permute),
    ``"fused"`` (the one-op CPU kernel of :mod:`gkp.fused`, float32 CPU inputs),
    ``"fused_filters"`` (its second op, each group's filters in the vector lanes: channels-last
    output, for groups of a multiple of 8 filters; others run the PyTorch ops), ``"triton"``
    (the one-op GPU kernel of :mod:`gkp.triton_conv` on tensor cores, float32/bfloat16 CUDA
    inputs), ``"triton_direct"`` (the same op's direct convolution on CUDA cores),
    ``"channels_last"`` (the PyTorch ops on a channels-last copy of the gathered input: oneDNN
    picks other kernels for that layout), ``"per_group"`` (one conv per group, as
    :class:`PerGroupConv2d`) or ``"dense"`` (the equivalent masked dense conv,
    zeros included, built from the weights on first use). All are exact; a fused/triton layer
    given an input its kernel does not take runs the PyTorch ops. Set it with
    :func:`set_backend` or :func:`gkp.autotune.autotune`; it is
    not part of the state dict, so checkpoints do not depend on it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        n_groups: int,
        n_keep: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_groups = n_groups
        self.n_keep = n_keep
        geometry = ConvGeometry(kernel_size, stride, padding, dilation, bias, device, dtype)
        self.conv = conv_like(
            geometry, in_channels=n_groups * n_keep, out_channels=out_channels, groups=n_groups
        )
        index = {"dtype": torch.long, "device": device}
        self.register_buffer("gather_index", torch.zeros(n_groups * n_keep, **index))
        self.register_buffer("output_index", torch.arange(out_channels, **index))

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, plan: GroupPlan, layer: str = "layer"
    ) -> GroupedKernelConv2d:
        """Build the deploy form of ``conv`` under ``plan`` (weights copied, not shared)."""
        _check_splittable(conv, layer)
        plan.validate(conv.out_channels, conv.in_channels, layer)
        geometry = ConvGeometry.of(conv).kwargs()  # built with conv_like, on conv's device/dtype
        new = cls(
            conv.in_channels,
            conv.out_channels,
            n_groups=plan.n_groups,
            n_keep=plan.n_keep,
            **geometry,
        )
        order = torch.tensor([o for grp in plan.groups for o in grp], device=conv.weight.device)
        gather = torch.tensor([c for k in plan.kept for c in k], device=conv.weight.device)
        d = conv.out_channels // plan.n_groups
        with torch.no_grad():
            w = conv.weight[order]  # filters in group order
            blocks = [w[g * d : (g + 1) * d][:, torch.tensor(k)] for g, k in enumerate(plan.kept)]
            new.conv.weight.copy_(torch.cat(blocks, 0))
            if conv.bias is not None:
                new.conv.bias.copy_(conv.bias[order])
        new.gather_index.copy_(gather)
        new.output_index.copy_(torch.argsort(order))
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.backend != "torch" and not torch.is_grad_enabled():
            if self.runs_fused(x):
                return self.fused_call(x)
            if self.backend in _TRITON and x.is_cuda and x.dtype in _TRITON_DTYPES:
                c = self.conv
                return torch.ops.gkp_triton.grouped_kernel_conv(
                    x, c.weight, c.bias, self.gather_index, self.output_index,
                    list(c.stride), list(c.padding), list(c.dilation), self.n_groups,
                    _TRITON[self.backend],
                )  # fmt: skip
            if self.backend == "dense":
                return self._dense_copy(x)(x)
            if self.backend == "per_group":
                return self._copy("_per_group", self._per_group_form, x)(x)
            if self.backend == "channels_last":
                g = x.index_select(1, self.gather_index).contiguous(memory_format=_CL)
                return self._unpermute(self.conv(g)).contiguous()
        return self._unpermute(self.conv(x.index_select(1, self.gather_index)))

    @property
    def filters_per_group(self) -> int:
        """Filters in each group (every group holds as many)."""
        return self.out_channels // self.n_groups

    def runs_fused(self, x: Tensor) -> bool:
        """Whether this layer's backend is one of the fused CPU ops (``"fused"``,
        ``"fused_filters"``) and ``x`` (float32, CPU) is an input it takes, with autograd off."""
        return (
            self.backend in _FUSED
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and (self.backend == "fused" or fused.filters_path_takes(self.filters_per_group))
            and fused.available()
        )

    def fused_call(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        """``relu?(self(x) + residual?)`` by this layer's fused op (see :meth:`runs_fused`); the
        filters path's output is channels-last, converted back for an NCHW input (the layout
        rule of every backend: :func:`gkp.fused.layout_of`)."""
        c = self.conv
        if self.backend == "fused":
            return fused.grouped_kernel_conv(
                x, c.weight, c.bias, self.gather_index, self.output_index, c.stride, c.padding,
                c.dilation, self.n_groups, residual, relu,
            )  # fmt: skip
        y = fused.grouped_conv_filters(
            x, self._filters_weight(), c.bias, self.gather_index, self.output_index, c.stride,
            c.padding, c.dilation, residual, relu,
        )  # fmt: skip
        return y.contiguous(memory_format=fused.layout_of(x))

    def _filters_weight(self) -> Tensor:
        """The weight packed for the filters path (:func:`gkp.fused.pack_filters`), packed on
        first use and again after an edit of the weights, kept outside the module's state
        (packed anew on every call while torch.compile or torch.export traces)."""
        w = self.conv.weight
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return fused.pack_filters(w, self.n_groups)
        version = (w.data_ptr(), None if w.is_inference() else w._version)
        hit = self.__dict__.get("_filters")
        if hit is None or hit[0] != version:
            hit = (version, fused.pack_filters(w, self.n_groups))
            self.__dict__["_filters"] = hit
        return hit[1]

    def _per_group_form(self) -> PerGroupConv2d:
        return PerGroupConv2d.from_conv(self.to_dense(), self.plan())

    def plan(self) -> GroupPlan:
        """Recover the GroupPlan this module implements."""
        order = torch.argsort(self.output_index).tolist()
        d = self.filters_per_group
        gather = self.gather_index.tolist()
        groups = [order[g * d : (g + 1) * d] for g in range(self.n_groups)]
        kept = [gather[g * self.n_keep : (g + 1) * self.n_keep] for g in range(self.n_groups)]
        return GroupPlan.from_lists(groups, kept)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent masked dense ``Conv2d`` (zeros where a group dropped a channel)."""
        c, d = self.conv, self.filters_per_group
        blocks = [slice(g * d, (g + 1) * d) for g in range(self.n_groups)]
        return _dense_from(c, self.in_channels, self.plan(), [c.weight[b] for b in blocks],
                           [None if c.bias is None else c.bias[b] for b in blocks])  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, groups={self.n_groups}, "
            f"n_keep={self.n_keep}"
        )


class PerGroupConv2d(_DeployForm):
    """One conv per group: the deploy form of a plan whose groups differ in size or kept count.

    SG-CNN's clusters hold different numbers of filters and keep different numbers of input
    channels, so one grouped conv cannot hold them. Group ``g`` is ``Conv2d(|K_g|, |g|)``
    reading the gathered channels ``K_g``; the outputs go back to the original filter order.
    MACs are ``sum_g |g|·|K_g|`` kernels' worth; the output equals the masked dense conv.

    ``backend`` (inference only, not in the state dict): ``"torch"`` (the per-group convs) or
    ``"dense"`` (the equivalent masked dense conv); :func:`gkp.autotune.autotune` picks one.
    """

    BACKENDS = ("torch", "dense")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        group_sizes: Sequence[int],
        keep_counts: Sequence[int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(group_sizes) != len(keep_counts) or sum(group_sizes) != out_channels:
            raise ValueError(
                f"group sizes {list(group_sizes)} must sum to {out_channels} filters and match "
                f"the {len(keep_counts)} kept counts"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.group_sizes = [int(d) for d in group_sizes]
        self.keep_counts = [int(k) for k in keep_counts]
        geometry = ConvGeometry(kernel_size, stride, padding, dilation, bias, device, dtype)
        self.convs = nn.ModuleList(
            conv_like(geometry, in_channels=k, out_channels=d)
            for d, k in zip(self.group_sizes, self.keep_counts, strict=True)
        )
        index = {"dtype": torch.long, "device": device}
        self.register_buffer("gather_index", torch.zeros(sum(self.keep_counts), **index))
        self.register_buffer("output_index", torch.arange(out_channels, **index))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, plan: GroupPlan, layer: str = "layer") -> PerGroupConv2d:
        """Build the per-group form of ``conv`` under ``plan`` (weights copied, not shared)."""
        _check_splittable(conv, layer)
        plan.validate(conv.out_channels, conv.in_channels, layer, equal=False)
        new = cls(
            conv.in_channels,
            conv.out_channels,
            group_sizes=[len(g) for g in plan.groups],
            keep_counts=[len(k) for k in plan.kept],
            **ConvGeometry.of(conv).kwargs(),
        )
        dev = conv.weight.device
        order = torch.tensor([o for grp in plan.groups for o in grp], device=dev)
        with torch.no_grad():
            for sub, grp, k in zip(new.convs, plan.groups, plan.kept, strict=True):
                rows, cols = torch.tensor(grp, device=dev), torch.tensor(k, device=dev)
                sub.weight.copy_(conv.weight[rows][:, cols])
                if conv.bias is not None:
                    sub.bias.copy_(conv.bias[rows])
        new.gather_index.copy_(torch.tensor([c for k in plan.kept for c in k], device=dev))
        new.output_index.copy_(torch.argsort(order))
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "dense" and not torch.is_grad_enabled():
            return self._dense_copy(x)(x)
        parts = x.index_select(1, self.gather_index).split(self.keep_counts, dim=1)
        y = torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], dim=1)
        return self._unpermute(y)

    def plan(self) -> GroupPlan:
        """Recover the GroupPlan this module implements."""
        order = torch.argsort(self.output_index).tolist()
        gather = self.gather_index.tolist()
        groups, kept, o, c = [], [], 0, 0
        for d, k in zip(self.group_sizes, self.keep_counts, strict=True):
            groups.append(order[o : o + d])
            kept.append(gather[c : c + k])
            o, c = o + d, c + k
        return GroupPlan.from_lists(groups, kept)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent masked dense ``Conv2d`` (zeros where a group dropped a channel)."""
        weights, biases = [c.weight for c in self.convs], [c.bias for c in self.convs]
        return _dense_from(self.convs[0], self.in_channels, self.plan(), weights, biases)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, group_sizes={self.group_sizes}, "
            f"keep_counts={self.keep_counts}"
        )


DEPLOY_FORMS = (GroupedKernelConv2d, PerGroupConv2d)


BACKENDS = (
    "torch", "fused", "fused_filters", "triton", "triton_direct", "channels_last", "per_group",
    "dense",
)  # fmt: skip
_FUSED = ("fused", "fused_filters")  # the fused CPU ops' backends (gkp.fused)
_CL = torch.channels_last
_TRITON_DTYPES = (torch.float32, torch.bfloat16)
_TRITON = {"triton": "dot", "triton_direct": "direct"}  # backend -> gkp.triton_conv variant


def set_backend(model: nn.Module, backend: str) -> int:
    """Run every ``GroupedKernelConv2d`` of ``model`` with ``backend`` (and every
    ``PerGroupConv2d`` too where it has that backend: ``"torch"``, ``"dense"``; the others stay
    on ``"torch"``); returns how many layers run with it.

    ``"fused"`` builds (or loads) the fused op first; when that is impossible (no compiler) it
    warns, leaves the layers on ``"torch"`` and returns 0. Unknown names raise ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in _FUSED and not fused.load():
        return 0
    if backend in _TRITON:
        from gkp import triton_conv  # registers the op

        if not triton_conv.available():
            raise ValueError(
                f"backend {backend!r} needs Triton and a CUDA GPU; use 'fused' on CPUs"
            )
    count = 0
    for layer in model.modules():
        if isinstance(layer, DEPLOY_FORMS):
            ok = isinstance(layer, GroupedKernelConv2d) or backend in PerGroupConv2d.BACKENDS
            layer.backend = backend if ok else "torch"
            layer.drop_built()
            count += ok
    return count


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _conv(model: nn.Module, name: str) -> nn.Conv2d:
    try:
        conv = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"plan names layer {name!r}, which the model does not have") from err
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"plan names {name!r}, a {type(conv).__name__}, not an nn.Conv2d")
    return conv


def apply_plans(model: nn.Module, plans: Mapping[str, GroupPlan]) -> nn.Module:
    """A copy of ``model`` with every planned conv replaced by its ``GroupedKernelConv2d``."""
    out = copy.deepcopy(model)
    for name, plan in plans.items():
        set_module(out, name, GroupedKernelConv2d.from_conv(_conv(out, name), plan, name))
    return out


def masked_reference(model: nn.Module, plans: Mapping[str, GroupPlan]) -> nn.Module:
    """A copy of ``model`` whose planned convs are zeroed outside their kept kernels.

    Built directly from the plans, independently of ``GroupedKernelConv2d``, so comparing the
    two checks the deploy form.
    """
    out = copy.deepcopy(model)
    for name, plan in plans.items():
        conv = _conv(out, name)
        plan.validate(conv.out_channels, conv.in_channels, name, equal=plan.uniform)
        mask = plan.mask(conv.out_channels, conv.in_channels).to(conv.weight.device)
        with torch.no_grad():
            conv.weight.mul_(mask[:, :, None, None].to(conv.weight.dtype))
    return out


def apply_per_group(model: nn.Module, plans: Mapping[str, GroupPlan]) -> nn.Module:
    """A copy of ``model`` with every planned conv replaced by its ``PerGroupConv2d``."""
    out = copy.deepcopy(model)
    for name, plan in plans.items():
        set_module(out, name, PerGroupConv2d.from_conv(_conv(out, name), plan, name))
    return out


def per_group_plans(model: nn.Module) -> dict[str, GroupPlan]:
    """The plans of every ``PerGroupConv2d`` in ``model`` (to save and rebuild it)."""
    return {n: m.plan() for n, m in model.named_modules() if isinstance(m, PerGroupConv2d)}


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every grouped or per-group conv replaced by ``to_dense()``."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, DEPLOY_FORMS):
            set_module(out, name, mod.to_dense())
    return out


def grouped_plans(model: nn.Module) -> dict[str, GroupPlan]:
    """The plans of every ``GroupedKernelConv2d`` in ``model`` (to save and rebuild it)."""
    return {n: m.plan() for n, m in model.named_modules() if isinstance(m, GroupedKernelConv2d)}


def masked_conv(x: Tensor, conv: nn.Conv2d, mask: Tensor) -> Tensor:
    """Reference output of ``conv`` with kernels outside ``mask`` (C_out, C_in) zeroed."""
    w = conv.weight * mask[:, :, None, None].to(conv.weight.dtype)
    return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation)

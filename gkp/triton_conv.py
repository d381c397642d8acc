"""The grouped-kernel layer as one Triton GPU op, ``gkp_triton::grouped_kernel_conv``, two kernels.

Same contract as the fused CPU op (:mod:`gkp.fused`)::

    y = conv2d(x[:, gather_index], weight, bias, stride, padding, dilation, groups)[:, output_index]

Variant ``"dot"``: an implicit GEMM per group on tensor cores: rows are output pixels (image,
oy, ox), columns the group's filters, and the reduction runs over (kept channel, ky, kx).
Variant ``"direct"``: a direct convolution on CUDA cores, output pixels by a group's filters,
adding each tap's input times the group's weights (no tensor-core tile left mostly empty by
groups of 2-8 filters). Both read each input value through the index table (the gather costs
an index load, never a copy). Results are stored
straight into each filter's final channel (the un-permute is free). float32 and bfloat16 inputs,
float32 accumulation, output in the input's dtype. Registered with ``torch.library`` (CUDA
implementation and a fake one), so ``torch.compile`` and ``torch.export`` see one op.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported): :func:`grouped_kernel_conv_triton` then takes CPU tensors, which is how the
tests check it on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import weakref

import torch
from torch import Tensor

from gkp.fused import output_shape

__all__ = ["VARIANTS", "available", "grouped_kernel_conv", "grouped_kernel_conv_triton"]


def available() -> bool:
    """Whether Triton is installed and a CUDA GPU is present (what the custom op needs)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


VARIANTS = ("dot", "direct")  # tensor-core implicit GEMM; direct convolution on CUDA cores
_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        x_ptr, w_ptr, b_ptr, gather_ptr, pos_ptr, y_ptr,
        N, C_in, H, W, C_out, Ho, Wo, n_keep, d, K,
        sh, sw, ph, pw, dh, dw,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n, grp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oy, ox)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # filters of this group
        row_ok, col_ok = rows < N * Ho * Wo, cols < d
        n = rows // (Ho * Wo)
        oy = (rows % (Ho * Wo)) // Wo
        ox = rows % Wo
        q = grp * d + cols  # grouped filter index
        taps = KH * KW  # K = n_keep * taps, passed in (a plain argument for range())
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            j = ks // taps
            ky = (ks % taps) // KW
            kx = ks % KW
            chan = tl.load(gather_ptr + grp * n_keep + j, mask=k_ok, other=0)
            iy = oy[:, None] * sh - ph + ky[None, :] * dh
            ix = ox[:, None] * sw - pw + kx[None, :] * dw
            ok = row_ok[:, None] & k_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            src = ((n[:, None] * C_in + chan[None, :]) * H + iy) * W + ix
            a = tl.load(x_ptr + src, mask=ok, other=0.0)
            b = tl.load(w_ptr + q[None, :] * K + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # fmt: skip
            if UPCAST:  # the interpreter multiplies bfloat16 tiles' raw bits: widen them first
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + q, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        o = tl.load(pos_ptr + q, mask=col_ok, other=0)  # final channel of filter q
        dst = ((n[:, None] * C_out + o[None, :]) * Ho + oy[:, None]) * Wo + ox[:, None]
        tl.store(y_ptr + dst, acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip

    return kernel


_direct_kernel = None


def _build_direct():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        x_ptr, w_ptr, b_ptr, gather_ptr, pos_ptr, y_ptr,
        N, C_in, H, W, C_out, Ho, Wo, n_keep, d, K,
        sh, sw, ph, pw, dh, dw,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program: BLOCK_M output pixels x BLOCK_D filters of one group, on CUDA cores
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        n_dblocks = (d + BLOCK_D - 1) // BLOCK_D
        grp = pid_n // n_dblocks
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oy, ox): ox fastest
        cols = (pid_n % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok, col_ok = rows < N * Ho * Wo, cols < d
        n = rows // (Ho * Wo)
        oy = (rows % (Ho * Wo)) // Wo
        ox = rows % Wo
        q = grp * d + cols
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        img = n * (C_in * H * W)
        iy0, ix0 = oy * sh - ph, ox * sw - pw
        # taps outside, kept channels inside: a tap's offsets and padding mask serve every
        # channel, so the inner loop is one scalar index load, one input load, the group's
        # weights of that channel and tap, and the products
        for ky in tl.static_range(KH):
            iy = iy0 + ky * dh
            y_ok = row_ok & (iy >= 0) & (iy < H)
            for kx in tl.static_range(KW):
                ix = ix0 + kx * dw
                ok = y_ok & (ix >= 0) & (ix < W)
                src = x_ptr + img + iy * W + ix
                w_tap = w_ptr + q * K + ky * KW + kx
                for j in range(n_keep):
                    chan = tl.load(gather_ptr + grp * n_keep + j)
                    a = tl.load(src + chan * (H * W), mask=ok, other=0.0).to(tl.float32)
                    b = tl.load(w_tap + j * (KH * KW), mask=col_ok, other=0.0).to(tl.float32)
                    acc += a[:, None] * b[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + q, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        o = tl.load(pos_ptr + q, mask=col_ok, other=0)  # final channel of filter q
        dst = ((n[:, None] * C_out + o[None, :]) * Ho + oy[:, None]) * Wo + ox[:, None]
        tl.store(y_ptr + dst, acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip

    return kernel


def _direct_tile(d: int) -> tuple[int, int]:
    """The direct kernel's (BLOCK_M, BLOCK_D) for a group of ``d`` filters, from the tile sweep
    on an NVIDIA H200 (``scripts/bench_gpu.py --sweep direct``, README): 256 pixels by 8 filters
    up to 8 filters per group (more pixels per program hide the loads' latency better than a
    tile that fits the group: 0.10 ms against 0.14 ms with 128 x 2 on ResNet-56's C = 16 layer
    at batch 64), 128 x 16 above."""
    return (256, 8) if d <= 8 else (128, 16)


_INVERSES: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _inverse(output_index: Tensor) -> Tensor:
    """``argsort(output_index)``, kept per index tensor (and its version) while it lives: a
    deployed layer's indices never change, so each forward saves the argsort's launches."""
    key = id(output_index)
    hit = _INVERSES.get(key)
    if hit is not None and hit[0]() is output_index and hit[1] == output_index._version:
        return hit[2]
    for k in [k for k, v in _INVERSES.items() if v[0]() is None]:
        del _INVERSES[k]
    inverse = torch.argsort(output_index.to(torch.int64))
    _INVERSES[key] = (weakref.ref(output_index), output_index._version, inverse)
    return inverse


def grouped_kernel_conv_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gather_index: Tensor,
    output_index: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    blocks: tuple[int, ...] | None = None,
    variant: str = "dot",
) -> Tensor:
    """Launch a kernel (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

    ``variant``: ``"dot"``, the implicit GEMM on tensor cores (``tl.dot``: a tile of output
    pixels x a group's filters, the reduction over kept channel and tap), or ``"direct"``, a
    direct convolution on CUDA cores: each program holds ``BLOCK_M`` output pixels (adjacent
    along the output row, so each tap is one coalesced load) by ``BLOCK_D`` filters of one
    group, and adds each loaded input value times the group's weights in exact float32. A group
    of GKP's layers has few filters (2 in ResNet-56's first stage at G = 8), which leaves a
    tensor-core tile mostly empty; the direct kernel wastes nothing there.

    float32 products follow PyTorch's convolution setting: TF32 tensor cores when
    ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default, what the cuDNN forms of the
    layer do), exact float32 ("ieee") when it is off or under the interpreter (which also
    widens bfloat16 tiles to float32 before the product: its own bfloat16 product is wrong).
    ``blocks``: (BLOCK_M, BLOCK_N, BLOCK_K) tile sizes (``"direct"``: (BLOCK_M, BLOCK_D))
    instead of the defaults (for tuning measurements).
    """
    global _kernel, _direct_kernel
    if variant not in VARIANTS:
        raise ValueError(f"gkp_triton: unknown variant {variant!r}; choose one of {VARIANTS}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError("gkp_triton: x and weight must be 4-D")
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError("gkp_triton: x and weight must both be float32 or both bfloat16")
    n_img, c_in, h, w = x.shape
    c_out, n_keep, kh, kw = weight.shape
    if groups < 1 or c_out % groups:
        raise ValueError("gkp_triton: groups must divide the filters")
    if gather_index.numel() != groups * n_keep or output_index.numel() != c_out:
        raise ValueError("gkp_triton: gather_index or output_index has the wrong length")
    _, _, ho, wo = output_shape(x, weight, stride, padding, dilation)
    if max(x.numel(), n_img * c_out * ho * wo) >= 2**31:
        raise ValueError("gkp_triton: tensors of 2**31 elements or more (32-bit offsets); "
                         "split the batch")  # fmt: skip
    x, weight = x.contiguous(), weight.contiguous()
    pos = _inverse(output_index)  # filter q -> its final channel
    gather = gather_index.contiguous()  # read as stored (int64 or int32): no cast launch
    y = torch.empty(n_img, c_out, ho, wo, device=x.device, dtype=x.dtype)
    d = c_out // groups
    shape_args = (
        n_img, c_in, h, w, c_out, ho, wo, n_keep, d, n_keep * kh * kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
    )  # fmt: skip
    if variant == "direct":
        if _direct_kernel is None:
            _direct_kernel = _build_direct()
        block_m, block_d = blocks or _direct_tile(d)
        grid = (-(-n_img * ho * wo // block_m), groups * -(-d // block_d))
        _direct_kernel[grid](
            x, weight, bias if bias is not None else weight, gather, pos, y, *shape_args,
            KH=kh, KW=kw, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip
        return y
    if _kernel is None:
        _kernel = _build()
    block_m, block_n, block_k = blocks or (64, 16 if d <= 16 else 32, 32)
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    tensor_cores = tf32 or (x.is_cuda and x.dtype == torch.bfloat16)  # else exact float32
    grid = (-(-n_img * ho * wo // block_m), -(-d // block_n), groups)  # ceil divisions
    _kernel[grid](
        x, weight, bias if bias is not None else weight, gather, pos, y, *shape_args,
        KH=kh, KW=kw, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="tf32" if tensor_cores else "ieee",
        UPCAST=not x.is_cuda,
    )  # fmt: skip
    return y


@torch.library.custom_op("gkp_triton::grouped_kernel_conv", mutates_args=(), device_types="cuda")
def grouped_kernel_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gather_index: Tensor,
    output_index: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    variant: str = "dot",
) -> Tensor:
    """``conv2d(x[:, gather_index], weight, bias, groups=groups)[:, output_index]`` on a GPU,
    with the kernel ``variant`` (:data:`VARIANTS`)."""
    return grouped_kernel_conv_triton(
        x, weight, bias, gather_index, output_index, stride, padding, dilation, groups,
        variant=variant,
    )  # fmt: skip


@grouped_kernel_conv.register_fake
def _(x, weight, bias, gather_index, output_index, stride, padding, dilation, groups,
      variant="dot"):  # fmt: skip
    return x.new_empty(output_shape(x, weight, stride, padding, dilation))

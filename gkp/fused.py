"""The fused CPU kernel of the grouped-kernel layer, custom op ``gkp_fused::grouped_kernel_conv``.

One op does gather → grouped conv → un-permute (``gkp/csrc/grouped_kernel_conv.cpp``), reading
each group's kept input channels through the index table and writing each filter's output
straight to its final channel. Two paths, by batch size: small batches zero-pad input planes
(an image at a time per thread when the batch splits evenly over the threads, else all at once
into a shared buffer) and run register-blocked FMA tiles over rows of 8 output columns (the
tile shape picked per layer by a cost model); batches of 16 or more images (8 without AVX-512)
put 16 images in each vector, so every kernel tap is one aligned vector load, and run as a
pipeline of rows (input rows padded just before the output row that reads them, finished pixels
written out as they are done) in (block of images, band of rows) tasks. float32, CPU, NCHW or
channels-last (a channels-last input is read in place and gives a channels-last output, so a
channels-last network runs the op without layout conversions around it), inference only (no
autograd: training uses the masked dense form, ``gkp.masked``). Buffers are per-thread scratch
memory kept between calls (a few MB; for ResNet-50 at batch 16 up to ~30 MB per thread).

A second op, ``gkp_fused::grouped_conv_filters`` (:func:`grouped_conv_filters`), computes the
same layer from channels-last input with each group's filters in the vector lanes (as oneDNN's
direct conv does for a dense layer) and the input read where it lies, no padded copy and no
transposes; it takes the weights packed once by :func:`pack_filters`. It wins where groups hold
many filters (32 and more: ResNet-50's later stages at G = 8) and loses where they hold few; the
autotuned deploy (:mod:`gkp.autotune`, backend ``"fused_filters"``) times it beside the rest.

:func:`load` builds it with ``torch.utils.cpp_extension`` (``-O3 -march=native -fopenmp``: the
work runs on ATen's OpenMP thread pool, sized by ``torch.set_num_threads``) on first use and
caches the build (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); a later
process loads the cached library in well under a second.
Without a working C++ compiler it warns once and returns False, and
:class:`gkp.nn.GroupedKernelConv2d` keeps its pure-PyTorch form. The op has a fake (meta)
implementation, so ``torch.compile`` and ``torch.export`` trace through it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available",
    "build_id",
    "compile_or_warn",
    "compile_source",
    "filters_path_takes",
    "grouped_conv_filters",
    "grouped_kernel_conv",
    "load",
    "pack_filters",
]

SOURCE = Path(__file__).with_name("csrc") / "grouped_kernel_conv.cpp"
# -fopenmp: ATen's at::parallel_for is a header template that runs serially unless the op itself
# is compiled with OpenMP (it then shares torch's libgomp and honours torch.set_num_threads)
FLAGS = ["-O3", "-march=native", "-fopenmp"]
# The lanes path's register tile shapes, "D,P" (D filters x P pixels; LSHAPES in the source):
# what GKP_FUSED_LANE_TILE may force, for kernel tuning (scripts/bench_fused.py --lane-tiles)
# and tests. A shape whose D does not divide a layer's filters per group is not forced there.
LANE_TILES = ("4,4", "2,8", "8,2", "2,7", "1,16", "2,4", "1,8", "1,7", "8,1", "16,1")
_lock = threading.Lock()
_state: dict[str, bool] = {}


@functools.cache
def build_id() -> str:
    """A short hash of the kernel's source and flags: what a cached tuning choice was made with."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode())
    return digest.hexdigest()[:10]


def load(verbose: bool = False) -> bool:
    """Build (or load the cached build of) the fused op; True when ``torch.ops.gkp_fused`` works.

    ``GKP_FUSED=0`` in the environment turns it off (the pure-PyTorch form is used).
    """
    if os.environ.get("GKP_FUSED", "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build(verbose)
        return _state["ok"]


def compile_source(name: str, source: Path, verbose: bool = False) -> None:
    """Build (or load the cached build of) ``source`` as the extension ``name`` with the op's
    flags (:data:`FLAGS`, OpenMP), registering the ``torch.ops`` libraries it defines. Raises
    what ``torch.utils.cpp_extension.load`` raises when the build fails."""
    # importing cpp_extension logs a CUDA_HOME warning on CPU-only machines: not ours to show
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )


def compile_or_warn(
    name: str, source: Path, what: str, fallback: str, verbose: bool = False
) -> bool:
    """:func:`compile_source`, True when it built (or loaded); otherwise a RuntimeWarning that
    ``what`` could not be built, why, and ``fallback`` (what runs instead), and False. The one
    place the project's C++ libraries (this op, :mod:`gkp.memory`'s allocator) fall back."""
    try:
        compile_source(name, source, verbose)
    except Exception as err:  # no compiler, no headers, a failed build: fall back, loudly
        why = str(err).strip().splitlines()[-1] if str(err).strip() else err
        warnings.warn(
            f"gkp: {what} could not be built ({type(err).__name__}: {why}); {fallback}",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


def _build(verbose: bool) -> bool:
    fallback = (
        "grouped layers use the pure-PyTorch form (gather -> grouped conv -> un-permute). It "
        "needs a C++20 compiler (g++); `python -c 'import gkp.fused as f; f.load(verbose=True)'` "
        "shows the build log."
    )
    what = "the fused grouped-kernel CPU op"
    if not compile_or_warn("gkp_fused", SOURCE, what, fallback, verbose):
        return False
    _register_fake()
    return True


def _register_fake() -> None:
    @torch.library.register_fake("gkp_fused::grouped_kernel_conv")
    def _fake(
        x, weight, bias, gather_index, output_index, stride, padding, dilation, groups,
        residual=None, relu=False,
    ):  # fmt: skip
        shape = output_shape(x, weight, stride, padding, dilation)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x))

    @torch.library.register_fake("gkp_fused::grouped_conv_filters")
    def _fake_filters(
        x, packed_weight, bias, gather_index, output_index, stride, padding, dilation,
        residual=None, relu=False,
    ):  # fmt: skip
        g, kh, kw, _, d = packed_weight.shape
        weight = packed_weight.new_empty(g * d, 1, kh, kw)  # the shape output_shape reads
        shape = output_shape(x, weight, stride, padding, dilation)
        cl = torch.channels_last
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=cl)


def filters_path_takes(filters_per_group: int) -> bool:
    """Whether :func:`grouped_conv_filters` takes groups of this many filters (its vectors hold
    8 or 16 of a group's filters: a multiple of 8)."""
    return filters_per_group % 8 == 0


def pack_filters(weight: Tensor, groups: int) -> Tensor:
    """A grouped conv's weight ``[C_out, n_keep, kh, kw]`` (filters in group order) packed for
    :func:`grouped_conv_filters`: ``[groups, kh, kw, n_keep, C_out // groups]``, each (tap, kept
    channel)'s filters of a group consecutive."""
    c_out, n_keep, kh, kw = weight.shape
    if c_out % groups:
        raise ValueError(f"groups ({groups}) must divide the {c_out} filters")
    w = weight.detach().reshape(groups, c_out // groups, n_keep, kh, kw)
    return w.permute(0, 3, 4, 2, 1).contiguous()


def layout_of(x: Tensor) -> torch.memory_format:
    """The op's output layout: channels-last for a 4-d channels-last input (one that is not also
    NCHW-contiguous: a tensor with one channel or 1x1 planes is both), NCHW otherwise; the C++
    op decides the same way (and :class:`gkp.nn.GroupedKernelConv2d`'s dense copies follow it)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    channels_last = cl and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, ...]:
    """(N, C_out, H_out, W_out) of the grouped-kernel layer's conv (both ops' fake shapes)."""
    hw = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
        // stride[i] + 1
        for i in (0, 1)
    ]  # fmt: skip
    return (x.shape[0], weight.shape[0], *hw)


def available() -> bool:
    """Whether the op has been built and loaded in this process (does not build it)."""
    return _state.get("ok", False)


def grouped_kernel_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gather_index: Tensor,
    output_index: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """``conv2d(x[:, gather_index], weight, bias, groups=groups)[:, output_index]`` in one op,
    then ``+ residual`` (a float32 tensor of the output's shape) and a ReLU when asked: the
    epilogue is applied as results reach the output, so it costs no pass of its own."""
    return torch.ops.gkp_fused.grouped_kernel_conv(
        x, weight, bias, gather_index, output_index, list(stride), list(padding),
        list(dilation), groups, residual, relu,
    )  # fmt: skip


def grouped_conv_filters(
    x: Tensor,
    packed_weight: Tensor,
    bias: Tensor | None,
    gather_index: Tensor,
    output_index: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """:func:`grouped_kernel_conv` with ``packed_weight = pack_filters(weight, groups)`` (the
    groups are its first dimension), by the filters path: the output is channels-last whatever
    ``x``'s layout (an NCHW input is converted first). Filters per group must be a multiple of 8."""
    return torch.ops.gkp_fused.grouped_conv_filters(
        x, packed_weight, bias, gather_index, output_index, list(stride), list(padding),
        list(dilation), residual, relu,
    )  # fmt: skip

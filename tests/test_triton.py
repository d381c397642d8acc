"""The Triton GPU kernels of the grouped-kernel layer (tensor-core and direct), checked on CPU
by Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess: it must be set before Triton
is imported) against gather → grouped conv → un-permute over random shapes, strides, paddings
and dilations, in float32 and bfloat16; on a GPU also against the PyTorch form in float32, TF32
and bfloat16 (``scripts/bench_gpu.py`` runs the same random cases on a GPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkp import triton_conv
from gkp.nn import set_backend

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)

CHECK = """
import random, sys
import torch, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from test_fused import random_case
from gkp.triton_conv import grouped_kernel_conv_triton as op
bad = []
for seed in range({n}):
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(random.Random(seed))
    dtype = torch.bfloat16 if seed % 4 == 3 else torch.float32  # every 4th case in bfloat16
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    f = lambda t: None if t is None else t.float()
    want = F.conv2d(f(x)[:, gather], f(weight), f(bias), stride, pad, dil, groups)[:, out_idx]
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bfloat16 output: 8 significant bits
    # the tensor-core kernel; the direct one with its default tiles and with small ones (pixel
    # tiles cut mid-row, a group's filters split over programs)
    for variant, blocks in (("dot", None), ("direct", None), ("direct", (8, 2))):
        got = op(x, weight, bias, gather, out_idx, stride, pad, dil, groups, blocks=blocks,
                 variant=variant)
        if got.dtype != dtype or got.shape != want.shape or not torch.allclose(
            got.float(), want, atol=tol * want.abs().max().item(), rtol=tol
        ):
            bad.append((seed, variant, blocks))
print("BAD", bad)
"""


@needs_triton
def test_kernel_equals_gather_grouped_conv_unpermute_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(tests=str(ROOT / "tests"), n=40)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BAD []" in done.stdout, done.stdout


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    gather, out = torch.tensor([0, 1, 2, 3]), torch.arange(4)
    args = ((1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="groups must divide"):
        triton_conv.grouped_kernel_conv_triton(x, w, None, gather, out, *args, 3)
    with pytest.raises(ValueError, match="float32 or both bfloat16"):
        triton_conv.grouped_kernel_conv_triton(x.double(), w.double(), None, gather, out, *args, 2)
    with pytest.raises(ValueError, match="wrong length"):
        triton_conv.grouped_kernel_conv_triton(x, w, None, gather[:3], out, *args, 2)
    with pytest.raises(ValueError, match="unknown variant 'wmma'"):
        triton_conv.grouped_kernel_conv_triton(x, w, None, gather, out, *args, 2, variant="wmma")


def test_fake_impl_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(2, 6, 9, 11, device="cuda"), torch.empty(8, 3, 3, 3, device="cuda")
        args = (x, w, None, torch.zeros(6, dtype=torch.long, device="cuda"),
                torch.arange(8, device="cuda"), [2, 1], [1, 1], [1, 1], 2)  # fmt: skip
        y = torch.ops.gkp_triton.grouped_kernel_conv(*args)
        y_direct = torch.ops.gkp_triton.grouped_kernel_conv(*args, "direct")
    assert tuple(y.shape) == tuple(y_direct.shape) == (2, 8, 5, 11)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("backend", ["triton", "triton_direct"])
def test_triton_backend_needs_a_gpu(backend):
    with pytest.raises(ValueError, match=f"'{backend}' needs Triton and a CUDA GPU"):
        set_backend(torch.nn.Sequential(), backend)


@pytest.mark.skipif(not triton_conv.available(), reason="needs Triton and a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "triton_direct"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_layer_equals_pytorch_form(precision, backend, monkeypatch):
    from gkp.nn import GroupedKernelConv2d, GroupPlan

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # fp32: exact products on both sides; tf32: PyTorch's default, TF32 tensor cores on both
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision != "fp32")

    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=True)
    plan = GroupPlan.from_lists([list(range(g, 16, 8)) for g in range(8)],
                                [[(g + i) % 16 for i in range(9)] for g in range(8)])  # fmt: skip
    layer = GroupedKernelConv2d.from_conv(conv, plan).cuda().to(dtype).eval()
    x = torch.randn(4, 16, 17, 15, device="cuda", dtype=dtype)
    with torch.inference_mode():
        want = layer(x).float()
        set_backend(layer, backend)
        got = layer(x).float()
    tol = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 5e-2}[precision]
    assert torch.allclose(got, want, atol=tol * want.abs().max().item(), rtol=tol)

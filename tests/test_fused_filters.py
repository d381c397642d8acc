"""The fused op's filters path (``gkp_fused::grouped_conv_filters``, backend ``"fused_filters"``):
exact against gather -> grouped conv -> un-permute over random shapes, strides, paddings,
dilations, epilogues and thread counts; a clear error for what it does not take; the layer
backend keeps each input's layout, repacks edited weights, fuses epilogues and traces under
torch.compile and torch.export; the autotuned deploy offers it where it runs."""

import random
import shutil

import pytest
import torch
import torch.nn.functional as F

# test_fused's autouse fixture (GKP_FUSED_SERIAL_MACS=0: small 2-thread calls still split) and
# its thread-count helper
from test_fused import _split_every_call, with_threads  # noqa: F401

from gkp import fused
from gkp.nn import GroupedKernelConv2d, GroupPlan, set_backend


@pytest.fixture(scope="module")
def op():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the fused op falls back to PyTorch (tests/test_fused.py)")
    assert fused.load(), "a compiler is installed, so the fused op must build"
    return fused.grouped_conv_filters


def filters_case(rng):
    """Groups of 8-72 filters (every tile width and its remainders), odd sizes, batch 1,
    repeated kept channels; output permutations random or the identity (one vector store)."""
    n, c_in, groups = rng.choice([1, 2, 3]), rng.choice([3, 8, 17, 40]), rng.choice([1, 2, 3])
    d, n_keep = rng.choice([8, 16, 24, 32, 40, 64, 72]), rng.randint(1, 12)
    k = (rng.choice([1, 3, 5]), rng.choice([1, 3]))
    stride = (rng.choice([1, 2, 3]), rng.choice([1, 2]))
    pad = (rng.choice([0, 1, 2]), rng.choice([0, 1]))
    dil = (1, rng.choice([1, 2]))
    h = rng.randint(max(1, dil[0] * (k[0] - 1) + 1 - 2 * pad[0]), 13)
    w = rng.randint(max(1, dil[1] * (k[1] - 1) + 1 - 2 * pad[1]), 17)
    x = torch.randn(n, c_in, h, w)
    weight = torch.randn(groups * d, n_keep, *k)
    bias = torch.randn(groups * d) if rng.random() < 0.5 else None
    gather = torch.tensor([rng.randrange(c_in) for _ in range(groups * n_keep)])
    out_idx = torch.arange(groups * d) if rng.random() < 0.3 else torch.randperm(groups * d)
    return x, weight, bias, gather, out_idx, stride, pad, dil, groups


@pytest.mark.parametrize("seed", range(48))
def test_filters_path_equals_gather_grouped_conv_unpermute(op, seed):
    rng = random.Random(9000 + seed)
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = filters_case(rng)
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    residual = torch.randn_like(want) if seed % 3 else None
    if residual is not None and seed % 4 == 1:
        residual = residual.contiguous(memory_format=torch.channels_last)
    relu = seed % 5 < 3
    if residual is not None:
        want = want + residual
    if relu:
        want = want.relu()
    packed = fused.pack_filters(weight, groups)
    got = with_threads(
        1 + seed % 2,
        lambda: op(x, packed, bias, gather, out_idx, stride, pad, dil, residual, relu),
    )
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch,size", [(1, 7), (3, 5), (16, 7)])
@pytest.mark.parametrize("inner", [None, "0", "1"])
def test_every_split_over_threads_is_exact(op, batch, size, inner, monkeypatch):
    """Rows few (one row a task, split by groups too) or many (equal chunks per thread), on 1-3
    threads, and with the default serial bound (small calls on the calling thread alone); each
    task running every group at each tile position or one group (GKP_FUSED_GROUPS_INNER forces
    either; None: the default rule)."""
    if inner is not None:
        monkeypatch.setenv("GKP_FUSED_GROUPS_INNER", inner)
    torch.manual_seed(batch)
    x = torch.randn(batch, 24, size, size).contiguous(memory_format=torch.channels_last)
    weight, gather = torch.randn(4 * 32, 10, 3, 3), torch.randint(0, 24, (40,))
    out_idx = torch.randperm(128)
    want = F.conv2d(x[:, gather], weight, None, 1, 1, 1, 4)[:, out_idx]
    packed = fused.pack_filters(weight, 4)
    for serial in ("0", None):
        if serial is None:
            monkeypatch.delenv("GKP_FUSED_SERIAL_MACS")
        for threads in (1, 2, 3):
            got = with_threads(
                threads, lambda: op(x, packed, None, gather, out_idx, (1, 1), (1, 1), (1, 1))
            )
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [8, 16, 32, 64])
@pytest.mark.parametrize("pad", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("row_tiles", ["1", "0"])
def test_row_tiles_at_every_width_and_padding(op, d, pad, stride, row_tiles, monkeypatch):
    """Kernels 3 wide with stride 1 or 2 along x take row tiles: the output pixels in tiles of 7
    or 14 (the last one moved back over the one before), the columns each reads outside the
    input (padding) known at compile time at a row's ends; every width from 1 to 33, each
    padding, both strides, every chunk width, with the epilogue, equal to the pixel tiles
    (GKP_FUSED_ROW_TILES=0) and exact."""
    monkeypatch.setenv("GKP_FUSED_ROW_TILES", row_tiles)
    rng = random.Random(d * 10 + pad + 100 * stride)
    for w in range(max(1, 3 - 2 * pad), 34):
        x = torch.randn(2, 11, 3, w).contiguous(memory_format=torch.channels_last)
        weight, gather = torch.randn(2 * d, 5, 3, 3), torch.tensor(rng.choices(range(11), k=10))
        out_idx, bias = torch.randperm(2 * d), torch.randn(2 * d)
        want = F.conv2d(x[:, gather], weight, bias, (1, stride), (1, pad), 1, 2)[:, out_idx]
        residual = torch.randn_like(want)
        args = (x, fused.pack_filters(weight, 2), bias, gather, out_idx, (1, stride), (1, pad),
                (1, 1), residual, True)  # fmt: skip
        got = with_threads(1 + w % 2, lambda args=args: op(*args))
        assert torch.allclose(got, (want + residual).relu(), atol=1e-4, rtol=1e-4), w


@pytest.mark.parametrize("c_in", [64, 128, 256, 512])
@pytest.mark.parametrize("stride", [1, 2])
def test_assembly_row_tiles_equal_the_compiled_ones(op, c_in, stride, monkeypatch):
    """The row tiles of 14 pixels in assembly (filters_row_tile_asm: 8 or 16 filters, inputs of
    64-512 channels, with AVX-512) give bit for bit what the compiled tiles give
    (GKP_FUSED_ASM=0; both add each sum's terms in the same order), and the exact result: every
    width that takes them, each padding, filters permuted or in order, with the epilogue. Groups
    of 8, 16 and 24 filters (a chunk of 16 and one of 8); kernels 3 wide and 1, 3 or 5 high."""
    rng = random.Random(c_in + stride)
    for d, pad, kh in [(8, 1, 3), (16, 0, 3), (24, 2, 1), (16, 1, 5), (8, 0, 5)]:
        for w in range(12 * stride, 33 * stride, 1 + (stride == 2)):
            x = torch.randn(2, c_in, 4, w + (w % 3 == 0)).contiguous(
                memory_format=torch.channels_last
            )
            n_keep = rng.choice([3, 16, 33])
            weight = torch.randn(2 * d, n_keep, kh, 3)
            gather = torch.tensor(rng.choices(range(c_in), k=2 * n_keep))
            out_idx = torch.randperm(2 * d) if w % 2 else torch.arange(2 * d)
            bias = torch.randn(2 * d)
            padding = (kh // 2, pad)
            want = F.conv2d(x[:, gather], weight, bias, (1, stride), padding, 1, 2)[:, out_idx]
            residual = torch.randn_like(want)
            args = (x, fused.pack_filters(weight, 2), bias, gather, out_idx, (1, stride),
                    padding, (1, 1), residual, True)  # fmt: skip
            got = with_threads(1 + w % 2, lambda args=args: op(*args))
            monkeypatch.setenv("GKP_FUSED_ASM", "0")
            compiled = with_threads(1 + w % 2, lambda args=args: op(*args))
            monkeypatch.delenv("GKP_FUSED_ASM")
            assert torch.equal(got, compiled), (d, pad, w)
            assert torch.allclose(got, (want + residual).relu(), atol=1e-4, rtol=1e-4), (d, w)


@pytest.mark.parametrize(
    "name",
    ["GKP_FUSED_ROW_TILES", "GKP_FUSED_GROUPS_INNER", "GKP_FUSED_PREFETCH", "GKP_FUSED_ASM"],
)
@pytest.mark.parametrize("value", ["-1", "yes", "1x"])
def test_a_bad_override_is_refused(op, name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(8, 2, 3, 3)
    with pytest.raises(RuntimeError, match=name):
        op(x, fused.pack_filters(weight, 1), None, torch.arange(2), torch.arange(8), (1, 1),
           (1, 1), (1, 1))  # fmt: skip


def test_pack_filters_lays_each_taps_filters_side_by_side():
    weight = torch.randn(2 * 8, 5, 3, 1)
    packed = fused.pack_filters(weight, 2)
    assert packed.shape == (2, 3, 1, 5, 8) and packed.is_contiguous()
    assert torch.equal(packed[1, 2, 0, 4], weight[8:16, 4, 2, 0])
    with pytest.raises(ValueError, match="must divide"):
        fused.pack_filters(weight, 3)


def test_bad_inputs_raise_clear_errors(op):
    x = torch.randn(1, 6, 5, 5)
    weight, gather = torch.randn(16, 3, 3, 3), torch.tensor([0, 1, 2, 3, 4, 5])
    out_idx = torch.randperm(16)
    packed = fused.pack_filters(weight, 2)
    geo = ((1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        op(x, fused.pack_filters(torch.randn(12, 3, 3, 3), 2), None, gather, torch.randperm(12),
           *geo)  # fmt: skip
    with pytest.raises(RuntimeError, match="pack_filters"):
        op(x, weight, None, gather, out_idx, *geo)
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, packed, None, torch.tensor([0, 1, 2, 3, 4, 6]), out_idx, *geo)
    with pytest.raises(RuntimeError, match="permutation"):
        op(x, packed, None, gather, torch.zeros(16, dtype=torch.long), *geo)
    with pytest.raises(RuntimeError, match="residual must be"):
        op(x, packed, None, gather, out_idx, *geo, torch.randn(1, 16, 4, 4))
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), packed, None, gather, out_idx, *geo)


def filters_layer(seed=0, c_in=24, c_out=64, groups=2, n_keep=10, stride=1):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True)
    order = list(range(c_out))
    rng.shuffle(order)
    d = c_out // groups
    plan = GroupPlan.from_lists(
        [order[g * d : (g + 1) * d] for g in range(groups)],
        [rng.sample(range(c_in), n_keep) for _ in range(groups)],
    )
    return GroupedKernelConv2d.from_conv(conv, plan).eval()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_backend_keeps_the_layout_and_repacks_edited_weights(op, layout):
    layer = filters_layer()
    x = torch.randn(2, 24, 9, 9).contiguous(memory_format=layout)
    with torch.inference_mode():
        want = layer(x)
    assert set_backend(layer, "fused_filters") == 1
    with torch.inference_mode():
        got = layer(x)
    assert got.is_contiguous(memory_format=layout)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        layer.conv.weight.mul_(-2)  # an edit in place: the packed copy must follow
    layer.backend = "torch"
    with torch.inference_mode():
        want = layer(x)
    layer.backend = "fused_filters"
    with torch.inference_mode():
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_groups_of_other_sizes_run_the_pytorch_ops(op):
    layer = filters_layer(c_out=36, groups=3)  # 12 filters a group: not a multiple of 8
    x = torch.randn(1, 24, 6, 6)
    with torch.inference_mode():
        want = layer(x)
        set_backend(layer, "fused_filters")
        assert not layer.runs_fused(x)
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_epilogue_goes_into_the_filters_path(op):
    from gkp.epilogue import ConvEpilogue

    layer = filters_layer()
    x = torch.randn(2, 24, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        residual = torch.randn(2, 64, 8, 8)
        want = torch.relu(layer(x) + residual)
        set_backend(layer, "fused_filters")
        got = ConvEpilogue(layer, relu=True)(x, residual)
    assert torch.allclose(got, want, atol=1e-5)


def test_compile_and_export_trace_through_the_op(op):
    layer = filters_layer()
    set_backend(layer, "fused_filters")
    x = torch.randn(2, 24, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(x), want, atol=1e-5)
        exported = torch.export.export(layer, (x,))
    assert "gkp_fused.grouped_conv_filters" in str(exported.graph)
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), want, atol=1e-5)


def test_fake_implementation_matches_the_op_shape_and_layout(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 6, 9, 11)
    args = (fused.pack_filters(torch.randn(16, 3, 3, 3), 2), None, torch.randint(0, 6, (6,)),
            torch.randperm(16), (2, 1), (1, 1), (1, 1))  # fmt: skip
    real = op(x, *args)
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), *(mode.from_tensor(a) if torch.is_tensor(a) else a
                                         for a in args))  # fmt: skip
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_autotune_offers_it_where_groups_hold_multiples_of_eight(op):
    from gkp.autotune import candidates

    x = torch.randn(1, 24, 8, 8)
    assert "fused_filters" in candidates(x, filters_layer())
    assert "fused_filters" not in candidates(x, filters_layer(c_out=36, groups=3))
    assert "fused_filters" not in candidates(x.double(), filters_layer())

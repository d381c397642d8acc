"""The fused CPU op of the grouped-kernel layer: exact against the masked dense conv over random
shapes, the same as the PyTorch form inside networks, traceable by torch.compile and
torch.export, and a warned fallback when it cannot be built."""

import itertools
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkp import fused
from gkp.nn import (
    GroupedKernelConv2d,
    GroupPlan,
    PerGroupConv2d,
    apply_plans,
    masked_conv,
    set_backend,
)


@pytest.fixture(scope="module")
def op():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the fused op falls back to PyTorch (tested below)")
    assert fused.load(), "a compiler is installed, so the fused op must build"
    return fused.grouped_kernel_conv


@pytest.fixture(autouse=True)
def _split_every_call(monkeypatch):
    """The op runs calls of few multiply-adds (under GKP_FUSED_SERIAL_MACS, 4 million by
    default) on the calling thread alone; these tests' layers are that small, so they set the
    bound to 0 and their 2-thread cases still run the parallel paths. The tests of the default
    bound delete it again."""
    monkeypatch.setenv("GKP_FUSED_SERIAL_MACS", "0")


def random_case(rng):
    """Shapes, strides (also unequal), paddings, dilations, odd sizes, batch 1, repeats."""
    n, c_in, groups = rng.choice([1, 2, 3]), rng.choice([3, 8, 17]), rng.choice([1, 2, 4])
    d, n_keep = rng.choice([1, 2, 3, 4, 8]), rng.randint(1, c_in)
    k = (rng.choice([1, 3, 5]), rng.choice([1, 3]))
    stride = (rng.choice([1, 2, 3]), rng.choice([1, 2]))
    pad = (rng.choice([0, 1, 2]), rng.choice([0, 1]))
    dil = (1, rng.choice([1, 2]))
    h = rng.randint(max(1, dil[0] * (k[0] - 1) + 1 - 2 * pad[0]), 19)
    w = rng.randint(max(1, dil[1] * (k[1] - 1) + 1 - 2 * pad[1]), 37)
    x = torch.randn(n, c_in, h, w)
    weight = torch.randn(groups * d, n_keep, *k)
    bias = torch.randn(groups * d) if rng.random() < 0.5 else None
    gather = torch.tensor([rng.randrange(c_in) for _ in range(groups * n_keep)])  # repeats too
    return x, weight, bias, gather, torch.randperm(groups * d), stride, pad, dil, groups


@pytest.mark.parametrize("seed", range(40))
def test_op_equals_gather_grouped_conv_unpermute(op, seed):
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(random.Random(seed))
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    got = op(x, weight, bias, gather, out_idx, stride, pad, dil, groups)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_weights_in_any_layout_give_the_same_output(op, seed):
    """The weights are packed through their strides (a network converted to channels-last has
    channels-last weights, read in place, not copied on every call): channels-last and
    non-contiguous weights give exactly the contiguous weights' output."""
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(random.Random(seed))
    want = op(x, weight, bias, gather, out_idx, stride, pad, dil, groups)
    cl = weight.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(weight.shape[0], weight.shape[1] * 2, *weight.shape[2:])[:, ::2]
    strided.copy_(weight)
    for w in (cl, strided, weight.transpose(2, 3).contiguous().transpose(2, 3)):
        assert torch.equal(op(x, w, bias, gather, out_idx, stride, pad, dil, groups), want)


@pytest.mark.parametrize("n_keep", [16, 21, 37])
@pytest.mark.parametrize("k", [1, 3])
def test_blocks_of_sixteen_filters_are_packed_exactly_in_any_layout(op, n_keep, k, monkeypatch):
    """Blocks of 16 filters (the lanes path's (16, 1) tile) are packed 16 x 16 at a time through
    a register transpose when a tap's kept channels are adjacent (channels-last weights) or a
    filter's floats are in packing order (contiguous ones), with the floats left over (n_keep or
    n_keep * taps not a multiple of 16) one by one, and through the general loops otherwise:
    every layout gives the reference's output, 1 and 2 threads (groups of 16 filters)."""
    monkeypatch.setenv("GKP_FUSED_PATH", "lanes")
    monkeypatch.setenv("GKP_FUSED_LANE_TILE", "16,1")
    gen = torch.Generator().manual_seed(n_keep * 10 + k)
    groups, c_in = 2, 40
    x = torch.randn(16, c_in, 6, 7, generator=gen)
    weight = torch.randn(32, n_keep, k, k, generator=gen)
    gather = torch.randint(0, c_in, (groups * n_keep,), generator=gen)
    out_idx = torch.randperm(32, generator=gen)
    bias = torch.randn(32, generator=gen)
    pad = k // 2
    want = F.conv2d(x[:, gather], weight, bias, 1, pad, 1, groups)[:, out_idx]
    strided = torch.zeros(32, 2 * n_keep, k, k)[:, ::2]
    strided.copy_(weight)
    layouts = (weight, weight.contiguous(memory_format=torch.channels_last), strided,
               weight.transpose(2, 3).contiguous().transpose(2, 3))  # fmt: skip
    for w in layouts:
        for threads in (1, 2):
            args = (x, w, bias, gather, out_idx, (1, 1), (pad, pad), (1, 1), groups)
            got = with_threads(threads, lambda args=args: op(*args))
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (w.stride(), threads)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("mode", [None, "own", "shared"])
def test_each_threads_own_or_one_shared_weight_copy_gives_the_same_exact_output(
    op, mode, big, monkeypatch
):
    """The lanes path's threads each pack their own copy of small weights (under 32768 floats)
    inside the parallel region and share one copy of larger ones packed by all
    (``GKP_FUSED_PACK=own|shared`` forces either): every way, on 1, 2 and 3 threads, with a
    block per thread and with one block split into bands, contiguous and channels-last
    weights (each call's weights differ from the call's before), the output equals the
    reference and is the same bit for bit on any number of threads."""
    monkeypatch.setenv("GKP_FUSED_PATH", "lanes")
    if mode:
        monkeypatch.setenv("GKP_FUSED_PACK", mode)
    gen = torch.Generator().manual_seed(11 + big)
    # weights of 32 x 6 x 9 = 1728 floats, or (big) 128 x 36 x 9 = 41472
    groups, d, n_keep, c_in = 4, (32 if big else 8), (36 if big else 6), 48
    weight = torch.randn(groups * d, n_keep, 3, 3, generator=gen)
    gather = torch.randint(0, c_in, (groups * n_keep,), generator=gen)
    out_idx = torch.randperm(groups * d, generator=gen)
    bias = torch.randn(groups * d, generator=gen)
    other = (weight * -0.5).contiguous(memory_format=torch.channels_last)  # no stale copy fits
    for batch in (16, 48):
        x = torch.randn(batch, c_in, 9, 10, generator=gen)
        for w in (weight, other, weight.contiguous(memory_format=torch.channels_last)):
            want = F.conv2d(x[:, gather], w, bias, 1, 1, 1, groups)[:, out_idx]
            outputs = []
            for threads in (1, 2, 3):
                args = (x, w, bias, gather, out_idx, (1, 1), (1, 1), (1, 1), groups)
                outputs.append(with_threads(threads, lambda args=args: op(*args)))
                assert torch.allclose(outputs[-1], want, atol=1e-4, rtol=1e-4), (batch, threads)
            assert all(torch.equal(o, outputs[0]) for o in outputs), (batch, w.stride())


@pytest.mark.parametrize("seed", range(16))
def test_channels_last_input_gives_an_exact_channels_last_output(op, seed):
    """A channels-last input is read in place (no NCHW copy) and the output comes back
    channels-last, equal to the reference; at 2 threads batch 1 and 3 take the shared-buffer
    path and batch 2 the one-image-per-thread path."""
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(random.Random(seed))
    x = torch.randn(1 + seed % 3, x.shape[1], max(x.shape[2], 2), max(x.shape[3], 2))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = op(x_cl, weight, bias, gather, out_idx, stride, pad, dil, groups)
    finally:
        torch.set_num_threads(before)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=fused.layout_of(x_cl))
    if want.shape[1] > 1 and want.shape[2] * want.shape[3] > 1:
        assert not got.is_contiguous(), "a channels-last output, not an NCHW copy"
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_clear_errors(op):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    gather, out = torch.tensor([0, 1, 2, 3]), torch.arange(4)
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, w, None, torch.tensor([0, 1, 2, 9]), out, (1, 1), (1, 1), (1, 1), 2)
    with pytest.raises(RuntimeError, match="permutation"):
        op(x, w, None, gather, torch.tensor([0, 0, 1, 2]), (1, 1), (1, 1), (1, 1), 2)
    with pytest.raises(RuntimeError, match="groups must divide"):
        op(x, w, None, gather, out, (1, 1), (1, 1), (1, 1), 3)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), w.double(), None, gather, out, (1, 1), (1, 1), (1, 1), 2)


def grouped_net(seed=0):
    """conv -> GKP layer (stride 2, overlapping kept sets) -> GKP layer, from random plans."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, bias=True),
    ).eval()  # fmt: skip
    plans = {}
    for name, c_in, c_out, g in (("2", 16, 16, 8), ("5", 16, 32, 4)):
        order = list(range(c_out))
        rng.shuffle(order)
        d = c_out // g
        groups = [order[i * d : (i + 1) * d] for i in range(g)]
        plans[name] = GroupPlan.from_lists(groups, [rng.sample(range(c_in), 9) for _ in range(g)])
    return model, plans, apply_plans(model, plans).eval()


@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_fused_layers_equal_the_masked_dense_network(op, batch):
    model, plans, pruned = grouped_net()
    x = torch.randn(batch, 3, 15, 15)
    with torch.inference_mode():
        plain = pruned(x)
        assert set_backend(pruned, "fused") == 2
        got = pruned(x)
    assert torch.allclose(got, plain, atol=1e-5)
    conv = model[2]
    with torch.inference_mode():
        mid = torch.relu(model[0](x))
        assert torch.allclose(
            pruned[2](mid), masked_conv(mid, conv, plans["2"].mask(16, 16)), atol=1e-5
        )


def test_autograd_and_training_use_the_pytorch_ops(op):
    _, _, pruned = grouped_net()
    set_backend(pruned, "fused")
    x = torch.randn(2, 3, 15, 15)
    pruned(x).sum().backward()  # grad mode: the fused op (no autograd) is not used
    assert pruned[2].conv.weight.grad is not None


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_compile_and_export_trace_through_the_op(op, layout):
    _, _, pruned = grouped_net()
    set_backend(pruned, "fused")
    x = torch.randn(2, 3, 15, 15).contiguous(memory_format=layout)
    with torch.no_grad():
        want = pruned(x)
        compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(x), want, atol=1e-5)
        exported = torch.export.export(pruned, (x,))
    graph = str(exported.graph)
    assert "gkp_fused.grouped_kernel_conv" in graph
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), want, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fake_implementation_matches_the_op_shape_and_layout(op, layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 6, 9, 11).contiguous(memory_format=layout)
    args = (torch.randn(8, 3, 3, 3), None, torch.randint(0, 6, (6,)), torch.randperm(8),
            (2, 1), (1, 1), (1, 1), 2)  # fmt: skip
    real = op(x, *args)
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), *(mode.from_tensor(a) if torch.is_tensor(a) else a
                                         for a in args))  # fmt: skip
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_without_a_compiler_it_warns_and_keeps_pytorch(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'gkp_fused'")

    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", broken)
    _, _, pruned = grouped_net()
    with pytest.warns(RuntimeWarning, match="pure-PyTorch form"):
        assert set_backend(pruned, "fused") == 0
    assert {m.backend for m in pruned.modules() if isinstance(m, GroupedKernelConv2d)} == {"torch"}


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GKP_FUSED", "0")
    assert fused.load() is False
    with pytest.raises(ValueError, match="unknown backend"):
        set_backend(nn.Sequential(), "cuda-magic")


# ------------------------------------------------------------------ backends and autotuning


def test_dense_backend_is_exact_and_not_saved():
    _, _, pruned = grouped_net()
    x = torch.randn(3, 3, 15, 15)
    with torch.inference_mode():
        want = pruned(x)
        keys = set(pruned.state_dict())
        assert set_backend(pruned, "dense") == 2
        got = pruned(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert set(pruned.state_dict()) == keys  # the dense copy is a cache, not state


@pytest.mark.parametrize("backend", ["channels_last", "per_group"])
def test_channels_last_and_per_group_backends_are_exact(backend):
    _, _, pruned = grouped_net()
    x = torch.randn(3, 3, 15, 15)
    with torch.inference_mode():
        want = pruned(x)
        keys = set(pruned.state_dict())
        assert set_backend(pruned, backend) == 2
        got = pruned(x)
    assert got.is_contiguous() and torch.allclose(got, want, atol=1e-5)
    assert set(pruned.state_dict()) == keys  # built forms are caches, not state


def per_group_net(seed=0):
    """conv -> SG-CNN style layer (unequal groups and kept counts) -> ReLU."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
    plan = GroupPlan.from_lists([[0, 4], [1, 2, 3, 5]], [[1, 2, 7], [0, 3, 4, 5, 6]])
    model[1] = PerGroupConv2d.from_conv(model[1], plan)
    return model.eval()


def test_per_group_layers_have_a_dense_backend_and_are_tuned(monkeypatch):
    from gkp import autotune as tune

    model, x = per_group_net(), torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        want = model(x)
        assert set_backend(model, "dense") == 1 and model[1].backend == "dense"
        assert torch.allclose(model(x), want, atol=1e-5)
        set_backend(model, "fused")  # per-group layers have no fused form: PyTorch ops
        assert model[1].backend == "torch"
    choices = tune.autotune(model, x, rounds=2, threads=1)
    assert set(choices) == {"1"} and set(choices["1"]["ms"]) == {"torch", "dense"}
    fake = {"torch": 5.0, "dense": 1.0}  # SG-CNN's per-group convs lose to dense: dense is kept
    monkeypatch.setattr(
        tune, "_median_ms", lambda layer, b, x, rounds, threads, *_: {k: fake[k] for k in b}
    )
    assert tune.autotune(model, x)["1"]["backend"] == "dense" and model[1].backend == "dense"


def twin_net():
    """conv -> two GKP layers of one shape (different kept channels and weights) -> a third of
    another kept count."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(4)])
    rng = random.Random(0)
    plans = {}
    for name, keep in (("1", 6), ("2", 6), ("3", 10)):
        plans[name] = GroupPlan.from_lists(
            [list(range(g * 4, g * 4 + 4)) for g in range(4)],
            [rng.sample(range(16), keep) for _ in range(4)],
        )
    return apply_plans(model.eval(), plans).eval()


def test_layers_of_one_shape_are_timed_once(monkeypatch):
    from gkp import autotune as tune

    timed = []

    def fake(layer, backends, x, rounds, threads, *_):
        timed.append(layer.n_keep)
        return {b: {"torch": 1.0, "dense": 2.0}.get(b, 3.0) for b in backends}

    monkeypatch.setattr(tune, "_median_ms", fake)
    monkeypatch.setattr(tune, "_whole_network_ms", lambda *a: {"tuned": 1.0, "dense": 2.0})
    pruned, x = twin_net(), torch.randn(2, 3, 8, 8)
    choices = tune.autotune(pruned, x, threads=1)
    assert timed == [6, 10]  # layer "2" has layer "1"'s shape: its timings are reused
    assert [bool(choices[n].get("shared")) for n in "123"] == [False, True, False]
    assert choices["2"]["ms"] == choices["1"]["ms"] and choices["2"]["backend"] == "torch"
    tune.autotune(twin_net(), x, threads=1)  # a second network of the same shapes: none timed
    assert timed == [6, 10]
    tune.autotune(pruned, x, threads=2)  # another thread count is another signature
    assert timed == [6, 10, 6, 10]
    tune.autotune(pruned, x, threads=1, share=False)
    assert timed == [6, 10, 6, 10, 6, 6, 10]
    tune.clear_shared_timings()
    tune.autotune(pruned, x, threads=1)
    assert timed[7:] == [6, 10]


def test_layer_signature_is_the_shape_not_the_kept_channels():
    from gkp.autotune import layer_signature

    pruned, x = twin_net(), torch.randn(2, 16, 8, 8)
    one, two, other = (pruned.get_submodule(n) for n in "123")
    assert one.gather_index.tolist() != two.gather_index.tolist()
    assert layer_signature(one, x, 1) == layer_signature(two, x, 1)
    assert layer_signature(one, x, 1) != layer_signature(other, x, 1)  # kept count
    assert layer_signature(one, x, 1) != layer_signature(one, x, 2)  # threads
    assert layer_signature(one, x, 1) != layer_signature(one, x[:1], 1)  # input shape
    cl = x.contiguous(memory_format=torch.channels_last)
    assert layer_signature(one, x, 1) != layer_signature(one, cl, 1)  # layout
    strided = apply_plans(
        nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1)).eval(),
        {"0": one.plan()},
    )[0]
    assert layer_signature(one, x, 1) != layer_signature(strided, x, 1)  # stride
    per_group = per_group_net()[1]
    y = torch.randn(2, 8, 9, 9)
    assert layer_signature(per_group, y, 1) == layer_signature(per_group_net(1)[1], y, 1)


def test_autotune_choices_are_cached_by_where_they_run(monkeypatch):
    from gkp import autotune as tune

    _, _, pruned = grouped_net()
    x = torch.randn(2, 3, 15, 15)
    cache: dict = {}
    first = tune.autotune(pruned, x, rounds=2, threads=1, cache=cache)
    key = tune.tune_key(x, 1)
    assert list(cache) == [key] and cache[key] == {n: c["backend"] for n, c in first.items()}
    assert "2x3x15x15" in key and "threads=1" in key and torch.__version__ in key

    def no_timing(*args):
        raise AssertionError("a cached choice must not be timed again")

    monkeypatch.setattr(tune, "_median_ms", no_timing)
    set_backend(pruned, "torch")
    again = tune.autotune(pruned, x, threads=1, cache=cache)
    assert all(c["cached"] for c in again.values())
    assert {n: pruned.get_submodule(n).backend for n in again} == cache[key]
    with pytest.raises(AssertionError, match="timed again"):  # another thread count: a new key
        tune.autotune(pruned, x, threads=2, cache=cache)
    with pytest.raises(ValueError, match="do not fit this model"):
        tune.apply_choices(pruned, {"2": "torch"})
    with pytest.raises(ValueError, match="cannot run here"):
        tune.apply_choices(pruned, {"2": "torch", "5": "warp-drive"})
    monkeypatch.undo()
    cache[key] = {"2": "torch"}  # a stale entry is re-tuned and replaced
    tune.autotune(pruned, x, rounds=1, threads=1, cache=cache)
    assert set(cache[key]) == {"2", "5"}


def test_choices_made_under_other_openmp_settings_are_not_reused(monkeypatch):
    """How OpenMP threads wait between parallel regions changes which form is fastest (at
    batch 1 on 2 threads OMP_WAIT_POLICY=PASSIVE put the tuned GKP network behind its masked
    dense form: README, "Deploy speed"), so the settings that are set are part of the key; with
    none set the key is what it was before they were."""
    from gkp import autotune as tune

    for name in tune.OPENMP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    x = torch.randn(2, 3, 15, 15)
    plain = tune.tune_key(x, 1)
    base = plain.removesuffix("|alloc=caching")  # the allocator's part: tests/test_memory.py
    assert "OMP" not in plain and base.endswith(f"|v{tune.TUNE_VERSION}")
    assert tune.openmp_settings() == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    passive = tune.tune_key(x, 1)
    assert passive == plain + "|OMP_WAIT_POLICY=PASSIVE"
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert tune.tune_key(x, 1) == plain + "|GOMP_SPINCOUNT=10000|OMP_WAIT_POLICY=PASSIVE"
    assert tune.openmp_settings() == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}

    _, _, pruned = grouped_net()
    cache: dict = {}
    monkeypatch.delenv("GOMP_SPINCOUNT")
    tune.autotune(pruned, x, rounds=2, threads=1, cache=cache)
    assert list(cache) == [passive]
    monkeypatch.delenv("OMP_WAIT_POLICY")
    tune.autotune(pruned, x, rounds=2, threads=1, cache=cache)  # tuned again, kept apart
    assert sorted(cache) == sorted([plain, passive])


def test_autotune_times_every_candidate_and_keeps_the_output():
    from gkp.autotune import autotune, candidates

    _, _, pruned = grouped_net()
    x = torch.randn(4, 3, 15, 15)
    with torch.inference_mode():
        want = pruned(x)
    choices = autotune(pruned, x, rounds=3, threads=1)
    assert set(choices) == {"2", "5"}
    for name, c in choices.items():
        fastest = min(c["ms"], key=c["ms"].get)
        whole = c["network_ms"]  # the tuned network raced against the masked dense one
        layer = pruned.get_submodule(name)
        assert set(c["ms"]) == set(candidates(x, layer)) and set(whole) == {"tuned", "dense"}
        # the filters path where a group's filters are a multiple of 8 (layer 5: 8 a group)
        assert ("fused_filters" in c["ms"]) == (name == "5")
        assert c["backend"] == (fastest if whole["tuned"] <= whole["dense"] else "dense")
        assert pruned.get_submodule(name).backend == c["backend"]
    with torch.inference_mode():
        assert torch.allclose(pruned(x), want, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        autotune(pruned.train(), x)


def test_autotune_keeps_the_fastest(monkeypatch):
    from gkp import autotune as tune

    fake = {"torch": 3.0, "fused": 2.0, "fused_filters": 2.5, "channels_last": 4.0,
            "per_group": 5.0,
            "dense": 1.0}  # fmt: skip
    monkeypatch.setattr(
        tune,
        "_median_ms",
        lambda layer, backends, x, rounds, threads, *_: {b: fake[b] for b in backends},
    )
    _, _, pruned = grouped_net()
    choices = tune.autotune(pruned, torch.randn(1, 3, 15, 15))
    assert {c["backend"] for c in choices.values()} == {"dense"}


@pytest.mark.parametrize(
    "tuned_ms,kept",
    [(1.0, "torch"), (1.9, "torch"), (1.96, "dense"), (2.0, "dense"), (3.0, "dense")],
)
def test_autotune_keeps_dense_when_the_whole_network_runs_faster_so(monkeypatch, tuned_ms, kept):
    """Per-layer picks that lose as a whole network (launch-bound GPUs), or win by less than
    the margin (3%: timing noise), give way to dense."""
    from gkp import autotune as tune

    fake = {"torch": 1.0, "fused": 2.0, "fused_filters": 2.5, "channels_last": 4.0,
            "per_group": 5.0,
            "dense": 3.0}  # fmt: skip
    monkeypatch.setattr(
        tune,
        "_median_ms",
        lambda layer, backends, x, rounds, threads, *_: {b: fake[b] for b in backends},
    )
    raced = []

    def whole(model, example, picks, rounds, threads):
        raced.append(picks)
        return {"tuned": tuned_ms, "dense": 2.0}

    monkeypatch.setattr(tune, "_whole_network_ms", whole)
    _, _, pruned = grouped_net()
    x, cache = torch.randn(1, 3, 15, 15), {}
    with torch.inference_mode():
        want = pruned(x)
    choices = tune.autotune(pruned, x, threads=1, cache=cache)
    assert raced == [{"tuned": {"2": "torch", "5": "torch"}, "dense": {"2": "dense", "5": "dense"}}]
    assert {c["backend"] for c in choices.values()} == {kept}
    assert {pruned.get_submodule(n).backend for n in choices} == {kept}
    assert cache[tune.tune_key(x, 1)] == {"2": kept, "5": kept}
    with torch.inference_mode():
        assert torch.allclose(pruned(x), want, atol=1e-5)


def test_whole_network_timing_runs_each_set_of_picks():
    from gkp import autotune as tune

    _, _, pruned = grouped_net()
    x = torch.randn(2, 3, 15, 15)
    seen = []
    layer = pruned.get_submodule("2")
    layer.register_forward_pre_hook(lambda m, _args: seen.append(m.backend))
    ms = tune._whole_network_ms(
        pruned, x, {"a": {"2": "torch", "5": "torch"}, "b": {"2": "dense", "5": "dense"}}, 3, 1
    )
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert {"torch", "dense"} <= set(seen)


def test_bench_reports_ideal_and_how_it_deployed(capsys):
    import json

    from benchmarks.cli import main

    argv = ["bench", "--dataset", "synthetic", "--method", "gkp-l2", "--bench-rounds", "2",
            "--bench-batch", "2", "--deploy", "autotune", "--threads", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        assert r["ideal"] == pytest.approx(r["macs_dense"] / r["macs"]) and r["ideal"] > 1.5
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] / r["ideal"])
        assert r["deploy"] == "autotune" and r["deploy_choices"]["epilogues"] > 0
        if r["deploy_choices"]["form"] == "grouped":  # else the masked dense network won
            assert sum(r["deploy_choices"]["autotune"].values()) == 18


def check_tile_geometries(op, gen, batches, layouts, label):
    """The op at 2 threads against the reference on four geometries (3x3 and 1x1 unit stride,
    a 3x3 with stride 2 (the lanes path's own unrolled tiles), a strided, dilated 3x3) for each
    batch and input layout (True: channels-last)."""
    geometries = [(3, 1, 1, 1, (13, 21)), (1, 1, 0, 1, (9, 30)), (3, 2, 1, 1, (15, 22)),
                  (3, 2, 2, 2, (17, 19))]  # fmt: skip
    for batch, cl, (k, stride, pad, dil, hw) in itertools.product(batches, layouts, geometries):
        x = torch.randn(batch, 12, *hw, generator=gen)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(32, 5, k, k, generator=gen)  # 2 groups of 16: every tile's D divides
        bias = torch.randn(32, generator=gen)
        gather = torch.randint(0, 12, (10,), generator=gen)
        out_idx = torch.randperm(32, generator=gen)
        args = ((stride, stride), (pad, pad), (dil, dil), 2)
        want = F.conv2d(x[:, gather], weight, bias, *args)[:, out_idx]
        call = (x, weight, bias, gather, out_idx, *args)
        got = with_threads(2, lambda call=call: op(*call))
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (label, batch, cl, k, stride)


TILES = ["1,3,4", "1,6,2", "1,8,1", "2,1,4", "2,2,3", "2,3,2", "2,6,1", "4,1,2", "4,2,1", "8,1,1"]


@pytest.mark.parametrize("order", ["group", "band"])
@pytest.mark.parametrize("tile", TILES)
def test_every_tile_shape_is_exact(op, tile, order, monkeypatch):
    """Each register-tile shape (forced; normally the cost model picks one) on the three code
    paths: 3x3 and 1x1 with unit stride (unrolled taps) and strided 3x3s (generic), in
    both loop orders (group by group, or band of rows by band; forced, normally chosen by the
    planes' size against the L2 cache), and both ways of splitting the work at 2 threads:
    batch 1 (planes padded into one shared buffer, (image, group) or (image, band) tasks) and
    batch 2 (one image per thread, padded into its own buffer)."""
    monkeypatch.setenv("GKP_FUSED_TILE", tile)
    monkeypatch.setenv("GKP_FUSED_ORDER", order)
    gen = torch.Generator().manual_seed(len(tile) + sum(map(int, tile.split(","))))
    check_tile_geometries(op, gen, batches=[1, 2], layouts=[False], label=tile)


@pytest.mark.parametrize(
    "path,tile",
    [("rows", t) for t in ("1,8,1", "2,6,1", "4,2,1", "8,1,1")]
    + [("lanes", t) for t in ("1,8", "2,8", "4,4", "8,2")],
)
def test_large_weights_are_packed_in_parallel_exactly(op, path, tile, monkeypatch):
    """Weights of 32768 floats or more are packed into the tiles' blocks of D filters on every
    thread (smaller ones by the calling thread, as in the tests above): a 64-filter layer with
    64 kept channels of 3x3 kernels (36864 floats), each block size D (forced through the tile
    shape), both paths, 1 and 2 threads (only 2 splits the packing), contiguous, channels-last
    and strided weights; on the rows path also a batch-1 call under the default bound at 2
    threads, which packs them on one."""
    monkeypatch.setenv("GKP_FUSED_PATH", path)
    monkeypatch.setenv("GKP_FUSED_TILE" if path == "rows" else "GKP_FUSED_LANE_TILE", tile)
    gen = torch.Generator().manual_seed(len(path) + sum(map(int, tile.split(","))))
    groups, c_in = 8, 72
    x = torch.randn(1 if path == "rows" else 16, c_in, 6, 7, generator=gen)
    weight = torch.randn(64, 64, 3, 3, generator=gen)
    assert weight.numel() >= 32768
    gather = torch.randint(0, c_in, (groups * 64,), generator=gen)
    out_idx = torch.randperm(64, generator=gen)
    bias = torch.randn(64, generator=gen)
    want = F.conv2d(x[:, gather], weight, bias, 1, 1, 1, groups)[:, out_idx]
    strided = torch.zeros(64, 128, 3, 3)[:, ::2]
    strided.copy_(weight)
    for w in (weight, weight.contiguous(memory_format=torch.channels_last), strided):
        for threads in (1, 2):
            args = (x, w, bias, gather, out_idx, (1, 1), (1, 1), (1, 1), groups)
            got = with_threads(threads, lambda args=args: op(*args))
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (path, tile, threads)
        if path == "rows":  # batch 1 under the default bound: one thread packs them all
            monkeypatch.delenv("GKP_FUSED_SERIAL_MACS")
            got = with_threads(2, lambda w=w: op(x, w, bias, gather, out_idx, (1, 1), (1, 1),
                                                 (1, 1), groups))  # fmt: skip
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (path, tile, "serial")
            monkeypatch.setenv("GKP_FUSED_SERIAL_MACS", "0")


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", range(24))
def test_lanes_path_equals_gather_grouped_conv_unpermute(op, seed, monkeypatch):
    """The large-batch path (images in the vector lanes), forced: random shapes, strides,
    paddings, dilations and repeated kept channels, batches that fill the lanes or leave some
    empty, NCHW or channels-last input, at 1 and 2 threads (with one block of images at 2
    threads each block is split into bands of rows)."""
    monkeypatch.setenv("GKP_FUSED_PATH", "lanes")
    rng = random.Random(1000 + seed)
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(rng)
    x = torch.randn(rng.choice([3, 8, 16, 21, 32]), *x.shape[1:])
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    got = with_threads(
        1 + seed // 2 % 2, lambda: op(x, weight, bias, gather, out_idx, stride, pad, dil, groups)
    )
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=fused.layout_of(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(16))
def test_lanes_path_with_the_least_input_window_is_exact(op, seed, monkeypatch):
    """The lanes path's padded input is a window of rows slid down each block (normally as many
    rows as fit in half the L2 cache, so small layers never slide): forced to the least window
    (the rows one output row reads plus a stride), it slides every output row or two. Tall
    inputs, strides, dilations (vertical ones too), paddings, both layouts, 1 and 2 threads,
    with and without the epilogue: still exact."""
    monkeypatch.setenv("GKP_FUSED_PATH", "lanes")
    monkeypatch.setenv("GKP_FUSED_LANE_WINDOW", "1")
    rng = random.Random(9000 + seed)
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(rng)
    dil = (rng.choice([1, 2]), dil[1])  # the taller input has room for a dilated kernel
    x = torch.randn(rng.choice([16, 21]), x.shape[1], x.shape[2] + 24, x.shape[3])
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    residual = torch.randn_like(want) if seed // 2 % 2 else None
    if residual is not None:
        want = (want + residual).relu()
    relu = residual is not None
    args = (x, weight, bias, gather, out_idx, stride, pad, dil, groups, residual, relu)
    got = with_threads(1 + seed // 4 % 2, lambda: op(*args))
    assert got.is_contiguous(memory_format=fused.layout_of(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", [None, "groups", "rows"])
@pytest.mark.parametrize("seed", range(8))
def test_lanes_path_split_over_groups_is_exact(op, seed, split, monkeypatch):
    """One block of images (batch 16) on more threads than blocks: rows that do not split
    evenly over the bands (7, 13) split the block's groups instead, each task writing only its
    filters' channels (``GKP_FUSED_LANE_SPLIT=groups`` forces that for every shape, ``rows``
    the bands). Exact in both layouts, with and without the epilogue, on 2 and 3 threads (4
    groups in 2 or 3 shares), whatever the output permutation and repeated kept channels."""
    monkeypatch.setenv("GKP_FUSED_PATH", "lanes")
    if split:
        monkeypatch.setenv("GKP_FUSED_LANE_SPLIT", split)
    rng = random.Random(7000 + seed)
    groups, d, n_keep, c_in = 4, rng.choice([2, 4, 8]), rng.choice([3, 5]), rng.choice([8, 12])
    stride = rng.choice([1, 2])
    size = rng.choice([7, 13, 14])
    x = torch.randn(16, c_in, size, size)
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(groups * d, n_keep, 3, 3)
    bias = torch.randn(groups * d) if seed % 3 else None
    gather = torch.tensor([rng.randrange(c_in) for _ in range(groups * n_keep)])
    out_idx = torch.randperm(groups * d)
    want = F.conv2d(x[:, gather], weight, bias, stride, 1, 1, groups)[:, out_idx]
    residual = torch.randn_like(want) if seed // 2 % 2 else None
    if residual is not None:
        want = (want + residual).relu()
    args = (x, weight, bias, gather, out_idx, (stride,) * 2, (1, 1), (1, 1), groups, residual,
            residual is not None)  # fmt: skip
    for threads in (2, 3):
        got = with_threads(threads, lambda: op(*args))
        assert got.is_contiguous(memory_format=fused.layout_of(x))
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (threads, size, stride)


@pytest.mark.parametrize("window", [None, "1"])
@pytest.mark.parametrize("tile", fused.LANE_TILES)
def test_every_lane_tile_shape_is_exact(op, tile, window, monkeypatch):
    """Each tile shape of the lanes path (forced; normally a cost model picks one) on its four
    code paths (3x3 and 1x1 unit stride, 3x3 stride 2, a strided dilated 3x3), NCHW and
    channels-last input, one block split into bands of rows (batch 16 at 2 threads) and a block
    per thread (batch 40: the last block has empty lanes); with the default input window (these
    small inputs fit in it whole) and with the least one (slid as the rows go down)."""
    monkeypatch.setenv("GKP_FUSED_PATH", "lanes")
    monkeypatch.setenv("GKP_FUSED_LANE_TILE", tile)
    if window is not None:
        monkeypatch.setenv("GKP_FUSED_LANE_WINDOW", window)
    gen = torch.Generator().manual_seed(sum(map(int, tile.split(","))))
    check_tile_geometries(op, gen, batches=[16, 40], layouts=[False, True], label=tile)


@pytest.mark.parametrize("d", [2, 4, 8, 16])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_layer_whose_rows_outgrow_the_l1_cache_is_exact(op, d, stride):
    """The lanes path's own choice for a layer whose kept rows per output row are large (here
    64 kept channels x 3 rows x 32 padded columns x 16 images x 4 bytes = 393 KB, beyond an
    eighth of any L2 cache up to 3 MB): the one-pixel tile with the most filters that divide
    the groups (16, 8 or 4), or the cost model's shape for d = 2; both layouts, 2 threads."""
    gen = torch.Generator().manual_seed(d * 10 + stride)
    x = torch.randn(16, 96, 30, 30, generator=gen)
    weight = torch.randn(2 * d, 64, 3, 3, generator=gen) / 24
    bias = torch.randn(2 * d, generator=gen)
    gather = torch.randint(0, 96, (128,), generator=gen)
    out_idx = torch.randperm(2 * d, generator=gen)
    args = ((stride, stride), (1, 1), (1, 1), 2)
    want = F.conv2d(x[:, gather], weight, bias, *args)[:, out_idx]
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        got = with_threads(2, lambda inp=inp: op(inp, weight, bias, gather, out_idx, *args))
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (d, stride)


@pytest.mark.parametrize(
    "env",
    [{"GKP_FUSED_TILE": "4,3,1"}, {"GKP_FUSED_TILE": "2;2;2"}, {"GKP_FUSED_ORDER": "rows"},
     {"GKP_FUSED_PATH": "vectors"}, {"GKP_FUSED_PATH": "lanes", "GKP_FUSED_LANE_TILE": "3,3"},
     {"GKP_FUSED_PATH": "lanes", "GKP_FUSED_LANE_TILE": "4"},
     {"GKP_FUSED_PATH": "lanes", "GKP_FUSED_LANE_WINDOW": "0"},
     {"GKP_FUSED_PATH": "lanes", "GKP_FUSED_LANE_WINDOW": "4x"},
     {"GKP_FUSED_PATH": "lanes", "GKP_FUSED_LANE_SPLIT": "bands"},
     {"GKP_FUSED_PATH": "lanes", "GKP_FUSED_PACK": "mine"},
     {"GKP_FUSED_SERIAL_MACS": "-1"}, {"GKP_FUSED_SERIAL_MACS": "many"},
     {"GKP_FUSED_SERIAL_MACS": "4M"}],
)  # fmt: skip
def test_an_unknown_tuning_override_is_refused(op, env, monkeypatch):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    var = list(env)[-1]
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(8, 2, 3, 3)
    with pytest.raises(RuntimeError, match=var):
        op(x, weight, None, torch.arange(4), torch.arange(8), (1, 1), (1, 1), (1, 1), 2)


@pytest.mark.parametrize("seed", range(12))
def test_small_calls_with_fewer_images_than_threads_run_exactly_on_one(op, seed, monkeypatch):
    """Under the default bound (4 million multiply-adds) a call with fewer images than threads
    runs on one thread with no parallel region: batch 1 at 2 threads, batches 2 and 3 at 4, with
    the epilogue, both input layouts; exact, and the same output as the call split over the
    threads."""
    monkeypatch.delenv("GKP_FUSED_SERIAL_MACS")
    rng = random.Random(300 + seed)
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(rng)
    batch, threads = [(1, 2), (2, 4), (3, 4)][seed % 3]
    x = torch.randn(batch, *x.shape[1:])
    x = x.contiguous(memory_format=torch.channels_last if seed % 2 else torch.contiguous_format)
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    residual = torch.randn_like(want)
    want = (want + residual).relu()
    assert want.numel() * weight[0].numel() < 4 << 20  # multiply-adds: under the bound
    args = (x, weight, bias, gather, out_idx, stride, pad, dil, groups, residual, True)
    got = with_threads(threads, lambda: op(*args))
    assert got.is_contiguous(memory_format=fused.layout_of(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("GKP_FUSED_SERIAL_MACS", "0")
    assert torch.equal(with_threads(threads, lambda: op(*args)), got)


def test_op_runs_on_torchs_thread_pool(op):
    """Built with OpenMP, the op's work is split over torch.set_num_threads threads (without
    -fopenmp at::parallel_for compiles to a serial loop and the op never scales)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.ops.gkp_fused.threads_used(64) == 1
        torch.set_num_threads(2)
        assert torch.ops.gkp_fused.threads_used(64) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", range(24))
def test_epilogue_adds_the_residual_and_applies_relu_on_both_paths(op, seed, monkeypatch):
    """``residual``/``relu``: ``relu?(conv + residual?)`` exactly, on the rows path (an image at
    a time per thread, or the shared buffer when the batch does not split over the threads)
    and the lanes path, NCHW or channels-last input, the residual in either layout."""
    rng = random.Random(5000 + seed)
    path = ["rows", "lanes"][seed % 2]
    monkeypatch.setenv("GKP_FUSED_PATH", path)
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(rng)
    x = torch.randn(rng.choice([1, 3, 4] if path == "rows" else [8, 16, 21]), *x.shape[1:])
    if seed // 2 % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
    residual = torch.randn_like(want) if seed // 4 % 3 else None
    relu = seed // 4 % 3 != 1
    if residual is not None and rng.random() < 0.5:
        residual = residual.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        want = want + residual
    if relu:
        want = want.relu()
    got = with_threads(
        1 + seed // 12,
        lambda: op(x, weight, bias, gather, out_idx, stride, pad, dil, groups, residual, relu),
    )
    assert got.is_contiguous(memory_format=fused.layout_of(x))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    if relu:
        assert (got >= 0).all() and (got == 0).any()


@pytest.mark.parametrize("order", ["group", "band"])
@pytest.mark.parametrize("layouts", ["nchw/nchw", "nchw/cl", "cl/nchw", "cl/cl"])
def test_epilogue_on_the_shared_buffer_path_in_both_orders(op, order, layouts, monkeypatch):
    """Batch 1 on 2 threads (the shared buffer: (image, group) or (image, band) tasks), where the
    epilogue runs inside the tasks that finish each stretch of output: every loop order, input
    and residual layout gives ``relu(conv + residual)`` exactly."""
    monkeypatch.setenv("GKP_FUSED_PATH", "rows")
    monkeypatch.setenv("GKP_FUSED_ORDER", order)
    x_layout, r_layout = (torch.channels_last if k == "cl" else torch.contiguous_format
                          for k in layouts.split("/"))  # fmt: skip
    for seed in range(4):
        x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(
            random.Random(7000 + seed)
        )
        x = torch.randn(1, *x.shape[1:]).contiguous(memory_format=x_layout)
        want = F.conv2d(x[:, gather], weight, bias, stride, pad, dil, groups)[:, out_idx]
        residual = torch.randn_like(want).contiguous(memory_format=r_layout)
        want = (want + residual).relu()
        args = (x, weight, bias, gather, out_idx, stride, pad, dil, groups, residual, True)
        got = with_threads(2, lambda a=args: op(*a))
        assert got.is_contiguous(memory_format=fused.layout_of(x))
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (seed, layouts, order)


def test_epilogue_refuses_a_residual_of_another_shape(op):
    x, weight, bias, gather, out_idx, stride, pad, dil, groups = random_case(random.Random(7))
    y = op(x, weight, bias, gather, out_idx, stride, pad, dil, groups)
    with pytest.raises(RuntimeError, match="residual must be float32 of the output's shape"):
        op(x, weight, bias, gather, out_idx, stride, pad, dil, groups, y[:, :, :1])
    with pytest.raises(RuntimeError, match="residual must be float32"):
        op(x, weight, bias, gather, out_idx, stride, pad, dil, groups, y.double())

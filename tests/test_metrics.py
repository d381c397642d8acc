"""Metric values derived by hand on tiny layers."""

import random

import pytest
import torch
from torch import nn

from gkp.metrics import (
    bn_elements,
    compare_latency,
    macs,
    macs_bn,
    macs_by_hooks,
    macs_nonzero,
    params,
    params_nonzero,
    topk_correct,
)
from gkp.nn import GroupedKernelConv2d, GroupPlan


@pytest.mark.parametrize(
    "conv,want",
    [
        (nn.Conv2d(3, 8, 3, 1, 1), 8 * 3 * 9 * 8 * 8),  # 8x8 output
        (nn.Conv2d(3, 8, 3, 2, 1), 8 * 3 * 9 * 4 * 4),  # strided: 4x4 output
        (nn.Conv2d(4, 8, 3, 1, 1, groups=2), 8 * 2 * 9 * 8 * 8),  # each filter reads 2 channels
        (nn.Conv2d(3, 8, 1, 1, 0), 8 * 3 * 8 * 8),
    ],
)
def test_conv_macs(conv, want):
    x = torch.zeros(1, conv.in_channels, 8, 8)
    assert macs(conv, x) == want
    assert macs_by_hooks(conv, x) == want
    assert macs(conv, torch.zeros(3, conv.in_channels, 8, 8)) == 3 * want


def test_linear_and_params():
    lin = nn.Linear(10, 5)
    assert macs(lin, torch.zeros(2, 10)) == 2 * 50
    assert params(lin) == 55
    bn = nn.BatchNorm2d(4)
    assert params(bn) == 8  # BN affine counts, running stats do not


def test_grouped_kernel_conv_counts_kept_fraction_and_no_gather():
    conv = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    rng = random.Random(0)
    plan = GroupPlan.from_lists(
        [list(range(2 * g, 2 * g + 2)) for g in range(8)],
        [rng.sample(range(16), 9) for _ in range(8)],
    )
    mod = GroupedKernelConv2d.from_conv(conv, plan)
    x = torch.zeros(1, 16, 8, 8)
    assert macs(mod, x) == 16 * 9 * 9 * 64  # n_keep/C_in = 9/16 of the dense 16*16*9*64
    assert params(mod) == 16 * 9 * 9


def test_macs_bn_adds_two_per_bn_output():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    x = torch.zeros(2, 3, 5, 5)
    assert bn_elements(model, x) == 2 * 4 * 25
    assert macs_bn(model, x) == 2 * 4 * 3 * 9 * 25 + 2 * (2 * 4 * 25)


def test_nonzero_counts():
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.weight[1, 1] = 2.0  # 9 non-zeros
    x = torch.zeros(1, 2, 4, 4)
    assert params_nonzero(conv) == 10
    assert macs_nonzero(conv, x) == 10 * 16
    assert macs(conv, x) == 2 * 2 * 9 * 16


def test_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 1, 0])
    assert topk_correct(logits, targets, (1, 2)) == {1: 1, 2: 2}
    assert topk_correct(logits, targets, (1, 5)) == {1: 1, 5: 3}  # k clipped to 3 classes


def test_compare_latency_protocol_fields():
    models = {"a": nn.Conv2d(3, 4, 3), "b": nn.Conv2d(3, 2, 3)}
    stats = compare_latency(models, (2, 3, 8, 8), rounds=5, warmup=1, threads=1)
    assert set(stats) == {"a", "b"}
    for s in stats.values():
        assert s.rounds == 5 and s.batch == 2 and s.threads == 1 and s.device == "cpu"
        assert s.median_ms > 0 and s.iqr_ms >= 0
    assert torch.get_num_threads() >= 1


class MatrixProducts(nn.Module):
    """``x @ W`` on 2D tensors, ``torch.mm`` and ``torch.bmm``: one of each product op."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(5, 7))
        self.b = nn.Parameter(torch.zeros(2, 5, 7))

    def forward(self, x):  # x: (3, 5)
        a = x @ self.w  # (3,5)@(5,7): 3*5*7 = 105
        m = torch.mm(x, self.w)  # 105 again
        c = torch.bmm(x.expand(2, 3, 5), self.b)  # 2 * (3*5*7) = 210
        return a.sum() + m.sum() + c.sum()


def test_matrix_product_macs():
    assert macs(MatrixProducts(), torch.zeros(3, 5)) == 105 + 105 + 210


class Op(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


W57 = torch.zeros(5, 7)
B257 = torch.zeros(2, 5, 7)


@pytest.mark.parametrize(
    "fn,shape,want",
    [
        (lambda x: torch.mm(x, W57), (3, 5), 3 * 5 * 7),
        (lambda x: x @ W57, (3, 5), 3 * 5 * 7),
        (lambda x: torch.matmul(x, W57), (2, 3, 5), 2 * 3 * 5 * 7),  # batched @ matrix
        (lambda x: torch.matmul(x, B257), (2, 3, 5), 2 * 3 * 5 * 7),
        (lambda x: torch.bmm(x, B257), (2, 3, 5), 2 * 3 * 5 * 7),
        (lambda x: torch.baddbmm(torch.zeros(2, 3, 7), x, B257), (2, 3, 5), 2 * 3 * 5 * 7),
        (lambda x: torch.addmm(torch.zeros(7), x, W57), (3, 5), 3 * 5 * 7),
        (lambda x: torch.nn.functional.linear(x, W57.t()), (2, 3, 5), 2 * 3 * 5 * 7),
        (lambda x: torch.einsum("bij,bjk->bik", x, B257), (2, 3, 5), 2 * 3 * 5 * 7),
        (lambda x: torch.mv(W57.t(), x), (5,), 7 * 5),
    ],
    ids=[
        "mm",
        "at-2d",
        "matmul-3d-2d",
        "matmul-3d-3d",
        "bmm",
        "baddbmm",
        "addmm",
        "F.linear",
        "einsum",
        "mv",
    ],
)
def test_each_product_op_counts_m_k_n(fn, shape, want):
    assert macs(Op(fn), torch.zeros(*shape)) == want


def test_linear_on_3d_input():
    lin = nn.Linear(5, 7)
    assert macs(lin, torch.zeros(2, 3, 5)) == 2 * 3 * 5 * 7
    assert macs_by_hooks(lin, torch.zeros(2, 3, 5)) == 2 * 3 * 5 * 7


def _fake_clock(monkeypatch):
    """Make ``fastest_of`` read each call's time from what the candidate returns, so the race's
    rules are tested without a wall clock: sleeps on a loaded CI machine overshoot by several
    ms and once made a 2x pair look more than 2x apart."""
    import gkp.metrics as metrics

    monkeypatch.setattr(metrics, "_time_cpu", lambda fn, x: fn(x))


def _counted(ms_of):
    """Candidates that "take" ``ms_of[name]`` per call, and their call counts."""
    calls = {k: 0 for k in ms_of}

    def make(name):
        def fn(x):
            calls[name] += 1
            return ms_of[name]

        return fn

    return {k: make(k) for k in ms_of}, calls


def test_a_slow_first_call_does_not_decide_the_race(monkeypatch):
    """One-time costs of a first call (a lazily built copy) do not drop a candidate: the first
    call of each is untimed."""
    from gkp.metrics import fastest_of

    first = {"lazy": True}

    def lazy(x):
        return 300.0 if first.pop("lazy", False) else 10.0  # builds something on first use

    def steady(x):
        return 30.0

    _fake_clock(monkeypatch)
    ms = fastest_of({"lazy": lazy, "steady": steady}, torch.zeros(1), rounds=3, threads=1)
    assert ms == {"lazy": 10.0, "steady": 30.0}


def test_fastest_of_drops_far_slower_candidates_early(monkeypatch):
    """A candidate 20x slower than the best runs only its untimed first call and its warm-up
    call; equal ones run every round; the medians name the fastest."""
    from gkp.metrics import fastest_of

    _fake_clock(monkeypatch)
    fns, calls = _counted({"fast": 20.0, "close": 20.5, "slow": 400.0})
    ms = fastest_of(fns, torch.zeros(1), rounds=4, threads=1, margin=5, clear=5)
    assert calls == {"fast": 6, "close": 6, "slow": 2}
    assert ms == {"fast": 20.0, "close": 20.5, "slow": 400.0}


def test_fastest_of_stops_a_clear_race_after_two_rounds(monkeypatch):
    """From the second timed round on, a candidate slower in every round than the leader's
    slowest (by the ``clear`` factor) stops, and the race ends with one left; candidates within
    that factor run every round."""
    from gkp.metrics import fastest_of

    _fake_clock(monkeypatch)
    fns, calls = _counted({"fast": 20.0, "slower": 36.0})  # within warm-up's 2x
    ms = fastest_of(fns, torch.zeros(1), rounds=6, threads=1, margin=5, clear=1.3)
    assert calls == {"fast": 4, "slower": 4}  # untimed, warm-up, two timed rounds
    assert min(ms, key=ms.get) == "fast"
    calls.update(fast=0, slower=0)
    fastest_of(fns, torch.zeros(1), rounds=6, threads=1, margin=5, clear=2)  # within: all rounds
    assert calls == {"fast": 8, "slower": 8}
    calls.update(fast=0, slower=0)
    fastest_of(fns, torch.zeros(1), rounds=6, threads=1, margin=1.5, clear=2)  # margin: round 1
    assert calls == {"fast": 3, "slower": 3}

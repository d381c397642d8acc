"""compare_latency's protocol: copies not originals, rotated order, settings, validation, stats.

No test here looks at how long anything took: timings are replaced where a value is needed.
"""

import statistics

import pytest
import torch
from torch import nn

from gkp import metrics
from gkp.metrics import compare_latency

CALLS: list[dict] = []  # module level, so the copies compare_latency makes still write here


class Recorder(nn.Module):
    """Logs each call's model tag and the settings it ran under."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        CALLS.append(
            {
                "tag": self.tag,
                "training": self.training,
                "inference": torch.is_inference_mode_enabled(),
                "benchmark": torch.backends.cudnn.benchmark,
                "threads": torch.get_num_threads(),
                "channels_last": x.is_contiguous(memory_format=torch.channels_last),
            }
        )
        return self.conv(x)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()
    yield
    CALLS.clear()


@pytest.mark.parametrize("channels_last", [False, True])
def test_callers_models_are_not_touched(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = [p.data_ptr() for p in model.parameters()]
    strides = [p.stride() for p in model.parameters()]  # memory format
    compare_latency({"m": model}, (2, 3, 8, 8), rounds=2, warmup=1, channels_last=channels_last)
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert [p.stride() for p in model.parameters()] == strides
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in model.parameters())
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_round_r_runs_the_models_rotated_by_r():
    models = {t: Recorder(t) for t in "abc"}
    compare_latency(models, (1, 3, 5, 5), rounds=4, warmup=0, threads=1)
    order = [c["tag"] for c in CALLS]
    assert order == list("abcbcacababc")


def test_warmup_passes_are_extra_and_every_model_leads_a_round():
    models = {t: Recorder(t) for t in "ab"}
    compare_latency(models, (1, 3, 5, 5), rounds=5, warmup=3, threads=1)
    order = [c["tag"] for c in CALLS]
    assert len(order) == 2 * (3 + 5)
    timed = order[-10:]
    assert timed == list("abbaabbaab")


@pytest.mark.parametrize("benchmark_before", [False, True])
def test_settings_during_timing_and_restored_after(benchmark_before):
    old_threads = torch.get_num_threads()
    torch.backends.cudnn.benchmark = benchmark_before
    try:
        stats = compare_latency(
            {"a": Recorder("a")}, (2, 3, 6, 6), rounds=3, warmup=2, threads=1, channels_last=True
        )
        assert torch.backends.cudnn.benchmark is benchmark_before
    finally:
        torch.backends.cudnn.benchmark = False
    assert torch.get_num_threads() == old_threads
    assert len(CALLS) == 5
    for c in CALLS:
        assert not c["training"] and c["inference"] and c["benchmark"]
        assert c["threads"] == 1 and c["channels_last"]
    assert stats["a"].threads == 1 and stats["a"].rounds == 3 and stats["a"].batch == 2


def test_settings_restored_when_a_model_fails():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    old_threads, old_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    with pytest.raises(RuntimeError, match="boom"):
        compare_latency({"x": Boom()}, (1, 3, 4, 4), rounds=1, warmup=0, threads=1)
    assert torch.get_num_threads() == old_threads
    assert torch.backends.cudnn.benchmark == old_benchmark


def test_default_threads_are_the_current_count_and_recorded():
    stats = compare_latency({"a": Recorder("a")}, (1, 3, 5, 5), rounds=1, warmup=0)
    assert stats["a"].threads == torch.get_num_threads()
    assert CALLS[0]["threads"] == torch.get_num_threads()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rounds": 0}, "rounds must be >= 1, got 0"),
        ({"rounds": -2}, "rounds must be >= 1, got -2"),
        ({"rounds": 2.5}, "rounds must be an integer"),
        ({"rounds": True}, "rounds must be an integer"),
        ({"warmup": -1}, "warmup must be >= 0, got -1"),
        ({"warmup": None}, "warmup must be an integer"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"threads": -1}, "threads must be >= 1, got -1"),
        ({"threads": "2"}, "threads must be an integer"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_latency({"a": Recorder("a")}, (1, 3, 5, 5), **kwargs)
    assert CALLS == []  # rejected before anything ran


def test_median_and_iqr_of_the_recorded_times(monkeypatch):
    fake = {"a": iter([5.0, 1.0, 4.0, 2.0, 3.0]), "b": iter([10.0, 10.0, 30.0, 20.0, 20.0])}
    monkeypatch.setattr(metrics, "_time_cpu", lambda m, x: next(fake[m.tag]))
    stats = compare_latency(
        {"a": Recorder("a"), "b": Recorder("b")}, (1, 3, 5, 5), rounds=5, warmup=0
    )
    # statistics.quantiles (exclusive): positions (n+1)/4 = 1.5 and 3(n+1)/4 = 4.5 of the sorted
    # times: a = 1..5 -> 1.5 and 4.5; b = 10,10,20,20,30 -> 10 and 25
    assert stats["a"].median_ms == 3.0 and stats["a"].iqr_ms == 3.0
    assert stats["b"].median_ms == 20.0 and stats["b"].iqr_ms == 15.0


def test_cuda_timer_synchronises_then_times_between_events(monkeypatch):
    log = []

    class FakeEvent:
        count = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            FakeEvent.count += 1
            self.name = "start" if FakeEvent.count == 1 else "end"

        def record(self):
            log.append(f"{self.name}.record")

        def synchronize(self):
            log.append(f"{self.name}.synchronize")

        def elapsed_time(self, other):
            log.append(f"{self.name}.elapsed_time({other.name})")
            return 1.25

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    ms = metrics._time_cuda(lambda x: log.append("forward"), torch.zeros(1))
    assert ms == 1.25
    assert log == [
        "sync",
        "start.record",
        "forward",
        "end.record",
        "end.synchronize",
        "start.elapsed_time(end)",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_records_device_and_restores_benchmark():
    old = torch.backends.cudnn.benchmark
    model = nn.Conv2d(3, 4, 3)
    stats = compare_latency({"m": model}, (2, 3, 16, 16), rounds=3, warmup=1, device="cuda")
    assert stats["m"].device.startswith("cuda") and stats["m"].median_ms > 0
    assert torch.backends.cudnn.benchmark == old
    assert model.weight.device.type == "cpu"


def test_each_models_times_are_kept_in_round_order(monkeypatch):
    """Round r's times pair up across models (the speed-up interval divides them round by
    round); ``to_dict`` leaves them out."""
    fake = {"a": iter([5.0, 1.0, 4.0]), "b": iter([10.0, 12.0, 30.0])}
    monkeypatch.setattr(metrics, "_time_cpu", lambda m, x: next(fake[m.tag]))
    stats = compare_latency({"a": Recorder("a"), "b": Recorder("b")}, (1, 3, 5, 5), rounds=3,
                            warmup=0)  # fmt: skip
    assert stats["a"].times_ms == (5.0, 1.0, 4.0) and stats["b"].times_ms == (10.0, 12.0, 30.0)
    assert "times_ms" not in stats["a"].to_dict() and stats["a"].to_dict()["median_ms"] == 4.0


def sign_test_k(n: int, level: float) -> int:
    """The k of the sign-test interval from scipy's binomial: the largest k >= 1 with
    P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2 (0: no interval)."""
    from scipy.stats import binom

    ks = [k for k in range(1, n // 2 + 1) if binom.cdf(k - 1, n, 0.5) <= (1 - level) / 2]
    return max(ks, default=0)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 10, 17, 30, 31, 100, 2000])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_median_interval_is_the_sign_tests_order_statistics(n, level):
    values = [float((7 * i) % n) for i in range(n)]  # 0..n-1, shuffled (7 is prime to these n)
    if n % 7 == 0:
        values = [float(i) for i in reversed(range(n))]
    k = sign_test_k(n, level)
    got = metrics.median_interval(values, level)
    if k == 0:
        assert got is None
        return
    assert got == (k - 1.0, n - k + 0.0)  # the k-th smallest and the k-th largest of 0..n-1
    from scipy.stats import binom

    assert 1 - 2 * binom.cdf(k - 1, n, 0.5) >= level  # it covers the median at >= level


def test_median_interval_hand_values():
    # n = 5: even (min, max) covers the median with 1 - 2/32 = 0.9375 < 0.95: no interval
    assert metrics.median_interval([3, 1, 2, 5, 4]) is None
    # n = 6: (min, max) covers it with 1 - 2/64 = 0.969; the next pair with 1 - 14/64 < 0.95
    assert metrics.median_interval([6, 1, 5, 2, 4, 3]) == (1.0, 6.0)
    # n = 10: P(B <= 1) = 11/1024 <= 0.025 < P(B <= 2) = 56/1024: the 2nd and 9th values
    assert metrics.median_interval(range(10, 0, -1)) == (2.0, 9.0)
    for level in (0.0, 1.0, -0.5, 95):
        with pytest.raises(ValueError, match="level must be in"):
            metrics.median_interval([1.0] * 10, level)


def test_speedup_interval_divides_round_by_round():
    """A machine that slows down during the run moves both medians but no round's ratio."""
    pruned = [1.0 + 0.3 * i for i in range(10)]  # drifting
    dense = [2.0 * p for p in pruned]
    dense[4] *= 1.5  # one noisy round
    assert metrics.speedup_interval(dense, pruned) == pytest.approx((2.0, 2.0))
    ratios = sorted(d / p for d, p in zip(dense, [1.0] * 10, strict=True))
    assert metrics.speedup_interval(dense, [1.0] * 10) == pytest.approx((ratios[1], ratios[8]))
    assert metrics.speedup_interval(dense[:5], pruned[:5]) is None
    with pytest.raises(ValueError, match="paired rounds: 10 dense, 9 pruned"):
        metrics.speedup_interval(dense, pruned[:9])


def test_paired_speedup_is_the_median_round_ratio_where_the_medians_disagree():
    """The machine slows down (2x) from the middle of the fourth round on, between that round's
    pruned and dense calls: the median of the dense times is a fast round's, the pruned one a
    slow round's, and their ratio reads 0.5; every other round compares like with like."""
    dense = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    pruned = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert statistics.median(dense) / statistics.median(pruned) == 0.5
    paired, interval = metrics.paired_speedup(dense, pruned)
    assert paired == 1.0 and interval == (0.5, 1.0)  # 7 rounds: the smallest and largest ratio
    assert metrics.paired_speedup(dense[:5], pruned[:5]) == (1.0, None)
    with pytest.raises(ValueError, match="paired rounds: 0 dense, 0 pruned"):
        metrics.paired_speedup([], [])

"""What the benchmark measures: MACs, params, non-zero counts, accuracy and latency.

Counting conventions (also the leaderboard's column meanings):

- ``macs``: multiply-accumulates of conv and linear layers as executed, counted by fvcore
  (fvcore calls them "flops"; one per MAC). Gathers, permutations, pads, pools, BN and
  activations count 0. A grouped conv counts ``C_out * (C_in/groups) * k*k`` per output pixel.
- ``macs_bn``: ``macs`` plus 2 per BatchNorm output element (scale and shift), the convention
  behind the GKP paper's 43.23% on ResNet-56.
- ``macs_nonzero``: conv/linear MACs that touch a non-zero weight (masked methods).
- ``params``: every parameter of the model, BN affine included; ``params_nonzero`` likewise.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from numbers import Integral

import torch
from torch import Tensor, nn

# fvcore's by_operator() keys (the aten op name without "aten::") of ops that multiply-accumulate:
# conv = aten::_convolution; linear = F.linear / nn.Linear; mm = torch.mm and ``x @ W`` when traced
# as aten::mm; matmul = torch.matmul / ``@``; bmm; addmm (linear with bias in older traces); einsum;
# baddbmm and mv get handles below (fvcore has none for them).
_MAC_OPS = ("conv", "linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "mv", "einsum")


def _baddbmm_macs(inputs: list, outputs: list) -> int:
    """``baddbmm(input, b1, b2)``: the MACs of ``bmm(b1, b2)``; the add counts 0 (like addmm)."""
    from fvcore.nn.jit_handles import bmm_flop_jit

    return int(bmm_flop_jit(inputs[1:3], outputs))


def _mv_macs(inputs: list, outputs: list) -> int:
    """``mv(A, x)`` with ``A`` of shape (n, m): n * m MACs."""
    from fvcore.nn.jit_handles import get_shape

    n, m = get_shape(inputs[0])
    return int(n * m)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def macs(model: nn.Module, example_inputs: Tensor) -> int:
    """Conv + linear + matrix-product MACs of one forward pass on ``example_inputs`` (fvcore).

    One MAC per multiply-accumulate: ``Conv2d`` ``C_out*(C_in/groups)*k*k`` per output pixel,
    ``Linear`` / ``mm`` / ``matmul`` / ``bmm`` / ``einsum`` ``m*k*n`` per (m, k) @ (k, n)
    product (times the batch); bias adds, BN and everything else count 0 (see ``macs_bn``).
    """
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, example_inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.set_op_handle("aten::baddbmm", _baddbmm_macs, "aten::mv", _mv_macs)
        by_op = analysis.by_operator()
    return int(sum(v for k, v in by_op.items() if k in _MAC_OPS))


def _hook_counts(
    model: nn.Module, x: Tensor, kinds: tuple[type, ...], count: Callable[[nn.Module, Tensor], int]
) -> dict[str, int]:
    """``count(module, output)`` summed per module name over one forward pass on ``x``, for
    every module of ``kinds``."""
    totals: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, kinds):

            def hook(mod: nn.Module, _inp: tuple, out: Tensor, name: str = name) -> None:
                totals[name] = totals.get(name, 0) + int(count(mod, out))

            handles.append(m.register_forward_hook(hook))
    try:
        with _eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return totals


def _hook_count(
    model: nn.Module, x: Tensor, kinds: tuple[type, ...], count: Callable[[nn.Module, Tensor], int]
) -> int:
    return sum(_hook_counts(model, x, kinds, count).values())


def bn_elements(model: nn.Module, example_inputs: Tensor) -> int:
    """Number of BatchNorm output elements in one forward pass."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return _hook_count(model, example_inputs, kinds, lambda _m, out: out.numel())


def macs_bn(model: nn.Module, example_inputs: Tensor) -> int:
    """``macs`` plus 2 per BatchNorm output element."""
    return macs(model, example_inputs) + 2 * bn_elements(model, example_inputs)


def _weight_macs(nonzero_only: bool) -> Callable[[nn.Module, Tensor], int]:
    def count(mod: nn.Module, out: Tensor) -> int:
        w = mod.weight
        n = int(torch.count_nonzero(w)) if nonzero_only else w.numel()
        if isinstance(mod, nn.Conv2d):  # one MAC per weight per output pixel per sample
            return n * out.shape[0] * out.shape[2] * out.shape[3]
        return n * out.numel() // out.shape[-1]  # linear: per weight, per input row

    return count


def macs_nonzero(model: nn.Module, example_inputs: Tensor) -> int:
    """Conv + linear MACs that multiply a non-zero weight."""
    return _hook_count(model, example_inputs, (nn.Conv2d, nn.Linear), _weight_macs(True))


def macs_by_hooks(model: nn.Module, example_inputs: Tensor) -> int:
    """Conv + linear MACs counted from weight shapes (an fvcore cross-check)."""
    return _hook_count(model, example_inputs, (nn.Conv2d, nn.Linear), _weight_macs(False))


def layer_macs(model: nn.Module, example_inputs: Tensor) -> dict[str, int]:
    """:func:`macs_by_hooks` per conv and linear layer, by module name."""
    return _hook_counts(model, example_inputs, (nn.Conv2d, nn.Linear), _weight_macs(False))


def params(model: nn.Module) -> int:
    """Every parameter, BN affine included."""
    return sum(p.numel() for p in model.parameters())


def params_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many samples have their label among the top-k logits, per k (k clipped to #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return {k: int(hits[:, : min(k, kmax)].any(1).sum()) for k in ks}


@dataclass(frozen=True)
class LatencyStats:
    """Median and inter-quartile range of one model's forward time, in milliseconds."""

    median_ms: float
    iqr_ms: float
    rounds: int
    batch: int
    threads: int
    device: str
    # Every round's time in ms, in round order (rounds of :func:`time_interleaved` pair up
    # across its models by position); left out of ``to_dict``.
    times_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["times_ms"]
        return out


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of ``values``: the order statistics
    ``(v_(k), v_(n+1-k))`` of the sorted values with the largest ``k`` such that the binomial
    probability ``P(Binomial(n, 1/2) <= k - 1)`` is at most ``(1 - level) / 2`` (the sign test's
    interval: it covers the median with probability at least ``level`` for any continuous
    distribution of independent values). None when there are too few values for ``level``
    (n < 6 at 0.95, where even the smallest and largest value cover it with less).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    v = sorted(float(x) for x in values)
    n, tail, k = len(v), (1.0 - level) / 2.0, 0
    below = 0.0  # P(Binomial(n, 1/2) <= k), growing with k
    while k < n // 2:
        below += math.comb(n, k) / 2**n  # integers: exact, no overflow for any n
        if below > tail:
            break
        k += 1
    return (v[k - 1], v[n - k]) if k >= 1 else None


def speedup_interval(
    dense_ms: Sequence[float], pruned_ms: Sequence[float], level: float = 0.95
) -> tuple[float, float] | None:
    """:func:`median_interval` of the per-round speed-ups ``dense_ms[i] / pruned_ms[i]`` of an
    interleaved run (round ``i`` timed both networks, so slow drifts of the machine cancel in
    each ratio). An interval whose upper end is below a target says the network is slower than
    that beyond noise; one that contains it says the rounds cannot tell. None under 6 rounds."""
    return median_interval(_round_ratios(dense_ms, pruned_ms), level)


def paired_speedup(
    dense_ms: Sequence[float], pruned_ms: Sequence[float], level: float = 0.95
) -> tuple[float, tuple[float, float] | None]:
    """The median of the per-round speed-ups ``dense_ms[i] / pruned_ms[i]`` and its
    :func:`speedup_interval`. Where the machine's speed changes during the run (a slowed core
    for some rounds), the two medians ``median(dense) / median(pruned)`` can come from rounds of
    different speed; each round's ratio cannot, so the paired median is the steadier estimate."""
    ratios = _round_ratios(dense_ms, pruned_ms)
    return statistics.median(ratios), median_interval(ratios, level)


def _round_ratios(dense_ms: Sequence[float], pruned_ms: Sequence[float]) -> list[float]:
    if len(dense_ms) != len(pruned_ms) or not dense_ms:
        raise ValueError(
            f"the speed-up of an interleaved run needs paired rounds: {len(dense_ms)} dense, "
            f"{len(pruned_ms)} pruned"
        )
    return [d / p for d, p in zip(dense_ms, pruned_ms, strict=True)]


def _positive_int(name: str, value: object, least: int) -> int:
    """``value`` as an int >= ``least``, or a ValueError that names the argument."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def _time_cpu(model: Callable[[Tensor], object], x: Tensor) -> float:
    """Wall time of one forward pass, in milliseconds."""
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1000.0


def _time_cuda(model: Callable[[Tensor], object], x: Tensor) -> float:
    """GPU time of one forward pass between two CUDA events, in milliseconds.

    Synchronise first so earlier queued work is not counted; wait for the end event before
    reading it. Must run with ``x.device`` as the current CUDA device (events use its stream).
    """
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(x.device)
    start.record()
    model(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@contextmanager
def _timing_settings(threads: int, device: torch.device) -> Iterator[None]:
    """Fixed thread count and cudnn autotuning while timing; the caller's settings restored after.

    ``cudnn.benchmark`` only affects cuDNN convs; setting it on every device keeps one code path
    (and lets the CPU tests check it). On CUDA, ``device`` is also made the current device.
    """
    old_threads, old_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_benchmark


def _stats(times: list[float], batch: int, threads: int, device: torch.device) -> LatencyStats:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median, iqr = statistics.median(times), q[2] - q[0]
    return LatencyStats(median, iqr, len(times), batch, threads, str(device), tuple(times))


def _rotated(items: list, r: int) -> list:
    """``items`` rotated left by ``r``: round ``r`` starts with model ``r mod n``."""
    r = r % len(items) if items else 0
    return items[r:] + items[:r]


def compare_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    rounds: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> dict[str, LatencyStats]:
    """Time several models on the same input in one run, rounds interleaved.

    Protocol: each model is timed on a copy (the caller's models keep their mode, device,
    memory format and weights) in eval(), under inference_mode, after ``warmup`` untimed rounds,
    with a fixed thread count (recorded; default: the current one). Round ``r`` runs the models
    in their given order rotated by ``r``, so no model always runs first (warm caches, clock
    boosts) and machine-load drift hits all of them alike. CPU: wall time of each pass. CUDA:
    CUDA events after a synchronise, with ``cudnn.benchmark`` on (restored after).
    Compare ratios within one call, never absolute times across runs.
    """
    rounds = _positive_int("rounds", rounds, 1)
    warmup = _positive_int("warmup", warmup, 0)
    threads = _positive_int("threads", torch.get_num_threads() if threads is None else threads, 1)
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*input_shape, device=device).contiguous(memory_format=fmt)
    prepared = [
        (k, copy.deepcopy(m).to(device).eval().to(memory_format=fmt)) for k, m in models.items()
    ]
    return time_interleaved(
        dict(prepared), x, rounds=rounds, warmup=warmup, threads=threads, device=device
    )


def time_interleaved(
    fns: Mapping[str, Callable[[Tensor], object]],
    x: Tensor,
    *,
    rounds: int,
    warmup: int,
    threads: int,
    device: str | torch.device | None = None,
) -> dict[str, LatencyStats]:
    """Median/IQR of several ready-to-run callables on ``x``, rounds interleaved and rotated.

    The core of :func:`compare_latency`, for anything that runs a batch: prepared modules, a
    compiled model, an ONNX Runtime or OpenVINO session wrapped as ``fn(x)``. Runs under
    ``inference_mode`` with ``threads`` intra-op threads (PyTorch's; a runtime session fixes its
    own when it is built). ``device`` (default: ``x``'s) picks the clock: CUDA events on a GPU.
    """
    device = x.device if device is None else torch.device(device)
    items = list(fns.items())
    time_once = _time_cuda if device.type == "cuda" else _time_cpu
    times: dict[str, list[float]] = {k: [] for k, _ in items}
    with _timing_settings(threads, device), torch.inference_mode():
        for r in range(warmup):
            for _, fn in _rotated(items, r):
                fn(x)
        for r in range(rounds):
            for k, fn in _rotated(items, r):
                times[k].append(time_once(fn, x))
    return {k: _stats(v, int(x.shape[0]), threads, device) for k, v in times.items()}


def fastest_of(
    fns: Mapping[str, Callable[[Tensor], object]],
    x: Tensor,
    *,
    rounds: int,
    threads: int,
    margin: float = 1.5,
    clear: float = 1.05,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Median ms of each candidate, for choosing the fastest: a race with early drop-outs.

    One untimed call of each candidate (it absorbs one-time costs: a masked dense copy built on
    first use once made a 7 ms network's first call take 43 ms and lose the race), one timed
    warm-up round, then ``rounds`` interleaved, rotated rounds. A candidate more than twice
    as slow as the fastest in the warm-up round, or more than ``margin`` times slower after the
    first timed round, stops running (its median is then of the rounds it ran; of its warm-up
    call if it ran no other, as when one candidate is left after the warm-up); so does, from
    the second timed round on, one whose fastest round is more than ``clear`` times the
    slowest round of the candidate with the lowest median (clearly slower in every round), and
    the race ends when one is left. Choosing among forms that differ several-fold (a grouped
    conv that ONNX Runtime runs 3-8x slower than dense) costs one slow call, not
    ``rounds + 1``, and a clear race of ResNet-50 networks at 0.5 s a call two rounds.
    ``device`` (default: ``x``'s) picks the clock: on a GPU, CUDA events after a synchronise
    (wall time would count only the launches).
    """
    device = x.device if device is None else torch.device(device)
    items = list(fns.items())
    time_once = _time_cuda if device.type == "cuda" else _time_cpu
    warm = {}
    times: dict[str, list[float]] = {k: [] for k, _ in items}

    def keep(last: Mapping[str, float], factor: float) -> list:
        best = min(last[k] for k, _ in items)
        return [(k, fn) for k, fn in items if last[k] <= factor * best]

    with _timing_settings(threads, device), torch.inference_mode():
        for _, fn in items:  # untimed: a first call's one-time costs (lazily built copies,
            fn(x)  # first-touched buffers) must not decide the early drop-outs below
        for k, fn in items:
            warm[k] = time_once(fn, x)
        items = keep(warm, 2.0)
        for r in range(rounds if len(items) > 1 else 0):  # a lone survivor needs no race
            for k, fn in _rotated(items, r):
                times[k].append(time_once(fn, x))
            if r == 0:
                items = keep({k: v[0] for k, v in times.items() if v}, margin)
            else:
                lead = min(items, key=lambda kv: statistics.median(times[kv[0]]))[0]
                worst = clear * max(times[lead])
                items = [(k, fn) for k, fn in items if min(times[k]) <= worst]
            if len(items) < 2:
                break
    return {k: statistics.median(v) if v else warm[k] for k, v in times.items()}

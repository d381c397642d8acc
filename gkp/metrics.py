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

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

_MAC_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def macs(model: nn.Module, example_inputs: Tensor) -> int:
    """Conv + linear MACs of one forward pass on ``example_inputs`` (fvcore, quietly)."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, example_inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    return int(sum(v for k, v in by_op.items() if k in _MAC_OPS))


def _hook_count(
    model: nn.Module, x: Tensor, kinds: tuple[type, ...], count: Callable[[nn.Module, Tensor], int]
) -> int:
    total = 0

    def hook(mod: nn.Module, _inp: tuple, out: Tensor) -> None:
        nonlocal total
        total += count(mod, out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with _eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return int(total)


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

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(model: nn.Module, x: Tensor) -> float:
    _sync(x.device)
    t0 = time.perf_counter()
    model(x)
    _sync(x.device)
    return (time.perf_counter() - t0) * 1000.0


def _stats(times: list[float], batch: int, threads: int, device: torch.device) -> LatencyStats:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return LatencyStats(
        statistics.median(times), q[2] - q[0], len(times), batch, threads, str(device)
    )


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

    eval(), inference_mode, ``warmup`` untimed passes, a fixed thread count (recorded), CUDA
    synchronised around each pass. Interleaving the models round by round makes their ratios
    robust to the machine's load drifting; compare ratios, never absolute times across runs.
    """
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*input_shape, device=device).contiguous(memory_format=fmt)
    prepared = {k: m.to(device).eval().to(memory_format=fmt) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in prepared}
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for m in prepared.values():
                    m(x)
            for _ in range(rounds):
                for k, m in prepared.items():
                    times[k].append(_time_once(m, x))
    finally:
        torch.set_num_threads(old_threads)
    return {k: _stats(v, int(input_shape[0]), threads, device) for k, v in times.items()}

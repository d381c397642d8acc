"""Per-layer deploy autotuning for grouped-kernel networks (like ``cudnn.benchmark``).

Every deploy-form layer has exact equivalents that run at very different speeds depending on the
layer's shape, the batch, the device and the thread count. For a ``GroupedKernelConv2d``: the
PyTorch ops (gather → grouped conv → un-permute) in NCHW or channels-last, one conv per group,
the fused CPU op (:mod:`gkp.fused`), the Triton GPU kernel and the masked dense conv; for a
``PerGroupConv2d`` (SG-CNN's unequal groups): its convs or the masked dense conv.
:func:`autotune` runs one forward pass of an example batch to capture each layer's real input,
times every candidate on it (:func:`gkp.metrics.fastest_of`: median of interleaved rounds, fixed
thread count, inference mode; a candidate more than 1.5x slower than the best after the first
round stops early) and keeps the fastest in ``layer.backend``. Because the masked dense conv is
always a candidate, no tuned layer is slower than its dense counterpart beyond timing noise.

Layers of the same shape are timed once per process: the candidates' speed depends on the
layer's geometry (channels, groups, kept count per group, kernel, stride, padding, dilation,
bias), its input's shape, strides (layout) and dtype, the device and the thread count, never on
which channels are kept or on the weights' values (:func:`layer_signature`). ResNet-56's 54
grouped layers have 5 shapes (ResNet-50's 16 have 7), and every GKP method at the same G and
rate prunes to the same shapes, so a later layer (or a later method's network) of a known shape
reuses the timings (``"shared": True`` in its choice). ``share=False`` times every layer anew.

Choices depend on where the network runs, so they are cached under a key of device, processor,
dtype, input shape, thread count, torch version, candidate set and the OpenMP wait and binding
settings when any is set (:func:`tune_key`): pass a
dict as ``cache`` and a later call with the same key applies the stored choices without timing.
The pipeline keeps that dict in the fine-tuned checkpoint (``final.pt``, key ``autotune``),
beside the weights it was tuned for; :func:`apply_choices` applies stored choices to a rebuilt
model.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gkp import fused, memory, metrics
from gkp.nn import DEPLOY_FORMS, PerGroupConv2d

__all__ = [
    "apply_choices",
    "autotune",
    "candidates",
    "clear_shared_timings",
    "layer_signature",
    "openmp_settings",
    "plain_if_all_dense",
    "tune_key",
]


TUNE_VERSION = 7  # 2: the tuned network raced against the masked dense one; 3: with a margin
# (NETWORK_MARGIN) and at least 5 rounds; 4: the masked dense candidate in the input's layout (it
# kept NCHW weights on channels-last inputs, a weight conversion per call); 5: races with an untimed
# first call per candidate (gkp.metrics.fastest_of); 6: entries may hold the per-layer picks before
# the network race (network_check=False, the latency backends' joint race); 7: a layer inside a
# gkp.epilogue.ConvEpilogue is timed with its epilogue; older entries re-tune
NETWORK_MARGIN = 0.03  # the tuned network must beat the masked dense one by this fraction


def beats_dense(ms: float, dense_ms: float) -> bool:
    """Whether a grouped network at ``ms`` should deploy instead of the masked dense one at
    ``dense_ms``: faster by at least :data:`NETWORK_MARGIN`. Within timing noise the network of
    exactly dense cost is the safe deploy (the rule of every form race in this suite)."""
    return ms < (1 - NETWORK_MARGIN) * dense_ms


def candidates(x: Tensor, layer: nn.Module | None = None) -> list[str]:
    """The backends worth timing for ``layer`` (a grouped layer when None) on input ``x``:
    always the PyTorch ops and masked dense; for a grouped layer also channels-last, one conv
    per group, the fused ops for float32 on a CPU (the filters path where each group's filters
    are a multiple of 8) and the Triton kernels (tensor-core and direct) for float32/bfloat16 on
    a CUDA GPU."""
    if isinstance(layer, PerGroupConv2d):
        return list(PerGroupConv2d.BACKENDS)
    out = ["torch", "channels_last", "per_group", "dense"]
    if x.device.type == "cpu" and x.dtype == torch.float32 and fused.load():
        out.insert(1, "fused")
        if layer is None or fused.filters_path_takes(layer.filters_per_group):
            out.insert(2, "fused_filters")
    if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16):
        from gkp import triton_conv

        if triton_conv.available():
            out[1:1] = ["triton", "triton_direct"]
    return out


# OpenMP settings that change how fast a form runs on a CPU (how threads wait between parallel
# regions, where they are placed): with OMP_WAIT_POLICY=PASSIVE every region starts with a
# wake-up, and ResNet-56's tuned GKP network at batch 1 on 2 threads went from well ahead of its
# masked dense form to behind it (README, "Deploy speed", the two suite commands there)
OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_PROC_BIND",
                   "OMP_PLACES")  # fmt: skip


def openmp_settings(example: Tensor | None = None) -> dict[str, str]:
    """The :data:`OPENMP_SETTINGS` set in this process's environment (empty when none is, or
    when ``example`` is on a GPU, where they do not apply)."""
    if example is not None and example.is_cuda:
        return {}
    return {k: os.environ[k] for k in OPENMP_SETTINGS if os.environ.get(k)}


def tune_key(example: Tensor, threads: int | None = None) -> str:
    """Where choices hold: device and processor, dtype, input shape, threads, torch version,
    the candidates a grouped layer is timed among, the fused kernel's build, how choices are
    made (:data:`TUNE_VERSION`) and, on a CPU, the OpenMP settings of :data:`OPENMP_SETTINGS`
    that are set (none set: no part in the key, so keys made without them stay valid) and
    ``alloc=caching`` while the caching CPU allocator is installed
    (:func:`gkp.memory.keep_freed_memory`: no page faults in the timed calls, so the timings, and
    the choices, differ)."""
    if example.is_cuda:
        where = f"cuda:{torch.cuda.get_device_name(example.device)}"
    else:
        where = f"cpu:{_cpu_name()}"
    n = threads if threads is not None else torch.get_num_threads()
    shape = "x".join(str(s) for s in example.shape)
    dtype = str(example.dtype).removeprefix("torch.")
    tried = "+".join(candidates(example))  # other candidates (a new form, no compiler): re-tune
    if "fused" in tried:
        tried += f"|fused={fused.build_id()}"  # a changed kernel: re-tune
    key = f"{where}|{dtype}|{shape}|threads={n}|torch={torch.__version__}|{tried}|v{TUNE_VERSION}"
    if not example.is_cuda and memory.allocator() == "caching":
        key += "|alloc=caching"
    return key + "".join(f"|{k}={v}" for k, v in sorted(openmp_settings(example).items()))


@functools.cache  # tune_key runs once per layer (layer_signature): read /proc/cpuinfo once
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_SHARED_MS: dict[tuple, dict[str, float]] = {}  # layer_signature -> candidates' median ms
_SHARED_MAX = 4096  # entries kept (a signature is one layer shape on one input shape)


def layer_signature(layer: nn.Module, x: Tensor, threads: int, epilogue: tuple = ()) -> tuple:
    """What decides how fast each exact form of ``layer`` runs on ``x``: :func:`tune_key`
    (device, processor, dtype, input shape, threads, candidates, kernel build), the input's
    strides (its layout), the layer's geometry, whether it writes its grouped rows in order
    (``ordered_output``: no scattered stores, no un-permuting copy) and the epilogue it runs
    with (``(relu, residual)`` inside a :class:`gkp.epilogue.ConvEpilogue`). Two layers with
    equal signatures
    differ only in which channels they keep and in their weights, which no candidate's speed
    depends on."""
    conv = layer.convs[0] if isinstance(layer, PerGroupConv2d) else layer.conv
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.bias is not None)
    if isinstance(layer, PerGroupConv2d):
        split = (tuple(layer.group_sizes), tuple(layer.keep_counts))
    else:
        split = (layer.n_groups, layer.n_keep)
    return (type(layer).__name__, layer.in_channels, layer.out_channels, split, geometry,
            layer.ordered_output, tuple(x.stride()), tune_key(x, threads), epilogue)  # fmt: skip


def clear_shared_timings() -> None:
    """Forget the per-shape layer timings of this process (the next autotune times anew)."""
    _SHARED_MS.clear()


def _tunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DEPLOY_FORMS)}


def _hosts(model: nn.Module) -> dict[str, nn.Module]:
    """Each deploy-form layer's caller: the :class:`gkp.epilogue.ConvEpilogue` wrapping it (so
    it is timed with the epilogue it runs with), or the layer itself."""
    from gkp.epilogue import ConvEpilogue

    modules = dict(model.named_modules())
    hosts = {}
    for name, layer in _tunable(model).items():
        parent = modules.get(name.rpartition(".")[0]) if name.endswith(".conv") else None
        hosts[name] = parent if isinstance(parent, ConvEpilogue) else layer
    return hosts


def _inputs(model: nn.Module, example: Tensor) -> dict[str, tuple[Tensor, ...]]:
    """Each deploy-form layer's arguments in a forward pass of ``example``: its input, and the
    residual when its caller (:func:`_hosts`) takes one."""
    seen: dict[str, tuple[Tensor, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, tuple(args)))
        for name, m in _hosts(model).items()
    ]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _median_ms(
    layer: nn.Module,
    backends: Sequence[str],
    x: Tensor,
    rounds: int,
    threads: int,
    host: nn.Module | None = None,
    rest: tuple[Tensor, ...] = (),
):
    """Median ms of ``layer`` with each backend on ``x``, called through ``host`` (its
    epilogue wrapper, with the further arguments ``rest``) when given."""
    call = layer if host is None else host

    def run_as(backend: str):
        def fn(inp: Tensor) -> Tensor:
            layer.backend = backend
            return call(inp, *rest)

        return fn

    return metrics.fastest_of({b: run_as(b) for b in backends}, x, rounds=rounds, threads=threads)


def _whole_network_ms(
    model: nn.Module,
    example: Tensor,
    picks: Mapping[str, Mapping[str, str]],
    rounds: int,
    threads: int,
) -> dict[str, float]:
    """Median ms of the whole network with each set of per-layer backends in ``picks``."""
    layers = dict(model.named_modules())

    def run_as(backends: Mapping[str, str]):
        def fn(inp: Tensor) -> Tensor:
            for name, backend in backends.items():
                layers[name].backend = backend
            return model(inp)

        return fn

    fns = {label: run_as(backends) for label, backends in picks.items()}
    return metrics.fastest_of(fns, example, rounds=max(5, rounds // 3), threads=threads)


def _whole_network_check(
    model: nn.Module, example: Tensor, choices: dict[str, dict[str, Any]], rounds: int, n: int
) -> None:
    """Layer timings do not always add up: on a GPU at small batches the launches of the
    grouped forms (three ops, or a Triton launch, per layer) cost more in the network than each
    layer's timing shows. So the tuned network is timed against the masked dense network (every
    layer ``"dense"``: the dense network's cost) and the tuned one is kept only when it is at
    least :data:`NETWORK_MARGIN` faster: within timing noise the exact dense-cost network is
    the safe deploy (with dense kept, every choice becomes ``"dense"``); each choice records both
    medians in ``"network_ms"``."""
    tuned = {name: c["backend"] for name, c in choices.items()}
    ms = _whole_network_ms(
        model, example, {"tuned": tuned, "dense": dict.fromkeys(tuned, "dense")}, rounds, n
    )
    keep = "tuned" if beats_dense(ms["tuned"], ms["dense"]) else "dense"
    for name, c in choices.items():
        c["backend"] = tuned[name] if keep == "tuned" else "dense"
        c["network_ms"] = {k: round(v, 4) for k, v in ms.items()}
    apply_choices(model, {name: c["backend"] for name, c in choices.items()})


def plain_if_all_dense(model: nn.Module, choices: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """``model`` as tuned: when every layer kept the masked dense conv, a copy made of plain
    convs (:func:`gkp.nn.densify`: the same network without the layers' dispatch), else itself."""
    from gkp.nn import densify

    picks = {c["backend"] for c in choices.values()}
    return densify(model) if picks == {"dense"} else model


def apply_choices(model: nn.Module, choices: Mapping[str, str], example: Tensor | None = None):
    """Set each deploy-form layer's backend from ``{layer name: backend}`` (stored choices).

    Raises ValueError when the names are not exactly ``model``'s deploy-form layers or a backend
    is not one that layer can run (with ``example``: on that input); nothing is changed then.
    """
    layers = _tunable(model)
    if set(choices) != set(layers):
        missing, extra = sorted(set(layers) - set(choices)), sorted(set(choices) - set(layers))
        raise ValueError(
            f"stored autotune choices do not fit this model (missing {missing[:3]}, unknown "
            f"{extra[:3]}); tune it again (drop the cache entry)"
        )
    for name, backend in choices.items():
        layer = layers[name]
        allowed = _all(layer) if example is None else candidates(example, layer)
        if backend not in allowed:
            raise ValueError(
                f"stored autotune choice {backend!r} for {name} cannot run here (choose from "
                f"{', '.join(allowed)}); tune it again (drop the cache entry)"
            )
    for name, backend in choices.items():
        layers[name].backend = backend
        layers[name].drop_built()


def _all(layer: nn.Module) -> tuple[str, ...]:
    from gkp.nn import BACKENDS

    return PerGroupConv2d.BACKENDS if isinstance(layer, PerGroupConv2d) else BACKENDS


def autotune(
    model: nn.Module,
    example: Tensor,
    *,
    rounds: int = 15,
    threads: int | None = None,
    cache: MutableMapping[str, dict[str, str]] | None = None,
    share: bool = True,
    network_check: bool = True,
) -> dict[str, dict[str, Any]]:
    """Pick the fastest exact backend of every deploy-form layer of ``model`` for ``example``.

    Returns ``{layer: {"backend": choice, "ms": {backend: median ms}}}`` (``"ms"`` is empty
    and ``"cached"`` true for choices taken from ``cache``). ``model`` must be in eval mode (BN
    statistics would move otherwise); ``threads`` fixes the thread count while timing (default:
    the current one). ``cache``: a dict of earlier choices by :func:`tune_key`; an entry for
    this key that fits the model is applied without timing, otherwise the new choices are
    stored in it. ``share``: reuse the timings of a layer of the same shape timed earlier in
    this process (:func:`layer_signature`; those choices carry ``"shared": True``), and keep
    this call's timings for later ones; False times every layer. ``network_check``: race the
    tuned network against the masked dense one and keep the tuned picks only if it wins by
    :data:`NETWORK_MARGIN` (:func:`_whole_network_check`); False returns (and caches) the
    per-layer picks as they are, for a caller that runs that race itself (the latency backends
    race it together with the input layouts, :func:`benchmarks.backends.prepare`).
    """
    if model.training:
        raise ValueError("autotune a model in eval() mode: it runs forward passes")
    key = tune_key(example, threads)
    if cache is not None and key in cache:
        try:
            apply_choices(model, cache[key], example)
            return {n: {"backend": b, "ms": {}, "cached": True} for n, b in cache[key].items()}
        except (ValueError, TypeError, AttributeError):
            pass  # stale or foreign entry: tune again and replace it
    n = int(threads) if threads is not None else torch.get_num_threads()
    with torch.inference_mode():
        inputs = _inputs(model, example)
    layers, hosts = dict(model.named_modules()), _hosts(model)
    choices = {}
    for name, (x, *rest) in inputs.items():
        layer, host = layers[name], hosts[name]
        host = None if host is layer else host
        epilogue = () if host is None else (host.relu, bool(rest))
        sig = layer_signature(layer, x, n, epilogue) if share else None
        ms = _SHARED_MS.get(sig) if share else None
        choices[name] = {"shared": True} if ms is not None else {}
        if ms is None:
            ms = _median_ms(layer, candidates(x, layer), x, rounds, n, host, tuple(rest))
            if share:
                if len(_SHARED_MS) >= _SHARED_MAX:
                    _SHARED_MS.pop(next(iter(_SHARED_MS)))
                _SHARED_MS[sig] = ms
        layer.backend = min(ms, key=ms.get)
        choices[name].update(backend=layer.backend, ms=dict(ms))
    if network_check and any(c["backend"] != "dense" for c in choices.values()):
        _whole_network_check(model, example, choices, rounds, n)
    if cache is not None and set(choices) == set(_tunable(model)):
        cache[key] = {n: c["backend"] for n, c in choices.items()}
    return choices

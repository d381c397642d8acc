"""Latency backends: one network made ready to run by each engine people deploy with.

Each backend turns an eval-mode model into ``fn(x) -> output`` for a fixed input shape; the dense
network is prepared by the same backend, so every speed-up compares like with like:

- ``eager``: PyTorch eager, grouped layers as gather → grouped conv → un-permute (``torch``),
  or the masked dense network where that runs faster (below).
- ``fused``: eager with the fused CPU op (:mod:`gkp.fused`) in every grouped layer, or the
  masked dense network where that runs faster.
- ``autotune``: eager, each grouped layer the fastest of its exact forms for this shape and thread
  count (:mod:`gkp.autotune`: PyTorch ops, fused op, masked dense).
- ``compile``: ``torch.compile`` (inductor) of the deployed network.

On ``eager``, ``fused`` and ``autotune`` every network, dense or pruned, runs in the faster of
NCHW and channels-last (``info["layout"]``; under ``autotune`` each layout tuned on its own), so
every speed-up is against the faster dense layout.
- ``onnxruntime`` / ``openvino``: the deployed network exported to ONNX (opset 17, the PyTorch
  ops form: the fused op is not an ONNX op) and run by ONNX Runtime (``CPUExecutionProvider``,
  all graph optimisations) or OpenVINO (``CPU``, latency hint).

Every backend first folds each BatchNorm into the conv before it (:func:`gkp.fold.fold_batchnorm`,
for dense and pruned networks alike, as ONNX Runtime and OpenVINO do on load), so eager speed-ups
compare the convolutions rather than BN passes both networks share, and then each grouped
layer's output permutation into the convs that read its output (:func:`gkp.fold.fold_permutations`:
the layer writes its filters in group order, no scattered stores or un-permuting copy, and the
readers take their input channels in that order).

A grouped network has two exact forms on every backend: its grouped deploy form and the masked
dense form (``gkp.nn.densify``: the removed kernels as zeros, i.e. dense cost). Every backend
deploys the faster: ``compile``, the runtimes, ``eager`` and ``fused`` time both for the whole
network (a few rounds; the eager family in both layouts), ``autotune`` per layer and then the
tuned network against the masked dense one. ``form`` in the returned info says which ran
(``grouped``, ``per-group``, ``masked-dense`` or ``dense`` for networks with one form), and the
medians that chose it are kept (``forms_ms`` / ``layouts_ms``), so the grouped form's own speed
stays on record where it lost.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gkp import fused, metrics
from gkp.fold import fold_batchnorm, fold_permutations
from gkp.memory import keep_freed_memory
from gkp.nn import densify, grouped_plans, per_group_plans, set_backend

__all__ = ["BACKENDS", "Prepared", "missing", "prepare", "version"]

BACKENDS = ("eager", "fused", "autotune", "compile", "onnxruntime", "openvino")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}

Prepared = tuple[Callable[[Tensor], Any], dict[str, Any]]


def missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here (None when it can); ValueError for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    module = _MODULES.get(backend)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install {module})"
    if backend == "fused" and not fused.load():
        return "the fused op could not be built (no C++ compiler?)"
    return None


def version(backend: str) -> str:
    """The engine's version string, for the results (PyTorch's for the PyTorch backends)."""
    module = _MODULES.get(backend)
    if module is None:
        return f"torch {torch.__version__}"
    return f"{module} {importlib.import_module(module).__version__}"


def structure_digest(model: nn.Module) -> str:
    """A digest of ``model``'s layers and parameter shapes (not values): equal for a network and
    a copy with masked (zeroed) weights, different once a layer is pruned or regrouped."""
    parts = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    parts += [f"{n}:{tuple(t.shape)}" for n, t in model.state_dict().items()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _form(model: nn.Module) -> str:
    if per_group_plans(model):
        return "per-group"
    return "grouped" if grouped_plans(model) else "dense"


def prepare(
    backend: str,
    model: nn.Module,
    example: Tensor,
    threads: int,
    tune_rounds: int = 15,
    cache: dict[str, Any] | None = None,
    dense_layout: str | None = None,
    dense_structure: str | None = None,
) -> Prepared:
    """``model`` (not modified) ready to run on ``backend`` for inputs shaped like ``example``.

    ``tune_rounds``: timed rounds per candidate when choosing (per layer for ``autotune``, a
    third of them, at least 3, per network form for the others). Returns ``(fn, info)``:
    ``info["form"]`` is the form that runs, ``info["forms_ms"]`` the medians that chose it where
    there was a choice, ``info["autotune"]`` the per-layer picks. ``cache``: a dict of earlier
    choices for this model (keyed by backend, engine version, device, shape and threads; see
    :func:`gkp.autotune.tune_key`): a choice found there is reused untimed
    (``info["cached"]``), a new one is stored in it. ``dense_layout``: the layout the dense
    network runs faster in (its own ``info["layout"]``), when known: ``eager`` and ``fused`` then
    race the masked dense network in that layout only (it runs the very convs dense runs, so the
    other layout is slower for it too), a third fewer candidate networks to time.
    ``dense_structure``: the dense network's :func:`structure_digest`; a ``model`` with the same
    digest (the dense network's own layers and shapes, masked weights: the weight and kernel
    methods) runs in ``dense_layout`` on ``eager``/``fused``/``autotune`` without a layout race
    of its own (``info["layout_from"] = "dense"``): its faster layout is dense's, and a race of
    its own would only let timing noise pick the slower one.
    ``info["openmp"]``: the OpenMP wait and binding settings in the environment
    (:func:`gkp.autotune.openmp_settings`), only when any is set: they change CPU timings and
    the choices (which are kept apart per setting). ``info["allocator"]``: PyTorch's CPU
    allocator (:func:`gkp.memory.keep_freed_memory`, installed here before anything is timed:
    ``"caching"`` unless ``GKP_CPU_CACHE=off`` or it cannot be built, then ``"default"``).
    Raises RuntimeError (with the fix) when the backend cannot run here.
    """
    why = missing(backend)
    if why:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    from gkp.autotune import openmp_settings

    alloc = keep_freed_memory()
    fn, info = _prepare(
        backend, model, example, threads, tune_rounds, cache, dense_layout, dense_structure
    )
    omp = openmp_settings(example)
    return fn, {**info, "allocator": alloc, **({"openmp": omp} if omp else {})}


def _prepare(
    backend: str,
    model: nn.Module,
    example: Tensor,
    threads: int,
    tune_rounds: int,
    cache: dict[str, Any] | None,
    dense_layout: str | None,
    dense_structure: str | None,
) -> Prepared:
    same = dense_structure is not None and structure_digest(model) == dense_structure
    model = fold_batchnorm(model).to(example.device)  # an eval() copy; runtimes fold BN too
    model = fold_permutations(model)  # grouped layers write group order where convs read it
    form = _form(model)
    if backend in ("eager", "fused", "autotune"):
        return _eager(
            backend, model, form, example, threads, tune_rounds, cache, dense_layout, same
        )
    build = {"compile": _compiled, "onnxruntime": _ort, "openvino": _openvino}[backend]
    if form == "dense":
        return build(model, example, threads), {"form": form}
    from gkp.autotune import tune_key

    key = f"{backend}|{version(backend)}|{FORM_RULE}|{tune_key(example, threads)}"
    forms = {} if cache is None else cache.setdefault("forms", {})
    if forms.get(key) in (form, "masked-dense"):
        chosen = forms[key]
        net = model if chosen == form else densify(model)
        return build(net, example, threads), {"form": chosen, "cached": True}
    candidates = {form: build(model, example, threads)}
    candidates["masked-dense"] = build(densify(model), example, threads)
    rounds = max(3, tune_rounds // 3)
    ms = metrics.fastest_of(candidates, example, rounds=rounds, threads=threads)
    best = pick_form(ms)
    forms[key] = best
    return candidates[best], {"form": best, "forms_ms": {k: round(v, 4) for k, v in ms.items()}}


_CL = torch.channels_last
# in the cache keys of network-form choices: choices made under an older rule are made again
FORM_RULE = "margin3-untimed-first-permfold"
# and, for ``autotune``, since its networks run with fused conv epilogues (gkp.epilogue)
EPILOGUE_RULE = "epilogues1"


def pick_form(ms: dict[str, float]) -> str:
    """The candidate to deploy from raced medians ``{name: ms}``: the fastest, except that a
    grouped candidate must beat the fastest masked-dense one (names ``masked-dense...``) by
    :data:`gkp.autotune.NETWORK_MARGIN` (3%), as autotune's tuned network must: within timing
    noise the exact dense-cost network is the safe deploy. Without masked-dense candidates
    (a dense network's layouts), simply the fastest."""
    from gkp.autotune import beats_dense

    best = min(ms, key=ms.get)
    masked = {k: v for k, v in ms.items() if k.startswith("masked-dense")}
    if not masked or best in masked:
        return best
    safe = min(masked, key=masked.get)
    return best if beats_dense(ms[best], masked[safe]) else safe


def _eager(
    backend: str,
    model: nn.Module,
    form: str,
    example: Tensor,
    threads: int,
    rounds: int,
    cache,
    dense_layout: str | None = None,
    same_as_dense: bool = False,
) -> Prepared:
    """Eager PyTorch (``fused``: fused op in every grouped layer; ``autotune``: each deploy-form
    layer tuned) in the faster of NCHW and channels-last for the whole network, dense and pruned
    alike (oneDNN picks other conv kernels for channels-last; the input's conversion is timed
    too), so speed-ups are against the faster dense layout. Under ``autotune`` each layout is
    tuned on its own input, so a layer keeping the masked dense conv runs it in the layout dense
    runs in. ``info["layout"]`` says which layout runs.

    Like the runtimes, all three also race the masked dense network (in both layouts, or in
    ``dense_layout`` alone when given) against the pruned form and deploy the faster by
    :func:`pick_form`'s rule (``form`` = ``masked-dense``, ``layouts_ms`` keys
    ``masked-dense|<layout>``). ``autotune`` tunes each layout's layers without
    :func:`gkp.autotune.autotune`'s own network race (``network_check=False``): this one race
    decides both the layout and tuned-or-dense, in about half the whole-network calls (ResNet-50
    at batch 16 runs 0.5 s a call here).

    ``autotune`` also fuses each conv's ReLU or add-and-ReLU into the conv call
    (:func:`gkp.epilogue.fuse_epilogues`) in every network it times, dense included: oneDNN's
    convolution with post-ops for dense convs, the fused kernel's epilogue for fused layers, as
    the deployment runtimes do (``info["epilogues"]`` counts them)."""
    from gkp.autotune import autotune, plain_if_all_dense, tune_key
    from gkp.epilogue import ConvEpilogue, fuse_epilogues

    def variant(choice: str) -> tuple[Callable[[Tensor], Any], dict[str, Any]]:
        masked, _, layout = choice.rpartition("|")  # "nchw", "masked-dense|channels_last", ...
        net = densify(model) if masked else model  # densify returns a copy
        if layout != "nchw":
            net = (net if masked else copy.deepcopy(net)).to(memory_format=_CL)
        info: dict[str, Any] = {"form": masked or form, "layout": layout}
        if backend == "autotune":  # dense, masked-dense and tuned networks alike (a copy)
            net = fuse_epilogues(net)  # before tuning: layers are timed with their epilogues
            info["epilogues"] = sum(m.relu for m in net.modules() if isinstance(m, ConvEpilogue))
        if backend == "fused" and not masked:
            set_backend(net, "fused")
        elif backend == "autotune" and form != "dense" and not masked:
            x = example if layout == "nchw" else example.contiguous(memory_format=_CL)
            layers = None if cache is None else cache.setdefault("autotune", {})
            tuned = autotune(
                net, x, rounds=rounds, threads=threads, network_check=False,
                cache=None if layers is None else layers.setdefault(layout, {}),
            )  # fmt: skip
            picks = [c["backend"] for c in tuned.values()]
            info["autotune"] = {b: picks.count(b) for b in sorted(set(picks))}
            plain = plain_if_all_dense(net, tuned)
            if plain is not net:  # every layer kept the masked dense conv: plain convs run it
                info["form"] = "masked-dense"
                net = plain if layout == "nchw" else plain.to(memory_format=_CL)
            info["cached"] = all(c.get("cached") for c in tuned.values())
        if layout == "nchw":
            return net, info
        return (lambda x: net(x.contiguous(memory_format=_CL))), info

    choices = ["nchw", "channels_last"]
    if form == "dense" and same_as_dense and dense_layout in choices:
        fn, info = variant(dense_layout)  # dense's own structure: dense's layout, unraced
        return fn, {**info, "layout_from": "dense"}
    if form != "dense":
        dense_layouts = choices if dense_layout not in choices else [dense_layout]
        choices += [f"masked-dense|{layout}" for layout in dense_layouts]
    rule = f"{FORM_RULE}|{EPILOGUE_RULE}" if backend == "autotune" else FORM_RULE
    key = f"{backend}|layout|{rule}|{tune_key(example, threads)}"
    forms = {} if cache is None else cache.setdefault("forms", {})
    if forms.get(key) in choices:
        fn, info = variant(forms[key])
        return fn, {**info, "cached": info.get("cached", True)}
    variants = {choice: variant(choice) for choice in choices}
    for choice in choices[:2]:  # a tuned layout whose layers all kept dense is a masked-dense one
        twin = variants.get(f"masked-dense|{choice}")
        if twin and variants[choice][1]["form"] == "masked-dense":
            twin[1]["autotune"] = variants.pop(choice)[1]["autotune"]
    fns = {k: v[0] for k, v in variants.items()}
    least = 5 if backend == "autotune" else 3  # autotune's own network race ran at least 5
    ms = metrics.fastest_of(fns, example, rounds=max(least, rounds // 3), threads=threads)
    forms[key] = best = pick_form(ms)
    return fns[best], {**variants[best][1], "layouts_ms": {k: round(v, 4) for k, v in ms.items()}}


def _compiled(model: nn.Module, example: Tensor, threads: int) -> Callable[[Tensor], Any]:
    fn = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fn(example)  # compile now, not inside the timed rounds
        finally:
            torch.set_num_threads(old)
    return fn


def _onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """The model as ONNX (opset 17, TorchScript exporter: static shapes, plain Conv/Gather ops)."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        set_backend(model, "torch")
        torch.onnx.export(
            model, (example,), str(path), opset_version=17, dynamo=False,
            input_names=["x"], output_names=["y"],
        )  # fmt: skip
        return path.read_bytes()


def _ort(model: nn.Module, example: Tensor, threads: int) -> Callable[[Tensor], Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting after a run: dense and pruned sessions alternate in one process, and a
    # session's spinning threads would take the cores from the other one's next run
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        _onnx_bytes(model, example), opts, providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def _openvino(model: nn.Module, example: Tensor, threads: int) -> Callable[[Tensor], Any]:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(_onnx_bytes(model, example))
        net = core.read_model(str(path))
    compiled = core.compile_model(
        net, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                     "INFERENCE_PRECISION_HINT": "f32"},
    )  # fmt: skip
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[compiled.output(0)]

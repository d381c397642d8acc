"""Leaderboard columns measured from models: sizes (MACs, params) and latency vs dense.

Latency columns come either from timing both models here, or from the JSON that the
pytest-benchmark latency suite writes (pure JSON handling, no model code).
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkp import metrics


def _pct(dense: float, pruned: float) -> float:
    return 100.0 * (1.0 - pruned / dense)


def size_columns(dense: nn.Module, pruned: nn.Module, x: torch.Tensor) -> dict[str, float | int]:
    """MACs (conv + linear; + BN), params and non-zero counts of both models on input ``x``."""
    cols: dict[str, float | int] = {}
    for key, fn in (("macs", metrics.macs), ("macs_bn", metrics.macs_bn)):
        d, p = fn(dense, x), fn(pruned, x)
        cols.update({f"{key}_dense": d, key: p, f"{key}_reduction_pct": _pct(d, p)})
    d, p = metrics.params(dense), metrics.params(pruned)
    cols.update(params_dense=d, params=p, params_reduction_pct=_pct(d, p))
    cols["macs_nonzero"] = metrics.macs_nonzero(pruned, x)
    cols["params_nonzero"] = metrics.params_nonzero(pruned)
    return cols


DEPLOYS = ("torch", "fused", "autotune")
# the form the latency suite deploys; "torch" times rows as every row before it was timed
DEFAULT_DEPLOY = "autotune"


_KEPT = ("form", "layout", "dense_layout", "autotune", "epilogues", "cached", "allocator")


def timed_forms(
    dense: nn.Module,
    pruned: nn.Module,
    deploy: str,
    example: torch.Tensor,
    threads: int,
    tune_cache: dict | None = None,
    also: Mapping[str, nn.Module] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the latency columns time for ``deploy`` on inputs like ``example``: ready-to-run
    ``{"dense", "pruned", *also}`` callables, and what the deploy chose.

    ``torch`` / ``fused``: eval copies of the networks as they are (``fused``: the pruned
    network's grouped layers on the fused op, falling back to ``torch`` with a warning where
    the op cannot be built; ``{"fused_layers": n}`` comes back). ``autotune``: exactly the
    latency suite's ``autotune`` backend (:func:`benchmarks.backends.prepare`) for every network,
    dense included: BN folded, conv epilogues fused, the faster of NCHW and channels-last, and
    for the pruned network per-layer tuning and the race against its masked dense form; so the
    speed-up is against the fastest dense network on the same backend, as in
    ``results/latency.csv``. ``tune_cache`` (the pruned network's choices, see ``prepare``):
    choices found there are reused untimed, new ones are stored in it. Every deploy first installs
    the caching CPU allocator (:func:`gkp.memory.keep_freed_memory`; ``"allocator"`` in what
    comes back says which one ran).
    """
    from benchmarks.backends import prepare, structure_digest
    from gkp.memory import keep_freed_memory
    from gkp.nn import set_backend

    if deploy not in DEPLOYS:
        raise ValueError(f"unknown --deploy {deploy!r}; choose one of {', '.join(DEPLOYS)}")
    if deploy != "autotune":
        nets = {"dense": dense, "pruned": pruned, **(also or {})}
        fns = {k: copy.deepcopy(m).to(example.device).eval() for k, m in nets.items()}
        picked = {"allocator": keep_freed_memory()}
        if deploy == "fused":
            picked["fused_layers"] = set_backend(fns["pruned"], "fused")
        return fns, picked
    run_dense, info = prepare("autotune", dense, example, threads)
    layout, structure = info.get("layout"), structure_digest(dense)
    run_pruned, info = prepare("autotune", pruned, example, threads, cache=tune_cache,
                               dense_layout=layout, dense_structure=structure)  # fmt: skip
    fns = {"dense": run_dense, "pruned": run_pruned}
    for name, model in (also or {}).items():
        fns[name] = prepare("autotune", model, example, threads, dense_layout=layout,
                            dense_structure=structure)[0]  # fmt: skip
    picked = {k: info[k] for k in _KEPT if k in info}
    return fns, {**picked, "dense_layout": layout}


def latency_columns(
    dense: nn.Module,
    pruned: nn.Module,
    sample_shape: Sequence[int],
    batch: int,
    rounds: int,
    device: torch.device,
    threads: int | None = None,
    also: Mapping[str, nn.Module] | None = None,
    deploy: str = DEFAULT_DEPLOY,
    tune_cache: dict | None = None,
) -> dict[str, Any]:
    """Median/IQR latency of pruned and dense at batch 1 and ``batch``, timed in one run.

    ``also``: other forms of the pruned network (e.g. ``masked_dense``) timed in the same run;
    their medians and speed-ups over dense come back under the key ``also`` (not a column).
    ``deploy``: how the networks run (:data:`DEPLOYS`, :func:`timed_forms`; chosen per batch);
    what it chose comes back under the key ``deploy`` (not a column); ``tune_cache``: see
    :func:`timed_forms`.
    """
    threads = threads or torch.get_num_threads()
    cols: dict[str, Any] = {"device": device.type, "bench_batch": batch}
    extra: dict[str, dict[str, float]] = {name: {} for name in also or {}}
    chosen: dict[str, Any] = {"deploy": deploy}
    for tag, b in (("b1", 1), ("bN", batch)):
        x = torch.randn(b, *sample_shape, device=device)
        fns, picked = timed_forms(dense, pruned, deploy, x, threads, tune_cache, also)
        if picked:
            chosen[tag] = picked
        stats = metrics.time_interleaved(fns, x, rounds=rounds, warmup=5, threads=threads)
        cols["threads"] = stats["pruned"].threads
        cols[f"latency_{tag}_ms"] = stats["pruned"].median_ms
        cols[f"latency_{tag}_iqr_ms"] = stats["pruned"].iqr_ms
        cols[f"latency_{tag}_dense_ms"] = stats["dense"].median_ms
        cols[f"speedup_{tag}"] = stats["dense"].median_ms / stats["pruned"].median_ms
        for name in extra:
            extra[name][f"latency_{tag}_ms"] = stats[name].median_ms
            extra[name][f"speedup_{tag}"] = stats["dense"].median_ms / stats[name].median_ms
    if extra:
        cols["also"] = extra
    cols["deploy"] = chosen
    return cols


# ----------------------------------------------------------------------------- benchmark JSON


def bench_key(method: str, target: float | None, native: Mapping[str, Any]) -> str:
    """What identifies a pruned configuration in timings: method, MACs target and knobs.

    The latency suite writes it to ``extra_info["config"]``; ``--latency-json`` only takes
    timings whose key equals the run's own.
    """
    return json.dumps(
        {"method": method, "target": target, "native": dict(native)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )


def _entries(path: Path) -> list[dict[str, Any]]:
    """The ``benchmarks`` list of a pytest-benchmark JSON file, each with its stats checked.

    An entry's ``extra_info`` without ``cpu_name`` (suites older than it) gets the processor in
    the file's ``machine_info`` (py-cpuinfo's ``brand_raw``; empty when not there)."""
    fix = "create one with `pytest benchmarks --benchmark-only --benchmark-json FILE`"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable pytest-benchmark JSON ({err}); {fix}") from None
    entries = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} has no 'benchmarks' list: not a pytest-benchmark JSON; {fix}")
    machine = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else {}
    good = []
    for i, b in enumerate(entries):
        info = b.get("extra_info") if isinstance(b, dict) else None
        if not isinstance(info, dict) or "method" not in info or "snapshots" in info:
            continue  # not a latency entry (test_prune_speed's entries time pruning)
        stats = b.get("stats")
        if not isinstance(stats, dict) or not all(
            isinstance(stats.get(k), (int, float)) for k in ("median", "iqr")
        ):
            raise ValueError(f"{path}: benchmark {i} has no numeric stats median/iqr; {fix}")
        missing = [k for k in ("model", "batch") if k not in info]
        if missing:
            raise ValueError(f"{path}: benchmark {i} lacks extra_info {missing}; {fix}")
        info.setdefault("cpu_name", str(cpu.get("brand_raw") or ""))
        good.append(b)
    return good


def _ideal(entry: Mapping[str, Any], speedup: float) -> dict[str, float]:
    if not entry.get("macs") or not entry.get("macs_dense"):
        return {}
    ideal = entry["macs_dense"] / entry["macs"]
    return {"ideal": ideal, "fraction_of_ideal": speedup / ideal}


def _interleaved_row(info: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model", "method", "config", "backend", "form", "batch", "input_shape", "device",
            "dense_ms", "dense_iqr_ms", "pruned_ms", "pruned_iqr_ms", "speedup", "threads",
            "macs", "macs_dense", "rounds", "engine", "backend_info", "cpu_name",
            "speedup_low", "speedup_high", "speedup_paired")  # fmt: skip
    return {**{k: info.get(k) for k in keys}, **_ideal(info, info["speedup"])}


def bench_from_json(path: Path) -> list[dict[str, Any]]:
    """Dense-vs-method ratios from a pytest-benchmark JSON file (medians, same run).

    Entries of the latency suite carry both medians (dense and pruned interleaved in one test)
    and give one row each. Older entries (one network each) pair up when model, backend, batch,
    memory format, input shape, device and threads agree; ``ideal`` (the MACs ratio) comes with
    them when MACs were recorded.
    """
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    rows = []
    for b in _entries(path):
        info = b["extra_info"]
        if info.get("interleaved"):  # the latency suite: dense and pruned timed in one test
            rows.append(_interleaved_row(info))
            continue
        key = (
            info["model"],
            info.get("backend", "eager"),
            info["batch"],
            info.get("memory_format", "nchw"),
            json.dumps(info.get("input_shape")),
            info.get("device", "cpu"),
            info.get("threads"),
        )
        entry = {
            "median": b["stats"]["median"] * 1e3,
            "iqr": b["stats"]["iqr"] * 1e3,
            "rounds": b["stats"].get("rounds"),
            **info,
        }
        groups[key][info.get("config") or info["method"]] = entry
    for (model, backend, batch, fmt, _shape, device, _threads), by_config in sorted(
        groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])
    ):
        dense = next((m for m in by_config.values() if m["method"] == "dense"), None)
        for m in by_config.values():
            if m["method"] == "dense" or dense is None:
                continue
            rows.append(
                {
                    "model": model,
                    "method": m["method"],
                    "config": m.get("config"),
                    "backend": backend,
                    "form": m.get("form"),
                    "batch": batch,
                    "memory_format": fmt,
                    "input_shape": m.get("input_shape"),
                    "device": device,
                    "dense_ms": dense["median"],
                    "dense_iqr_ms": dense["iqr"],
                    "pruned_ms": m["median"],
                    "pruned_iqr_ms": m["iqr"],
                    "speedup": dense["median"] / m["median"],
                    "threads": m.get("threads"),
                    "macs": m.get("macs"),
                    "macs_dense": m.get("macs_dense"),
                    "params": m.get("params"),
                    "rounds": min(filter(None, (m["rounds"], dense["rounds"])), default=None),
                    "engine": m.get("engine"),
                    "backend_info": m.get("backend_info"),
                    "cpu_name": m.get("cpu_name"),
                    **_ideal(m, dense["median"] / m["median"]),
                }
            )
    return rows


def latency_columns_from_json(
    path: Path, *, model: str, config: str, input_shape: Sequence[int], device: str
) -> dict[str, Any]:
    """The leaderboard's latency columns for one configuration, from a pytest-benchmark JSON.

    Only timings of the same model, configuration (:func:`bench_key`), per-sample input shape
    and device count; anything else is refused. Batch 1 fills the ``b1`` columns and the
    largest other batch the ``bN`` ones (NCHW rows); speed-ups are dense / pruned medians.
    """
    shape = [int(s) for s in input_shape]
    rows = [
        r
        for r in bench_from_json(path)
        if r["model"] == model
        and r["config"] == config
        and r["memory_format"] == "nchw"
        and r["input_shape"] == shape
        and r["device"] == device
    ]
    by_batch = {r["batch"]: r for r in rows}
    if 1 not in by_batch or len(by_batch) < 2:
        raise ValueError(
            f"{path} has no batch-1 and throughput timings of {model} with {config} on input "
            f"{shape} on {device}: it timed another configuration. Time this one "
            "(`gkp-bench bench` with the same flags), or drop --latency-json"
        )
    big = max(by_batch)
    cols: dict[str, Any] = {
        "device": device,
        "bench_batch": big,
        "threads": by_batch[1]["threads"],
    }
    for tag, r in (("b1", by_batch[1]), ("bN", by_batch[big])):
        cols.update(
            {
                f"latency_{tag}_ms": r["pruned_ms"],
                f"latency_{tag}_iqr_ms": r["pruned_iqr_ms"],
                f"latency_{tag}_dense_ms": r["dense_ms"],
                f"speedup_{tag}": r["speedup"],
            }
        )
    return cols

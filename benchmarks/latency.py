"""Long-format latency results (``results/latency.csv``): one row per run, backend, batch, threads.

Every row times a pruned network and its dense original on the same backend, device, batch and
thread count, in one interleaved run (``gkp.metrics.time_interleaved``), and says how close the
speed-up came to the ideal (the MACs ratio). ``run_id`` links a row to its leaderboard row (the
``gkp-bench run`` that produced the network); latency of untrained networks (``gkp-bench bench``,
the latency suite) has ``run_id`` = ``untrained-`` + a digest of the configuration.

The file is written like the leaderboard: validated rows, appended atomically under a lock; a
malformed file raises LeaderboardError naming the row and is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from benchmarks.backends import BACKENDS, prepare, structure_digest, version
from benchmarks.csvtable import (
    csv_line,
    parse_table,
    raise_problems,
    read_text,
    to_frame,
    upgraded_bytes,
)
from benchmarks.environment import cpu_name
from benchmarks.leaderboard import utc_now
from benchmarks.rowcheck import LeaderboardError, coerce
from benchmarks.schema import Column
from gkp import metrics
from gkp.fsio import atomic_write_bytes, exclusive_lock, remove_orphaned_temps

__all__ = ["LATENCY_SCHEMA", "append_rows", "latency_rows", "read_latency", "untrained_run_id"]


def _c(name: str, dtype: str, unit: str, doc: str, choices: tuple[str, ...] = ()) -> Column:
    return Column(name, dtype, unit, doc, choices, (0, None) if dtype != "str" else (None, None))


LATENCY_SCHEMA: tuple[Column, ...] = (
    _c("run_id", "str", "", "the leaderboard row's run_id, or untrained-<digest> (no row)"),
    _c("model", "str", "", "architecture"),
    _c("method", "str", "", "pruning method"),
    _c("config", "str", "JSON", "method, MACs target and knobs (benchmarks.measure.bench_key)"),
    _c("input_shape", "str", "", "C x H x W of one sample"),
    _c("backend", "str", "", "engine that ran both networks", BACKENDS),
    _c(
        "form",
        "str",
        "",
        "form of the pruned network that ran (grouped, per-group, masked-dense, dense)",
    ),  # fmt: skip
    _c("backend_info", "str", "JSON", "what the backend picked (per-layer choices, form medians)"),
    _c("device", "str", "", "cpu or cuda", ("cpu", "cuda")),
    _c("batch", "int", "", "batch size"),
    _c("threads", "int", "", "intra-op threads of both networks"),
    _c("rounds", "int", "", "timed rounds (interleaved, after warm-up)"),
    _c("dense_ms", "float", "ms", "median latency of the dense network on this backend"),
    _c("dense_iqr_ms", "float", "ms", "its interquartile range"),
    _c("pruned_ms", "float", "ms", "median latency of the pruned network on this backend"),
    _c("pruned_iqr_ms", "float", "ms", "its interquartile range"),
    _c("speedup", "float", "x", "dense_ms / pruned_ms"),
    _c("macs_dense", "int", "MACs", "dense conv + linear MACs of one sample"),
    _c("macs", "int", "MACs", "pruned deploy-form MACs of one sample"),
    _c("ideal", "float", "x", "macs_dense / macs: the speed-up if time followed MACs"),
    _c("fraction_of_ideal", "float", "", "speedup / ideal"),
    _c("engine", "str", "", "engine version (torch, onnxruntime or openvino)"),
    _c("date", "str", "", "when it was measured (UTC)"),
    _c("command", "str", "", "the command that measured it"),
    _c(
        "cpu_name",
        "str",
        "",
        "processor of the machine that timed it (benchmarks.environment.cpu_name; the host's for "
        "cuda rows; empty: not recorded)",
    ),
    _c(
        "speedup_low",
        "float",
        "x",
        "lower end of a 95% interval for the median per-round speed-up (dense / pruned of each "
        "interleaved round; sign-test order statistics, gkp.metrics.speedup_interval); empty "
        "under 6 rounds and in rows measured before it was recorded",
    ),
    _c("speedup_high", "float", "x", "upper end of that interval"),
    _c(
        "speedup_paired",
        "float",
        "x",
        "median of the per-round speed-ups (gkp.metrics.paired_speedup), the estimate the "
        "interval is for; empty in rows measured before it was recorded",
    ),
)
COLUMNS = tuple(c.name for c in LATENCY_SCHEMA)
_BY_NAME = {c.name: c for c in LATENCY_SCHEMA}
OPTIONAL = ("backend_info", "command", "cpu_name", "speedup_low", "speedup_high", "speedup_paired")
REQUIRED = tuple(c for c in COLUMNS if c not in OPTIONAL)
# Headers of older files (prefixes of COLUMNS): they read with the missing columns empty, and
# the next append upgrades the file in place (benchmarks.csvtable.upgraded_bytes).
LEGACY_HEADERS = tuple(
    COLUMNS[: COLUMNS.index(first)] for first in ("cpu_name", "speedup_low", "speedup_paired")
)


def _check(row: Mapping[str, object]) -> tuple[dict, list[str]]:
    clean: dict[str, object] = {}
    problems = []
    for name in COLUMNS:
        try:
            clean[name] = coerce(_BY_NAME[name], row.get(name))
        except ValueError as exc:
            clean[name] = None
            problems.append(f"{name}: {exc}")
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        problems.append(f"unknown columns {unknown}")
    problems += [f"{n} is empty" for n in REQUIRED if clean[n] is None and n in row]
    problems += [f"{n} is missing" for n in REQUIRED if n not in row]
    return clean, problems


# CPU latency rows dated before this were measured under older protocols (BatchNorm not folded,
# older kernels and deploy rules; results/README.md) on an AMD EPYC. The README's latency and goal
# tables and the latency figure leave them out (:func:`current_cpu_rows`); the rows since then
# come from more than one machine, so the tables and the figure keep processors apart by each
# row's ``cpu_name`` (:func:`machine`).
CPU_SINCE = "2026-11-27T17:00:00Z"
UNRECORDED_CPU = "CPU not recorded"
# A run timed again on the same backend, batch, threads and machine: its last row counts.
LAST_ROW_KEYS = ["run_id", "backend", "batch", "threads", "device", "machine"]


def last_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The last row of each run id, backend, batch, threads and machine (:func:`machine`: the
    processor of CPU rows, the device of GPU rows, whose host processor, recorded in newer rows
    only, does not make them another machine), in file order, with the column ``machine``."""
    frame = frame.assign(machine=machine(frame))
    return frame.drop_duplicates(subset=LAST_ROW_KEYS, keep="last")


def current_cpu_rows(frame: pd.DataFrame, since: str | None = CPU_SINCE) -> pd.DataFrame:
    """``frame`` less its CPU rows dated before ``since`` (ISO-8601 UTC; None keeps every row).
    GPU rows are all kept."""
    if since is None:
        return frame
    return frame[(frame["device"] != "cpu") | (frame["date"] >= since)]


def machine(frame: pd.DataFrame) -> pd.Series:
    """Each row's machine: the processor for CPU rows (``cpu_name``, or ``UNRECORDED_CPU``), the
    device for the others (``cuda``), so that no table line, goal or panel mixes machines."""
    cpu = frame["cpu_name"].where(frame["cpu_name"] != "", UNRECORDED_CPU)
    return cpu.where(frame["device"] == "cpu", frame["device"])


def cpu_names(frame: pd.DataFrame) -> list[str]:
    """The processors of ``frame``'s CPU rows (:func:`machine`), in order of first row."""
    return list(dict.fromkeys(machine(frame[frame["device"] == "cpu"])))


def read_latency(path: str | os.PathLike) -> pd.DataFrame:
    """``results/latency.csv`` as a typed frame (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return to_frame([], LATENCY_SCHEMA)
    table = parse_table(read_text(path), LATENCY_SCHEMA, _check, LEGACY_HEADERS)
    if table.problems:
        raise_problems(path, table.problems)
    return to_frame(table.rows, LATENCY_SCHEMA)


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> int:
    """Validate every row, then append them all atomically (none when one is bad)."""
    path = Path(path)
    lines = []
    for i, row in enumerate(rows, start=1):
        clean, problems = _check(row)
        if problems:
            raise LeaderboardError(f"{path}: nothing appended: row {i}: {'; '.join(problems)}")
        lines.append(csv_line([clean[c] for c in COLUMNS]))
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path) as real:
        remove_orphaned_temps(real)
        existing = real.read_bytes() if real.exists() else b""
        table = parse_table(read_text(path, existing), LATENCY_SCHEMA, _check, LEGACY_HEADERS)
        if table.problems:
            raise_problems(path, table.problems, outcome=", nothing appended")
        atomic_write_bytes(real, upgraded_bytes(existing, table, COLUMNS) + b"".join(lines))
    return len(lines)


def import_rows(source: str | os.PathLike, path: str | os.PathLike) -> int:
    """Append every row of ``source``, a latency CSV written elsewhere (e.g. by
    ``scripts/bench_gpu.py --parts backends`` on a GPU machine), to ``path``, validated as
    both files are; returns how many. A malformed ``source`` raises LeaderboardError naming
    it, and ``path`` is left as it was."""
    source = Path(source)
    if not source.exists():
        raise LeaderboardError(f"{source}: no such latency CSV; give the file the run wrote")
    table = parse_table(read_text(source), LATENCY_SCHEMA, _check, LEGACY_HEADERS)
    if table.problems:
        raise_problems(source, table.problems, outcome=", nothing imported")
    return append_rows(path, table.rows)


def rows_from_suite(pairs: Iterable[Mapping[str, Any]], command: str) -> list[dict[str, Any]]:
    """Long-format rows from ``benchmarks.measure.bench_from_json`` pairs of the latency suite
    (pairs without MACs, from suites older than this file, are left out)."""
    rows = []
    for p in pairs:
        if not p.get("ideal") or not p.get("engine"):
            continue
        shape = p.get("input_shape") or []
        rows.append({
            "run_id": untrained_run_id(p["model"], p["config"], shape),
            **{k: p[k] for k in ("model", "method", "config", "backend", "form", "device",
                                 "batch", "threads", "rounds", "dense_ms", "dense_iqr_ms",
                                 "pruned_ms", "pruned_iqr_ms", "speedup", "macs", "macs_dense",
                                 "ideal", "fraction_of_ideal", "engine")},
            "input_shape": "x".join(map(str, shape)),
            "backend_info": p.get("backend_info") or {},
            "date": utc_now(),
            "command": command,
            "cpu_name": p.get("cpu_name") or "",
            "speedup_low": p.get("speedup_low"),
            "speedup_high": p.get("speedup_high"),
            "speedup_paired": p.get("speedup_paired"),
        })  # fmt: skip
    return rows


def paired_columns(dense_ms: Sequence[float], pruned_ms: Sequence[float]) -> dict[str, Any]:
    """A row's ``speedup_paired``, ``speedup_low`` and ``speedup_high`` from the per-round times
    of an interleaved run (:func:`gkp.metrics.paired_speedup`; the interval None under 6 rounds):
    the one place the suite, ``gkp-bench bench`` and the latency rows make them."""
    paired, interval = metrics.paired_speedup(dense_ms, pruned_ms)
    low, high = interval or (None, None)
    return {"speedup_paired": paired, "speedup_low": low, "speedup_high": high}


def suite_rounds(seconds: float, once: float) -> int:
    """Timed rounds of a latency-suite test: its budget ``seconds`` over one round's time
    ``once`` (seconds), at least 3 and at most 30, and at least 6 (the fewest that give a
    speed-up interval, :func:`gkp.metrics.speedup_interval`) where 6 rounds fit in twice the
    budget: ResNet-56 at batch 64 (about 0.2 s a round on 2 cores) gets its interval for a round
    or two more, ResNet-50 at batch 16 (1.4 s) keeps 3 at the default budget of 1 s."""
    rounds = max(3, min(30, int(seconds / max(once, 1e-6))))
    return max(rounds, 6) if 6 * once <= 2 * seconds else rounds


def untrained_run_id(model: str, config: str, input_shape: Sequence[int]) -> str:
    """``run_id`` of latency rows of a freshly initialised network (no leaderboard row)."""
    key = f"{model}|{config}|{tuple(input_shape)}".encode()
    return "untrained-" + hashlib.sha256(key).hexdigest()[:12]


def latency_rows(
    dense: nn.Module,
    pruned: nn.Module,
    *,
    sample_shape: Sequence[int],
    backends: Sequence[str],
    batches: Sequence[int],
    threads: int,
    rounds: int,
    ident: Mapping[str, Any],
    command: str = "",
    progress=None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Time ``pruned`` against ``dense`` on every backend and batch; the long-format rows.

    ``ident``: run_id, model, method, config of the rows. A backend that cannot run here is
    skipped with a warning naming why. ``device``: ``"cuda"`` times copies of both networks on
    the GPU (the PyTorch backends; CUDA events), recording the GPU and whether TF32 was on.
    """
    from benchmarks.backends import missing

    x1 = torch.zeros(1, *sample_shape)
    macs_dense, macs = metrics.macs(dense, x1), metrics.macs(pruned, x1)
    structure = structure_digest(dense)
    rows = []
    for backend in backends:
        why = missing(backend)
        if why:
            import warnings

            warnings.warn(f"latency: backend {backend} skipped: {why}", RuntimeWarning, 2)
            continue
        for batch in batches:
            x = torch.randn(batch, *sample_shape, device=device)
            run_dense, dense_info = prepare(backend, dense, x, threads)
            layout = dense_info.get("layout")  # masked dense races in that layout only
            run_pruned, info = prepare(
                backend, pruned, x, threads, dense_layout=layout, dense_structure=structure
            )
            if layout is not None:
                info["dense_layout"] = layout
            if x.is_cuda:
                info["gpu"] = torch.cuda.get_device_name(x.device)
                info["tf32"] = torch.backends.cudnn.allow_tf32
            stats = metrics.time_interleaved(
                {"dense": run_dense, "pruned": run_pruned}, x, rounds=rounds, warmup=3,
                threads=threads,
            )  # fmt: skip
            d, p = stats["dense"], stats["pruned"]
            speedup = d.median_ms / p.median_ms
            rows.append({
                **ident,
                "input_shape": "x".join(map(str, sample_shape)),
                "backend": backend,
                "form": info.pop("form"),
                "backend_info": info,
                "device": x.device.type,
                "batch": batch,
                "threads": threads,
                "rounds": rounds,
                "dense_ms": d.median_ms,
                "dense_iqr_ms": d.iqr_ms,
                "pruned_ms": p.median_ms,
                "pruned_iqr_ms": p.iqr_ms,
                "speedup": speedup,
                "macs_dense": macs_dense,
                "macs": macs,
                "ideal": macs_dense / macs,
                "fraction_of_ideal": speedup / (macs_dense / macs),
                "engine": version(backend),
                "date": utc_now(),
                "command": command,
                "cpu_name": cpu_name(),
                **paired_columns(d.times_ms, p.times_ms),
            })  # fmt: skip
            if progress is not None:
                progress(rows[-1])
    return rows


def _config(text: str) -> dict[str, Any]:
    """A row's ``config`` JSON ({} when it is not an object)."""
    try:
        cfg = json.loads(text)
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _labels(frame: pd.DataFrame) -> list[str]:
    """Each row's method, with its knobs where one model has rows of several configurations."""
    configs = frame.groupby(["model", "method"])["config"].nunique()
    out = []
    for model, method, config in zip(frame["model"], frame["method"], frame["config"], strict=True):
        if configs[(model, method)] < 2:
            out.append(method)
            continue
        cfg = _config(config)
        knobs = [f"{k}={v}" for k, v in sorted((cfg.get("native") or {}).items())]
        if cfg.get("target") is not None:
            knobs.append(f"target={cfg['target']}")
        out.append(f"{method} ({', '.join(knobs)})")
    return out


def latency_markdown(frame: pd.DataFrame) -> str:
    """Markdown table of speed-ups over dense: one line per (model, batch, threads, method), one
    column per backend (the last row of each run id, backend, batch and threads), and the ideal.
    Rows of other devices, and of several processors, get lines of their own, the model cell
    naming the machine (:func:`machine`).
    """
    if frame.empty:
        return "(no latency rows)\n"
    frame = last_rows(frame)
    backends = [b for b in BACKENDS if b in set(frame["backend"])]
    lines = [
        "| model | batch | threads | method | ideal | " + " | ".join(backends) + " |",
        "|---|---:|---:|---|---:|" + "---:|" * len(backends),
    ]
    frame = frame.assign(label=_labels(frame))
    several = len(cpu_names(frame)) > 1  # then each CPU line names its processor
    group = ["model", "machine", "batch", "threads", "device", "label"]
    for (model, where, batch, threads, device, method), part in frame.groupby(group, sort=True):
        by = dict(zip(part["backend"], part["speedup"], strict=True))
        forms = dict(zip(part["backend"], part["form"], strict=True))
        cells = [
            f"{by[b]:.2f}×" + (" (md)" if forms[b] == "masked-dense" else "") if b in by else ""
            for b in backends
        ]
        where = f"{model} ({where})" if device != "cpu" or several else model
        ideal = part["ideal"].iloc[-1]
        lines.append(
            f"| {where} | {batch} | {threads} | {method} | {ideal:.2f}× | "
            + " | ".join(cells)
            + " |"
        )
    return (
        "\n".join(lines) + "\n\n(md): the runtime ran the masked-dense form, faster there than "
        "the grouped form (benchmarks/backends.py).\n"
    )


GKP_FAMILY = ("gkp-l2", "gkp-random", "tmi-gkp", "sr-gkp")  # G = 8 in the suite


def goals_markdown(frame: pd.DataFrame) -> str:
    """Issue 9's speed goals against the measured CPU rows (the last row of each run id, backend,
    batch, threads and processor): per processor and thread count, the values each goal covers
    and whether all meet it. Rows below a goal are counted, and how many of them are below it
    beyond noise (the upper end of their speed-up interval, ``speedup_high``, under the goal)
    and how many have no interval."""
    frame = last_rows(frame)
    frame = frame[frame["device"] == "cpu"]
    lines = [
        "| goal | target | cpu | threads | measured | met |",
        "|---|---:|---|---:|---|---|",
    ]
    for cpu in cpu_names(frame) or [""]:
        lines += _goal_lines(frame[machine(frame) == cpu], cpu)
    return "\n".join(lines) + "\n"


def _goal_lines(frame: pd.DataFrame, cpu: str) -> list[str]:
    rate = frame["config"].map(lambda c: (_config(c).get("native") or {}).get("rate") == 0.75)
    gkp = frame["method"].isin(GKP_FAMILY)
    r56, r50 = frame["model"] == "resnet56", frame["model"] == "resnet50"
    goals = [
        ("ResNet-56 GKP (G=8, p=0.4375), autotune, batch 64", 1.3,
         frame[r56 & gkp & (frame["batch"] == 64) & (frame["backend"] == "autotune")]),
        ("ResNet-56 GKP (G=8, p=0.4375), autotune, batch 1", 1.0,
         frame[r56 & gkp & (frame["batch"] == 1) & (frame["backend"] == "autotune")]),
        ("ResNet-50 GKP (3x3, p=0.4375), autotune, batch 16", 1.15,
         frame[r50 & gkp & ~rate & (frame["batch"] == 16) & (frame["backend"] == "autotune")]),
        ("ResNet-50 gkp-l2 (3x3, p=0.75), best backend, batch 16", 1.4,
         _best(frame[r50 & rate & (frame["batch"] == 16)])),
        ("every method, every backend", 0.98, frame[~rate]),
    ]  # fmt: skip
    lines = []
    for name, target, part in goals:
        if part.empty:
            lines.append(f"| {name} | ≥ {target:.2f}× | {cpu} | | not measured | no |")
            continue
        for threads, rows in part.groupby("threads", sort=True):
            values = sorted(rows["speedup"])
            measured = f"{values[0]:.2f}–{values[-1]:.2f}× over {len(values)} rows"
            below = int((rows["speedup"] < target).sum())
            if below:
                measured += f", {below} below ({_beyond_noise(rows, target)})"
            met = "yes" if below == 0 else "no"
            lines.append(f"| {name} | ≥ {target:.2f}× | {cpu} | {threads} | {measured} | {met} |")
    return lines


def _beyond_noise(rows: pd.DataFrame, target: float) -> str:
    """How many of ``rows`` below ``target`` are below it beyond noise (their speed-up interval's
    upper end under it), and how many have no interval to tell (under 6 rounds, older rows)."""
    low = rows[rows["speedup"] < target]
    beyond = int((low["speedup_high"] < target).sum())
    unknown = int(low["speedup_high"].isna().sum())
    parts = [f"{beyond} beyond noise"] if unknown < len(low) else []
    return ", ".join(parts + ([f"{unknown} without an interval"] if unknown else []))


def _best(frame: pd.DataFrame) -> pd.DataFrame:
    """The fastest backend's row per (run id, batch, threads)."""
    if frame.empty:
        return frame
    best = frame.groupby(["run_id", "batch", "threads"])["speedup"].idxmax()
    return frame.loc[best]

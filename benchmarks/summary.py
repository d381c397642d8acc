"""Means over seeds of the measured leaderboard rows, per configuration: the numbers to quote.

``summarize(frame)`` takes a leaderboard frame (``benchmarks.leaderboard.read_leaderboard``) and
gives one row per (method, model, dataset, recipe, target, deploy):

- Measured rows only: reported rows (and ``literature.csv``) are never averaged in.
- One row per run: rows sharing a ``run_id`` (a copied row, a re-run of the same run) count once,
  the last one in file order kept. A row with an empty ``run_id`` (a file not yet migrated) is a
  run of its own.
- An empty ``target`` (native knobs given) is a group of its own, labelled ``native``; other
  targets are labelled by their value (``0.5``).
- ``deploy``: how the row's latency columns were timed (``prune_info``'s ``deploy``, see
  ``gkp-bench run --deploy``; ``torch`` for rows that do not say): speed-ups timed in different
  forms are never averaged together.
- ``top1`` and ``delta`` = ``top1 - top1_dense`` (each row against its own dense baseline): mean
  and sample standard deviation (ddof 1; NaN when n = 1).
- ``macs_removed_pct_mean``: per row ``macs_reduction_pct``, except for masked rows (most of
  the removed MACs, ``macs_dense - macs_nonzero``, are zeros the deployed model still runs,
  ``macs - macs_nonzero``: only a sparse kernel could skip them), which count the non-zero
  reduction ``100 * (1 - macs_nonzero / macs_dense)``;
  ``masked`` says the group has such rows.
- ``theory_speedup``: mean ``macs_dense / macs`` of what runs (1.0 for masked rows);
  ``speedup_b1_*`` / ``speedup_bN_*``: mean and sd of the measured speed-ups, with the throughput
  batch(es) (``bench_batch``) and device(s) they were measured on, as text (``"32"``, or
  ``"16, 32"`` when the group mixes them). Speed-ups are never averaged over machines: a
  group's speed-ups are those of its rows measured on the machine of its last row with one
  (``machine``: the row's ``gpu_name`` for ``cuda`` rows, else its ``cpu_name``; the other
  machines' rows still count for accuracy), so rows of another processor (the development
  machine has changed processors) never blur a speed-up.

Rows are ordered by model, dataset, recipe, target (``native`` first, then ascending), mean top1
descending, then method, so the same CSV always gives the same table. ``accuracy_points`` and
``speedup_points`` turn it into the markers ``benchmarks.plots`` draws.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd

from benchmarks.leaderboard import read_leaderboard

KEYS = ["model", "dataset", "recipe", "target", "method", "deploy"]
NATIVE = "native"  # the target label of rows whose target is empty (native knobs given)
NO_ROWS = "no measured rows"
SUMMARY_COLUMNS = [
    *KEYS,
    *["granularity", "faithfulness", "n", "top1_mean", "top1_sd", "delta_mean", "delta_sd"],
    *["top1_dense_mean", "macs_removed_pct_mean", "masked", "theory_speedup"],
    *["speedup_b1_mean", "speedup_b1_sd", "speedup_bN_mean", "speedup_bN_sd"],
    *["bench_batch", "device", "machine"],
]


def measured_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """The measured rows of ``frame``, one per ``run_id`` (the last), in file order."""
    rows = frame[frame["source"] == "measured"]
    fallback = pd.Series([f"\0row {i}" for i in range(len(rows))], index=rows.index, dtype=object)
    ids = rows["run_id"].astype(object).where(rows["run_id"].astype(object) != "", fallback)
    return rows[~ids.duplicated(keep="last")]


def _join(values: pd.Series) -> str:
    """The distinct non-empty values as sorted text: "32", "16, 32"."""
    seen = {str(v) for v in values if not pd.isna(v) and str(v) != ""}
    return ", ".join(sorted(seen, key=lambda s: (len(s), s)))


def deploy_of(prune_info: object) -> str:
    """How a row's latency columns were timed, from its ``prune_info`` JSON: ``torch`` when it
    does not say (rows timed with the PyTorch ops, the only form before ``--deploy``)."""
    try:
        info = json.loads(str(prune_info))
    except ValueError:
        return "torch"
    deploy = info.get("deploy") if isinstance(info, dict) else None
    return str(deploy.get("deploy", "torch")) if isinstance(deploy, dict) else "torch"


def _per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the derived values the summary averages."""

    def num(column: str) -> pd.Series:
        return rows[column].astype("float64")

    macs, dense, nonzero = num("macs"), num("macs_dense"), num("macs_nonzero")
    # masked: most of the removed MACs are zeros the deployed model still runs (weight, kernel);
    # a few masked weights beside physical pruning (SG-CNN's FC) do not make a row masked.
    # NaN compares False: unknown means not masked.
    masked = ((macs - nonzero) > 0.5 * (dense - nonzero)).astype(bool)
    removed = num("macs_reduction_pct").where(~masked, 100 * (1 - nonzero / dense))
    target = num("target")
    return pd.DataFrame(
        {
            **{k: rows[k].astype(object) for k in ("model", "dataset", "recipe", "method")},
            "deploy": [deploy_of(v) for v in rows["prune_info"]],
            "target": [NATIVE if math.isnan(t) else f"{t:g}" for t in target],
            "order": target.fillna(-math.inf),
            "granularity": rows["granularity"].astype(object),
            "faithfulness": rows["faithfulness"].astype(object),
            "top1": num("top1"),
            "delta": num("top1") - num("top1_dense"),
            "top1_dense": num("top1_dense"),
            "removed": removed,
            "masked": masked,
            "theory": dense / macs.where(macs > 0),
            "speedup_b1": num("speedup_b1"),
            "speedup_bN": num("speedup_bN"),
            "bench_batch": rows["bench_batch"].astype(object),
            "device": rows["device"].astype(object),
            "machine": [
                _machine(*r)
                for r in zip(rows["device"], rows["cpu_name"], rows["gpu_name"], strict=True)
            ],
        }
    )


def _machine(device: object, cpu: object, gpu: object) -> str:
    """The machine a row's latency was measured on: the GPU for ``cuda`` rows, else the CPU."""
    name = gpu if str(device) == "cuda" else cpu
    return str(name) if isinstance(name, str) and name else str(device or "?")


def _one_machine(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the speed-ups of rows from another machine than the one of their group's
    last row with a speed-up blanked (NaN), and ``machine`` blank on the rows without one."""
    timed = runs["speedup_b1"].notna() | runs["speedup_bN"].notna()
    last = runs[timed].groupby(KEYS, sort=False)["machine"].last()
    keep = [
        t and last.get(tuple(k)) == m
        for t, k, m in zip(timed, runs[KEYS].itertuples(index=False), runs["machine"], strict=True)
    ]
    keep = pd.Series(keep, index=runs.index, dtype=bool)
    speedups = ["speedup_b1", "speedup_bN"]
    out = runs.assign(machine=runs["machine"].where(keep, ""))
    out[speedups] = out[speedups].where(keep)
    return out


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (method, model, dataset, recipe, target): n runs, mean and sd over them (module doc)."""
    runs = _one_machine(_per_run(measured_runs(frame)))
    if runs.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SUMMARY_COLUMNS})
    out = (
        runs.groupby(KEYS, sort=True)
        .agg(
            granularity=("granularity", _join),
            faithfulness=("faithfulness", _join),
            n=("top1", "size"),
            top1_mean=("top1", "mean"),
            top1_sd=("top1", "std"),
            delta_mean=("delta", "mean"),
            delta_sd=("delta", "std"),
            top1_dense_mean=("top1_dense", "mean"),
            macs_removed_pct_mean=("removed", "mean"),
            masked=("masked", "any"),
            theory_speedup=("theory", "mean"),
            speedup_b1_mean=("speedup_b1", "mean"),
            speedup_b1_sd=("speedup_b1", "std"),
            speedup_bN_mean=("speedup_bN", "mean"),
            speedup_bN_sd=("speedup_bN", "std"),
            bench_batch=("bench_batch", _join),
            device=("device", _join),
            machine=("machine", _join),
            order=("order", "first"),
        )
        .reset_index()
    )
    out = out.sort_values(
        ["model", "dataset", "recipe", "order", "top1_mean", "method", "deploy"],
        ascending=[True, True, True, True, False, True, True],
        kind="mergesort",
    )
    out["n"] = out["n"].astype(int)
    out["masked"] = out["masked"].astype(bool)
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


def summary_from_csv(leaderboard_csv: str | os.PathLike) -> pd.DataFrame:
    """``summarize`` of a leaderboard file (a missing file gives an empty summary)."""
    return summarize(read_leaderboard(leaderboard_csv))


# ----------------------------------------------------------------------------- plot points

POINTS = ["method", "granularity", "hollow", "masked", "x", "y", "yerr", "n"]


def accuracy_points(board: pd.DataFrame, literature: pd.DataFrame) -> pd.DataFrame:
    """One row per accuracy marker: measured groups (``summarize``) and reported rows (hollow).

    Columns: model, dataset, ``POINTS`` (x = MACs removed %, y = top-1, yerr = its sd), delta and
    delta_err (Δ top-1 vs own dense and its sd) and dense (the dense top-1 of measured groups).
    """
    s = summarize(board)
    measured = pd.DataFrame(
        {
            **{k: s[k] for k in ("model", "dataset", "method", "granularity", "masked", "n")},
            "hollow": False,
            "x": s["macs_removed_pct_mean"],
            "y": s["top1_mean"],
            "yerr": s["top1_sd"],
            "delta": s["delta_mean"],
            "delta_err": s["delta_sd"],
            "dense": s["top1_dense_mean"],
        }
    )
    keys = ["model", "dataset", "method", "granularity"]
    rows = [board.loc[board["source"] != "measured"], literature]
    reported = pd.concat([r[[*keys, "macs_reduction_pct", "top1", "top1_dense"]] for r in rows])
    reported = pd.DataFrame(
        {
            **{k: reported[k].astype(object) for k in keys},
            "masked": False,
            "n": 1,
            "hollow": True,
            "x": reported["macs_reduction_pct"].astype("float64"),
            "y": reported["top1"].astype("float64"),
            "delta": (reported["top1"] - reported["top1_dense"]).astype("float64"),
        }
    )
    frames = [f for f in (measured, reported) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["model", "dataset", *POINTS, "delta", "delta_err", "dense"])
    points = pd.concat(frames, ignore_index=True).dropna(subset=["x", "y"])
    points = points.astype({"hollow": bool, "masked": bool, "n": int})
    order = ["model", "dataset", "method", "granularity", "hollow", "masked", "x", "y"]
    return points.sort_values(order, kind="mergesort").reset_index(drop=True)


def speedup_points(board: pd.DataFrame) -> pd.DataFrame:
    """One row per speed-up marker: measured groups per machine, deploy and batch kind, mean ±
    sd (a group's speed-ups come from one machine, :func:`summarize`).

    Columns: panel (title: device (machine), deploy, batch), ``POINTS`` with x = mean ``macs_dense /
    macs`` (1 for masked rows) and y = mean measured speed-up; rows are in panel order.
    """
    parts = []
    measured = board[board["source"] == "measured"]
    for device in sorted(set(measured["device"])):
        summary = summarize(measured[measured["device"] == device])
        for (machine, deploy), s in summary.groupby(["machine", "deploy"], sort=True):
            s = s.dropna(subset=["theory_speedup"])
            named = machine not in ("", device)  # rows without a CPU/GPU name: the device only
            where = f"{device or 'device ?'} ({machine})" if named else device or "device ?"
            for kind, column in enumerate(("speedup_b1", "speedup_bN")):
                rows = s.dropna(subset=[f"{column}_mean"])
                batch = "1" if kind == 0 else ", ".join(sorted(set(rows["bench_batch"]) - {""}))
                frame = pd.DataFrame(
                    {
                        "panel": f"{where}, {deploy}, batch {batch or 'N'}",
                        "order": kind,
                        **{k: rows[k] for k in ("method", "granularity", "masked", "n")},
                        "hollow": False,
                        "x": rows["theory_speedup"],
                        "y": rows[f"{column}_mean"],
                        "yerr": rows[f"{column}_sd"],
                    }
                )
                parts.append(frame.assign(device=where, deploy=deploy))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=["panel", *POINTS])
    points = pd.concat(parts, ignore_index=True).astype({"masked": bool, "n": int})
    order = ["device", "deploy", "order", "method", "granularity", "masked", "x", "y"]
    points = points.sort_values(order, kind="mergesort")
    return points.drop(columns=["device", "deploy", "order"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- rendering


def _pm(mean: float, sd: float) -> str:
    """ "mean ± sd" to 2 decimals; just the mean when there is no sd (n = 1); "" when no mean."""
    if pd.isna(mean):
        return ""
    return f"{mean:.2f}" if pd.isna(sd) else f"{mean:.2f} ± {sd:.2f}"


def _macs(row: pd.Series) -> str:
    value = row["macs_removed_pct_mean"]
    text = "" if pd.isna(value) else f"{value:.2f}"
    return f"{text} (masked)" if text and row["masked"] else text


# (header, cell, right-aligned) per displayed column
_DISPLAY = (
    ("model", lambda r: r["model"], False),
    ("dataset", lambda r: r["dataset"], False),
    ("recipe", lambda r: r["recipe"], False),
    ("target", lambda r: r["target"], False),
    ("method", lambda r: r["method"], False),
    ("granularity", lambda r: r["granularity"], False),
    ("n", lambda r: str(r["n"]), True),
    ("top1 (%)", lambda r: _pm(r["top1_mean"], r["top1_sd"]), True),
    ("Δ top1 vs own dense (pp)", lambda r: _pm(r["delta_mean"], r["delta_sd"]), True),
    ("MACs removed (%)", _macs, True),
    ("speed-up b1", lambda r: _pm(r["speedup_b1_mean"], r["speedup_b1_sd"]), True),
    ("speed-up bN", lambda r: _pm(r["speedup_bN_mean"], r["speedup_bN_sd"]), True),
    ("N", lambda r: r["bench_batch"], True),
    ("deploy", lambda r: r["deploy"], False),
    ("timed on", lambda r: r["machine"], False),
    ("faithfulness", lambda r: r["faithfulness"], False),
)


def _cells(summary: pd.DataFrame) -> list[list[str]]:
    return [[str(cell(row)) for _, cell, _ in _DISPLAY] for _, row in summary.iterrows()]


def summary_text(summary: pd.DataFrame) -> str:
    """An aligned plain-text table (text left, numbers right); "no measured rows" when empty."""
    if summary.empty:
        return NO_ROWS + "\n"
    rows = [[h for h, _, _ in _DISPLAY], *_cells(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_DISPLAY))]
    rule = ["-" * w for w in widths]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, (_, _, right) in zip(cells, widths, _DISPLAY, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in [rows[0], rule, *rows[1:]]) + "\n"


def summary_markdown(summary: pd.DataFrame) -> str:
    """A GitHub markdown table, "mean ± sd" cells to 2 decimals, masked MACs marked "(masked)"."""
    if summary.empty:
        return NO_ROWS + "\n"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    header = line([h for h, _, _ in _DISPLAY])
    rule = "|" + "|".join("---:" if right else "---" for _, _, right in _DISPLAY) + "|"
    return "\n".join([header, rule, *(line(r) for r in _cells(summary))]) + "\n"


def _plain(value: object) -> object:
    """A JSON-able Python value: NaN / NA -> None, numpy scalars -> int, float or bool."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def summary_records(summary: pd.DataFrame) -> list[dict]:
    """The summary as JSON-able dicts (``json.dumps(..., allow_nan=False)`` accepts them)."""
    return [
        {k: _plain(v) for k, v in row.items()}
        for row in summary[SUMMARY_COLUMNS].to_dict(orient="records")
    ]

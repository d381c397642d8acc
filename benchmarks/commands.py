"""One function per ``gkp-bench`` command: returns (JSON-able result, human-readable text)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import leaderboard as lb
from benchmarks.compare import comparison_text, method_list, per_method, run_all
from benchmarks.environment import environment
from benchmarks.latency import append_rows as append_latency
from benchmarks.latency import rows_from_suite
from benchmarks.leaderboard import LeaderboardError
from benchmarks.measure import bench_from_json, latency_columns_from_json
from benchmarks.plots import plot_all
from benchmarks.runner import LATENCY_ROWS, RunConfig, check_method, prune_run, train_baseline
from gkp.api import get_method, list_methods
from gkp.data import example_input, get_dataset_spec, list_datasets
from gkp.errors import UsageError
from gkp.models import get_model_info, list_models
from gkp.recipes import RECIPES, get_recipe

Result = tuple[Any, str]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def native_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """``--option KEY=VALUE`` (VALUE read as JSON when it is JSON), ``--rate``, ``--groups``."""
    knobs: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        if not key.isidentifier():
            raise UsageError(f"--option {item!r}: {key!r} is not a knob name (letters, digits, _)")
        knobs[key] = _parse_value(value)
    for key in ("rate", "groups"):
        if getattr(args, key, None) is not None:
            knobs[key] = getattr(args, key)
    return knobs


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")


def _check_numbers(args: argparse.Namespace) -> None:
    """Ranges of the numeric flags, before anything runs."""
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    _at_least("--epochs", args.epochs, 1)
    _at_least("--ft-epochs", args.ft_epochs, 0)
    _at_least("--subset", args.subset, 1)
    _at_least("--test-subset", args.test_subset, 1)
    _at_least("--batch-size", args.batch_size, 1)
    if hasattr(args, "method"):
        _at_least("--bench-batch", args.bench_batch, 1)
        _at_least("--bench-rounds", args.bench_rounds, 1)
        _at_least("--threads", args.threads, 1)
        if args.target is not None and not 0.0 < args.target < 1.0:
            raise UsageError(
                f"--target {args.target} is outside (0, 1): it is the fraction of "
                "the target layers' MACs to remove, e.g. --target 0.4375"
            )


def config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig for the common flags, with every name and number checked up front.

    Names are stored canonically (``SYNTHETIC`` is ``synthetic``), so folders and rows agree.
    """
    _check_numbers(args)
    recipe = get_recipe(args.recipe).with_overrides(
        epochs=args.epochs,
        ft_epochs=args.ft_epochs,
        subset=args.subset,
        test_subset=args.test_subset,
        batch_size=args.batch_size,
    )
    cfg = RunConfig(
        model=get_model_info(args.model).name,
        dataset=get_dataset_spec(args.dataset).name,
        recipe=recipe,
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        download=args.download,
        runs_dir=args.runs,
        results_dir=args.out,
        progress=not args.no_progress,
        restart=args.restart,
        command=args.command_line,
    )
    cfg.torch_device  # noqa: B018  (a device this machine lacks raises here)
    if hasattr(args, "method"):
        cfg.method, cfg.target = get_method(args.method or "gkp-l2").info.name, args.target
        cfg.native = native_knobs(args)
        cfg.bench_batch, cfg.bench_rounds = args.bench_batch, args.bench_rounds
        cfg.threads = args.threads
        cfg.deploy = args.deploy
        cfg.latency_json = getattr(args, "latency_json", None)
        cfg.backends = backend_list(args.backends)
    return cfg


def _layout(row: dict[str, Any]) -> str:
    """The input layout a timed row ran in: its own field, or what the backend or deploy chose
    (the autotune races pick a layout), else NCHW."""
    chosen = row.get("backend_info") or row.get("deploy_choices") or {}
    return (
        row.get("memory_format")
        or (chosen.get("layout") if isinstance(chosen, dict) else None)
        or "nchw"
    )


def writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if needed and prove it is a writable folder, or raise UsageError."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(
            f"{flag} {path} is not a writable folder ({err.strerror or err}); pass another one"
        ) from None


def preflight(cfg: RunConfig, *, appends: bool) -> None:
    """Everything that can be checked before hours of training: knobs against the model,
    the latency JSON, the leaderboard the row will be appended to, the output folders.
    ``appends``: the command prunes and appends a row (prune, run); train does neither."""
    if appends:
        check_method(cfg)
    if cfg.latency_json is not None:
        latency_columns_from_json(
            cfg.latency_json,
            model=cfg.model,
            config=cfg.bench_key(),
            input_shape=example_input(cfg.dataset, 1).shape[1:],
            device=cfg.torch_device.type,
        )
    if appends:
        problems = lb.validate_file(cfg.results_dir / "leaderboard.csv")
        if problems and (cfg.results_dir / "leaderboard.csv").exists():
            raise LeaderboardError(
                f"the row could not be appended: {problems[0]}"
                + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
            )
        writable_dir(cfg.results_dir, "--out")
    writable_dir(cfg.runs_dir, "--runs")


def cmd_methods(args: argparse.Namespace) -> Result:
    infos = [get_method(n).info for n in list_methods()]
    rows = [
        {**dataclasses.asdict(i), "granularity": i.granularity.value, "needs": sorted(i.needs)}
        for i in infos
    ]
    text = "\n".join(
        f"{i.name:14s} {i.granularity.value:15s} {i.faithfulness:13s} {i.description}"
        for i in infos
    )
    return rows, text


def cmd_models(args: argparse.Namespace) -> Result:
    return list_models(), "\n".join(list_models())


def cmd_datasets(args: argparse.Namespace) -> Result:
    specs = [dataclasses.asdict(get_dataset_spec(n)) for n in list_datasets()]
    return specs, "\n".join(
        f"{s['name']:14s} {s['num_classes']} classes, {s['in_channels']}x"
        f"{s['image_size']}x{s['image_size']}"
        for s in specs
    )


def cmd_recipes(args: argparse.Namespace) -> Result:
    rows = [dataclasses.asdict(r) for r in RECIPES.values()]
    return rows, "\n".join(
        f"{r.name:6s} {r.epochs}+{r.ft_epochs} epochs: {r.why}" for r in RECIPES.values()
    )


def cmd_train(args: argparse.Namespace) -> Result:
    cfg = config(args)
    preflight(cfg, appends=False)
    summary = train_baseline(cfg)
    out = {k: v for k, v in summary.items() if k != "history"}
    out["run_dir"] = str(cfg.baseline_dir())
    return out, (
        f"baseline {cfg.model} on {cfg.dataset}: top-1 {summary['top1']:.2f}% "
        f"(saved in {cfg.baseline_dir()})"
    )


def _record(cfg: RunConfig, row: dict[str, Any]) -> dict[str, Any]:
    """Append the leaderboard row, then its long-format latency rows (``--backends``)."""
    extra = row.pop(LATENCY_ROWS, [])
    full = {**lb.empty_row(), **row, **environment(cfg.torch_device), "date": lb.utc_now()}
    lb.append_row(cfg.results_dir / "leaderboard.csv", full)
    append_latency(cfg.results_dir / "latency.csv", extra)
    return full


def backend_list(text: str | None) -> tuple[str, ...]:
    """``--backends a,b`` (or ``all``: every backend that can run here), each checked."""
    from benchmarks.backends import BACKENDS, missing

    if not text:
        return ()
    if text.strip() == "all":
        return tuple(b for b in BACKENDS if b != "compile" and missing(b) is None)
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in BACKENDS:
            raise UsageError(f"--backends: unknown backend {name!r}; choose from "
                             f"{', '.join(BACKENDS)} or all")  # fmt: skip
        why = missing(name)
        if why:
            raise UsageError(f"--backends: {name} cannot run here: {why}")
    return names


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['method']} on {row['model']}/{row['dataset']}: top-1 {row['top1_dense']:.2f}% "
        f"dense -> {row['top1_pruned_before_ft']:.2f}% pruned -> {row['top1']:.2f}% "
        f"fine-tuned; MACs -{row['macs_reduction_pct']:.2f}%, params "
        f"-{row['params_reduction_pct']:.2f}%; speed-up x{row['speedup_b1']:.2f} (batch 1), "
        f"x{row['speedup_bN']:.2f} (batch {row['bench_batch']}) on {row['device']}"
    )


def cmd_prune(args: argparse.Namespace) -> Result:
    cfg = config(args)
    preflight(cfg, appends=True)
    row = _record(cfg, prune_run(cfg))
    return row, _row_text(row) + f"\nrow appended to {cfg.results_dir / 'leaderboard.csv'}"


def cmd_run(args: argparse.Namespace) -> Result:
    """Train one baseline, then prune, fine-tune, time and record each method (see compare.py)."""
    cfg = config(args)
    cfgs = per_method(cfg, method_list(args.methods, args.method))
    for c in cfgs:  # every method's knobs, before the baseline's training
        try:
            preflight(c, appends=True)
        except ValueError as err:
            raise UsageError(f"{c.method}: {err}" if len(cfgs) > 1 else str(err)) from err
    train_baseline(cfg)
    board = cfg.results_dir / "leaderboard.csv"
    recorded = {
        r["run_id"]: r for r in lb.read_leaderboard(board).to_dict("records") if r["run_id"]
    }

    def record(c: RunConfig, row: dict[str, Any]) -> dict[str, Any]:
        return row if recorded.get(row["run_id"]) is row else _record(c, row)

    rows = run_all(cfgs, lambda c: prune_run(c, recorded), record)
    figures = _plot(cfg.results_dir)
    new = sum(1 for r in rows if recorded.get(r["run_id"]) is not r)
    text = comparison_text(rows) + f"\n{new} row(s) appended to {board}"
    if new < len(rows):
        text += f"; {len(rows) - new} were already recorded (same run id)"
    text += f"\nfigures: {', '.join(str(f) for f in figures)}"
    return {"rows": rows, "figures": [str(f) for f in figures]}, text


def cmd_bench(args: argparse.Namespace) -> Result:
    from benchmarks.bench import bench_backends, bench_untrained

    if args.from_json is not None:
        rows = bench_from_json(args.from_json)
        if args.save:
            writable_dir(args.out, "--out")
            saved = rows_from_suite(rows, args.command_line)
            append_latency(args.out / "latency.csv", saved)
    else:
        cfg = config(args)
        check_method(cfg)
        if cfg.backends:
            writable_dir(cfg.results_dir, "--out")
            rows = bench_backends(cfg)
            append_latency(cfg.results_dir / "latency.csv", rows)
            return rows, "\n".join(
                f"{r['model']} {r['method']} {r['backend']} batch {r['batch']} ({r['form']}): "
                f"dense {r['dense_ms']:.2f} ms, pruned {r['pruned_ms']:.2f} ms, speed-up "
                f"x{r['speedup']:.2f}{_interval(r)} (ideal x{r['ideal']:.2f})"
                for r in rows
            ) + f"\n{len(rows)} row(s) appended to {cfg.results_dir / 'latency.csv'}"
        rows = bench_untrained(cfg)
    text = "\n".join(
        f"{r['model']} {r['method']} batch {r['batch']} {_layout(r)}: "
        f"dense {r['dense_ms']:.2f} ms,"
        f" pruned {r['pruned_ms']:.2f} ms, speed-up x{r['speedup']:.2f}{_interval(r)}"
        + (f" (ideal x{r['ideal']:.2f}, {r.get('deploy') or r['backend']})" if "ideal" in r else "")
        for r in rows
    )
    return rows, text


def _interval(row: dict[str, Any]) -> str:
    """`` (paired x1.25 [1.22–1.28])``: the median per-round speed-up and its 95% interval
    (gkp.metrics.paired_speedup; the interval from 6 rounds), or "" (not recorded)."""
    paired, low, high = (row.get(k) for k in ("speedup_paired", "speedup_low", "speedup_high"))
    if paired is None:
        return ""
    return f" (paired x{paired:.2f}" + ("" if low is None else f" [{low:.2f}–{high:.2f}]") + ")"


def cmd_leaderboard(args: argparse.Namespace) -> Result:
    path = args.out / "leaderboard.csv"
    if args.action == "latency":
        from benchmarks.latency import latency_markdown, read_latency

        frame = read_latency(args.out / "latency.csv")
        return frame.to_dict(orient="records"), latency_markdown(frame)
    if args.action == "summary":
        from benchmarks.summary import summarize, summary_markdown, summary_records, summary_text

        table = summarize(lb.read_leaderboard(path))
        text = summary_markdown(table) if args.markdown else summary_text(table)
        return summary_records(table), text
    if args.action == "validate":
        problems = lb.validate_file(path)
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        return {"path": str(path), "ok": True}, f"{path}: valid"
    frame = lb.read_leaderboard(path)
    cols = [
        "method",
        "model",
        "dataset",
        "recipe",
        "macs_reduction_pct",
        "top1_dense",
        "top1",
        "speedup_b1",
        "speedup_bN",
    ]
    return frame.to_dict(orient="records"), frame[cols].to_string(index=False)


def method_colors() -> dict[str, str]:
    return {n: get_method(n).info.color for n in list_methods()}


def _plot(out: Path) -> list[Path]:
    """Regenerate ``out/figures`` from ``out/leaderboard.csv`` (+ ``literature.csv`` and
    ``latency.csv`` if there; its CPU rows since ``CPU_SINCE``, the current machine's)."""
    from benchmarks.latency import CPU_SINCE
    from benchmarks.latency_plot import plot_latency

    lit = out / "literature.csv"
    written = plot_all(
        out / "leaderboard.csv",
        lit if lit.exists() else None,
        out / "figures",
        colors=method_colors(),
    )
    latency = out / "latency.csv"
    return written + plot_latency(latency, out / "figures", method_colors(), cpu_since=CPU_SINCE)


def cmd_plot(args: argparse.Namespace) -> Result:
    files = _plot(Path(args.out))
    return [str(f) for f in files], "\n".join(str(f) for f in files) or "nothing to plot"


def dispatch(args: argparse.Namespace) -> Result:
    return globals()[f"cmd_{args.command}"](args)

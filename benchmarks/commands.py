"""One function per ``gkp-bench`` command: returns (JSON-able result, human-readable text)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks import leaderboard as lb
from benchmarks.environment import environment
from benchmarks.plots import plot_all
from benchmarks.runner import RunConfig, prune_run, train_baseline
from gkp.api import get_method, list_methods
from gkp.data import get_dataset_spec, list_datasets
from gkp.models import get_model_info, list_models
from gkp.recipes import RECIPES, get_recipe

Result = tuple[Any, str]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def native_knobs(args: argparse.Namespace) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        knobs[key.replace("-", "_")] = _parse_value(value)
    for key in ("rate", "groups"):
        if getattr(args, key, None) is not None:
            knobs[key] = getattr(args, key)
    return knobs


def config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig for the common flags, validating names early with clear errors."""
    recipe = get_recipe(args.recipe).with_overrides(
        epochs=args.epochs,
        ft_epochs=args.ft_epochs,
        subset=args.subset,
        test_subset=args.test_subset,
        batch_size=args.batch_size,
    )
    get_dataset_spec(args.dataset)  # unknown names raise here, listing the known ones
    get_model_info(args.model)
    cfg = RunConfig(
        model=args.model,
        dataset=args.dataset,
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
    if hasattr(args, "method"):
        get_method(args.method)
        if args.target is not None and not 0.0 < args.target < 1.0:
            raise ValueError(
                f"--target {args.target} is outside (0, 1): it is the fraction of "
                "the target layers' MACs to remove, e.g. --target 0.4375"
            )
        cfg.method, cfg.target, cfg.native = args.method, args.target, native_knobs(args)
        cfg.bench_batch, cfg.bench_rounds = args.bench_batch, args.bench_rounds
        cfg.threads = args.threads
        cfg.latency_json = getattr(args, "latency_json", None)
    return cfg


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
    summary = train_baseline(cfg)
    out = {k: v for k, v in summary.items() if k != "history"}
    out["run_dir"] = str(cfg.baseline_dir())
    return out, (
        f"baseline {cfg.model} on {cfg.dataset}: top-1 {summary['top1']:.2f}% "
        f"(saved in {cfg.baseline_dir()})"
    )


def _record(cfg: RunConfig, row: dict[str, Any]) -> dict[str, Any]:
    full = {**lb.empty_row(), **row, **environment(cfg.torch_device), "date": lb.utc_now()}
    lb.append_row(cfg.results_dir / "leaderboard.csv", full)
    return full


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
    row = _record(cfg, prune_run(cfg))
    return row, _row_text(row) + f"\nrow appended to {cfg.results_dir / 'leaderboard.csv'}"


def cmd_run(args: argparse.Namespace) -> Result:
    cfg = config(args)
    train_baseline(cfg)
    row = _record(cfg, prune_run(cfg))
    figures = _plot(cfg.results_dir)
    text = _row_text(row) + f"\nrow appended to {cfg.results_dir / 'leaderboard.csv'}"
    text += f"\nfigures: {', '.join(str(f) for f in figures)}"
    return {"row": row, "figures": [str(f) for f in figures]}, text


def cmd_bench(args: argparse.Namespace) -> Result:
    from benchmarks.bench import bench_from_json, bench_untrained

    if args.from_json is not None:
        rows = bench_from_json(args.from_json)
    else:
        rows = bench_untrained(config(args))
    text = "\n".join(
        f"{r['model']} {r['method']} batch {r['batch']} {r.get('memory_format', 'nchw')}: "
        f"dense {r['dense_ms']:.2f} ms,"
        f" pruned {r['pruned_ms']:.2f} ms, speed-up x{r['speedup']:.2f}"
        for r in rows
    )
    return rows, text


def cmd_leaderboard(args: argparse.Namespace) -> Result:
    path = args.out / "leaderboard.csv"
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
    """Regenerate ``out/figures`` from ``out/leaderboard.csv`` (+ ``literature.csv`` if there)."""
    lit = out / "literature.csv"
    return plot_all(
        out / "leaderboard.csv",
        lit if lit.exists() else None,
        out / "figures",
        colors=method_colors(),
    )


def cmd_plot(args: argparse.Namespace) -> Result:
    files = _plot(Path(args.out))
    return [str(f) for f in files], "\n".join(str(f) for f in files) or "nothing to plot"


def dispatch(args: argparse.Namespace) -> Result:
    return globals()[f"cmd_{args.command}"](args)

"""``gkp-bench``: the command line. Thin: parses flags, calls the runner, prints results.

Every command takes ``--json`` to print one machine-readable JSON document on stdout
(progress bars go to stderr). Expected errors (bad input, missing or foreign files) print one
line saying what is wrong and how to fix it, and exit with status 2; under ``--json`` stdout
also gets ``{"error": ..., "command": ...}``. Anything unexpected is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks import commands
from benchmarks.measure import DEFAULT_DEPLOY, DEPLOYS
from gkp import memory
from gkp.checkpoint import CheckpointError
from gkp.data import DatasetNotFoundError

# What a user can fix. ValueError covers UsageError, unknown names, bad knobs, leaderboard and
# dataset-format errors; KeyError, TypeError and the rest are bugs and keep their traceback.
EXPECTED = (ValueError, CheckpointError, DatasetNotFoundError)


def _common(p: argparse.ArgumentParser, method: bool = True) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--model", default="resnet20", help="model name (see `gkp-bench models`)")
    g.add_argument("--dataset", default="fashion-mnist", help="dataset name")
    g.add_argument(
        "--recipe", default="quick", help="smoke | quick | short | paper (default quick; README)"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if present)")
    g.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="results folder: leaderboard.csv, figures/ (default: results)",
    )
    g.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="folder for models, checkpoints and snapshots (default: runs)",
    )
    g.add_argument("--data-dir", default=None, help="where the dataset lies (see README)")
    g.add_argument("--download", action="store_true", help="download the dataset if missing")
    g.add_argument("--restart", action="store_true", help="ignore checkpoints; redo the steps")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r = p.add_argument_group("recipe overrides (default: the recipe's value)")
    r.add_argument("--epochs", type=int, default=None, help="baseline training epochs")
    r.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs")
    r.add_argument("--subset", type=int, default=None, help="training images to use")
    r.add_argument("--test-subset", type=int, default=None, help="test images to use")
    r.add_argument("--batch-size", type=int, default=None)
    if method:
        m = p.add_argument_group("method")
        m.add_argument(
            "--method", default=None, help="method name (see `gkp-bench methods`; default gkp-l2)"
        )
        m.add_argument(
            "--target",
            type=float,
            default=None,
            help="fraction of the target layers' MACs to remove, in (0, 1)",
        )
        m.add_argument("--rate", type=float, default=None, help="native knob: pruning rate")
        m.add_argument("--groups", type=int, default=None, help="native knob: groups per layer")
        m.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any other native knob of the method (repeatable)",
        )
        b = p.add_argument_group("latency")
        b.add_argument("--bench-batch", type=int, default=32, help="throughput batch size")
        b.add_argument("--bench-rounds", type=int, default=30, help="timed rounds per model")
        b.add_argument("--threads", type=int, default=None, help="torch threads while timing")
        b.add_argument(
            "--deploy",
            choices=DEPLOYS,
            default=DEFAULT_DEPLOY,
            help="how the networks run when timed: autotune (the default; the latency suite's "
            "autotune backend for pruned and dense alike: BN folded, ReLU/residual epilogues "
            "fused, the faster layout, per layer the fastest exact form, tuned per batch size), "
            "fused (the one-op CPU kernel in every grouped layer) or torch (gather, grouped conv, "
            "un-permute; plain dense; how rows were timed before autotune became the default)",
        )
        b.add_argument(
            "--backends",
            default=None,
            metavar="LIST",
            help="also time pruned vs dense on these backends (comma-separated: eager, fused, "
            "autotune, compile, onnxruntime, openvino; or all = every one installed except "
            "compile) at batch 1 and --bench-batch, rows appended to <out>/latency.csv",
        )
        b.add_argument(
            "--latency-json",
            type=Path,
            default=None,
            help="take the latency columns from a pytest-benchmark --benchmark-json file",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gkp-bench", description="Benchmark of pruning granularities (Grouped Kernel Pruning)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print a machine-readable JSON result")
        return p

    add("methods", "list the registered pruning methods")
    add("models", "list the registered models")
    add("datasets", "list the datasets")
    add("recipes", "list the training recipes")
    _common(add("train", "train the dense baseline (resumable; snapshots for TMI-GKP)"), False)
    _common(add("prune", "prune the baseline, fine-tune, evaluate, time, append a leaderboard row"))
    p = add("bench", "latency of dense vs pruned (untrained weights), ratios in one run")
    _common(p)
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="instead, summarise a pytest-benchmark --benchmark-json file",
    )
    p.add_argument(
        "--save",
        action="store_true",
        help="with --from-json: append the latency suite's pairs to <out>/latency.csv",
    )
    p = add("run", "the main job: one baseline, methods compared at one MACs target, rows, plots")
    _common(p)
    p.add_argument(
        "--methods",
        default=None,
        help="'all' or a comma-separated list (default: one method per granularity and the "
        "two random controls; --method M runs M alone); --target defaults to 0.436",
    )
    p = add("leaderboard", "show, validate or summarise results/leaderboard.csv")
    p.add_argument(
        "action",
        choices=("show", "validate", "summary", "latency"),
        help="summary: n, mean ± sd of top-1 and Δ vs dense, MACs removed and speed-ups per "
        "(method, model, dataset, recipe, target, deploy), each run id counted once; latency: the "
        "speed-ups of <out>/latency.csv per backend (Markdown)",
    )
    p.add_argument("--markdown", action="store_true", help="summary as a Markdown table")
    p.add_argument("--out", type=Path, default=Path("results"))
    p = add("plot", "regenerate results/figures/ from the CSVs")
    p.add_argument("--out", type=Path, default=Path("results"))
    return parser


def _emit(args: argparse.Namespace, result: Any, text: str) -> None:
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "gkp-bench " + shlex.join(argv)
    try:
        if args.command in ("prune", "run", "bench"):  # they time networks: refuse a bad value now
            memory.limit_mb()
        result, text = commands.dispatch(args)
    except EXPECTED as err:
        msg = str(err)
        print(f"gkp-bench {args.command}: error: {msg}", file=sys.stderr)
        if args.json:
            json.dump({"error": msg, "command": args.command}, sys.stdout)
            sys.stdout.write("\n")
        return 2
    _emit(args, result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

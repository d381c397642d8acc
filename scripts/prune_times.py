"""Seconds each method takes to prune an untrained network, as the latency suite prunes it.

    .venv/bin/python scripts/prune_times.py --model resnet50 --methods sr-gkp,tmi-gkp
    GKP_PLAN_WORKERS=1 .venv/bin/python scripts/prune_times.py --model resnet50 --methods sr-gkp

Same configuration as ``benchmarks/test_latency.py`` (MACs target 0.436, G = 8 for the GKP
family, seeded fresh weights, stand-in snapshots for TMI-GKP), no structure cache: every call
prunes. ``--check DIR`` also loads the structure cached in DIR (the suite's
``GKP_BENCH_CACHE``; pruned and stored there when absent) and says whether the new one is
identical to it, weights included. Wall-clock seconds on a shared machine: compare runs made one
after the other, with nothing else running.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench import cached_untrained
from benchmarks.runconfig import RunConfig
from gkp.api import list_methods
from gkp.checkpoint import structure_of

DATASETS = {"resnet56": "synthetic", "resnet50": "imagenet"}
GKP_FAMILY = ("gkp", "tmi-gkp", "sr-gkp")


def config(model: str, method: str) -> RunConfig:
    native = {"groups": 8} if method.startswith(GKP_FAMILY) else {}
    return RunConfig(model=model, dataset=DATASETS[model], method=method, target=0.436,
                     native=native, progress=False)  # fmt: skip


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (
        structure_of(a) == structure_of(b)
        and sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(DATASETS), default="resnet50")
    ap.add_argument("--methods", default=",".join(list_methods()), help="comma list")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--check", type=Path, help="a structure cache to compare against")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for method in args.methods.split(","):
        cfg = config(args.model, method)
        t0 = time.perf_counter()
        _, pruned, _ = cached_untrained(cfg, None)
        seconds = time.perf_counter() - t0
        line = f"{args.model} {method}: {seconds:.1f} s"
        if args.check is not None:
            _, cached, _ = cached_untrained(cfg, args.check)
            line += f", identical to the cached structure: {same(pruned, cached)}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

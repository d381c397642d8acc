"""What the caching CPU allocator (gkp.memory) does to dense and GKP timings: page faults and time.

For each ``--model``/``--batch`` pair, times the latency suite's ``autotune`` form of the dense
network and of ``--method`` at the suite's MACs target (G = 8, untrained weights) in one
interleaved run (``gkp.metrics.time_interleaved``: eval, inference_mode, warm-up, fixed threads,
median), once with PyTorch's default CPU allocator (``GKP_CPU_CACHE=off``) and once with the
caching one, each in a fresh process (the allocator is process-wide), and counts the page faults
of every timed pass (``getrusage``). Prints, per allocator, the medians, the median faults per
pass and the speed-up.

    taskset -c 0,1 .venv/bin/python scripts/allocator_effect.py --threads 2

``GKP_BENCH_CACHE`` (as for the suite) reuses the suite's pruned structures and tuning choices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = ("resnet56:64", "resnet50:16", "resnet56:1")


def _measure(model: str, batch: int, method: str, threads: int, rounds: int) -> dict:
    """Time dense and ``method`` (this process's allocator) with faults per pass."""
    from benchmarks.bench import suite_autotune_pair, suite_cache
    from gkp import memory

    x, run_dense, run_pruned, _ = suite_autotune_pair(model, method, batch, threads, suite_cache())
    fns = {"dense": run_dense, method: run_pruned}
    ms: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)  # warm-up
        for r in range(rounds):
            for name in list(fns)[r % 2 :] + list(fns)[: r % 2]:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                fns[name](x)
                ms[name].append((time.perf_counter() - t0) * 1e3)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "allocator": memory.allocator(),
        "ms": {k: statistics.median(v) for k, v in ms.items()},
        "faults": {k: statistics.median(v) for k, v in faults.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="model:batch,...")
    parser.add_argument("--method", default="gkp-l2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, batch = args.pairs.split(":")
        result = _measure(model, int(batch), args.method, args.threads, args.rounds)
        print("RESULT " + json.dumps(result))
        return
    print(f"{args.method} vs dense, autotune form, {args.threads} thread(s), {args.rounds} rounds")
    print("| model | batch | allocator | dense ms | GKP ms | faults/pass dense | GKP | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for pair in args.pairs.split(","):
        model, batch = pair.split(":")
        for setting in ("off", "on"):
            env = {**os.environ, "GKP_CPU_CACHE": setting}
            cmd = [sys.executable, __file__, "--child", "--pairs", pair, "--method", args.method,
                   "--threads", str(args.threads), "--rounds", str(args.rounds)]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            d, p = r["ms"]["dense"], r["ms"][args.method]
            fd, fp = r["faults"]["dense"], r["faults"][args.method]
            print(f"| {model} | {batch} | {r['allocator']} | {d:.2f} | {p:.2f} | {fd:.0f} | "
                  f"{fp:.0f} | {d / p:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Whether a tuned network's speed changes with the machine's phase: dense and GKP, back to back.

Prepares the latency suite's ``autotune`` form of the dense network and of ``--method`` at the
suite's MACs target (G = 8, untrained weights; ``GKP_BENCH_CACHE`` reuses the suite's structures
and tuning choices) once, then runs the two alternately for ``--seconds`` and prints, for every
``--window`` seconds, each one's median milliseconds and the speed-up. The same two prepared
networks throughout, in one process: a change from window to window is the machine's, not a
property of a process or of a prepared network.

    GKP_BENCH_CACHE=<a suite cache> taskset -c 0,1 .venv/bin/python scripts/phase_probe.py \\
        --model resnet56 --batch 64 --threads 2 --seconds 80
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import suite_pair_arguments, suite_pair_from  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite_pair_arguments(parser, model="resnet56", batch=64)
    parser.add_argument("--seconds", type=float, default=80.0)
    parser.add_argument("--window", type=float, default=5.0)
    args = parser.parse_args(argv)
    x, run_dense, run_gkp, picked = suite_pair_from(args)
    form = f"{picked.get('form')}, {picked.get('layout')}"
    print(f"{args.model} {args.method}, batch {args.batch}, {args.threads} thread(s), autotune "
          f"form ({form}), medians per {args.window:g} s")  # fmt: skip
    end = time.monotonic() + args.seconds
    with torch.inference_mode():
        run_dense(x)
        run_gkp(x)
        while time.monotonic() < end:
            times: dict[str, list[float]] = {"dense": [], "gkp": []}
            stop = time.monotonic() + args.window
            while time.monotonic() < stop:
                for name, fn in (("dense", run_dense), ("gkp", run_gkp)):
                    t0 = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - t0)
            d, g = (statistics.median(times[k]) * 1e3 for k in ("dense", "gkp"))
            print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC  dense {d:.1f} ms  GKP {g:.1f} "
                  f"ms  x{d / g:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Whether a tuned network's speed changes with the machine's phase: dense and GKP, back to back.

Prepares the latency suite's ``autotune`` form of the dense network and of ``--method`` at the
suite's MACs target (G = 8, untrained weights; ``GKP_BENCH_CACHE`` reuses the suite's structures
and tuning choices) once, then runs the two alternately for ``--seconds`` and prints, for every
``--window`` seconds, each one's median milliseconds and the speed-up. The same two prepared
networks throughout, in one process: a change from window to window is the machine's, not a
property of a process or of a prepared network. ``--env VAR=VALUE`` (repeatable) also runs the
GKP network with that environment variable set (the fused op's tuning overrides, such as
``GKP_FUSED_PATH=rows`` or ``GKP_FUSED_PACK=shared``, are read on every call) in the same rounds,
so a variant's speed is compared with the default's in the same phase. ``--core-latency``
prints, before and after each window, the time a cache line takes to go from the first CPU to
the second and back (``scripts/core_latency.py``): where the host put the two virtual CPUs.
Each window is ``gkp.metrics.time_interleaved`` over about ``--window`` seconds of rounds, whose
runs take turns at coming first in a round (one that always follows another on the same data
would find it in cache).

    GKP_BENCH_CACHE=<a suite cache> taskset -c 0,1 .venv/bin/python scripts/phase_probe.py \\
        --model resnet56 --batch 64 --threads 2 --seconds 80 [--env GKP_FUSED_PATH=rows] \\
        [--core-latency]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import suite_pair_arguments, suite_pair_from  # noqa: E402
from gkp.metrics import time_interleaved  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from core_latency import round_trip_ns  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite_pair_arguments(parser, model="resnet56", batch=64)
    parser.add_argument("--seconds", type=float, default=80.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument(
        "--core-latency",
        action="store_true",
        help="also print the cache-line round trip between the first two CPUs "
        "(scripts/core_latency.py) before and after each window",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="also time the GKP network with this variable set (repeatable)",
    )
    args = parser.parse_args(argv)
    variants = [_setting(text, parser) for text in args.env]
    x, run_dense, run_gkp, picked = suite_pair_from(args)
    runs = {"dense": run_dense, "gkp": run_gkp}
    runs.update({f"{var}={value}": _with_env(var, value, run_gkp) for var, value in variants})
    form = f"{picked.get('form')}, {picked.get('layout')}"
    print(f"{args.model} {args.method}, batch {args.batch}, {args.threads} thread(s), autotune "
          f"form ({form}), medians per {args.window:g} s")  # fmt: skip
    with torch.inference_mode():  # warm-up, and one round's time: a window's rounds
        t0 = time.perf_counter()
        for fn in runs.values():
            fn(x)
        rounds = max(3, round(args.window / (time.perf_counter() - t0)))
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        before = round_trip_ns() if args.core_latency else None
        stats = time_interleaved(runs, x, rounds=rounds, warmup=0, threads=args.threads)
        ms = {name: st.median_ms for name, st in stats.items()}
        d, g = ms.pop("dense"), ms.pop("gkp")
        extra = "".join(f"  [{name}] {v:.1f} ms x{d / v:.3f}" for name, v in ms.items())
        if before is not None:
            extra += f"  core round trip {before:.0f}/{round_trip_ns():.0f} ns"
        print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC  dense {d:.1f} ms  GKP {g:.1f} "
              f"ms  x{d / g:.3f}{extra}", flush=True)  # fmt: skip


def _setting(text: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    var, sep, value = text.partition("=")
    if not sep or not var:
        parser.error(f"--env takes VAR=VALUE, got {text!r}")
    return var, value


def _with_env(var: str, value: str, fn):
    """``fn`` run with ``var`` set to ``value`` (its earlier value, or its absence, restored)."""

    def run(x):
        before = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn(x)
        finally:
            if before is None:
                del os.environ[var]
            else:
                os.environ[var] = before

    return run


if __name__ == "__main__":
    main()

"""Where a tuned GKP network's time goes, layer by layer, against dense: in the network, not alone.

Prepares the latency suite's ``autotune`` form of the dense network and of ``--method`` at the
suite's MACs target (G = 8, untrained weights; ``GKP_BENCH_CACHE`` reuses the suite's structures
and tuning choices, as the suite does) and times both networks' whole forward passes (median of
``--rounds`` rounds, each running both networks, order alternating) and, in the same passes,
each block's convs through forward hooks (around each ``layerN.i.convK``: its conv with its
fused epilogue and, for a grouped layer, the form autotune picked). Prints the totals, the
grouped layers' sum and each grouped layer's dense and GKP milliseconds with its speed-up, so a
layer that runs far below the ideal shows up. Hooks add a few microseconds per layer to both.

    GKP_BENCH_CACHE=<a suite cache> taskset -c 0,1 .venv/bin/python scripts/network_layers.py \
        --model resnet50 --batch 16 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import suite_pair_arguments, suite_pair_from  # noqa: E402
from gkp.nn import DEPLOY_FORMS  # noqa: E402


def _network(fn):
    """The module a prepared callable runs (the channels-last wrapper closes over it)."""
    cells = getattr(fn, "__closure__", None) or ()
    for cell in cells:
        if isinstance(cell.cell_contents, torch.nn.Module):
            return cell.cell_contents
    return fn


def _hooked(fn, per: dict[str, list[float]]) -> list:
    """Forward hooks that add each ``layerN.i.convK`` call's time to ``per``."""
    started: dict[str, float] = {}
    hooks = []
    for name, mod in _network(fn).named_modules():
        parts = name.split(".")
        if len(parts) == 3 and parts[0].startswith("layer") and parts[2].startswith("conv"):

            def pre(_m, _a, name=name):
                started[name] = time.perf_counter()

            def post(_m, _a, _o, name=name):
                per[name].append(time.perf_counter() - started[name])

            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return hooks


def _timed(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Per network: median whole-pass ms and median ms of each ``layerN.i.convK``, over
    ``rounds`` rounds that run every network once (order alternating), so a change of the
    machine's speed during the run hits them alike."""
    per = {k: collections.defaultdict(list) for k in fns}
    total: dict[str, list[float]] = {k: [] for k in fns}
    hooks = [h for k, fn in fns.items() for h in _hooked(fn, per[k])]
    names = list(fns)
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for p in per.values():
            p.clear()
        for r in range(rounds):
            for k in names[r % 2 :] + names[: r % 2]:
                t0 = time.perf_counter()
                fns[k](x)
                total[k].append(time.perf_counter() - t0)
    for h in hooks:
        h.remove()
    return {
        k: (statistics.median(total[k]) * 1e3,
            {n: statistics.median(v) * 1e3 for n, v in per[k].items()})
        for k in fns
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    suite_pair_arguments(parser, model="resnet50", batch=16)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    x, run_dense, run_gkp, picked = suite_pair_from(args)
    grouped = {
        n.rsplit(".", 1)[0] if n.endswith(".conv") else n: m.backend
        for n, m in _network(run_gkp).named_modules()
        if isinstance(m, DEPLOY_FORMS)
    }
    timed = _timed({"dense": run_dense, "gkp": run_gkp}, x, args.rounds)
    (d_total, d), (g_total, g) = timed["dense"], timed["gkp"]
    d_g = sum(d[k] for k in grouped)
    g_g = sum(g[k] for k in grouped)
    print(f"{args.model} {args.method}, batch {args.batch}, {args.threads} thread(s), autotune "
          f"form ({picked.get('form')}, {picked.get('layout')}; allocator "
          f"{picked.get('allocator')}), medians of {args.rounds} passes")  # fmt: skip
    print(f"whole network: dense {d_total:.1f} ms, GKP {g_total:.1f} ms, x{d_total / g_total:.3f}")
    print(f"grouped layers ({len(grouped)}): dense {d_g:.1f} ms, GKP {g_g:.1f} ms, "
          f"x{d_g / g_g:.3f}; everything else: dense {d_total - d_g:.1f} ms, GKP "
          f"{g_total - g_g:.1f} ms")  # fmt: skip
    print("| layer | form | dense ms | GKP ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for k, form in grouped.items():
        print(f"| {k} | {form} | {d[k]:.2f} | {g[k]:.2f} | {d[k] / g[k]:.2f}× |")


if __name__ == "__main__":
    main()

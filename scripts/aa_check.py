"""A/A check of the latency protocol: dense against a second, separately prepared copy of itself.

    taskset -c 0,1 .venv/bin/python scripts/aa_check.py --model resnet56 --batch 1 \
        --backends eager,onnxruntime,openvino --rounds 30 --repeat 3 --threads 2

Both networks are the same untrained dense network (the latency suite's), each prepared on its
own (its own ONNX Runtime/OpenVINO session, its own copy in eager), and timed interleaved like
the suite's pairs (``gkp.metrics.time_interleaved``: rotated order, warm-up, fixed threads,
median). The true ratio is 1.00, so the spread of the printed ratios is the noise floor of a
speed-up read from one test with that many rounds on this machine: the resolution of a goal
like "every method >= 0.98x of dense". Each ratio of medians (the suite's ``speedup``) comes with
the median of the per-round ratios and its 95% interval (the suite's ``speedup_paired``,
``speedup_low``, ``speedup_high``: ``gkp.metrics.paired_speedup``, the interval from 6 rounds);
the last lines per backend give the spread of both estimates and count how many intervals hold
the true 1.00: the check of the interval on this machine, where rounds are not quite independent
draws.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.backends import prepare  # noqa: E402
from benchmarks.bench import SUITE_DATASETS as DATASETS  # noqa: E402
from benchmarks.bench import SUITE_TARGET, cached_untrained  # noqa: E402
from benchmarks.runconfig import RunConfig  # noqa: E402
from gkp.metrics import paired_speedup, time_interleaved  # noqa: E402


def aa_ratios(model: str, backend: str, batch: int, rounds: int, repeat: int, threads: int):
    """``repeat`` (ratio, paired, interval) triples of one dense network's two preparations on
    ``backend``: the first copy's median / the second copy's, the median of the per-round ratios
    and its 95% interval (None under 6 rounds)."""
    cfg = RunConfig(model=model, dataset=DATASETS[model], method="weight-magnitude",
                    target=SUITE_TARGET, progress=False)  # fmt: skip
    dense, _, x = cached_untrained(cfg, None)
    x = torch.randn(batch, *x.shape[1:])
    first, _ = prepare(backend, dense, x, threads)
    second, _ = prepare(backend, copy.deepcopy(dense), x, threads)
    out = []
    for _ in range(repeat):
        st = time_interleaved({"a": first, "b": second}, x, rounds=rounds, warmup=3,
                              threads=threads)  # fmt: skip
        ratio = st["a"].median_ms / st["b"].median_ms
        out.append((ratio, *paired_speedup(st["a"].times_ms, st["b"].times_ms)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DATASETS), default="resnet56")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backends", default="eager,onnxruntime,openvino")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    for backend in args.backends.split(","):
        r = aa_ratios(args.model, backend, args.batch, args.rounds, args.repeat, args.threads)
        print(
            f"{args.model} {backend} batch {args.batch} threads {args.threads}, "
            f"{args.rounds} rounds: A/A (ratio of medians / paired median [interval]) "
            + " ".join(f"{v:.3f}/{m:.3f}" + _interval(i) for v, m, i in r)
        )
        for name, values in (("ratio of medians", [v for v, _, _ in r]),
                             ("paired median", [m for _, m, _ in r])):  # fmt: skip
            print(f"  {name}: {min(values):.3f}-{max(values):.3f}")
        held = [i[0] <= 1.0 <= i[1] for _, _, i in r if i is not None]
        if held:
            print(f"  the 95% interval holds 1.00 in {sum(held)} of {len(held)}")


def _interval(interval) -> str:
    return "" if interval is None else f" [{interval[0]:.3f}-{interval[1]:.3f}]"


if __name__ == "__main__":
    main()

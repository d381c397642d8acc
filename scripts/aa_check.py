"""A/A check of the latency protocol: dense against a second, separately prepared copy of itself.

    taskset -c 0,1 .venv/bin/python scripts/aa_check.py --model resnet56 --batch 1 \
        --backends eager,onnxruntime,openvino --rounds 30 --repeat 3 --threads 2

Both networks are the same untrained dense network (the latency suite's), each prepared on its
own (its own ONNX Runtime/OpenVINO session, its own copy in eager), and timed interleaved like
the suite's pairs (``gkp.metrics.time_interleaved``: rotated order, warm-up, fixed threads,
median). The true ratio is 1.00, so the spread of the printed ratios is the noise floor of a
speed-up read from one test with that many rounds on this machine: the resolution of a goal
like "every method >= 0.98x of dense".
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
from benchmarks.bench import cached_untrained  # noqa: E402
from benchmarks.runconfig import RunConfig  # noqa: E402
from gkp.metrics import time_interleaved  # noqa: E402

DATASETS = {"resnet56": "synthetic", "resnet50": "imagenet"}


def aa_ratios(model: str, backend: str, batch: int, rounds: int, repeat: int, threads: int):
    """``repeat`` ratios (first copy's median / second copy's) of one dense network's two
    preparations on ``backend``."""
    cfg = RunConfig(model=model, dataset=DATASETS[model], method="weight-magnitude",
                    target=0.436, progress=False)  # fmt: skip
    dense, _, x = cached_untrained(cfg, None)
    x = torch.randn(batch, *x.shape[1:])
    first, _ = prepare(backend, dense, x, threads)
    second, _ = prepare(backend, copy.deepcopy(dense), x, threads)
    out = []
    for _ in range(repeat):
        st = time_interleaved({"a": first, "b": second}, x, rounds=rounds, warmup=3,
                              threads=threads)  # fmt: skip
        out.append(st["a"].median_ms / st["b"].median_ms)
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
        print(f"{args.model} {backend} batch {args.batch} threads {args.threads}, "
              f"{args.rounds} rounds: A/A " + " ".join(f"{v:.3f}" for v in r))  # fmt: skip


if __name__ == "__main__":
    main()

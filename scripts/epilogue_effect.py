"""What fusing conv epilogues (gkp.epilogue) does to dense and GKP networks, in one timed run.

For ResNet-56 (32x32) or ResNet-50 (224x224) with ``gkp-l2`` at the suite's MACs target (G = 8,
untrained weights, the latency suite's structure), BatchNorm folded, channels-last, times in one
interleaved run (``gkp.metrics.time_interleaved``: eval, inference_mode, warm-up, fixed
threads, median): the dense network as PyTorch runs it (conv, then ReLU and add as ops of their
own) and with its epilogues fused (oneDNN's convolution with post-ops), and the GKP network with
the fused op in every grouped layer, unfused and fused (the kernel's own epilogue). Prints the
medians and the GKP speed-up over dense each way.

    taskset -c 0 .venv/bin/python scripts/epilogue_effect.py --model resnet56 --batch 64 \
        --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import prune_untrained  # noqa: E402
from benchmarks.runconfig import RunConfig  # noqa: E402
from gkp import memory  # noqa: E402
from gkp.epilogue import fuse_epilogues  # noqa: E402
from gkp.fold import fold_batchnorm  # noqa: E402
from gkp.metrics import time_interleaved  # noqa: E402
from gkp.nn import set_backend  # noqa: E402

CL = torch.channels_last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56", choices=["resnet56", "resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"allocator: {memory.keep_freed_memory()}")  # no page faults in the timed calls
    torch.manual_seed(0)
    dataset = "synthetic" if args.model == "resnet56" else "imagenet"
    cfg = RunConfig(
        model=args.model, dataset=dataset, method="gkp-l2", target=0.436, progress=False
    )
    dense, pruned, x = prune_untrained(cfg)
    x = torch.randn(args.batch, *x.shape[1:]).contiguous(memory_format=CL)
    nets = {}
    for name, model in (("dense", dense), ("gkp", pruned)):
        net = fold_batchnorm(model).to(memory_format=CL)
        set_backend(net, "fused")
        nets[name] = net
        nets[f"{name}+epilogues"] = fuse_epilogues(net)
    stats = time_interleaved(nets, x, rounds=args.rounds, warmup=2, threads=args.threads)
    ms = {k: v.median_ms for k, v in stats.items()}
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), channels-last, median ms:")
    for k, v in ms.items():
        print(f"  {k:18s} {v:9.2f}")
    print(f"GKP speed-up, epilogues as separate ops: {ms['dense'] / ms['gkp']:.2f}x")
    print(f"GKP speed-up, epilogues fused:           "
          f"{ms['dense+epilogues'] / ms['gkp+epilogues']:.2f}x")  # fmt: skip
    print(f"fusing epilogues saves {1 - ms['dense+epilogues'] / ms['dense']:.0%} of dense's "
          f"time and {1 - ms['gkp+epilogues'] / ms['gkp']:.0%} of GKP's")  # fmt: skip


if __name__ == "__main__":
    main()

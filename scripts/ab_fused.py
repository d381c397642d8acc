"""The fused op of this checkout against its build at another commit, layer by layer.

For kernel work: a change to ``gkp/csrc/grouped_kernel_conv.cpp`` that gains a few percent is
lost in the run-to-run noise of ``scripts/bench_fused.py`` on a shared machine, so this builds
the kernel source of ``--base`` (read with ``git show``) as a second op namespace
(``gkp_fused_base``) beside this checkout's ``gkp_fused`` and times the two in one interleaved
run per layer (``gkp.metrics.time_interleaved``: inference_mode, warm-up, fixed threads,
rounds rotated, median). Layers: those of ``scripts/bench_fused.py`` at their larger batch
(ResNet-56 at 64, ResNet-50 at 16), with ``--batch-one`` at batch 1, and with
``--downsampling`` its stride-2 ones; input
NCHW or channels-last; with the epilogue a ResNet block's second conv runs (residual + ReLU);
with ``--network-weights`` the weights in the input's layout (a channels-last network's are
channels-last, and the op packs them through their strides).

    taskset -c 0,1 .venv/bin/python scripts/ab_fused.py --base HEAD~1 --threads 1,2

Prints one Markdown row per layer, layout and thread count: both medians and base / this
(above 1: this checkout's kernel is faster).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gkp import fused, memory  # noqa: E402
from gkp.metrics import time_interleaved  # noqa: E402
from scripts.bench_fused import DOWNSAMPLING, LAYERS, layer_pair  # noqa: E402

SOURCE = "gkp/csrc/grouped_kernel_conv.cpp"


def load_base(rev: str) -> None:
    """Build the kernel source of git revision ``rev`` as ``torch.ops.gkp_fused_base``."""
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    except subprocess.CalledProcessError as err:
        sys.exit(f"cannot read {SOURCE} at {rev!r}: {err.stderr.strip()}")
    except OSError as err:  # no git
        sys.exit(f"cannot read {SOURCE} at {rev!r}: git did not run ({err})")
    renamed = text.replace("TORCH_LIBRARY(gkp_fused,", "TORCH_LIBRARY(gkp_fused_base,")
    renamed = renamed.replace("TORCH_LIBRARY_IMPL(gkp_fused,", "TORCH_LIBRARY_IMPL(gkp_fused_base,")
    # every registration renamed, so the base build cannot touch this checkout's op
    left = re.search(r"\(\s*gkp_fused\s*,", renamed)
    if renamed.count("TORCH_LIBRARY(gkp_fused_base,") != 1 or left:
        sys.exit(f"{SOURCE} at {rev!r} does not register the op as this script expects")
    digest = hashlib.sha256(renamed.encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"gkp_fused_base_{digest}.cpp"
    if not path.exists() or path.read_text() != renamed:  # an unchanged file: no rebuild
        path.write_text(renamed)
    fused.compile_source(f"gkp_fused_base_{digest}", path)  # the same flags as this build


def pick_layers(downsampling: bool, batch_one: bool) -> list[tuple]:
    """(network, in channels, input size, batch, out channels, stride) of the layers to time:
    ``scripts/bench_fused.py``'s stride-2 layers, its batch-1 layers, or its larger-batch ones."""
    if downsampling:
        return [(*ly, 2) for ly in DOWNSAMPLING]
    return [(n, c, hw, b, c, 1) for n, c, hw, b in LAYERS if (b == 1) == batch_one]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (HEAD~1, ...)")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--layouts", default="nchw,cl", help="input layouts: nchw, cl or both")
    ap.add_argument("--no-epilogue", action="store_true", help="time the conv alone")
    ap.add_argument(
        "--network-weights", action="store_true",
        help="weights in the input's layout, as a network converted to that layout holds them "
        "(channels-last with --layouts cl: the suite's autotune deploy); default contiguous",
    )  # fmt: skip
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--downsampling", action="store_true", help="the stride-2 layers instead")
    which.add_argument("--batch-one", action="store_true", help="the batch-1 layers instead")
    args = ap.parse_args()
    print(f"allocator: {memory.keep_freed_memory()}")  # no page faults in the timed calls
    if not fused.load():
        sys.exit("the fused op could not be built (see the warning above)")
    load_base(args.base)
    ops = {"base": torch.ops.gkp_fused_base.grouped_kernel_conv,
           "this": torch.ops.gkp_fused.grouped_kernel_conv}  # fmt: skip
    layers = pick_layers(args.downsampling, args.batch_one)
    print(f"| layer | batch | layout | threads | {args.base} ms | this ms | {args.base} / this |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for threads in [int(t) for t in args.threads.split(",")]:
        for net, c, hw, batch, c_out, stride in layers:
            _, layer, _ = layer_pair(c, seed=c + hw, c_out=c_out, stride=stride)
            conv = layer.conv
            for layout in args.layouts.split(","):
                fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
                x = torch.randn(batch, c, hw, hw).contiguous(memory_format=fmt)
                out_hw = (hw - 1) // stride + 1
                res = None
                if not args.no_epilogue:
                    res = torch.randn(batch, c_out, out_hw, out_hw).contiguous(memory_format=fmt)

                weight = conv.weight
                if args.network_weights:
                    weight = weight.contiguous(memory_format=fmt)
                rest = (
                    weight, conv.bias, layer.gather_index, layer.output_index,
                    list(conv.stride), list(conv.padding), list(conv.dilation), layer.n_groups,
                    res, res is not None,
                )  # fmt: skip
                fns = {name: (lambda x, op=op, rest=rest: op(x, *rest)) for name, op in ops.items()}
                if not torch.equal(fns["base"](x), fns["this"](x)):
                    print(f"warning: {net} C={c}: the two builds' outputs differ", file=sys.stderr)
                stats = time_interleaved(fns, x, rounds=args.rounds, warmup=5, threads=threads)
                ms = {k: v.median_ms for k, v in stats.items()}
                name = f"{net} C={c}{'->' + str(c_out) if c_out != c else ''} {hw}x{hw}"
                name += f" s{stride}" if stride > 1 else ""
                ratio = ms["base"] / ms["this"]
                print(f"| {name} | {batch} | {layout} | {threads} | {ms['base']:.3f} | "
                      f"{ms['this']:.3f} | {ratio:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

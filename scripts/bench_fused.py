"""Layer-level speed of the grouped-kernel layer's deploy forms against the dense conv.

For the 3x3 layers of ResNet-56 (32x32 input) and of ResNet-50's stages (224x224 input), G = 8
groups keeping n_keep = 9/16 of the input channels (p = 0.4375; ``--keep`` another fraction, its
table printed, not written), times in one interleaved run
(``gkp.metrics.time_interleaved``: eval, inference_mode, warm-up, fixed threads, median): the
dense conv in NCHW and channels-last, the PyTorch deploy form (gather -> grouped conv ->
un-permute), the fused op (``gkp.fused``) on an NCHW and a channels-last input, and its filters
path (``"fused_filters"``, channels-last input) where groups hold a multiple of 8 filters. Prints a
Markdown table (GMAC/s of the MACs each form must do, and speed-up against the faster dense
layout) and writes it as CSV.

    taskset -c 0,1 .venv/bin/python scripts/bench_fused.py --threads 1,2 \
        --out results/fused_kernel.csv

``--downsampling`` times the networks' stride-2 3x3 layers instead (``DOWNSAMPLING``; the table
prints them as ``C=in->out``).

``--lane-tiles`` times, for every layer at batch 64 / 16 (stride 1 and 2: the batches that take
the lanes path), the fused op on a channels-last input with its own tile choice and with each of
the lanes path's tile shapes forced in turn (``GKP_FUSED_LANE_TILE``, ``gkp.fused.LANE_TILES``;
shapes whose D does not divide the layer's filters per group are left out), each timed in a
pair with the faster dense layout, and prints each one's speed-up over dense: how far the
kernel's choice is from the best shape, layer by layer (nothing is written).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import sys
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.csvtable import replace_rows  # noqa: E402
from benchmarks.environment import cpu_name  # noqa: E402
from gkp import fused, memory  # noqa: E402
from gkp.metrics import time_interleaved  # noqa: E402
from gkp.nn import GroupedKernelConv2d, GroupPlan, set_backend  # noqa: E402

# (network, channels, spatial size, batch)
LAYERS = [
    ("resnet56", 16, 32, 1), ("resnet56", 32, 16, 1), ("resnet56", 64, 8, 1),
    ("resnet56", 16, 32, 64), ("resnet56", 32, 16, 64), ("resnet56", 64, 8, 64),
    ("resnet50", 64, 56, 1), ("resnet50", 128, 28, 1), ("resnet50", 256, 14, 1),
    ("resnet50", 512, 7, 1), ("resnet50", 64, 56, 16), ("resnet50", 128, 28, 16),
    ("resnet50", 256, 14, 16), ("resnet50", 512, 7, 16),
]  # fmt: skip
GROUPS = 8
KEEP = Fraction(9, 16)  # of each group's input channels kept (p = 0.4375)


# The downsampling 3x3 convs (stride 2): ResNet-56's first convs of stages 2 and 3 (C -> 2C),
# torchvision ResNet-50's 3x3 convs of the first blocks of stages 2-4 (C -> C).
# (network, in channels, input size, batch, out channels)
DOWNSAMPLING = [
    ("resnet56", 16, 32, 64, 32), ("resnet56", 32, 16, 64, 64),
    ("resnet50", 128, 56, 16, 128), ("resnet50", 256, 28, 16, 256), ("resnet50", 512, 14, 16, 512),
]  # fmt: skip


def layer_pair(
    c: int, seed: int, c_out: int | None = None, stride: int = 1, keep: Fraction = KEEP
) -> tuple[nn.Conv2d, GroupedKernelConv2d, int]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c_out = c if c_out is None else c_out
    conv = nn.Conv2d(c, c_out, 3, stride=stride, padding=1, bias=False)
    n_keep = max(1, int(c * keep))
    order = list(range(c_out))
    rng.shuffle(order)
    d = c_out // GROUPS
    plan = GroupPlan.from_lists(
        [order[g * d : (g + 1) * d] for g in range(GROUPS)],
        [rng.sample(range(c), n_keep) for _ in range(GROUPS)],
    )
    return conv, GroupedKernelConv2d.from_conv(conv, plan), n_keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1", help="thread counts, comma-separated (e.g. 1,2)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="CSV file to write")
    ap.add_argument("--table", type=Path, default=None, help="print the table of this CSV")
    which = ap.add_mutually_exclusive_group()
    which.add_argument(
        "--downsampling", action="store_true", help="time the stride-2 3x3 layers instead"
    )
    which.add_argument(
        "--lane-tiles", action="store_true", help="time every lanes-path tile shape per layer"
    )
    ap.add_argument(
        "--keep",
        type=Fraction,
        default=KEEP,
        help="fraction of each group's input channels kept (default 9/16, p = 0.4375; another "
        "value prints its table without --out: the CSV holds the 9/16 rows)",
    )
    args = ap.parse_args()
    if args.keep != KEEP and args.out is not None:
        ap.error(f"--keep {args.keep} prints its table only; {args.out} holds the 9/16 rows")
    if not 0 < args.keep <= 1:
        ap.error(f"--keep must be in (0, 1], got {args.keep}")
    if args.table is not None:
        print_table(read_rows(args.table))
        return
    print(f"allocator: {memory.keep_freed_memory()}")  # no page faults in the timed calls
    if not fused.load():
        sys.exit("the fused op could not be built (see the warning above)")
    if args.lane_tiles:
        for threads in [int(t) for t in args.threads.split(",")]:
            lane_tiles(threads, args.rounds)
        return
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        if args.downsampling:
            layers = [(*ly, 2) for ly in DOWNSAMPLING]
        else:
            layers = [(n, c, hw, b, c, 1) for n, c, hw, b in LAYERS]
        rows += measure(threads, args.rounds, layers, args.keep)
    if args.out is not None:
        write_rows(args.out, rows)
    print_table(rows)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path``, keeping the rows of other processors already there (a file
    holds one set of layer timings per processor; this machine's are replaced)."""
    replace_rows(path, rows, ("cpu_name",))


def measure(threads: int, rounds: int, layers: list[tuple], keep: Fraction = KEEP) -> list[dict]:
    """Rows for ``layers``: (network, in channels, input size, batch, out channels, stride),
    ``keep`` of each group's input channels kept."""
    rows = []
    cl = torch.channels_last
    for net, c, hw, batch, c_out, stride in layers:
        conv, grouped, n_keep = layer_pair(c, seed=c + hw, c_out=c_out, stride=stride, keep=keep)
        fast = GroupedKernelConv2d.from_conv(conv, grouped.plan())
        set_backend(fast, "fused")
        conv_cl = copy.deepcopy(conv).to(memory_format=cl)
        x = torch.randn(batch, c, hw, hw)
        x_cl = x.contiguous(memory_format=cl)
        runs = {  # name: (module, its input)
            "dense": (conv, x), "dense_cl": (conv_cl, x_cl), "torch": (grouped, x),
            "fused": (fast, x), "fused_cl": (fast, x_cl),
        }  # fmt: skip
        if fused.filters_path_takes(c_out // GROUPS):  # the filters path (channels-last input)
            filters = GroupedKernelConv2d.from_conv(conv, grouped.plan())
            set_backend(filters, "fused_filters")
            runs["filters"] = (filters, x_cl)
        stats = time_interleaved(
            {name: _on(module.eval(), inp) for name, (module, inp) in runs.items()},
            x, rounds=rounds, warmup=5, threads=threads,
        )  # fmt: skip
        out_hw = (hw - 1) // stride + 1  # 3x3, padding 1
        dense_macs = batch * c_out * c * 9 * out_hw * out_hw
        kept = dense_macs * n_keep // c
        ms = {k: v.median_ms for k, v in stats.items()}
        best = min(ms["dense"], ms["dense_cl"])  # speed-ups against the faster dense layout
        rows.append(
            {
                "network": net, "channels": c, "size": hw, "batch": batch, "groups": GROUPS,
                "out_channels": c_out, "stride": stride,
                "n_keep": n_keep, "threads": threads,
                **{f"{k}_ms": v for k, v in ms.items()},
                **{f"{k}_gmacs": (dense_macs if k.startswith("dense") else kept) / v / 1e6
                   for k, v in ms.items()},
                "ideal": c / n_keep,
                **{f"{k}_speedup": best / ms[k] for k in ("torch", "fused", "fused_cl", "filters")
                   if k in ms},
                "cpu_name": cpu_name(),
            }
        )  # fmt: skip
        for k in ("filters_ms", "filters_gmacs", "filters_speedup"):  # every row has the columns
            rows[-1].setdefault(k, "")
    return rows


def lane_tiles(threads: int, rounds: int) -> None:
    """Print, per lanes-path layer, the fused op's speed-up over the faster dense layout with its
    own tile choice ("chosen") and with each tile shape forced (channels-last input). Each one
    is timed in a pair with dense, so that every call follows a dense call, as a layer follows
    other layers in a network: timed one after another, a shape would find the input and the
    weights the shape before it left in the cache, and the first after dense would not."""
    cl = torch.channels_last
    layers = [(n, c, hw, b, c, 1) for n, c, hw, b in LAYERS if b > 1]
    layers += [(*ly, 2) for ly in DOWNSAMPLING]
    print(f"lanes-path tile shapes (D filters x P pixels), {threads} thread(s): speed-up over "
          "the faster dense layout, channels-last input, each in a pair with dense")  # fmt: skip
    for net, c, hw, batch, c_out, stride in layers:
        conv, grouped, _ = layer_pair(c, seed=c + hw, c_out=c_out, stride=stride)
        set_backend(grouped, "fused")
        grouped.eval()
        x = torch.randn(batch, c, hw, hw)
        x_cl = x.contiguous(memory_format=cl)
        conv_cl = copy.deepcopy(conv).to(memory_format=cl)
        dense = {"dense": _on(conv.eval(), x), "dense_cl": _on(conv_cl.eval(), x_cl)}
        stats = time_interleaved(dense, x, rounds=rounds, warmup=3, threads=threads)
        faster = dense[min(dense, key=lambda k: stats[k].median_ms)]
        d = c_out // GROUPS
        tiles = [None] + [t for t in fused.LANE_TILES if d % int(t.split(",")[0]) == 0]
        speedup = {}
        for tile in tiles:
            pair = {"dense": faster, "fused": _forced(grouped, x_cl, tile)}
            st = time_interleaved(pair, x, rounds=rounds, warmup=3, threads=threads)
            speedup[tile or "chosen"] = st["dense"].median_ms / st["fused"].median_ms
        shapes = sorted((k for k in speedup if k != "chosen"), key=lambda k: -speedup[k])
        print(f"{net} C={c}{'' if c_out == c else f'->{c_out}'} {hw}x{hw} s{stride} b{batch}: "
              f"chosen x{speedup['chosen']:.2f} | "
              + " ".join(f"{k}:x{speedup[k]:.2f}" for k in shapes), flush=True)  # fmt: skip


def _forced(module: nn.Module, inp: torch.Tensor, tile: str | None):
    """A callable for time_interleaved running ``module`` with the lane tile ``tile`` forced
    (None: the kernel's own choice)."""

    def run(_x):
        if tile is None:
            return module(inp)
        os.environ["GKP_FUSED_LANE_TILE"] = tile
        try:
            return module(inp)
        finally:
            del os.environ["GKP_FUSED_LANE_TILE"]

    return run


def _on(module: nn.Module, inp: torch.Tensor):
    """A callable for time_interleaved that runs ``module`` on its own (prepared) input."""
    return lambda _x: module(inp)


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def print_table(rows: list[dict]) -> None:
    print(table(rows), end="")


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (what the README shows, generated from the CSV)."""
    strides = sorted({r.get("stride") or 1 for r in rows})  # rows from before: stride 1 only
    cpus = list(dict.fromkeys(str(r.get("cpu_name") or "CPU not recorded") for r in rows))
    lines = [
        f"G = {GROUPS}, n_keep = {_kept(rows)} of C, 3x3, stride {'/'.join(map(str, strides))}; "
        "(x ...): "
        f"speed-up over the faster dense layout; measured on: {', '.join(cpus)}",
        "",
        "| layer | batch | threads | dense NCHW GMAC/s | dense channels-last GMAC/s "
        "| torch grouped GMAC/s (x) | fused NCHW GMAC/s (x) | fused channels-last GMAC/s (x) "
        "| fused filters path GMAC/s (x) | ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    several = len(cpus) > 1  # then each line names its processor
    for r in rows:
        where = f" ({r.get('cpu_name') or 'CPU not recorded'})" if several else ""
        lines.append(
            f"| {r['network']} C={r['channels']}{_to(r)} {r['size']}x{r['size']}{where} | "
            f"{r['batch']} | "
            f"{r['threads']} | {r['dense_gmacs']:.1f} | {r['dense_cl_gmacs']:.1f} | "
            f"{r['torch_gmacs']:.1f} (x{r['torch_speedup']:.2f}) | "
            f"{r['fused_gmacs']:.1f} (x{r['fused_speedup']:.2f}) | "
            f"{r['fused_cl_gmacs']:.1f} (x{r['fused_cl_speedup']:.2f}) | {_filters(r)} | "
            f"x{r['ideal']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _kept(rows: list[dict]) -> str:
    """The fractions of the input channels the rows keep (``9/16`` for the CSV's rows)."""
    kept = (Fraction(r["n_keep"], r["channels"]) if r.get("n_keep") else KEEP for r in rows)
    return ", ".join(dict.fromkeys(str(k) for k in kept))


def _filters(row: dict) -> str:
    """The filters path's cell: empty where it was not timed (groups of other than a multiple
    of 8 filters; rows from before it)."""
    if row.get("filters_gmacs") in (None, ""):
        return "–"
    return f"{row['filters_gmacs']:.1f} (x{row['filters_speedup']:.2f})"


def _to(row: dict) -> str:
    """`` -> C_out`` when a layer changes the channel count, else nothing."""
    c_out = row.get("out_channels") or row["channels"]  # rows from before: empty
    return "" if c_out == row["channels"] else f"->{c_out}"


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(handle)]


if __name__ == "__main__":
    main()

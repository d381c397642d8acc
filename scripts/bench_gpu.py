"""The grouped-kernel layer and GKP networks on a CUDA GPU: the Triton kernel checked and timed.

Three parts, each written to its own file in ``--out`` as soon as it is done:

1. ``gpu_check.csv``: the Triton op (``gkp.triton_conv``) against gather -> conv2d -> un-permute
   on the GPU over the random cases of ``tests/test_fused.py`` (strides, padding, dilation, odd
   sizes, batch 1, overlapping kept sets), in exact float32, TF32 and bfloat16.
2. ``gpu_kernel.csv``: layer timings (CUDA events, ``gkp.metrics.time_interleaved``, rounds
   interleaved, median) of the 3x3 layers of ``scripts/bench_fused.py`` (G = 8, p = 0.4375):
   dense conv (cuDNN, NCHW and channels-last), the PyTorch deploy form (gather -> grouped conv
   -> un-permute) and the Triton op, with GMAC/s and the speed-up against the faster dense
   layout; both Triton kernels (``triton``: tensor cores, ``triton_direct``: CUDA cores), also
   with other tile sizes (``--sweep``, or ``--sweep direct`` for the direct kernel's alone).
3. ``gpu_networks.csv``: whole networks (BN folded, untrained weights: latency only) of the
   latency suite's GKP configurations, dense (NCHW and channels-last) against the pruned
   network in the PyTorch form (both layouts) and with each Triton kernel in every grouped
   layer, in TF32 and bfloat16.
4. ``latency.csv``: the same networks through the latency harness (``benchmarks.latency``:
   backends ``eager`` and ``autotune``, whose per-layer candidates include the Triton op on a
   GPU) at the suite's batches, TF32: rows for ``results/latency.csv`` with device ``cuda``.

Precisions: ``fp32`` (exact float32: TF32 off for cuDNN and Triton), ``tf32`` (PyTorch's default
for convolutions) and ``bf16``. Needs a CUDA GPU and Triton::

    python scripts/bench_gpu.py --sweep --out results/gpu
    python scripts/bench_gpu.py --table results/gpu      # the tables of the saved CSVs
    python scripts/bench_gpu.py --table results/gpu --brief   # the README's subset

``--device cpu`` (with ``TRITON_INTERPRET=1``) runs the same code on a CPU without the Triton
forms: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PRECISIONS = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
              "bf16": (torch.bfloat16, True)}  # fmt: skip
# (network, channels, spatial size, batch): bench_fused's layers plus larger GPU batches
GPU_LAYERS = [
    (net, c, s, b)
    for net, sizes, batches in (
        ("resnet56", ((16, 32), (32, 16), (64, 8)), (1, 64, 256)),
        ("resnet50", ((64, 56), (128, 28), (256, 14), (512, 7)), (1, 16, 64)),
    )
    for c, s in sizes
    for b in batches
]
SWEEP = [(32, 16, 32), (128, 16, 32), (64, 16, 64), (128, 32, 64)]
DIRECT_SWEEP = [
    (64, 8),
    (256, 8),
    (128, 16),
    (64, 32),
    (32, 64),
]  # (BLOCK_M, BLOCK_D) of the direct kernel
NETWORKS = [  # (model, method, native knobs, MACs target, batches)
    *[("resnet56", m, {"groups": 8}, 0.436, (1, 64, 256))
      for m in ("gkp-l2", "tmi-gkp", "sr-gkp", "gkp-random")],
    *[("resnet50", m, {"groups": 8}, 0.436, (1, 16, 64))
      for m in ("gkp-l2", "tmi-gkp", "sr-gkp", "gkp-random")],
    ("resnet50", "gkp-l2", {"groups": 8, "rate": 0.75}, None, (1, 16, 64)),
]  # fmt: skip


DEV, TRITON = "cuda", True  # set by main()
TRITON_BACKENDS = ("triton", "triton_direct")  # gkp.nn backends: tensor-core, direct kernel


def gpu_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke test)"


def set_precision(name: str) -> torch.dtype:
    dtype, tf32 = PRECISIONS[name]
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return dtype


def write(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def check(out: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fused import random_case

    from gkp.triton_conv import VARIANTS
    from gkp.triton_conv import grouped_kernel_conv_triton as op

    rows = []
    for prec, variant in ((p, v) for p in PRECISIONS for v in VARIANTS):
        dtype = set_precision(prec)
        worst, bad = 0.0, []
        for seed in range(n):
            x, w, b, gather, out_idx, stride, pad, dil, groups = random_case(random.Random(seed))
            x, w = x.to(DEV).to(dtype), w.to(DEV).to(dtype)
            b = None if b is None else b.to(DEV).to(dtype)
            gather, out_idx = gather.to(DEV), out_idx.to(DEV)
            torch.backends.cudnn.allow_tf32 = False  # the reference: exact float32 of the inputs
            want = F.conv2d(x.float()[:, gather], w.float(), None if b is None else b.float(),
                            stride, pad, dil, groups)[:, out_idx]  # fmt: skip
            torch.backends.cudnn.allow_tf32 = PRECISIONS[prec][1]
            got = op(x, w, b, gather, out_idx, stride, pad, dil, groups, variant=variant)
            got = got.float()
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            worst = max(worst, err)
            tol = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 2e-2}[prec]
            if got.shape != want.shape or not err <= tol:
                bad.append(seed)
        rows.append({"precision": prec, "variant": variant, "cases": n,
                     "worst_rel_err": f"{worst:.2e}",
                     "failed_seeds": " ".join(map(str, bad)) or "none"})  # fmt: skip
        print(rows[-1], flush=True)
    write(out / "gpu_check.csv", rows)


def time_layers(out: Path, rounds: int, sweep: str, precisions: list[str]) -> None:
    from bench_fused import layer_pair

    from gkp.metrics import time_interleaved
    from gkp.nn import set_backend
    from gkp.triton_conv import grouped_kernel_conv_triton

    rows = []
    gpu = gpu_name()
    for prec in precisions:
        dtype = set_precision(prec)
        for net, c, size, batch in GPU_LAYERS:
            conv, layer, n_keep = layer_pair(c, seed=c + size)
            conv, layer = conv.to(DEV).to(dtype).eval(), layer.to(DEV).to(dtype).eval()
            conv_cl = conv.to(memory_format=torch.channels_last)
            x = torch.randn(batch, c, size, size, device=DEV, dtype=dtype)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            fns = {"dense": conv, "dense_cl": lambda _x, c=conv_cl, xc=x_cl: c(xc),
                   "torch": layer}  # fmt: skip
            for backend in TRITON_BACKENDS if TRITON else ():
                fns[backend] = copy.deepcopy(layer)
                set_backend(fns[backend], backend)
            if TRITON and sweep and prec == "tf32" and batch > 1:
                cv = layer.conv
                sweeps = [("triton_", "dot", b) for b in SWEEP if sweep in ("all", "dot")]
                sweeps += [("direct_", "direct", b) for b in DIRECT_SWEEP if sweep != "dot"]
                for prefix, variant, blocks in sweeps:
                    fns[prefix + "x".join(map(str, blocks))] = (
                        lambda _x, cv=cv, t=layer, bl=blocks, v=variant: grouped_kernel_conv_triton(
                            _x, cv.weight, cv.bias, t.gather_index, t.output_index,
                            cv.stride, cv.padding, cv.dilation, t.n_groups, blocks=bl,
                            variant=v))  # fmt: skip
            stats = time_interleaved(fns, x, rounds=rounds, warmup=3, threads=1)
            gmac_dense = batch * size * size * c * c * 9 / 1e9
            gmac_pruned = gmac_dense * n_keep / c
            best_dense = min(stats["dense"].median_ms, stats["dense_cl"].median_ms)
            for form, st in stats.items():
                dense_form = form.startswith("dense")
                rows.append({
                    "gpu": gpu, "precision": prec, "network": net, "channels": c,
                    "size": size, "batch": batch, "n_keep": n_keep, "form": form,
                    "median_ms": round(st.median_ms, 5), "iqr_ms": round(st.iqr_ms, 5),
                    "gmacs": round((gmac_dense if dense_form else gmac_pruned)
                                   / (st.median_ms / 1e3), 1),
                    "speedup_vs_dense": round(best_dense / st.median_ms, 3),
                    "ideal": round(c / n_keep, 3), "rounds": rounds,
                })  # fmt: skip
            print(
                prec,
                net,
                c,
                size,
                batch,
                {k: round(best_dense / v.median_ms, 2) for k, v in stats.items()},
                flush=True,
            )
            write(out / "gpu_kernel.csv", rows)


def time_networks(out: Path, rounds: int, cache: Path | None) -> None:
    from benchmarks.bench import cached_untrained
    from benchmarks.latency import untrained_run_id
    from benchmarks.runconfig import RunConfig
    from gkp import metrics
    from gkp.fold import fold_batchnorm
    from gkp.nn import set_backend

    rows = []
    gpu = gpu_name()
    cl = torch.channels_last
    for model, method, native, target, batches in NETWORKS:
        dataset = "synthetic" if model == "resnet56" else "imagenet"
        cfg = RunConfig(model=model, dataset=dataset, method=method, target=target,
                        native=native, progress=False)  # fmt: skip
        t0 = time.time()
        dense, pruned, x1 = cached_untrained(cfg, cache)
        macs_dense, macs = metrics.macs(dense, x1), metrics.macs(pruned, x1)
        rid = untrained_run_id(model, cfg.bench_key(), x1.shape[1:])
        print(f"{model} {method} {native}: structure in {time.time() - t0:.1f} s", flush=True)
        dense, pruned = fold_batchnorm(dense), fold_batchnorm(pruned)
        for prec in ("tf32", "bf16"):
            dtype = set_precision(prec)
            d = dense.to(DEV).to(dtype).eval()
            d_cl = copy.deepcopy(d).to(memory_format=cl)
            p = pruned.to(DEV).to(dtype).eval()
            p_cl = copy.deepcopy(p).to(memory_format=cl)
            p_triton = {b: copy.deepcopy(p) for b in TRITON_BACKENDS} if TRITON else {}
            for backend, net in p_triton.items():
                set_backend(net, backend)
            for batch in batches:
                x = torch.randn(batch, *x1.shape[1:], device=DEV, dtype=dtype)
                x_cl = x.contiguous(memory_format=cl)
                fns = {"dense": d, "dense_cl": lambda _x, m=d_cl, xc=x_cl: m(xc),
                       "torch": p, "torch_cl": lambda _x, m=p_cl, xc=x_cl: m(xc),
                       **p_triton}  # fmt: skip
                stats = metrics.time_interleaved(fns, x, rounds=rounds, warmup=3, threads=1)
                best_dense = min(stats["dense"].median_ms, stats["dense_cl"].median_ms)
                for form, st in stats.items():
                    rows.append({
                        "gpu": gpu, "precision": prec, "run_id": rid, "model": model,
                        "method": method, "config": cfg.bench_key(), "batch": batch,
                        "form": form, "median_ms": round(st.median_ms, 5),
                        "iqr_ms": round(st.iqr_ms, 5),
                        "speedup_vs_dense": round(best_dense / st.median_ms, 3),
                        "ideal": round(macs_dense / macs, 3), "macs_dense": macs_dense,
                        "macs": macs, "rounds": rounds, "torch": torch.__version__,
                    })  # fmt: skip
                print(prec, model, method, native.get("rate", ""), batch,
                      {k: round(best_dense / v.median_ms, 2) for k, v in stats.items()},
                      flush=True)  # fmt: skip
                write(out / "gpu_networks.csv", rows)


def time_backends(latency: Path, rounds: int, cache: Path | None) -> None:
    """The latency suite's GKP configurations on the GPU through the harness's own backends
    (``benchmarks.backends.prepare``: eager and autotune, each network in its faster layout),
    at the suite's batches, float32 with PyTorch's default TF32: rows of ``results/latency.csv``
    (device ``cuda``), validated and appended to ``latency``."""
    from benchmarks.bench import cached_untrained
    from benchmarks.latency import append_rows, latency_rows, untrained_run_id
    from benchmarks.runconfig import RunConfig

    set_precision("tf32")
    command = f"python scripts/bench_gpu.py --parts backends --rounds {rounds}"
    for model, method, native, target, batches in NETWORKS:
        dataset = "synthetic" if model == "resnet56" else "imagenet"
        cfg = RunConfig(model=model, dataset=dataset, method=method, target=target,
                        native=native, progress=False)  # fmt: skip
        dense, pruned, x1 = cached_untrained(cfg, cache)
        ident = {"run_id": untrained_run_id(model, cfg.bench_key(), x1.shape[1:]),
                 "model": model, "method": method, "config": cfg.bench_key()}  # fmt: skip
        t0 = time.time()
        rows = latency_rows(
            dense, pruned, sample_shape=x1.shape[1:], backends=["eager", "autotune"],
            batches=batches[:2], threads=1, rounds=rounds, ident=ident, command=command,
            device=DEV,
        )  # fmt: skip
        append_rows(latency, rows)
        for r in rows:
            print(model, method, native.get("rate", ""), r["backend"], r["batch"],
                  f"{r['speedup']:.2f}x", r["form"], json.dumps(r["backend_info"])[:160],
                  flush=True)  # fmt: skip
        print(f"  ({time.time() - t0:.1f} s)", flush=True)


def _read(path: Path) -> list[dict[str, str]]:
    """The rows of a saved CSV ([] when the run did not write it)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _swept(forms, prefix: str) -> list[str]:
    """The forms among ``forms`` that are swept tiles named ``<prefix><M>x<N>...``."""
    return [f for f in forms if f.startswith(prefix) and f[len(prefix) :][:1].isdigit()]


def _layer_table(layers: list[dict], brief: bool) -> list[str]:
    by_layer: dict[tuple, dict[str, dict]] = {}
    for r in layers:
        if not brief or r["precision"] == "tf32":
            key = (r["precision"], r["network"], r["channels"], r["size"], r["batch"])
            by_layer.setdefault(key, {})[r["form"]] = r
    seen = {f for forms in by_layer.values() for f in forms}
    # (header, form or swept-tile prefix): a column only where the run timed that form
    columns = [("torch grouped (x)", "torch"), ("Triton tensor cores (x)", "triton")]
    if _swept(seen, "triton_"):
        columns.append(("best tile (x)", "triton_"))
    if "triton_direct" in seen:
        columns.append(("Triton direct (x)", "triton_direct"))
    if _swept(seen, "direct_"):
        columns.append(("best direct tile (x)", "direct_"))
    out = [
        "Layers (G = 8, n_keep = 9/16 of C, 3x3): GMAC/s of the MACs each form does "
        "(x speed-up over the faster dense layout); best tile: the fastest swept tile of the "
        "tensor-core kernel (BLOCK_M x BLOCK_N x BLOCK_K) or of the direct one "
        "(BLOCK_M x BLOCK_D)",
        "",
        "| precision | layer | batch | dense NCHW | dense channels-last | "
        + " | ".join(h for h, _ in columns) + " | ideal |",
        "|---|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|",
    ]  # fmt: skip
    for (prec, net, c, size, batch), forms in by_layer.items():

        def cell(name: str, forms=forms) -> str:
            r = forms.get(name)
            return "" if r is None else f"{r['gmacs']} (x{float(r['speedup_vs_dense']):.2f})"

        def column(name: str, forms=forms, cell=cell) -> str:
            if not name.endswith("_"):
                return cell(name)
            swept = _swept(forms, name)
            if not swept:
                return ""
            best = max(swept, key=lambda f: float(forms[f]["speedup_vs_dense"]))
            return f"{best.removeprefix(name)}: {cell(best)}"

        out.append(
            f"| {prec} | {net} C={c} {size}x{size} | {batch} | {forms['dense']['gmacs']} "
            f"| {forms['dense_cl']['gmacs']} | "
            + " | ".join(column(name) for _, name in columns)
            + f" | x{float(forms['dense']['ideal']):.2f} |"
        )
    return out


def _network_table(nets: list[dict], brief: bool) -> list[str]:
    by_net: dict[tuple, dict[str, dict]] = {}
    for r in nets:
        if not brief or r["method"] == "gkp-l2":
            rate = (json.loads(r["config"]).get("native") or {}).get("rate", 0.4375)
            key = (r["precision"], r["model"], r["method"], rate, r["batch"])
            by_net.setdefault(key, {})[r["form"]] = r
    forms = ["dense", "torch", "torch_cl", "triton", "triton_direct"]
    heads = ["dense NCHW", "torch NCHW", "torch channels-last", "Triton tensor cores",
             "Triton direct"]  # fmt: skip
    if not any("triton_direct" in f for f in by_net.values()):
        forms, heads = forms[:-1], heads[:-1]
    out = [
        "Networks (BN folded, eager PyTorch): speed-up over the faster dense layout",
        "",
        "| precision | model | method | rate | batch | ideal | " + " | ".join(heads) + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(heads),
    ]
    for (prec, model, method, rate, batch), f in by_net.items():
        cells = [f"{float(f[k]['speedup_vs_dense']):.2f}×" if k in f else "" for k in forms]
        ideal = float(next(iter(f.values()))["ideal"])
        out.append(
            f"| {prec} | {model} | {method} | {rate} | {batch} | {ideal:.2f}× | "
            + " | ".join(cells)
            + " |"
        )
    return out


def tables(folder: Path, brief: bool = False) -> str:
    """Markdown of the saved CSVs in ``folder`` (each table where its file exists): the check,
    the layer table, the network table (``brief``: layers in TF32 only, networks of gkp-l2
    only, for the README)."""
    checks = _read(folder / "gpu_check.csv")
    layers = _read(folder / "gpu_kernel.csv")
    nets = _read(folder / "gpu_networks.csv")
    gpu = next((r["gpu"] for r in layers + nets if r.get("gpu")), "the GPU")
    parts: list[list[str]] = []
    if checks:
        parts.append([
            f"Triton op against gather -> conv2d -> un-permute on the GPU ({gpu}), random cases:",
            "",
            "| precision | kernel | cases | worst error / max output | failed |",
            "|---|---|---:|---:|---|",
            *(f"| {r['precision']} | {r.get('variant', 'dot')} | {r['cases']} "
              f"| {r['worst_rel_err']} | {r['failed_seeds']} |" for r in checks),
        ])  # fmt: skip
    if layers:
        parts.append(_layer_table(layers, brief))
    if nets:
        parts.append(_network_table(nets, brief))
    return "\n\n".join("\n".join(p) for p in parts) + "\n" if parts else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    ap.add_argument("--parts", default="check,layers,networks,backends")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--cases", type=int, default=40, help="random cases of the check")
    ap.add_argument(
        "--precisions", default="fp32,tf32,bf16", help="precisions of the layers part (comma list)"
    )
    ap.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        default="",
        choices=("all", "dot", "direct"),
        help="also time other tile sizes of both Triton kernels (all), or of one",
    )
    ap.add_argument("--cache", type=Path, default=None, help="pruned-structure cache folder")
    ap.add_argument(
        "--latency",
        type=Path,
        default=None,
        help="latency CSV the backends part appends to (default: OUT/latency.csv)",
    )
    ap.add_argument(
        "--import-latency",
        type=Path,
        default=None,
        help="append the rows of this latency CSV (a GPU run's) to --latency, validated; "
        "no GPU needed",
    )
    ap.add_argument("--device", default="cuda", help="cuda (cpu: smoke test of the script)")
    ap.add_argument("--table", type=Path, default=None, help="print the tables of this folder")
    ap.add_argument("--brief", action="store_true", help="with --table: the README's subset")
    args = ap.parse_args()
    if args.table is not None:
        print(tables(args.table, args.brief), end="")
        return
    if args.import_latency is not None:
        from benchmarks.latency import import_rows

        dest = args.latency or Path("results/latency.csv")
        print(f"{import_rows(args.import_latency, dest)} rows appended to {dest}")
        return
    global DEV, TRITON
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA GPU (or --device cpu for a smoke test)")
    TRITON = DEV == "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    print(torch.__version__, gpu_name(), flush=True)
    if "check" in parts:
        check(args.out, args.cases)
    if "layers" in parts:
        time_layers(args.out, args.rounds, args.sweep, args.precisions.split(","))
    if "networks" in parts:
        time_networks(args.out, args.rounds, args.cache)
    if "backends" in parts:
        time_backends(args.latency or args.out / "latency.csv", args.rounds, args.cache)


if __name__ == "__main__":
    main()

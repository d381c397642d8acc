"""The leaderboard's declared schema: every column's type, unit, meaning and allowed values.

``results/README.md`` embeds ``schema_markdown()``; a test checks it is up to date. Columns are
only ever added at the end, so that every older header is a prefix of ``COLUMNS``: files with
such a header (``LEGACY_HEADERS``) still read, and the next append upgrades them in place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One declared column: its type ("str", "int", "float" or "bool"), unit and meaning."""

    name: str
    dtype: str
    unit: str
    doc: str
    choices: tuple[str, ...] = ()  # allowed values of an enumeration; empty = free
    bounds: tuple[float | None, float | None] = (None, None)  # inclusive range of numbers


def _s(name: str, doc: str, unit: str = "", choices: tuple[str, ...] = ()) -> Column:
    return Column(name, "str", unit, doc, choices)


def _i(name: str, unit: str, doc: str, lo: float | None = 0) -> Column:
    return Column(name, "int", unit, doc, bounds=(lo, None))


def _f(name: str, unit: str, doc: str, lo: float | None = 0, hi: float | None = None) -> Column:
    return Column(name, "float", unit, doc, bounds=(lo, hi))


_MACS = "conv + linear MACs (fvcore counting, gathers/permutations count 0)"
_BN = "MACs plus 2 per BatchNorm output element (the GKP paper's convention)"
_PARAMS = "all parameters, BatchNorm affine included"
_RED = "reduction vs dense: 100 * (1 - pruned / dense)"

SCHEMA: tuple[Column, ...] = (
    _s("date", "when the row was produced, e.g. 2025-01-31T12:00:00Z", "ISO-8601 UTC"),
    _s("source", "measured here, or reported by a paper", choices=("measured", "reported")),
    _s("method", "registered method name (or the paper's name for reported rows)"),
    _s(
        "granularity",
        "what the method removes",
        choices=("weight", "kernel", "grouped_kernel", "filter", "channel"),
    ),
    _s(
        "faithfulness",
        "how closely the code follows its paper; baseline = dense reference",
        choices=("faithful", "reconstructed", "variant", "baseline"),
    ),
    _s("options", 'native knobs and named deviations, e.g. `{"groups":8,"rate":0.4375}`', "JSON"),
    _s("model", "model name"),
    _s("dataset", "dataset name"),
    _s("recipe", "training / fine-tuning recipe name"),
    _i("seed", "", "random seed of pruning and fine-tuning", lo=None),
    _f(
        "target",
        "fraction",
        "PruneTarget: fraction of target-layer MACs to remove; empty if native knobs given",
        hi=1,
    ),
    _i("finetune_epochs", "epochs", "fine-tuning epochs after pruning"),
    _s("snapshot_window", "training snapshots used, e.g. '2-4 of 15'; empty if unused", "epochs"),
    _i("macs_dense", "MACs", f"dense model: {_MACS}"),
    _i("macs", "MACs", f"pruned deploy form: {_MACS}"),
    _f("macs_reduction_pct", "%", f"MACs {_RED}; never negative", hi=100),
    _i("macs_bn_dense", "MACs", f"dense model: {_BN}"),
    _i("macs_bn", "MACs", f"pruned deploy form: {_BN}"),
    _f("macs_bn_reduction_pct", "%", f"BN-inclusive MACs {_RED}; never negative", hi=100),
    _i("params_dense", "params", f"dense model: {_PARAMS}"),
    _i("params", "params", f"pruned deploy form: {_PARAMS}"),
    _f("params_reduction_pct", "%", f"params {_RED}; never negative", hi=100),
    _i(
        "macs_nonzero",
        "MACs",
        "MACs of non-zero weights (masked methods); equals macs if deployed dense",
    ),
    _i(
        "params_nonzero",
        "params",
        "non-zero params (masked methods); equals params if deployed dense",
    ),
    _f("top1_dense", "%", "top-1 accuracy of the dense model", hi=100),
    _f("top1_pruned_before_ft", "%", "top-1 right after pruning, before fine-tuning", hi=100),
    _f("top1", "%", "top-1 after the final fine-tuning epoch", hi=100),
    _f("top1_best", "%", "best top-1 over fine-tuning epochs (the papers' convention)", hi=100),
    _f("top5", "%", "top-5 after the final fine-tuning epoch", hi=100),
    _s("device", "where latency was measured", choices=("cpu", "cuda")),
    _i("threads", "threads", "torch intra-op threads during timing", lo=1),
    _i("bench_batch", "images", "batch size of the throughput (bN) measurement", lo=1),
    _f("latency_b1_ms", "ms", "median latency of the pruned model at batch 1"),
    _f("latency_b1_iqr_ms", "ms", "interquartile range of that latency"),
    _f("latency_b1_dense_ms", "ms", "median latency of the dense model at batch 1, same run"),
    _f("speedup_b1", "x", "latency_b1_dense_ms / latency_b1_ms"),
    _f("latency_bN_ms", "ms", "median latency of the pruned model at batch bench_batch"),
    _f("latency_bN_iqr_ms", "ms", "interquartile range of that latency"),
    _f("latency_bN_dense_ms", "ms", "median latency of the dense model at bench_batch, same run"),
    _f("speedup_bN", "x", "latency_bN_dense_ms / latency_bN_ms"),
    _f("prune_seconds", "s", "wall time of the pruning step"),
    _f("train_seconds", "s", "wall time of (fine-)training"),
    _s("cpu_name", "CPU model"),
    _s("gpu_name", "GPU model; empty on CPU-only machines"),
    _s("torch_version", "torch.__version__"),
    _s("git_commit", "commit of this repository that produced the row"),
    _s("command", "the exact gkp-bench command line that produced the row"),
    _s("reference", "paper the method comes from (or the reported number's source)"),
    _s(
        "run_id",
        "id of the run that produced the row, so that a copied row or a re-run is recognised; "
        "rows older than this column: 'legacy-' + 12 hex of the sha256 of their CSV line",
    ),
    _s(
        "prune_commit",
        "commit that pruned the model when it differs from git_commit (a reused pruned "
        "checkpoint); else empty",
    ),
    _s(
        "prune_info",
        "what the method decided that is not a knob, e.g. dropped clustering candidates; "
        "`deploy`: how the latency columns were timed (`--deploy` and what it chose; absent: "
        "`torch`); `{}` when nothing",
        "JSON",
    ),
)
COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA)
BY_NAME = {c.name: c for c in SCHEMA}

# Past headers, oldest first: COLUMNS as it was before columns were added at its end.
LEGACY_HEADERS: tuple[tuple[str, ...], ...] = (COLUMNS[: COLUMNS.index("reference") + 1],)

REQUIRED = ("date", "source", "method", "granularity", "faithfulness", "model", "dataset")
REQUIRED_MEASURED = (  # checked on every append, and on stored measured rows with a run_id
    "recipe",
    "seed",
    "finetune_epochs",
    "macs_dense",
    "macs",
    "macs_reduction_pct",
    "params_dense",
    "params",
    "params_reduction_pct",
    "top1_dense",
    "top1_pruned_before_ft",
    "top1",
    "git_commit",
    "command",
    "run_id",
)
# Stored measured rows without a run_id were written before it existed, under this older rule.
REQUIRED_MEASURED_LEGACY = ("recipe", "seed", "macs", "params", "top1")
REQUIRED_REPORTED = ("reference",)
PCT_TOLERANCE = 0.05  # percentage points allowed between a stored reduction and its recomputation
SPEEDUP_RTOL = 0.02  # relative tolerance between a stored speed-up and dense / pruned latency
DERIVED = (
    ("macs_reduction_pct", "macs_dense", "macs"),
    ("macs_bn_reduction_pct", "macs_bn_dense", "macs_bn"),
    ("params_reduction_pct", "params_dense", "params"),
)
SPEEDUPS = (
    ("speedup_b1", "latency_b1_dense_ms", "latency_b1_ms"),
    ("speedup_bN", "latency_bN_dense_ms", "latency_bN_ms"),
)

LITERATURE_SCHEMA: tuple[Column, ...] = (
    *(
        BY_NAME[n]
        for n in (
            "model",
            "dataset",
            "method",
            "granularity",
            "top1_dense",
            "top1",
            "macs_reduction_pct",
            "params_reduction_pct",
            "reference",
        )
    ),
    _s("where_read", "where in the source the numbers were read, and how they were counted"),
)
LITERATURE_REQUIRED = ("model", "dataset", "method", "granularity", "top1", "reference")


def schema_markdown() -> str:
    """The column table (name, type, unit, meaning) that results/README.md embeds."""
    lines = ["| column | type | unit | meaning |", "|---|---|---|---|"]
    for col in SCHEMA:
        doc = col.doc + (
            f". One of: {', '.join(f'`{c}`' for c in col.choices)}." if col.choices else ""
        )
        lines.append(f"| `{col.name}` | {col.dtype} | {col.unit} | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"

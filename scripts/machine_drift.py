"""How much faster or slower the machine ran between two latency-suite runs.

    .venv/bin/python scripts/machine_drift.py first.json first2.json

For every test in both ``--benchmark-json`` files, the ratio of the second run's dense median to
the first's (the same dense network, backend, batch and threads: only the machine changed),
summarised as the median ratio per model, backend and batch. Suite wall times and absolute
latencies are comparable across runs only where these ratios are near 1; speed-ups, which
time dense and pruned interleaved in one test, are not affected.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def dense_ms(path: Path) -> dict[str, dict]:
    benchmarks = json.loads(path.read_text())["benchmarks"]
    return {b["name"]: b["extra_info"] for b in benchmarks if "dense_ms" in b["extra_info"]}


def drift(first: Path, second: Path) -> dict[tuple, float]:
    a, b = dense_ms(first), dense_ms(second)
    ratios: dict[tuple, list[float]] = {}
    for name in a.keys() & b.keys():
        key = (a[name]["model"], a[name]["backend"], a[name]["batch"], a[name]["threads"])
        ratios.setdefault(key, []).append(b[name]["dense_ms"] / a[name]["dense_ms"])
    return {k: statistics.median(v) for k, v in sorted(ratios.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    for (model, backend, batch, threads), r in drift(args.first, args.second).items():
        print(f"{model:9s} {backend:12s} batch {batch:3d} threads {threads}: dense x{r:.2f}")


if __name__ == "__main__":
    main()

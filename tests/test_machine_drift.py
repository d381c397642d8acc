"""scripts/machine_drift.py and scripts/aa_check.py: comparing runs, and the A/A noise floor."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import machine_drift  # noqa: E402


def _run(path: Path, dense: dict[str, float]) -> Path:
    benchmarks = [
        {
            "name": name,
            "extra_info": {
                "model": name.split("-")[0],
                "backend": "eager",
                "batch": 1,
                "threads": 2,
                "dense_ms": ms,
            },
        }  # fmt: skip
        for name, ms in dense.items()
    ]
    benchmarks.append({"name": "prune-speed", "extra_info": {"seconds": 3.0}})  # no dense: skipped
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_drift_is_the_median_ratio_of_the_same_tests(tmp_path):
    first = _run(tmp_path / "a.json", {"resnet56-x": 2.0, "resnet56-y": 4.0, "resnet56-z": 1.0,
                                       "resnet50-x": 10.0})  # fmt: skip
    second = _run(tmp_path / "b.json", {"resnet56-x": 3.0, "resnet56-y": 4.4, "resnet56-z": 2.0,
                                        "resnet56-only-here": 9.0})  # fmt: skip
    got = machine_drift.drift(first, second)
    assert got == {("resnet56", "eager", 1, 2): 1.5}  # median of 1.5, 1.1, 2.0; resnet50 unpaired


def test_aa_check_times_two_preparations_of_one_dense_network():
    import aa_check

    ratios = aa_check.aa_ratios("resnet56", "eager", batch=1, rounds=2, repeat=2, threads=1)
    assert len(ratios) == 2 and all(r > 0 and m > 0 and i is None for r, m, i in ratios)
    ((r, m, (low, high)),) = aa_check.aa_ratios("resnet56", "eager", batch=1, rounds=6, repeat=1,
                                                threads=1)  # fmt: skip
    assert 0 < low <= min(r, m) <= max(r, m) <= high  # 6 rounds: smallest, largest round ratio

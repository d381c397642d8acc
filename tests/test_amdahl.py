"""scripts/amdahl_bound.py: per-layer MACs by hand, per-layer times, Amdahl's bound."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import amdahl_bound  # noqa: E402


def small() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).eval()  # fmt: skip


def test_layer_macs_are_the_hand_counts():
    macs = amdahl_bound.layer_macs(small(), torch.zeros(1, 3, 4, 4))
    # outputs x inputs read per output: 8*16 x 3*9, 16*16 x (8/2)*9, 10 x 256
    assert macs == {"0": 8 * 16 * 27, "2": 16 * 16 * 36, "4": 10 * 256}


def test_layer_times_cover_the_named_layers_within_the_whole_call():
    per, total = amdahl_bound.layer_times(small(), ["0", "2"], torch.randn(4, 3, 4, 4), 5, 1)
    assert set(per) == {"0", "2"} and all(v > 0 for v in per.values())
    assert sum(per.values()) < total


@pytest.mark.parametrize("pruned,p,want", [(0.0, 0.5, 1.0), (10.0, 0.5, 2.0), (5.0, 0.75, 1.6)])
def test_bound_is_amdahl(pruned, p, want):
    assert amdahl_bound.bound(10.0, pruned, p) == pytest.approx(want)


def test_csv_keeps_other_configurations_and_prints_back(tmp_path):
    row = {"model": "resnet50", "batch": 16, "threads": 1, "rounds": 3, "dense_ms": 10.0,
           "dense_unhooked_ms": 9.5, "convs_ms": 9.0, "pruned_layers": 16,
           "pruned_layers_ms": 3.0, "share": 0.3, "ideal_p0.4375": 1.25, "bound_p0.4375": 1.15,
           "ideal_p0.75": 1.51, "bound_p0.75": 1.29, "cpu_name": "EPYC"}  # fmt: skip
    path = tmp_path / "amdahl.csv"
    amdahl_bound.write_rows(path, [row, {**row, "threads": 2}])
    amdahl_bound.write_rows(path, [{**row, "dense_ms": 12.0}])  # replaces the 1-thread row
    text = amdahl_bound.read_table(path)
    assert text == amdahl_bound.table([{**row, "threads": 2}, {**row, "dense_ms": 12.0}])
    assert "| resnet50 | 16 | 2 | 10.0 (9.5) | 30.0% (16 layers) | 1.25× / 1.15× |" in text

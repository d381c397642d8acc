"""scripts/core_latency.py: the cache-line round trip between two CPUs, and its refusals."""

import math
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import core_latency  # noqa: E402

ALLOWED = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs")
compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")),
    reason="needs a C++ compiler",
)


@two_cpus
@compiler
def test_a_round_trip_takes_between_a_nanosecond_and_a_millisecond():
    ns = core_latency.round_trip_ns((ALLOWED[0], ALLOWED[1]), batches=5)
    assert math.isfinite(ns) and 1.0 < ns < 1e6


@two_cpus
@pytest.mark.parametrize(
    "cpus,batches,message",
    [((0, 0), 5, "two different CPUs"), ((ALLOWED[0], 10**6), 5, "may run on"),
     (None, 0, "batches must be at least 1")],
)  # fmt: skip
def test_bad_cpus_or_batches_are_refused(cpus, batches, message):
    cpus = (ALLOWED[0], ALLOWED[0]) if cpus == (0, 0) else cpus
    with pytest.raises(ValueError, match=message):
        core_latency.round_trip_ns(cpus, batches)


def test_the_cli_names_a_malformed_cpu_pair(capsys):
    with pytest.raises(SystemExit):
        core_latency.main(["--cpus", "0-1"])
    assert "two CPU numbers" in capsys.readouterr().err

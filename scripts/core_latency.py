"""Round-trip time of a cache line between two CPUs: how far apart the machine's cores are now.

Two threads, pinned to the two CPUs, hand a counter back and forth through one cache line
(release store, acquire spin) in batches of 1000 round trips; the median batch gives
nanoseconds per round trip. Cores that share a cache answer in tens of nanoseconds; cores
farther apart (another core complex, another socket) in hundreds. On a virtual machine the
answer can change while a program runs, when the host moves its virtual CPUs:
``scripts/phase_probe.py --core-latency`` prints it beside each timing window (README, "Deploy
speed"). The small C++ program is compiled once with ``g++`` (or ``$CXX``) into
``~/.cache/gkp-bench/core_latency``::

    .venv/bin/python scripts/core_latency.py [--cpus 0,1] [--batches 200]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <pthread.h>
#include <thread>
#include <vector>

alignas(64) static std::atomic<long> flag{0};

static bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const int a = atoi(argv[1]), b = atoi(argv[2]), batches = atoi(argv[3]), per = 1000;
  const long total = long(batches) * per;
  bool partner_pinned = false;  // written by the partner alone, read after join()
  std::thread partner([&] {
    partner_pinned = pin(b);
    for (long i = 0; i < total; ++i) {
      while (flag.load(std::memory_order_acquire) != 2 * i + 1) {}
      flag.store(2 * i + 2, std::memory_order_release);
    }
  });
  const bool pinned = pin(a);
  std::vector<double> ns;
  long i = 0;
  for (int k = 0; k < batches; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int j = 0; j < per; ++j, ++i) {
      flag.store(2 * i + 1, std::memory_order_release);
      while (flag.load(std::memory_order_acquire) != 2 * i + 2) {}
    }
    const auto t1 = std::chrono::steady_clock::now();
    ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / per);
  }
  partner.join();
  if (!pinned || !partner_pinned) return 3;
  std::sort(ns.begin(), ns.end());
  std::printf("%.2f\n", ns[ns.size() / 2]);
  return 0;
}
"""


def _binary() -> Path:
    """The compiled program (built on first use, keyed by its source)."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "gkp-bench" / "core_latency"
    exe = folder / f"round_trip-{digest}"
    if exe.exists():
        return exe
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("core_latency needs a C++ compiler (g++); install one or set CXX")
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"round_trip-{digest}.cpp"
    src.write_text(SOURCE)
    tmp = folder / f"{exe.name}.{os.getpid()}.tmp"
    done = subprocess.run(
        [cxx, "-O2", "-std=c++17", "-pthread", str(src), "-o", str(tmp)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"core_latency: {cxx} failed: {done.stderr[-500:]}")
    tmp.replace(exe)  # atomic: a concurrent build never runs a half-written program
    return exe


def default_cpus() -> tuple[int, int]:
    """The first two CPUs this process may run on (ValueError with fewer than two)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise ValueError(f"core_latency needs two CPUs; this process may run on {allowed} only")
    return allowed[0], allowed[1]


def round_trip_ns(cpus: tuple[int, int] | None = None, batches: int = 200) -> float:
    """Median nanoseconds for one cache-line round trip between ``cpus`` (default:
    :func:`default_cpus`) over ``batches`` batches of 1000. ValueError for CPUs this process
    may not run on, the same CPU twice, or ``batches`` under 1."""
    a, b = cpus if cpus is not None else default_cpus()
    allowed = os.sched_getaffinity(0)
    if a == b or a not in allowed or b not in allowed:
        raise ValueError(
            f"core_latency needs two different CPUs this process may run on "
            f"({sorted(allowed)}), got {a} and {b}"
        )
    if batches < 1:
        raise ValueError(f"core_latency: batches must be at least 1, got {batches}")
    done = subprocess.run(
        [str(_binary()), str(a), str(b), str(batches)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"core_latency: the program failed (exit {done.returncode})")
    return float(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default=None, help="two CPUs, e.g. 0,1 (default: the first two)")
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args(argv)
    cpus = None
    if args.cpus is not None:
        parts = args.cpus.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            parser.error(f"--cpus takes two CPU numbers, e.g. 0,1; got {args.cpus!r}")
        cpus = (int(parts[0]), int(parts[1]))
    try:
        print(f"{round_trip_ns(cpus, args.batches):.1f} ns per round trip")
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()

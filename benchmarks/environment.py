"""Where a measurement was taken: CPU/GPU names, library versions, the repository commit."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from pathlib import Path

import torch


@cache
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: torch.device | str | None = None) -> str:
    if not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(device if device is not None else 0)


@cache
def git_commit() -> str:
    """The commit of this checkout, '+dirty' when code (anything outside results/, which the runs
    themselves write) has uncommitted changes; 'unknown (not a git checkout)' outside one."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + ("+dirty" if dirty.strip() else "")


def environment(device: torch.device) -> dict[str, object]:
    """The leaderboard's environment columns for a run on ``device``."""
    return {
        "cpu_name": cpu_name(),
        "gpu_name": gpu_name(device) if device.type == "cuda" else "",
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
    }

"""Writing files so that a crash or ``kill -9`` never leaves a half-written one behind.

One helper for every file the project writes in place (checkpoints, the leaderboard, CSVs):
write a temporary sibling, ``fsync`` it, rename it over the target, ``fsync`` the folder. A
symlinked target is resolved first, so the link survives and every writer, whichever path it
was given, replaces the same real file. Temporary files of a writer that was killed are named
``.<name>.<random>.tmp`` and are removed by the next write of the same file.

Writers that read, modify and replace a shared file (the leaderboard) serialise with
:func:`exclusive_lock`, an ``flock`` on the sibling ``<name>.lock`` of the *real* file, so that
writers given a symlink and writers given the real path take the same lock.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"


def real_path(path: str | os.PathLike) -> Path:
    """``path`` with symlinks resolved (also when the file itself does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def orphaned_temps(path: str | os.PathLike) -> list[Path]:
    """Temporary files an interrupted ``atomic_write`` of ``path`` left behind."""
    path = real_path(path)
    if not path.parent.is_dir():
        return []
    prefix = _tmp_prefix(path)
    return sorted(
        p
        for p in path.parent.iterdir()
        if p.name.startswith(prefix) and p.name.endswith(TMP_SUFFIX)
    )


def remove_orphaned_temps(path: str | os.PathLike) -> int:
    """Delete what :func:`orphaned_temps` finds; returns how many were removed.

    Call it only where no other writer of ``path`` can be mid-write (under the file's lock, or
    for files one run owns, such as its checkpoints).
    """
    removed = 0
    for tmp in orphaned_temps(path):
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` by what ``write(handle)`` writes: readers see the old or the new file.

    The target is resolved through symlinks; the new file keeps the old one's permissions
    (0644 for a new file). Returns the real path written.
    """
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write(path, lambda handle: handle.write(data))


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<real path>.lock`` and yield the real path.

    The lock file is a sibling (never the data file itself, which :func:`atomic_write` replaces)
    of the symlink-resolved target, so every writer of the same file takes the same lock.
    """
    real = real_path(path)
    real.parent.mkdir(parents=True, exist_ok=True)
    with open(real.with_name(real.name + LOCK_SUFFIX), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield real
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

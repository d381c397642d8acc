"""Finding and reading the datasets' files; the public API is in :mod:`gkp.data`.

Readers parse the datasets' own formats (MNIST-style idx files here, CIFAR's pickled batches in
:mod:`gkp.cifar`) instead of going through torchvision's classes, so small files written by tests
load (torchvision checks md5 sums) and so a corrupt file fails with a message that names it.
torchvision is used only to download and for ImageNet's ``ImageFolder`` (:mod:`gkp.imagenet`).
This module also holds what they share: the search-then-download logic and its error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from gkp.loaders import Split

DEFAULT_DATA_DIR = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES, IDX_LABELS = 2051, 2049  # idx magic numbers: unsigned bytes, 3 and 1 dimensions
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
T = TypeVar("T")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message lists every place and the fixes."""


def not_found(title: str, searched: Sequence[Path], fixes: Sequence[str]) -> DatasetNotFoundError:
    """Build the error whose message says where we looked and how to get the data."""
    where = "\n".join(f"  - {p}" for p in searched)
    how = "\n".join(f"  - {f}" for f in fixes)
    return DatasetNotFoundError(f"{title}\nSearched:\n{where}\nTo get it:\n{how}")


def absolute(path: str | Path) -> Path:
    """Absolute path without resolving symlinks, so messages show the path the user typed."""
    return Path(os.path.abspath(Path(path).expanduser()))


def locate(
    title: str,
    searched: Sequence[Path],
    find: Callable[[Path], T | None],
    fixes: Sequence[str],
    download: tuple[str, Path, Path] | None = None,
) -> T:
    """``find`` on each folder in turn; failing that, download and look again, else raise.

    ``download`` is (torchvision class, root, folder the files land in). The class is called as
    ``cls(root, train=True, download=True)``; any failure of it (no network, checksum) becomes a
    DatasetNotFoundError chained to the original error.
    """
    for folder in searched:
        if (hit := find(folder)) is not None:
            return hit
    if download is None:
        raise not_found(f"{title} not found.", searched, fixes)
    import torchvision.datasets as tvd

    class_name, root, target = download
    try:
        getattr(tvd, class_name)(str(root), train=True, download=True)
    except Exception as err:  # any failure means "not available"; the cause is chained
        msg = f"{title}: download into {root} failed ({err!r})."
        raise not_found(msg, searched, fixes) from err
    if (hit := find(target)) is None:
        raise not_found(f"{title}: downloaded, but no files in {target}.", searched, fixes)
    return hit


def check_labels(labels: Tensor, num_classes: int, path: Path) -> None:
    """Refuse labels outside 0..num_classes-1 now, not as an index error deep in training."""
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{path}: label {int(labels[i])} at position {i} is outside the valid range "
            f"0..{num_classes - 1} ({num_classes} classes); the file is corrupt or belongs to "
            "another dataset"
        )


# ---------------------------------------------------------------- Fashion-MNIST (idx files)


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # gzip magic; the file is stored uncompressed
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from err


def read_idx(path: Path, magic: int) -> Tensor:
    """Read an idx file of unsigned bytes (gzip or plain), checking its magic number and size."""
    raw = _read_maybe_gzip(path)
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise ValueError(f"{path}: idx magic number {found}, expected {magic}: wrong or corrupt")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(
            f"{path}: truncated or corrupt idx file, header says {dims} = {int(np.prod(dims))} "
            f"values but it holds {len(raw) - header}"
        )
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy())


def fashion_candidates(data_dir: Path | None) -> list[Path]:
    """Folders searched, in order. An explicit data_dir is authoritative: no fallback elsewhere."""
    if data_dir is not None:
        d = absolute(data_dir)
        return [d, d / "fashion-mnist", d / "FashionMNIST" / "raw"]
    local = absolute(DEFAULT_DATA_DIR)
    return [DEBIAN_FASHION_MNIST, local / "fashion-mnist", local / "FashionMNIST" / "raw"]


def _fashion_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    stems = [s for pair in FASHION_FILES.values() for s in pair]
    files = {s: _fashion_file(folder, s) for s in stems}
    return None if None in files.values() else files  # type: ignore[return-value]


def find_fashion_mnist(data_dir: Path | None, download: bool) -> dict[str, Path]:
    """Paths of the four idx files, searching :func:`fashion_candidates`, else downloading."""
    searched = fashion_candidates(data_dir)
    root = absolute(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    names = ", ".join(f"{s}.gz" for pair in FASHION_FILES.values() for s in pair)
    fixes = [
        f"Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (files in "
        f"{DEBIAN_FASHION_MNIST}/), then leave data_dir / --data-dir unset",
        f"or pass download=True (CLI --download) to fetch it with torchvision into "
        f"{root / 'FashionMNIST' / 'raw'}",
        f"or put {names} (gzip or uncompressed) in one folder and pass it as data_dir "
        "(CLI --data-dir)",
    ]
    fetch = ("FashionMNIST", root, root / "FashionMNIST" / "raw") if download else None
    return locate("fashion-mnist", searched, _fashion_files, fixes, fetch)


def read_fashion_mnist(files: dict[str, Path], num_classes: int = 10) -> tuple[Split, Split]:
    """Train and test splits as (uint8 N x 1 x 28 x 28, int64 N)."""
    splits = []
    for image_stem, label_stem in FASHION_FILES.values():
        images = read_idx(files[image_stem], IDX_IMAGES).unsqueeze(1)
        labels = read_idx(files[label_stem], IDX_LABELS).long()
        check_labels(labels, num_classes, files[label_stem])
        if len(images) != len(labels):
            raise ValueError(f"{files[image_stem]}: {len(images)} images but {len(labels)} labels")
        splits.append((images, labels))
    return splits[0], splits[1]


# ---------------------------------------------------------------- synthetic


SYNTHETIC_SEED = 20240611  # the data are fixed; load_data's seed only orders and subsets them


def synthetic_split(n: int, split: int, num_classes: int = 10, size: int = 32) -> Split:
    """``n`` learnable images: a fixed smooth pattern per class + per-pixel Gaussian noise.

    Patterns are random 4x4 colour fields upsampled to ``size`` (smooth, so the 4-pixel shifts
    of augmentation keep the class recognisable). Labels are balanced. ``split`` picks an
    independent noise stream (0 train, 1 test).
    """
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1
    patterns = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")
    g.manual_seed(SYNTHETIC_SEED + 1 + split)
    labels = torch.randperm(n, generator=g) % num_classes
    noise = torch.randn(n, 3, size, size, generator=g)
    images = 128 + 64 * patterns[labels] + 48 * noise
    return images.round().clamp(0, 255).to(torch.uint8), labels

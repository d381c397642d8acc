"""Finding and reading the datasets' files; the public API is in :mod:`gkp.data`.

Readers parse the datasets' own formats (CIFAR's pickled batches, MNIST-style idx files) instead
of going through torchvision's classes, so small files written by tests load (torchvision checks
md5 sums) and so a corrupt file fails with a message that names it. torchvision is used only to
download and for ImageNet's ``ImageFolder``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

DEFAULT_DATA_DIR = Path("data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_IMAGES, IDX_LABELS = 2051, 2049  # idx magic numbers: unsigned bytes, 3 and 1 dimensions
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# name -> (extracted folder, train files, test file, labels key, torchvision class)
CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels", "CIFAR100"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/{}.tar.gz"
CIFAR_ARCHIVE = {"cifar10": "cifar-10-python", "cifar100": "cifar-100-python"}

Split = tuple[Tensor, Tensor]  # (uint8 images N x C x H x W, int64 labels N)
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


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch): each epoch's order is reproducible on resume."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


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


# ---------------------------------------------------------------- CIFAR (python pickle format)


def _key(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """Look up ``key`` whether the pickle stored it as bytes (the real files) or str."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: not a CIFAR batch, it has no {key!r} entry")


def read_cifar_batch(path: Path, labels_key: str) -> Split:
    """Read one pickled CIFAR batch: ``data`` uint8 (N, 3072) row-major RGB, labels list."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({err})") from err
    data = np.asarray(_key(batch, "data", path), dtype=np.uint8)
    labels = np.asarray(_key(batch, labels_key, path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: data {data.shape} / {len(labels)} labels, want (N, 3072) / N")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def cifar_candidates(name: str, data_dir: Path) -> list[Path]:
    """Folders that may hold the extracted files: ``<dir>/<extracted folder>`` or ``<dir>``."""
    return [data_dir / CIFAR_LAYOUT[name][0], data_dir]


def _cifar_folder(name: str) -> Callable[[Path], Path | None]:
    _, train, test, _, _ = CIFAR_LAYOUT[name]
    return lambda folder: folder if all((folder / f).is_file() for f in (*train, test)) else None


def find_cifar(name: str, data_dir: Path | None, download: bool) -> Path:
    """The folder with CIFAR's extracted batches; downloads with torchvision if asked to."""
    root = absolute(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    searched = cifar_candidates(name, root)
    _, train, test, _, tv_class = CIFAR_LAYOUT[name]
    archive = CIFAR_URL.format(CIFAR_ARCHIVE[name])
    fixes = [
        f"pass download=True (CLI --download) to fetch it with torchvision into {root}",
        f"or, on a machine with internet, get {archive} and extract it under {root} "
        f"(tar xzf {Path(archive).name} -C {root}), giving {searched[0]}/"
        f"{{{','.join((*train, test))}}}",
        "or pass data_dir (CLI --data-dir) pointing at the folder that holds it",
    ]
    fetch = (tv_class, root, searched[0]) if download else None
    return locate(name, searched, _cifar_folder(name), fixes, fetch)


def read_cifar(name: str, folder: Path) -> tuple[Split, Split]:
    """Train and test splits of CIFAR-10/100 from the extracted python batches."""
    _, train_files, test_file, key, _ = CIFAR_LAYOUT[name]
    parts = [read_cifar_batch(folder / f, key) for f in train_files]
    train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return train, read_cifar_batch(folder / test_file, key)


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


def read_fashion_mnist(files: dict[str, Path]) -> tuple[Split, Split]:
    """Train and test splits as (uint8 N x 1 x 28 x 28, int64 N)."""
    splits = []
    for image_stem, label_stem in FASHION_FILES.values():
        images = read_idx(files[image_stem], IDX_IMAGES).unsqueeze(1)
        labels = read_idx(files[label_stem], IDX_LABELS).long()
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


# ---------------------------------------------------------------- ImageNet (ImageFolder)


def find_imagenet(data_dir: Path | None, download: bool) -> Path:
    """The folder with ``train/`` and ``val/`` class subfolders: ``<dir>`` or ``<dir>/imagenet``."""
    root = absolute(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    searched = [root, root / "imagenet"]
    for folder in searched:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            return folder
    fixes = [
        "ImageNet cannot be downloaded automatically (its licence needs a login at "
        "https://image-net.org); download=True does not help",
        "extract ILSVRC2012 so that each split has one folder per class (for val, sort the "
        "images into class folders, e.g. with the well-known valprep.sh): "
        "<dir>/train/n01440764/*.JPEG ... and <dir>/val/n01440764/*.JPEG ...",
        "then pass that <dir> as data_dir (CLI --data-dir)",
    ]
    title = "imagenet not found" + (" (download=True is not supported)." if download else ".")
    raise not_found(title, searched, fixes)


def seeded_subset(n_total: int, n: int | None, seed: int) -> Tensor | None:
    """Sorted indices of a seeded random subset of size ``n`` (None means all)."""
    if n is None:
        return None
    if not 0 < n <= n_total:
        raise ValueError(f"subset size {n} must be in [1, {n_total}]")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


class EpochDataLoader:
    """A torch DataLoader whose shuffle order (and worker seeds) depend only on (seed, epoch)."""

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool, seed: int, workers: int):
        self._generator = torch.Generator()
        self._seed, self._epoch = seed, 0
        self.num_samples = len(dataset)
        self.batch_size = batch_size
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            generator=self._generator,
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use ``epoch``'s order (for resuming a run)."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self._generator.manual_seed(epoch_seed(self._seed, self._epoch))
        self._epoch += 1
        yield from self._loader


def imagenet_loaders(
    folder: Path, spec_mean: Sequence[float], spec_std: Sequence[float], opts: Any
) -> tuple[EpochDataLoader, EpochDataLoader]:
    """Train/val loaders over ImageFolders with the standard ImageNet transforms."""
    from torchvision import datasets
    from torchvision import transforms as tvt

    norm = [tvt.ToTensor(), tvt.Normalize(spec_mean, spec_std)]
    evaluate = tvt.Compose([tvt.Resize(256), tvt.CenterCrop(224), *norm])
    fit = tvt.Compose([tvt.RandomResizedCrop(224), tvt.RandomHorizontalFlip(), *norm])
    train = datasets.ImageFolder(str(folder / "train"), fit if opts.augment else evaluate)
    val = datasets.ImageFolder(str(folder / "val"), evaluate)
    if train.classes != val.classes:
        raise ValueError(f"{folder}: train/ and val/ have different class folders")
    sets = []
    for ds, n, seed in ((train, opts.subset, opts.seed), (val, opts.test_subset, opts.seed + 1)):
        idx = seeded_subset(len(ds), n, seed)
        sets.append(ds if idx is None else torch.utils.data.Subset(ds, idx.tolist()))
    return (
        EpochDataLoader(sets[0], opts.batch_size, True, opts.seed, opts.num_workers),
        EpochDataLoader(sets[1], opts.eval_batch_size, False, opts.seed, opts.num_workers),
    )

"""CIFAR-10/100 from their python batches, read with an unpickler that cannot run code.

``pickle.load`` on a downloaded file runs whatever the file asks for; :class:`CifarUnpickler`
resolves only the few numpy globals a CIFAR batch needs (real files are protocol-2 pickles written
by Python 2 with numpy arrays) and refuses everything else, naming the file.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gkp._datasets import DEFAULT_DATA_DIR, absolute, check_labels, locate
from gkp.loaders import Split

__all__ = [
    "CIFAR_LAYOUT",
    "CIFAR_PICKLE_GLOBALS",
    "CifarUnpickler",
    "UnsafePickleError",
    "batch_entry",
    "cifar_candidates",
    "find_cifar",
    "load_cifar_pickle",
    "read_cifar",
    "read_cifar_batch",
]

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


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch needs: numpy's array, dtype and scalar reconstruction.

    Listed under both module names numpy has used (``numpy.core`` before 2.0, ``numpy._core``
    after), resolved to the running numpy's objects; ``_codecs.encode`` is how Python 3 writes
    bytes at pickle protocols 0-2.
    """
    core = getattr(np, "_core", None) or np.core
    found: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        found[(f"{prefix}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        found[(f"{prefix}.multiarray", "scalar")] = core.multiarray.scalar
        found[(f"{prefix}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return found


CIFAR_PICKLE_GLOBALS = _numpy_globals()


class UnsafePickleError(ValueError):
    """A pickle asked for a global that a dataset file has no business loading."""


class CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that loads only what CIFAR batches hold: dicts, lists, bytes, str,
    ints and numpy arrays. Any other global (a function to call, a class to build) is refused
    before it is looked up, since unpickling it could run arbitrary code.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = CIFAR_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self.path}: refused to load the global {module}.{name} from this pickle; a "
                "CIFAR batch holds only dicts, lists, bytes, ints and numpy arrays, so the file "
                "is corrupt or not a CIFAR batch (it could run code if loaded with pickle.load)"
            )
        return allowed


def load_cifar_pickle(path: Path) -> dict[Any, Any]:
    """The dict of one CIFAR batch file, through :class:`CifarUnpickler`."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR batch, it holds a {type(batch).__name__}")
    return batch


def batch_entry(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """Look up ``key`` whether the pickle stored it as bytes (the real files) or str."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: not a CIFAR batch, it has no {key!r} entry")


def read_cifar_batch(path: Path, labels_key: str, num_classes: int) -> Split:
    """Read one pickled CIFAR batch: ``data`` uint8 (N, 3072) row-major RGB, labels list."""
    batch = load_cifar_pickle(path)
    data = np.asarray(batch_entry(batch, "data", path), dtype=np.uint8)
    labels = np.asarray(batch_entry(batch, labels_key, path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: data {data.shape} / {len(labels)} labels, want (N, 3072) / N")
    check_labels(torch.from_numpy(labels), num_classes, path)
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


def read_cifar(name: str, folder: Path, num_classes: int) -> tuple[Split, Split]:
    """Train and test splits of CIFAR-10/100 from the extracted python batches."""
    _, train_files, test_file, key, _ = CIFAR_LAYOUT[name]
    parts = [read_cifar_batch(folder / f, key, num_classes) for f in train_files]
    train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return train, read_cifar_batch(folder / test_file, key, num_classes)

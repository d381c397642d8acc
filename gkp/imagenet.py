"""ImageNet from ``ImageFolder`` trees, with the standard ResNet transforms and worker loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gkp._datasets import DEFAULT_DATA_DIR, absolute, not_found
from gkp.loaders import EpochDataLoader, check_subset_size, seeded_subset

__all__ = ["find_imagenet", "imagenet_loaders"]


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
    for split, ds, n, seed in (
        ("train", train, opts.subset, opts.seed),
        ("test", val, opts.test_subset, opts.seed + 1),
    ):
        check_subset_size("imagenet", split, n, len(ds))
        idx = seeded_subset(len(ds), n, seed)
        sets.append(ds if idx is None else torch.utils.data.Subset(ds, idx.tolist()))
    return (
        EpochDataLoader(sets[0], opts.batch_size, True, opts.seed, opts.num_workers),
        EpochDataLoader(sets[1], opts.eval_batch_size, False, opts.seed, opts.num_workers),
    )

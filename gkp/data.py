"""Datasets by name: shape/normalisation specs, one registry, and ``load_data``.

``load_data(name, ...)`` returns ``(train, test, spec)``. Both loaders are re-iterable (one pass is
one epoch), have ``len()`` = batches per epoch and yield ``(x, y)``: float32 NCHW normalised
images and int64 labels, on the CPU. Names are case-insensitive and ``_`` is ``-``; the spec's
``name`` is the canonical spelling (``fashion-mnist``).

The small datasets (CIFAR-10/100, Fashion-MNIST, synthetic) are held in memory by
:class:`~gkp.loaders.TensorLoader`; ImageNet uses ``ImageFolder`` and worker processes. The file
readers are in :mod:`gkp._datasets`, :mod:`gkp.cifar` and :mod:`gkp.imagenet`; the loaders,
augmentation and subsets in :mod:`gkp.loaders`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from gkp._datasets import (
    DatasetNotFoundError,
    find_fashion_mnist,
    read_fashion_mnist,
    synthetic_split,
)
from gkp.cifar import find_cifar, read_cifar
from gkp.imagenet import find_imagenet, imagenet_loaders
from gkp.loaders import (
    Loader,
    Split,
    TensorLoader,
    check_subset_size,
    random_calibration,
    random_crop_flip,
    stratified_subset,
    take_subset,
)
from gkp.registry import Registry, canonical

__all__ = [
    "DATASETS",
    "DataBundle",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Loader",
    "LoadOptions",
    "TensorLoader",
    "dataset_name",
    "example_input",
    "get_dataset_spec",
    "list_datasets",
    "load_data",
    "random_calibration",
    "random_crop_flip",
    "register_dataset",
    "stratified_subset",
    "tensor_loaders",
]


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset: classes, input shape and normalisation.

    ``mean``/``std`` are per channel, for pixel values scaled to [0, 1].
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class LoadOptions:
    """The keyword arguments of :func:`load_data`, as handed to a dataset's builder."""

    data_dir: Path | None = None
    download: bool = False
    subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    augment: bool = True
    num_workers: int = 2


class DataBundle(NamedTuple):
    """``(train, test, spec)``: unpacks like the tuple the trainer expects, fields by name too."""

    train: Loader
    test: Loader
    spec: DatasetSpec


Builder = Callable[[DatasetSpec, LoadOptions], tuple[Loader, Loader]]


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its spec (known without files) and its loader builder."""

    spec: DatasetSpec
    build: Builder

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``fashion-mnist`` for ``Fashion_MNIST``."""
        return self.spec.name


def dataset_name(name: str) -> str:
    """Canonical dataset name: stripped, lower case, ``_`` written as ``-``."""
    return canonical(name).replace("_", "-")


DATASETS: Registry[Dataset] = Registry("dataset", normalise=dataset_name)


def register_dataset(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[Builder], Builder]:
    """Register ``builder(spec, opts) -> (train_loader, test_loader)`` under ``name``.

    The spec is given here, so :func:`get_dataset_spec` needs no files. Duplicates raise.
    """
    key = dataset_name(name)
    spec = DatasetSpec(key, num_classes, in_channels, image_size, tuple(mean), tuple(std))
    return DATASETS.decorator(key, lambda build: Dataset(spec, build))


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset (``_`` and ``-``, upper and lower case are the same).

    Its ``name`` is the canonical spelling; an unknown name raises UnknownNameError.
    """
    return DATASETS[name].spec


def example_input(name: str, batch: int = 1) -> Tensor:
    """Zeros shaped like one batch of the dataset, e.g. for counting MACs."""
    s = get_dataset_spec(name)
    return torch.zeros(batch, s.in_channels, s.image_size, s.image_size)


def tensor_loaders(
    spec: DatasetSpec, opts: LoadOptions, train: Split, test: Split
) -> tuple[TensorLoader, TensorLoader]:
    """Subset (seeded, stratified) and wrap in-memory splits; the test split is never augmented.

    A subset larger than its split raises ValueError naming the option and the largest value.
    """
    check_subset_size(spec.name, "train", opts.subset, len(train[1]))
    check_subset_size(spec.name, "test", opts.test_subset, len(test[1]))
    train = take_subset(train, opts.subset, opts.seed)
    test = take_subset(test, opts.test_subset, opts.seed + 1)
    norm = {"mean": spec.mean, "std": spec.std}
    return (
        TensorLoader(
            *train,
            batch_size=opts.batch_size,
            shuffle=True,
            augment=opts.augment,
            seed=opts.seed,
            **norm,
        ),
        TensorLoader(*test, batch_size=opts.eval_batch_size, **norm),
    )


# ---------------------------------------------------------------- the datasets


@register_dataset(
    "cifar100",
    num_classes=100,
    in_channels=3,
    image_size=32,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
@register_dataset(
    "cifar10",
    num_classes=10,
    in_channels=3,
    image_size=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
def _cifar(spec: DatasetSpec, opts: LoadOptions) -> tuple[Loader, Loader]:
    """CIFAR from its python batches in data_dir (default ./data), downloaded if asked."""
    folder = find_cifar(spec.name, opts.data_dir, opts.download)
    return tensor_loaders(spec, opts, *read_cifar(spec.name, folder, spec.num_classes))


@register_dataset(
    "fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=(0.2860,), std=(0.3530,)
)
def _fashion_mnist(spec: DatasetSpec, opts: LoadOptions) -> tuple[Loader, Loader]:
    """Fashion-MNIST idx files: data_dir, else Debian's package path, else ./data."""
    files = find_fashion_mnist(opts.data_dir, opts.download)
    return tensor_loaders(spec, opts, *read_fashion_mnist(files, spec.num_classes))


@register_dataset(
    "imagenet",
    num_classes=1000,
    in_channels=3,
    image_size=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
def _imagenet(spec: DatasetSpec, opts: LoadOptions) -> tuple[Loader, Loader]:
    """ImageFolder train/ and val/ under data_dir; standard ResNet transforms."""
    folder = find_imagenet(opts.data_dir, opts.download)
    return imagenet_loaders(folder, spec.mean, spec.std, opts)


@register_dataset(
    "synthetic",
    num_classes=10,
    in_channels=3,
    image_size=32,
    mean=(0.510, 0.493, 0.501),
    std=(0.213, 0.212, 0.215),
)
def _synthetic(spec: DatasetSpec, opts: LoadOptions) -> tuple[Loader, Loader]:
    """Fixed learnable images (no files): subset / test_subset set the sizes (512 / 256)."""
    train = synthetic_split(opts.subset or 512, split=0)
    test = synthetic_split(opts.test_subset or 256, split=1)
    whole = dataclasses.replace(opts, subset=None, test_subset=None)
    return tensor_loaders(spec, whole, train, test)


def load_data(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    seed: int = 0,
    augment: bool = True,
    num_workers: int = 2,
) -> DataBundle:
    """Train and test loaders and the spec of dataset ``name``.

    ``subset`` / ``test_subset`` keep a seeded random (for in-memory datasets stratified) subset
    of that many images. Missing files raise :class:`DatasetNotFoundError` whose message lists
    the folders searched and how to get the data. ``num_workers`` only matters for ImageNet.
    """
    dataset = DATASETS[name]
    for arg, value in (
        ("batch_size", batch_size),
        ("eval_batch_size", eval_batch_size),
        ("subset", subset),
        ("test_subset", test_subset),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be positive, got {value}")
    opts = LoadOptions(
        None if data_dir is None else Path(data_dir),
        download,
        subset,
        test_subset,
        batch_size,
        eval_batch_size,
        seed,
        augment,
        num_workers,
    )
    return DataBundle(*dataset.build(dataset.spec, opts), dataset.spec)

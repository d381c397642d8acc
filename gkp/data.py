"""Datasets by name: shape/normalisation specs, one registry, and loaders of normalised batches.

``load_data(name, ...)`` returns ``(train, test, spec)``. Both loaders are re-iterable (one pass is
one epoch), have ``len()`` = batches per epoch and yield ``(x, y)``: float32 NCHW normalised
images and int64 labels, on the CPU.

The small datasets (CIFAR-10/100, Fashion-MNIST, synthetic) are held in memory as uint8 tensors
by :class:`TensorLoader`, which augments whole batches at once (pad-4 random crop + horizontal
flip): on a 2-core CPU a per-sample torchvision pipeline would cost more than the network.
ImageNet uses ``ImageFolder`` and a torch ``DataLoader`` with worker processes.

Randomness: the train order, the augmentation and the subsets follow ``seed`` only. Epoch ``e`` of
a train loader always uses the same order and crops, so a resumed run can call ``set_epoch(e)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from gkp._datasets import (
    DatasetNotFoundError,
    Split,
    epoch_seed,
    find_cifar,
    find_fashion_mnist,
    find_imagenet,
    imagenet_loaders,
    read_cifar,
    read_fashion_mnist,
    synthetic_split,
)

__all__ = [
    "DataBundle",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Loader",
    "LoadOptions",
    "TensorLoader",
    "example_input",
    "get_dataset_spec",
    "list_datasets",
    "load_data",
    "random_crop_flip",
    "register_dataset",
    "stratified_subset",
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


class Loader(Protocol):
    """What the trainer may rely on: re-iterable, sized in batches, epoch-addressable."""

    num_samples: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class DataBundle(NamedTuple):
    """``(train, test, spec)``: unpacks like the tuple the trainer expects, fields by name too."""

    train: Loader
    test: Loader
    spec: DatasetSpec


Builder = Callable[[DatasetSpec, LoadOptions], tuple[Loader, Loader]]


_REGISTRY: dict[str, tuple[DatasetSpec, Builder]] = {}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


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
    key = _canonical(name)
    spec = DatasetSpec(key, num_classes, in_channels, image_size, tuple(mean), tuple(std))

    def decorate(build: Builder) -> Builder:
        if key in _REGISTRY:
            raise ValueError(f"dataset {key!r} is already registered")
        _REGISTRY[key] = (spec, build)
        return build

    return decorate


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[DatasetSpec, Builder]:
    try:
        return _REGISTRY[_canonical(name)]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset (``_`` and ``-``, upper and lower case are the same)."""
    return _entry(name)[0]


def example_input(name: str, batch: int = 1) -> Tensor:
    """Zeros shaped like one batch of the dataset, e.g. for counting MACs."""
    s = get_dataset_spec(name)
    return torch.zeros(batch, s.in_channels, s.image_size, s.image_size)


# ---------------------------------------------------------------- the tensor-resident loader


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Per sample: zero-pad by ``pad``, crop back to H x W at a random offset, flip with p=0.5.

    One gather for the whole batch (no Python loop over samples). Works for any dtype; padding is
    zero in pixel space, as torchvision's ``RandomCrop(size, padding=pad)``.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)  # (b, c, (h + 2p) * (w + 2p))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator)
    flip = torch.rand(b, 1, 1, generator=generator) < 0.5
    rows = torch.arange(h).view(1, h, 1) + dy
    cols = torch.arange(w).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    flat = (rows * (w + 2 * pad) + cols).view(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, flat).view(b, c, h, w)


class TensorLoader:
    """Batches of an in-memory split, augmented and normalised on the fly, batch-vectorised.

    ``images``: uint8 (pixels 0..255) or float (0..1) N x C x H x W. With ``shuffle`` each epoch
    has its own order; with ``augment`` each sample gets a pad-``pad`` random crop and a random
    horizontal flip. The last batch may be smaller (no sample is dropped).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        pad: int = 4,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"need N x C x H x W images and N labels, got {tuple(images.shape)}"
                f" and {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()
        self.batch_size, self.shuffle, self.augment, self.pad = batch_size, shuffle, augment, pad
        self.seed, self._epoch = seed, 0
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        pixel = 1 / 255 if images.dtype == torch.uint8 else 1.0
        self._scale = pixel / std_t
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t

    @property
    def num_samples(self) -> int:
        """Images per epoch."""
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use ``epoch``'s order and augmentation (for resuming a run)."""
        self._epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def normalise(self, x: Tensor) -> Tensor:
        """Pixels to float32 ``(x / 255 - mean) / std`` (without the /255 for float data)."""
        return x.to(torch.float32, copy=True).mul_(self._scale).sub_(self._shift)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self._epoch))
        self._epoch += 1
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, self.pad, g)
            yield self.normalise(x), self.labels[idx]


def stratified_subset(labels: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of ``n`` samples drawn at random, each class in proportion to its size.

    Every sample gets the key (rank in a seeded shuffle of its class + 0.5) / class size; the
    ``n`` smallest keys win, so a balanced dataset gives every class n / C samples (+- 1).
    """
    total = len(labels)
    if not 0 < n <= total:
        raise ValueError(f"subset size {n} must be in [1, {total}]")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    order = torch.argsort(lab, stable=True)
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total) - starts[lab[order]]
    key = (rank + 0.5) / counts[lab]
    return perm[torch.argsort(key, stable=True)[:n]].sort().values


def _take(split: Split, n: int | None, seed: int) -> Split:
    if n is None:
        return split
    idx = stratified_subset(split[1], n, seed)
    return split[0][idx], split[1][idx]


def _tensor_loaders(
    spec: DatasetSpec, opts: LoadOptions, train: Split, test: Split
) -> tuple[TensorLoader, TensorLoader]:
    """Subset (seeded, stratified) and wrap in-memory splits; the test split is never augmented."""
    train = _take(train, opts.subset, opts.seed)
    test = _take(test, opts.test_subset, opts.seed + 1)
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
    return _tensor_loaders(spec, opts, *read_cifar(spec.name, folder))


@register_dataset(
    "fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=(0.2860,), std=(0.3530,)
)
def _fashion_mnist(spec: DatasetSpec, opts: LoadOptions) -> tuple[Loader, Loader]:
    """Fashion-MNIST idx files: data_dir, else Debian's package path, else ./data."""
    files = find_fashion_mnist(opts.data_dir, opts.download)
    return _tensor_loaders(spec, opts, *read_fashion_mnist(files))


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
    return _tensor_loaders(spec, whole, train, test)


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
    spec, build = _entry(name)
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
    return DataBundle(*build(spec, opts), spec)

"""Loaders of normalised batches, batch-vectorised augmentation and seeded subsets.

Nothing here knows a dataset by name: :mod:`gkp.data` and the readers hand in tensors or torch
datasets. The small datasets live in memory as uint8 tensors in :class:`TensorLoader`, which
augments whole batches at once (pad-4 random crop + horizontal flip): on a 2-core CPU a
per-sample torchvision pipeline would cost more than the network. Large datasets go through
:class:`EpochDataLoader` (a torch ``DataLoader`` with worker processes).

Randomness: the train order, the augmentation and the subsets follow ``seed`` only. Epoch ``e`` of
a loader always uses the same order and crops, so a resumed run can call ``set_epoch(e)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Split = tuple[Tensor, Tensor]  # (uint8 images N x C x H x W, int64 labels N)

__all__ = [
    "EpochDataLoader",
    "Loader",
    "Split",
    "TensorLoader",
    "check_subset_size",
    "epoch_seed",
    "random_calibration",
    "random_crop_flip",
    "seeded_subset",
    "stratified_subset",
    "take_subset",
]


class Loader(Protocol):
    """What the trainer may rely on: re-iterable, sized in batches, epoch-addressable."""

    num_samples: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch): each epoch's order is reproducible on resume."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


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


# ---------------------------------------------------------------- subsets


def check_subset_size(dataset: str, split: str, n: int | None, available: int) -> None:
    """Refuse a subset larger than the split, naming the option and the largest valid value.

    ``split`` is ``"train"`` (option ``--subset``) or ``"test"`` (option ``--test-subset``).
    """
    if n is None or n <= available:
        return
    option, images = ("--subset", "training") if split == "train" else ("--test-subset", "test")
    raise ValueError(
        f"{option} {n} is larger than {dataset}'s {available} {images} images; "
        f"use at most {available}"
    )


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


def seeded_subset(n_total: int, n: int | None, seed: int) -> Tensor | None:
    """Sorted indices of a seeded random subset of size ``n`` (None means all)."""
    if n is None:
        return None
    if not 0 < n <= n_total:
        raise ValueError(f"subset size {n} must be in [1, {n_total}]")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def take_subset(split: Split, n: int | None, seed: int) -> Split:
    """A seeded stratified subset of ``n`` samples of an in-memory split (None: all of it)."""
    if n is None:
        return split
    idx = stratified_subset(split[1], n, seed)
    return split[0][idx], split[1][idx]


def random_calibration(
    input_shape: Sequence[int], batches: int = 2, batch_size: int = 8, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], ...]:
    """Seeded Gaussian stand-ins for calibration batches (``PruneContext.calib_batches``).

    For what needs only a pruned network's *structure* (latency benchmarks, tests); results
    that report accuracy use batches the runner draws from the training set.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return tuple(
        (torch.randn(batch_size, *input_shape, generator=gen), torch.zeros(batch_size).long())
        for _ in range(batches)
    )

"""Splits and batches: what a data set is once loaded, and how it is iterated.

Usage::

    for images, labels in iterate_batches(data.train, torch.randperm(len(data.train)), 128):
        ...  # images: (B, C_in, H, W) float32, labels: (B,) int64

Also the catalogue of data set names (:data:`DATASETS`), one place for every loader.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from nctools.errors import DataError

DIGIT_SETS = ("mnist5k", "mnist", "kmnist", "svhn")  # a mirrored digit is another symbol
# where torchvision reads each set from under data.root (SVHN reads root itself)
TORCHVISION_DIRS = {
    "mnist": "MNIST/raw",
    "fashionmnist": "FashionMNIST/raw",
    "kmnist": "KMNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "svhn": "",
    "stl10": "stl10_binary",
}
TORCHVISION_SETS = tuple(TORCHVISION_DIRS)
DATASETS = ("mnist5k", "synthetic", *TORCHVISION_SETS, "imagenet")


@dataclass
class Split:
    """One split of a data set.

    images: (N, C_in, H, W) float32 standardised tensor, or a lazy torch Dataset yielding
        (image (C_in, H, W), label) pairs (image folders too large for memory).
    labels: (N,) int64.
    hflip: whether a horizontal flip keeps the label (False for digits and synthetic data).
    """

    images: Tensor | torch.utils.data.Dataset
    labels: Tensor
    hflip: bool = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lazy(self) -> bool:
        return not isinstance(self.images, Tensor)


@dataclass
class Dataset:
    """A train/test pair with the shape facts a network needs.

    channel_mean, channel_std: (C_in,) the standardisation applied to in-memory splits
    (:func:`nctools.data.sets.load_dataset`), None when the pixels are not standardised.
    class_names: the name of each label where the data has them (image folders), else None.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    channel_mean: Tensor | None = None
    channel_std: Tensor | None = None
    class_names: list[str] | None = None  # label c is class_names[c] (image folders)


def iterate_batches(
    split: Split,
    indices: Tensor,
    batch_size: int,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images (B, C_in, H, W), labels (B,))`` in the order of ``indices`` (N_sel,).

    The last partial batch is kept. In-memory splits are indexed directly (one index_select
    per batch, no per-sample collation) so the loop costs next to nothing beside the network.
    ``augment`` applies :func:`augment_batch` with ``generator``.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    if split.lazy:
        yield from _iterate_lazy(split, indices, batch_size, augment, generator)
        return
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start : start + batch_size].to(split.labels.device)
        assert isinstance(split.images, Tensor)  # not lazy
        # index_select, not images[idx]: several times faster on the CPU for row gathers
        images = split.images.index_select(0, idx)
        if augment:
            images = augment_batch(images, generator, hflip=split.hflip)
        yield images, split.labels.index_select(0, idx)


def augment_batch(
    images: Tensor, generator: torch.Generator | None = None, hflip: bool = True
) -> Tensor:
    """Random crop after zero padding, and a random horizontal flip when ``hflip``.

    images: (B, C, H, W) standardised, so zero padding is padding with the mean.
    Padding is 4 px for images of 28 px or more (the usual CIFAR recipe), H // 8 below.
    """
    B, C, H, W = images.shape
    pad = 4 if min(H, W) >= 28 else max(1, min(H, W) // 8)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    shifts = torch.randint(0, 2 * pad + 1, (2, B), generator=generator, device=gen_device)
    dy, dx = shifts.to(images.device)
    cols = torch.arange(W, device=images.device).expand(B, W)
    if hflip:
        flip = torch.rand(B, generator=generator, device=gen_device).to(images.device) < 0.5
        cols = torch.where(flip[:, None], W - 1 - cols, cols)  # a flip reads columns backwards
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    Hp, Wp = H + 2 * pad, W + 2 * pad
    # One flat index_select crops (and flips) every image at its own offset: several times
    # faster on the CPU than 4-D advanced indexing or a per-image loop.
    ar = functools.partial(torch.arange, device=images.device)
    start = (ar(B)[:, None] * C + ar(C)[None, :]) * (Hp * Wp) + dy[:, None] * Wp + dx[:, None]
    flat = start[:, :, None, None] + (ar(H) * Wp)[None, None, :, None] + cols[:, None, None, :]
    return padded.reshape(-1).index_select(0, flat.reshape(-1)).reshape(B, C, H, W)

def _iterate_lazy(
    split: Split,
    indices: Tensor,
    batch_size: int,
    augment: bool,
    generator: torch.Generator | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of a lazy split through a DataLoader over a Subset in the index order."""
    workers = min(8, os.cpu_count() or 1)
    assert not isinstance(split.images, Tensor)  # lazy
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(split.images, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    try:
        for images, labels in loader:
            if augment:
                images = augment_batch(images, generator, hflip=split.hflip)
            yield images, labels.long()
    except DataError as exc:  # e.g. an unreadable image, named by the data set's loader
        raise DataError(worker_message(exc)) from None


def worker_message(exc: Exception) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback.

    A worker's exception comes back as the same type built from "Caught X in DataLoader
    worker process N. Original Traceback ...", its own message on the last line.
    """
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.partition(f"{type(exc).__name__}: ")[2] or last

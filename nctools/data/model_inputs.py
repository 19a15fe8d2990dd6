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


def folder_layout(path: str, flag: str = "--dataset") -> tuple[Path, Path | None]:
    """``folder:PATH``'s training and test folders: PATH/train and PATH/val (or PATH/test);
    the test folder is None where there is none: PATH/train alone, or a flat PATH of class
    folders (its images are one split, the training one).

    Raises ConfigError naming ``flag`` for an empty PATH (it would read the current folder).
    """
    if not path.strip():
        raise ConfigError(f"{flag} folder:{path}: empty path; give folder:PATH, a folder of "
                          "class folders (or of train/ and val/)")
    root = Path(path).expanduser()
    if not (root / "train").is_dir():
        return root, None
    return root / "train", next((root / s for s in ("val", "test") if (root / s).is_dir()), None)


def folder_classes(path: str, flag: str = "--dataset") -> list[str]:
    """The class names of ``folder:PATH`` (its training folder's class folders, sorted as
    torchvision's ImageFolder indexes them): ``len`` of it is the number of classes, known
    before any network is built. Raises DataError naming ``flag`` when there are none."""
    from torchvision.datasets.folder import find_classes

    train_dir, _ = folder_layout(path, flag)
    try:
        return find_classes(str(train_dir))[0]
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{flag} folder:{path}: no class folders of images ({exc})") from None


def image_folder(path: str, transform: Callable, flag: str = "--dataset",
                 split: str | None = None, labels: bool = True) -> Dataset:
    """``folder:PATH`` as a Dataset: PATH/train and PATH/val (or test), else PATH for both.

    Images go through ``transform`` (the network's own evaluation transform), read lazily;
    a file that is no image is a DataError naming it
    (:func:`~nctools.data.torchvision_sets.read_image`). The test folder's classes are
    matched to the training folder's by name (train's sorted list is the index): a class
    unknown to train is a DataError naming it and the folder; a training class absent from
    the test folder leaves that class without test samples. ``split``: the split the
    caller will measure, if any: ``"test"`` is refused for a flat folder (its only images
    are the training ones) and for a test folder lacking a class (naming the class and the
    folder). ``labels=False``: the test images' labels go unused (an out-of-distribution
    set): its classes need not be the training folder's and keep their own indices.
    ``flag`` names the option in errors.
    """
    from torchvision import datasets

    from nctools.data.torchvision_sets import read_image

    train_dir, test_dir = folder_layout(path, flag)
    if test_dir is None and split == "test":
        lacks = ("train/ and val/ folders" if train_dir == Path(path).expanduser()
                 else "val/ (or test/) folder beside its train/")
        raise ConfigError(f"--split test: folder:{path} has no {lacks}, so no test "
                          "images (its images are the training split); measure --split "
                          "train, or give it train/ and val/ class folders")
    folders = []
    for folder in (train_dir, test_dir or train_dir):
        try:
            folders.append(datasets.ImageFolder(str(folder), transform=transform,
                                                loader=read_image))
        except (FileNotFoundError, OSError, RuntimeError) as exc:
            raise DataError(f"{flag} folder:{path}: no class folders of images ({exc})") from None
    train, test = folders
    if test_dir is not None and labels:
        _index_like(test, train, f"{flag} folder:{path}", test_dir, train_dir,
                    must_hold_all=split == "test")
    first: Any = train[0][0]
    return Dataset(f"folder:{path}", Split(train, _targets(train)), Split(test, _targets(test)),
                   num_classes=len(train.classes), in_channels=int(first.shape[0]),
                   image_size=int(first.shape[-1]), class_names=list(train.classes))


def _targets(folder: Any) -> Tensor:
    return torch.as_tensor(folder.targets, dtype=torch.long)


def _index_like(test: Any, train: Any, where: str, test_dir: Path, train_dir: Path,
                must_hold_all: bool) -> None:
    """Relabel ImageFolder ``test`` in place with ``train``'s class indices, by class name
    (each folder alone indexes its own sorted names: {a, c, d} would read c as b)."""
    index = train.class_to_idx
    unknown = [name for name in test.classes if name not in index]
    if unknown:
        raise DataError(f"{where}: class {unknown[0]!r} of {test_dir} is not a class of "
                        f"{train_dir} ({', '.join(train.classes)})")
    missing = [name for name in train.classes if name not in test.class_to_idx]
    if missing and must_hold_all:
        raise DataError(f"{where}: class {missing[0]!r} (class {index[missing[0]]}) has no "
                        f"samples in {test_dir} ({len(missing)} of {len(train.classes)} "
                        f"classes missing there: {', '.join(missing)})")
    if missing:
        log.info("%s: %s has no images of class(es) %s", where, test_dir, ", ".join(missing))
    test.samples = [(file, index[test.classes[label]]) for file, label in test.samples]
    test.imgs = test.samples
    test.targets = [label for _, label in test.samples]
    test.classes, test.class_to_idx = list(train.classes), dict(index)


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

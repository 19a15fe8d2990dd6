"""Data sets the user already has on disk, read through torchvision (imported lazily).

Usage (by :func:`nctools.data.load_dataset`)::

    data = torchvision_set(DataConfig(dataset="cifar10", root="~/data"), "cifar10")
    data = imagenet(DataConfig(dataset="imagenet", root="~/data"))

Nothing is downloaded unless ``data.download`` is true; a missing set is a DataError that
names the folder torchvision looked in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nctools.config.schema import DataConfig
from nctools.data.splits import DIGIT_SETS, TORCHVISION_DIRS, Dataset, Split
from nctools.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_set(cfg: DataConfig, name: str) -> Dataset:
    """A torchvision data set (one of ``TORCHVISION_SETS``) under ``data.root``, in memory."""
    import torchvision.datasets as tvd

    root = Path(cfg.root).expanduser()
    cls = {
        "mnist": tvd.MNIST,
        "fashionmnist": tvd.FashionMNIST,
        "kmnist": tvd.KMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "svhn": tvd.SVHN,
        "stl10": tvd.STL10,
    }[name]
    splits = []
    for train in (True, False):
        kwargs: dict[str, object]
        if name in ("svhn", "stl10"):
            kwargs = {"split": "train" if train else "test"}
        else:
            kwargs = {"train": train}
        try:
            ds = cls(str(root), download=cfg.download, **kwargs)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(
                f"data set {name!r} not found under {root} (torchvision looked in "
                f"{root / TORCHVISION_DIRS[name]}: {e}); run with --set data.download=true "
                f"to download it, or copy the files there (data.root={cfg.root})"
            ) from None
        splits.append(_to_tensors(ds))
    (x_train, y_train), (x_test, y_test) = splits
    labels_all = torch.cat([y_train, y_test])
    return Dataset(
        name,
        Split(x_train, y_train, hflip=name not in DIGIT_SETS),
        Split(x_test, y_test, hflip=name not in DIGIT_SETS),
        num_classes=int(labels_all.max()) + 1,
        in_channels=x_train.shape[1],
        image_size=x_train.shape[-1],
    )


def _to_tensors(ds: Any) -> tuple[Tensor, Tensor]:
    """A torchvision data set's arrays as images (N, C, H, W) float32 in [0, 1], labels (N,)."""
    data = torch.as_tensor(np.asarray(ds.data))
    if data.ndim == 3:  # MNIST family: (N, H, W)
        data = data[:, None]
    elif data.shape[-1] == 3:  # CIFAR: (N, H, W, C); SVHN and STL10 are already (N, C, H, W)
        data = data.permute(0, 3, 1, 2)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = ds.labels
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return data.contiguous().float().div_(255), labels


def read_image(path: str) -> Any:
    """The image file ``path`` as an RGB PIL image (torchvision's ImageFolder loader);
    a file PIL cannot read is a DataError naming it, one line even from a loader worker."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"{path}: cannot read image (not an image format PIL knows)") from None
    except Exception as exc:  # truncated or corrupt data: PIL's decoders raise many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from None


def imagenet(cfg: DataConfig) -> Dataset:
    """``root/imagenet/{train,val}/CLASS/*.JPEG``, read through a DataLoader when iterated.

    Both splits use the deterministic eval transform (resize 256, centre crop 224,
    ImageNet mean/std), so features come from unaugmented images; ``data.augment`` adds
    :func:`augment_batch` on top at training time.
    """
    from torchvision import datasets, transforms

    root = Path(cfg.root).expanduser() / "imagenet"
    tf = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    splits = []
    for sub in ("train", "val"):
        try:
            folder = datasets.ImageFolder(str(root / sub), transform=tf, loader=read_image)
        except (FileNotFoundError, OSError, RuntimeError) as e:
            raise DataError(
                f"data set 'imagenet' not found: expected class folders under {root / sub} "
                f"({e}); copy ImageNet's train/ and val/ (one folder per class) there"
            ) from None
        splits.append(folder)
    train, val = splits
    if train.classes != val.classes:
        raise DataError(f"imagenet: {root / 'train'} and {root / 'val'} hold different classes")
    return Dataset(
        "imagenet",
        Split(train, torch.as_tensor(train.targets, dtype=torch.long)),
        Split(val, torch.as_tensor(val.targets, dtype=torch.long)),
        num_classes=len(train.classes),
        in_channels=3,
        image_size=224,
    )

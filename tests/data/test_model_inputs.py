"""folder:PATH image folders (nctools/data/model_inputs.py): class matching by name and
the split a folder can give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nctools.data.model_inputs import image_folder
from nctools.errors import ConfigError, DataError

# one grey level per class name: an image's class is read back from its pixels
SHADES = {"a": 10, "b": 60, "c": 110, "d": 160}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, 4, 4) float pixels 0-255 of a PIL image."""
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float()


def make_classes(folder: Path, names: str, per_class: int = 2) -> None:
    for name in names:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (4, 4), (SHADES[name],) * 3).save(folder / name / f"{i}.png")


def shade_labels(split) -> list[tuple[int, int]]:
    """(shade, label) of every image of a lazy split."""
    return sorted({(int(split.images[i][0][0, 0, 0]), int(split.images[i][1]))
                   for i in range(len(split))})


def test_val_classes_are_matched_to_train_by_name(tmp_path):
    """train {a, b, c}, val {a, c}: val's c images are label 2 (train's index of c), not
    1 (their position in val)."""
    make_classes(tmp_path / "train", "abc")
    make_classes(tmp_path / "val", "ac")
    data = image_folder(str(tmp_path), to_tensor)
    assert data.num_classes == 3
    assert shade_labels(data.train) == [(10, 0), (60, 1), (110, 2)]
    assert shade_labels(data.test) == [(10, 0), (110, 2)]
    assert data.test.labels.tolist() == [0, 0, 2, 2]


def test_a_val_class_unknown_to_train_is_named(tmp_path):
    make_classes(tmp_path / "train", "abc")
    make_classes(tmp_path / "val", "acd")
    with pytest.raises(DataError) as info:
        image_folder(str(tmp_path), to_tensor)
    assert str(info.value) == (f"--dataset folder:{tmp_path}: class 'd' of {tmp_path / 'val'} "
                               f"is not a class of {tmp_path / 'train'} (a, b, c)")


def test_a_folder_without_val_gives_no_test_split(tmp_path):
    make_classes(tmp_path / "flat", "ab")
    make_classes(tmp_path / "only" / "train", "ab")
    with pytest.raises(ConfigError) as info:
        image_folder(str(tmp_path / "flat"), to_tensor, split="test")
    assert str(info.value) == (
        f"--split test: folder:{tmp_path / 'flat'} has no train/ and val/ folders, so no test "
        "images (its images are the training split); measure --split train, or give it "
        "train/ and val/ class folders")
    with pytest.raises(ConfigError) as info:
        image_folder(str(tmp_path / "only"), to_tensor, split="test")
    assert str(info.value).startswith(
        f"--split test: folder:{tmp_path / 'only'} has no val/ (or test/) folder beside its "
        "train/, so no test images")
    # the training split (and the test split for an OOD set) are the folder's images
    flat = image_folder(str(tmp_path / "flat"), to_tensor)
    assert flat.train.labels.tolist() == flat.test.labels.tolist() == [0, 0, 1, 1]

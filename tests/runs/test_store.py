"""Run-directory I/O (nctools/store.py): snapshots, checksums, atomic writes, checkpoints."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from nctools.errors import CheckpointError, RunError, SnapshotError
from nctools.runs import files, snapshots, store

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


# ---------------------------------------------------------------------------------------
# Snapshot round trips


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


# ---------------------------------------------------------------------------------------
# Checksums


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


# ---------------------------------------------------------------------------------------
# Atomic writes


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if ".tmp-" in p.name]


def test_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    files.atomic_write_text(path, "old")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(RunError) as info:
        files.atomic_write_text(path, "new")
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old" and no_temp_files(tmp_path)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    store.save_checkpoint(path, {"x": torch.ones(3)})

    def denied(obj, f, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(RunError, match=r"checkpoint\.pt: Permission denied"):
        store.save_checkpoint(path, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(store.load_checkpoint(path)["x"], torch.ones(3))
    assert no_temp_files(tmp_path)


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


# ---------------------------------------------------------------------------------------
# Manifest and history


def test_manifest_round_trip(tmp_path):
    manifest = {"status": "running", "epochs_done": 3, "sizes": {"train": 5000}, "out": tmp_path}
    store.write_manifest(tmp_path, manifest)
    assert store.read_manifest(tmp_path) == {**manifest, "out": str(tmp_path)}
    with pytest.raises(RunError, match=r"elsewhere/run\.json: not found"):
        store.read_manifest(tmp_path / "elsewhere")
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(RunError, match="manifest is corrupt"):
        store.read_manifest(tmp_path)


def row(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "lr": 0.05 / epoch, "train_loss": 1 / 3 / epoch,
            "train_acc_running": 0.625, "train_acc": 0.5,
            "test_loss": 2.0, "test_acc": 0.25, "seconds": 1.5, **extra}


def test_history_append_read_truncate(tmp_path):
    empty = store.read_history(tmp_path)
    assert empty.empty and list(empty.columns) == list(store.HISTORY_COLUMNS)
    for epoch in (1, 2, 3):
        store.append_history(tmp_path, row(epoch))
    history = store.read_history(tmp_path)
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["train_loss"].tolist() == [1 / 3, 1 / 6, 1 / 9]  # exact, not rounded
    store.truncate_history(tmp_path, 1)
    assert store.read_history(tmp_path)["epoch"].tolist() == [1]
    store.append_history(tmp_path, row(2, grad_norm=0.5))
    history = store.read_history(tmp_path)
    assert list(history.columns) == [*store.HISTORY_COLUMNS, "grad_norm"]
    assert history["grad_norm"].isna().tolist() == [True, False]
    store.truncate_history(tmp_path / "none", 3)  # no file: nothing to do


def test_history_row_for_same_epoch_replaces(tmp_path):
    store.append_history(tmp_path, row(1))
    store.append_history(tmp_path, row(2))
    store.append_history(tmp_path, row(2, test_acc=0.75))
    history = store.read_history(tmp_path)
    expected = pd.DataFrame([row(1), row(2, test_acc=0.75)])
    pd.testing.assert_frame_equal(history, expected)


# ---------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4])
    state = {"epoch": 3, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(), "tpt": None}
    store.save_checkpoint(tmp_path / "checkpoint.pt", state)
    loaded = store.load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded["epoch"] == 3 and loaded["tpt"] is None
    assert torch.equal(loaded["rng_cpu"], state["rng_cpu"])
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    assert loaded["scheduler"]["milestones"] == state["scheduler"]["milestones"]
    buf = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, opt.state_dict()["state"][0]["momentum_buffer"])


class Payload:
    """Unpickling this would create ``marker``: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    state = {"model": {"w": torch.ones(2)}, "extra": Payload(marker)}
    if writer == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError) as info:
        store.load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: checkpoint cannot be loaded safely (")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint", "cannot be loaded safely"),
        (None, "cannot be loaded safely"),  # truncated
        (b"", "cannot be loaded safely"),
    ],
)
def test_broken_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    if content is None:
        store.save_checkpoint(path, {"w": torch.randn(100)})
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        store.load_checkpoint(path)


def test_checkpoint_must_be_a_dict_and_exist(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: .*\(expected a dict, found list\)"):
        store.load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint not found"):
        store.load_checkpoint(tmp_path / "nope.pt")


def test_meta_json_is_plain_json(tmp_path, tensors):
    folder = write_single(tmp_path, tensors)
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {"train.safetensors", "test.safetensors",
                                  "classifier.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in meta["files"].values())

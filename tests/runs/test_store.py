"""The run directory's records (nctools/runs/store.py): manifest, history and checkpoint
files, written atomically and read back exactly; a checkpoint never runs code."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from nctools.errors import CheckpointError, RunError
from tests.helpers import no_temp_files
from nctools.runs import store


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

"""The manifest's one schema (nctools/runs/manifest.py): the keys a run of `nctools train`
and a run written from a Lightning loop record, and the run's identity."""

from __future__ import annotations

import pytest
import torch

from nctools import __version__
from nctools.runs import manifest, store

FIELDS = dict(name="demo", run_id="abc", device="cpu", world_size=1, dataset="mnist5k",
              num_train=500, num_test=200, num_classes=10, feature_dim=64, epochs=3,
              epochs_done=0, tpt_onset_epoch=None, snapshot_epochs=(1, 3))


def test_the_schema_in_its_order_with_the_versions():
    written = manifest.new_manifest(**FIELDS)
    assert list(written) == ["name", "run_id", "status", "nctools_version", "torch_version",
                             "device", "world_size", "dataset", "num_train", "num_test",
                             "num_classes", "feature_dim", "epochs", "epochs_done",
                             "tpt_onset_epoch", "snapshot_epochs"]
    assert written["status"] == "running" and written["snapshot_epochs"] == [1, 3]
    assert (written["nctools_version"], written["torch_version"]) == (__version__,
                                                                       torch.__version__)


def test_a_source_follows_the_status_and_an_unknown_status_is_refused():
    written = manifest.new_manifest(**FIELDS, source="lightning", status="completed")
    assert list(written)[2:4] == ["status", "source"] and written["source"] == "lightning"
    with pytest.raises(ValueError, match="status must be one of"):
        manifest.new_manifest(**FIELDS, status="done")


def test_the_run_id_is_kept_and_made_once(tmp_path):
    fresh = manifest.run_identity(tmp_path)
    assert len(fresh) == 32 and fresh != manifest.run_identity(tmp_path)  # a new one each time
    store.write_manifest(tmp_path, {"run_id": "kept"})
    assert manifest.run_identity(tmp_path) == "kept"
    store.write_manifest(tmp_path, {"run_id": ""})  # no id recorded: a new one
    assert manifest.run_identity(tmp_path) != ""


@pytest.mark.parametrize(("stands", "epochs", "complete"), [
    ({"status": "completed", "epochs_done": 3}, 3, True),
    ({"status": "completed", "epochs_done": 3}, 4, False),  # extended since
    ({"status": "interrupted", "epochs_done": 3}, 3, False),
    (None, 3, False),
])
def test_complete_means_completed_with_every_epoch(tmp_path, stands, epochs, complete):
    if stands is not None:
        store.write_manifest(tmp_path, stands)
    assert manifest.is_complete(tmp_path, epochs) is complete

"""The one decision new / resume / refuse (nctools/runs/resume.py), for `nctools train`
and for runs written from another library's loop, on folders made by hand."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from nctools.config.schema import Config
from nctools.errors import RunError
from nctools.runs import store
from nctools.runs.layout import CHECKPOINT_FILE, CONFIG_FILE, HISTORY_FILE
from nctools.runs.resume import (
    check_resume_changes,
    open_external_run,
    open_run,
    resume_changes,
    saved_config,
)
from tests.helpers import tiny_config


def saved_run(run: Path, config: Config, status: str = "running", done: int = 2) -> Path:
    """A run folder as `nctools train` leaves it after ``done`` epochs."""
    run.mkdir(exist_ok=True)
    store.save_config(config, run / CONFIG_FILE)
    store.save_checkpoint(run / CHECKPOINT_FILE, {"epoch": done})
    store.write_manifest(run, {"status": status, "epochs_done": done})
    return run


def test_a_new_path_and_an_empty_folder_take_a_new_run(tmp_path):
    config = tiny_config()
    assert open_run(tmp_path / "new", config, resume=False) == (config, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / f".config.yaml.tmp-{os.uname().nodename}-1").write_text("")  # a killed start
    assert open_run(empty, config, resume=False) == (config, None)
    assert saved_config(empty) is None


@pytest.mark.parametrize("flag", ["--out", "out"])
def test_a_file_a_dangling_link_and_other_files_are_refused_naming_the_argument(tmp_path, flag):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(RunError, match=f"afile: is a file, not a run folder; give a folder as "
                                       f"{flag}$"):
        saved_config(a_file, flag)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(RunError, match=f"is a symbolic link to .*gone, which does not exist; "
                                       f"give a folder as {flag}$"):
        saved_config(link, flag)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=rf"holds files but no nctools run \(no config\.yaml\); "
                                       rf"use another {flag}, or an empty or new folder$"):
        saved_config(tmp_path, flag)


def test_the_same_config_resumes_from_the_checkpoint(tmp_path):
    config = tiny_config()
    run = saved_run(tmp_path, config)
    assert open_run(run, config, resume=False) == (config, run / CHECKPOINT_FILE)
    moved = replace(config, train=replace(config.train, device="auto", eval_every=2))
    opened, _ = open_run(run, moved, resume=False)  # RESUME_MAY_CHANGE: taken, not refused
    assert opened == moved


def test_another_config_is_refused_and_resume_keeps_the_saved_one(tmp_path):
    config = tiny_config()
    run = saved_run(tmp_path, config)
    other = replace(config, train=replace(config.train, lr=0.1))
    with pytest.raises(RunError,
                       match=r"holds a run of another config \(train\.lr: 0\.05 -> 0\.1\)"):
        open_run(run, other, resume=False)
    with pytest.warns(UserWarning, match=r"ignored: train\.lr: 0\.05 -> 0\.1"):
        assert open_run(run, other, resume=True) == (config, run / CHECKPOINT_FILE)
    with pytest.raises(RunError, match="would change the run"):
        check_resume_changes(run, other)


def test_epochs_may_grow_but_not_shrink(tmp_path):
    config = tiny_config(epochs=3)
    longer, shorter = tiny_config(epochs=5), tiny_config(epochs=2)
    assert resume_changes(config, longer) == ([], 5)
    assert resume_changes(config, shorter) == (
        ["train.epochs: 3 -> 2 (a run can be extended, not shortened)"], 3)
    run = saved_run(tmp_path, config)
    assert open_run(run, longer, resume=True)[0].train.epochs == 5


def test_a_completed_run_has_nothing_to_do_until_extended(tmp_path):
    config = tiny_config(epochs=3)
    run = saved_run(tmp_path, config, status="completed", done=3)
    assert open_run(run, config, resume=False) == (None, None)
    assert open_run(run, tiny_config(epochs=4), resume=True)[0].train.epochs == 4


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(RunError, match=r"nothing: no run to resume \(no config\.yaml there\)"):
        open_run(tmp_path / "nothing", tiny_config(), resume=True)


def test_an_external_run_continues_only_from_its_own_checkpoint(tmp_path):
    run = tmp_path / "run"
    open_external_run(run, "lightning", done=0)  # a new folder: nothing to check or write
    config = tiny_config()
    config = replace(config, data=replace(config.data, dataset="TensorDataset"))
    run.mkdir()
    store.save_config(config, run / CONFIG_FILE)
    for epoch in (1, 2, 3):
        store.append_history(run, {"epoch": epoch})
    with pytest.raises(RunError, match="holds a run of nctools train, not one written by "
                                       "lightning"):
        open_external_run(run, "lightning", done=2)  # no manifest naming its source
    store.write_manifest(run, {"status": "running", "epochs_done": 3, "source": "lightning"})
    with pytest.raises(RunError, match="holds the run of an earlier training"):
        open_external_run(run, "lightning", done=0)
    with pytest.raises(RunError, match="holds a run of lightning, not one written by hf"):
        open_external_run(run, "hf", done=2)
    open_external_run(run, "lightning", done=2)  # resumed at epoch 2: later rows dropped
    assert store.read_history(run)["epoch"].tolist() == [1, 2]
    assert (run / HISTORY_FILE).is_file()


def test_a_run_without_a_finished_epoch_takes_a_changed_config(tmp_path):
    config = tiny_config()
    other = replace(config, train=replace(config.train, lr=0.1))
    run = saved_run(tmp_path / "started", config, done=0)
    assert open_run(run, other, resume=False) == (other, None)  # started anew
    assert open_run(run, config, resume=False) == (config, run / CHECKPOINT_FILE)
    run = saved_run(tmp_path / "failed", config, status="failed", done=0)
    assert open_run(run, other, resume=False) == (other, None)
    (run / "snapshots" / "epoch-0001").mkdir(parents=True)  # epoch 1 was being written
    with pytest.raises(RunError, match="holds a run of another config"):
        open_run(run, other, resume=False)
    done = saved_run(tmp_path / "done", config, done=1)
    with pytest.raises(RunError, match="holds a run of another config"):
        open_run(done, other, resume=False)

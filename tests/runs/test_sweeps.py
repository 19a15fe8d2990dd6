"""The sweep folder (nctools/runs/sweeps.py): its record, written once and then only
matched, and the run directories of its points."""

from __future__ import annotations

import json

import pytest

from nctools.errors import RunError
from nctools.runs import store, sweeps
from nctools.runs.layout import SWEEP_FILE
from tests.helpers import tiny_config

RECORD = {"config": "demo.yaml", "grid": {"train.lr": [0.1, 0.05]},
          "points": [{"name": "000-lr=0.1"}, {"name": "001-lr=0.05"}]}


def test_the_record_is_written_once_and_then_matched(tmp_path):
    root = tmp_path / "sweep"
    sweeps.record_sweep(root, RECORD)
    assert sweeps.is_sweep(root) and json.loads((root / SWEEP_FILE).read_text()) == RECORD
    sweeps.record_sweep(root, RECORD)  # the same sweep: continued
    with pytest.raises(RunError, match=r"holds another sweep \(its sweep\.json differs"):
        sweeps.record_sweep(root, {**RECORD, "grid": {"train.lr": [0.1]}})


def test_a_folder_of_other_files_or_a_broken_record_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="holds files but no sweep; use another --out"):
        sweeps.record_sweep(tmp_path, RECORD)
    (tmp_path / SWEEP_FILE).write_text("{")
    with pytest.raises(RunError, match=r"sweep\.json: not a sweep record"):
        sweeps.record_sweep(tmp_path, RECORD)
    with pytest.raises(RunError, match=r"sweep\.json: not a sweep record"):
        sweeps.sweep_runs(tmp_path)


def test_sweep_runs_are_the_points_that_exist_in_point_order(tmp_path):
    sweeps.record_sweep(tmp_path, RECORD)
    assert sweeps.sweep_runs(tmp_path) == []
    second = sweeps.point_dir(tmp_path, "001-lr=0.05")
    second.mkdir(parents=True)
    store.save_config(tiny_config(), second / "config.yaml")
    assert sweeps.sweep_runs(tmp_path) == [tmp_path / "runs" / "001-lr=0.05"]
    with pytest.raises(RunError, match=r"not a sweep \(no sweep\.json; make one with"):
        sweeps.sweep_runs(tmp_path / "runs")

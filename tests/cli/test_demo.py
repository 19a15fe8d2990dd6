"""`nctools demo`: the packaged config, trained, analysed and plotted."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from nctools.cli import main
from nctools.config.schema import load_config


def test_demo_config_is_packaged_and_valid():
    with files("nctools.configs").joinpath("demo.yaml").open() as f:
        assert "mnist5k" in f.read()
    cfg = load_config("demo")
    assert (cfg.name, cfg.data.dataset, cfg.model.arch) == ("demo", "mnist5k", "convnet")


def test_demo_runs_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any folder: the config comes from the package
    overrides = ["data.dataset=synthetic", "data.num_classes=4", "data.train_per_class=16",
                 "data.samples_per_class=null", "data.test_samples_per_class=null",
                 "data.test_per_class=8", "data.image_size=8",
                 "model.width=8",
                 "train.epochs=2", "snapshot.epochs=all", "train.device=cpu"]
    argv = ["demo", "--out", "d"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"metrics table: {Path('d') / 'metrics.csv'}" in out
    assert f"figure:        {Path('d') / 'figures' / 'collapse.png'}" in out
    assert (tmp_path / "d" / "figures" / "collapse.png").stat().st_size > 0


@pytest.mark.slow
def test_demo_packaged_config_one_epoch(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "train.epochs=1",
                 "--set", "snapshot.epochs=all"]) == 0
    assert "mnist5k" in (tmp_path / "demo" / "metrics.csv").read_text()

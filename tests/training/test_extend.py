"""Extending a finished run: `nctools train --resume --out RUN --set train.epochs=N`.

The run continues from its last checkpoint with the schedule recomputed for N epochs and
recorded (config.yaml, run.json ``extended``). Where the learning rates of the epochs
already trained are those of an N-epoch run (``constant``), the extended run is
bit-identical to an uninterrupted N-epoch run; ``multistep`` follows the new milestones
from the extension on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from nctools.cli import main
from nctools.config.schema import load_config
from nctools.runs import store

CONFIG = """\
name: extend
seed: 2
data: {dataset: synthetic, num_classes: 3, train_per_class: 8, test_per_class: 4, image_size: 8}
model: {arch: convnet, width: 4}
train: {epochs: 3, batch_size: 16, lr: 0.05, device: cpu, schedule: SCHEDULE}
snapshot: {epochs: all}
"""


def run_pair(tmp: Path, schedule: str, short: int, long: int) -> tuple[Path, Path]:
    """``short`` epochs extended to ``long``, and ``long`` epochs in one go."""
    config = tmp / "config.yaml"
    config.write_text(CONFIG.replace("SCHEDULE", schedule).replace("epochs: 3",
                                                                    f"epochs: {short}"))
    extended, straight = tmp / "extended", tmp / "straight"
    assert main(["train", str(config), "--out", str(extended)]) == 0
    assert store.read_manifest(extended)["status"] == "completed"
    assert main(["train", "--resume", "--out", str(extended),
                 "--set", f"train.epochs={long}"]) == 0
    assert main(["train", str(config), "--out", str(straight),
                 "--set", f"train.epochs={long}"]) == 0
    return extended, straight


def history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "history.csv").drop(columns="seconds")


def test_an_extended_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, capsys):
    extended, straight = run_pair(tmp_path, "constant", 2, 4)
    a, b = (store.load_checkpoint(r / "checkpoint.pt") for r in (extended, straight))
    assert a["epoch"] == b["epoch"] == 4
    for key in ("model", "scheduler"):
        for name, value in a[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key][name]), name
            else:
                assert value == b[key][name], name
    assert history(extended).equals(history(straight))
    for epoch in range(1, 5):
        for name in ("train.safetensors", "test.safetensors", "classifier.safetensors"):
            file = Path("snapshots") / f"epoch-{epoch:04d}" / name
            assert (extended / file).read_bytes() == (straight / file).read_bytes()
    manifest = store.read_manifest(extended)
    assert manifest["status"] == "completed" and manifest["epochs_done"] == 4
    assert manifest["extended"] == [{"after_epoch": 2, "from_epochs": 2, "to_epochs": 4}]
    assert manifest["snapshot_epochs"] == [1, 2, 3, 4]
    assert load_config(extended / "config.yaml") == load_config(straight / "config.yaml")


def test_an_extended_multistep_run_follows_the_new_milestones(tmp_path, capsys):
    """3 epochs (lr /10 after epochs 1 and 2) extended to 6 (milestones 2 and 4): from the
    extension on, the learning rates are those of a 6-epoch run."""
    extended, straight = run_pair(tmp_path, "multistep", 3, 6)
    lr = history(extended)["lr"].tolist()
    assert lr[:3] == pytest.approx([0.05, 0.005, 0.0005])  # the 3-epoch schedule, as trained
    assert lr[3:] == history(straight)["lr"].tolist()[3:] == pytest.approx([0.005, 5e-4, 5e-4])
    assert store.read_manifest(extended)["extended"] == [
        {"after_epoch": 3, "from_epochs": 3, "to_epochs": 6}]
    assert load_config(extended / "config.yaml").train.epochs == 6

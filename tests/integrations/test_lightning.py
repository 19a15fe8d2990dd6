"""The Lightning callback logs nctools.measure's numbers of features the test extracts
itself, for the model as it stands at the end of each measured epoch."""

import json
import os
import tempfile

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nctools import measure
from nctools.analysis.tables import analyze
from nctools.integrations.lightning import NeuralCollapseCallback
from nctools.runs import snapshots

NUM_CLASSES, DIM = 3, 8


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, DIM), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Captured(Logger):
    """Every logged scalar, by step; written to ``path`` at the end when given."""

    def __init__(self, path=None):
        super().__init__()
        self.rows, self.path = [], path

    name, version = "captured", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    @rank_zero_only  # as Lightning's own loggers: under DDP only rank 0 records and writes
    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    @rank_zero_only
    def finalize(self, status):
        if self.path:
            with open(self.path, "w") as handle:
                json.dump(self.rows, handle)


def loaders(n_train=60, n_val=24):
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(NUM_CLASSES, 5, generator=gen) * 2

    def split(n):
        y = torch.arange(n) % NUM_CLASSES
        return TensorDataset(centres[y] + torch.randn(n, 5, generator=gen), y)

    return DataLoader(split(n_train), batch_size=16), DataLoader(split(n_val), batch_size=7)


def expected(model, loader, **kwargs):
    """measure() on features taken by slicing the model, without any hook."""
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        return measure(model.body(x), y, model.head.weight, model.head.bias, **kwargs)


def trainer(logger, max_epochs=3, **kwargs):
    return pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=logger, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def test_logged_values_equal_measure_on_independent_features():
    train, val = loaders()
    model, logger = Tiny(), Captured()
    trainer(logger, callbacks=[NeuralCollapseCallback(epochs=[0, 2])]).fit(model, train, val)
    logged = [row for row in logger.rows if "nc/train/nc1" in row]
    assert [row["epoch"] for row in logged] == [0, 2]
    assert model.training  # train mode restored
    final = logged[-1]
    want_train = expected(model, train)
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    with torch.no_grad():
        means = torch.stack([model.body(x)[y == c].mean(0) for c in range(NUM_CLASSES)])
    want_val = expected(model, val, class_means=means)  # NC4 on val with the train means
    for key, value in want_train.items():
        assert final[f"nc/train/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for key, value in want_val.items():
        assert final[f"nc/val/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="splits"):
        NeuralCollapseCallback(splits=("test",))
    with pytest.raises(ValueError, match="every_n_epochs"):
        NeuralCollapseCallback(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        NeuralCollapseCallback(layer=nn.ReLU())


class TinySaved(Tiny):
    """Writes its final weights from rank 0 (forked DDP workers do not return them)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self):
        if self.global_rank == 0:
            torch.save(self.state_dict(), self.path)


def test_ddp_two_processes_log_the_metrics_of_the_union(tmp_path):
    train, val = loaders(n_train=60, n_val=24)  # multiples of 2: no padded samples
    model, logger = TinySaved(tmp_path / "weights.pt"), Captured(tmp_path / "rows.json")
    callback = NeuralCollapseCallback(epochs=[2], splits=("train",), save_snapshots=True,
                                      out=tmp_path / "run")
    run = trainer(logger, callbacks=[callback], strategy="ddp_fork", devices=2)
    run.fit(model, train, val)
    final = next(r for r in json.loads((tmp_path / "rows.json").read_text()) if "nc/train/nc1" in r)
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    # save_snapshots: each process wrote its shard, rank 0 merged them; analyze reads the union
    meta = snapshots.read_meta(tmp_path / "run", 3)
    assert meta["world"] == 2 and meta["splits"]["train"]["rows"] == [30, 30]
    table = analyze(tmp_path / "run", strict=True)
    analyzed = dict(zip(table.metric, table.value, strict=True))
    for key, value in expected(model, train).items():
        assert final[f"nc/train/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert analyzed[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


def test_ddp_each_process_spills_its_shard_and_logs_the_union(tmp_path, monkeypatch):
    made, folder = tmp_path / "made.txt", tempfile.TemporaryDirectory

    def noted(*args, **kwargs):  # each spill folder a (forked) process makes, in a file
        with open(made, "a") as handle:
            handle.write(f"{os.getpid()} {kwargs.get('prefix')}\n")
        return folder(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", noted)
    train, val = loaders(n_train=60, n_val=24)
    model, logger = TinySaved(tmp_path / "weights.pt"), Captured(tmp_path / "rows.json")
    (tmp_path / "spill").mkdir()
    callback = NeuralCollapseCallback(epochs=[1], splits=("train",), spill_dir=tmp_path / "spill")
    trainer(logger, max_epochs=2, callbacks=[callback], strategy="ddp_fork",
            devices=2).fit(model, train, val)
    final = next(r for r in json.loads((tmp_path / "rows.json").read_text()) if "nc/train/nc1" in r)
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    for key, value in expected(model, train).items():  # one forward pass each, summed
        assert final[f"nc/train/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert list((tmp_path / "spill").iterdir()) == []
    spills = [line.split() for line in made.read_text().splitlines() if "nctools-spill" in line]
    assert len(spills) == 2 and len({pid for pid, _ in spills}) == 2  # one per process

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
from nctools.analysis.lm_measure import measure_language_model
from nctools.analysis.tables import analyze
from nctools.integrations.core import split_batch
from nctools.integrations.lightning import NeuralCollapseCallback
from nctools.runs import snapshots
from tests.helpers import lm_batches

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


def test_layer_by_name_equals_the_module_and_the_default():
    train, val = loaders()
    logged = []
    for layer in ("head", "module", None):
        model, logger = Tiny(), Captured()
        chosen = model.head if layer == "module" else layer
        trainer(logger, max_epochs=1,
                callbacks=[NeuralCollapseCallback(layer=chosen)]).fit(model, train, val)
        logged.append(next(row for row in logger.rows if "nc/train/nc1" in row))
    assert logged[0] == logged[1] == logged[2]
    want = expected(model, train)["nc1"]
    assert logged[0]["nc/train/nc1"] == pytest.approx(want, rel=1e-6)


def test_epochs_beyond_the_fit_are_warned_about_when_it_starts():
    train, val = loaders()
    with pytest.warns(UserWarning, match=r"epochs \[99\] are beyond this fit \(max_epochs=2"):
        trainer(Captured(), max_epochs=2,
                callbacks=[NeuralCollapseCallback(epochs=[1, 99])]).fit(Tiny(), train, val)


class Dicts(torch.utils.data.Dataset):
    """The rows of a TensorDataset as dicts, as image and text datasets yield them."""

    def __init__(self, dataset, key):
        self.dataset, self.key = dataset, key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return {"image": x, self.key: y}


class TinyDicts(Tiny):
    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, _):
        pass


def test_dict_batches_are_measured_by_their_label_key():
    train, val = loaders()
    model, logger = TinyDicts(), Captured()
    as_dicts = [DataLoader(Dicts(loader.dataset, "label"), batch_size=loader.batch_size)
                for loader in (train, val)]
    trainer(logger, max_epochs=1, callbacks=[NeuralCollapseCallback()]).fit(model, *as_dicts)
    row = next(row for row in logger.rows if "nc/train/nc1" in row)
    for key, value in expected(model, train).items():
        assert row[f"nc/train/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    batch = next(iter(DataLoader(Dicts(train.dataset, "target"), batch_size=4)))
    with pytest.raises(ValueError, match=r"no labels key .*it has image, target.*unpack="):
        split_batch(batch)
    inputs, labels = split_batch((*batch.values(), "extra"))  # (x, y, ...): the first two
    assert inputs is batch["image"] and labels is batch["target"]


class Unused(Tiny):
    """A last Linear the forward pass never calls (an auxiliary head)."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(DIM, 2)


class NoLinear(Tiny):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 1, 1))
        self.head = nn.Identity()
        self.steps = 0

    def forward(self, x):
        return self.body(x[:, None]).mean(1)[:, :NUM_CLASSES]

    def training_step(self, batch, _):
        self.steps += 1
        return super().training_step(batch, _)


def test_a_layer_that_does_not_run_or_does_not_exist_is_named():
    train, val = loaders()
    with pytest.raises(ValueError, match="layer 'aux' did not run in the model's forward pass"):
        trainer(Captured(), max_epochs=1, callbacks=[NeuralCollapseCallback()]).fit(
            Unused(), train, val)
    model = NoLinear()
    with pytest.raises(ValueError, match=r"^layer: NoLinear has no nn.Linear \(no classifier\)"):
        trainer(Captured(), max_epochs=1, callbacks=[NeuralCollapseCallback()]).fit(
            model, train, val)
    assert model.steps == 0  # refused at setup, before the first epoch
    with pytest.raises(ValueError, match=r"layer: Tiny has no module 'fc' \(its nn.Linear "
                                         r"modules: body.0, head\)"):
        trainer(Captured(), max_epochs=1, callbacks=[NeuralCollapseCallback(layer="fc")]).fit(
            Tiny(), train, val)


VOCAB = 50


class TinyLM(pl.LightningModule):
    """A LightningModule holding a Hugging Face causal LM, fed its dict batches."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.lm = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                             n_positions=32))

    def training_step(self, batch, _):
        return self.lm(**batch).loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.lm(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lm_loaders():
    """Loaders whose batches are those of ``lm_batches`` (B = 3, in order)."""
    def rows(batches):
        return [{key: value[i] for key, value in batch.items()}
                for batch in batches for i in range(3)]

    train, val = lm_batches(VOCAB, False, count=4, seed=5), lm_batches(VOCAB, False, count=2)
    return (train, val, DataLoader(rows(train), batch_size=3),
            DataLoader(rows(val), batch_size=3))


@pytest.mark.filterwarnings("ignore:C > D")
def test_a_module_holding_a_causal_lm_is_measured_token_by_token(tmp_path):
    train, val, train_loader, val_loader = lm_loaders()
    model, logger = TinyLM(), Captured()
    options = {"min_count": 2, "top_k": 10, "ncc_samples": 25}
    callback = NeuralCollapseCallback(epochs=[1], vocabulary=options)
    trainer(logger, max_epochs=2, callbacks=[callback]).fit(model, train_loader, val_loader)
    (row,) = [row for row in logger.rows if "nc/train/nc1" in row]
    assert row["epoch"] == 1 and row["nc/train/classes_measured"] == 10  # top_k
    model.lm.eval()
    for prefix, batches in (("nc/train/", train), ("nc/val/", val)):
        want = measure_language_model(model.lm, batches, **options)
        assert want["classes_measured"] <= 10 and want["ncc_samples"] == 25
        for key, value in want.items():  # Lightning logs float32 scalars
            assert row[prefix + key] == pytest.approx(value, rel=1e-6, abs=1e-9,
                                                      nan_ok=True), key
    with pytest.raises(ValueError, match=r"^save_snapshots: GPT2LMHeadModel is measured token "
                                         r"by token"):
        trainer(Captured(), max_epochs=1, callbacks=[NeuralCollapseCallback(
            save_snapshots=True, out=tmp_path / "run")]).fit(TinyLM(), train_loader)
    with pytest.raises(ValueError, match=r"^vocabulary: options of a language model's token "
                                         r"samples, but Tiny is measured at the input"):
        trainer(Captured(), max_epochs=1, callbacks=[NeuralCollapseCallback(
            vocabulary={"top_k": 5})]).fit(Tiny(), *loaders())

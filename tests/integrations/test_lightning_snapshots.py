"""NeuralCollapseCallback(save_snapshots=True): a Lightning run becomes an nctools run
directory that `nctools analyze` and `nctools plot` read unchanged, with the numbers the
callback logged, features equal to an independent extraction, and checksums that hold."""

import json
import math
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from nctools.analysis.plots import collapse_figure
from nctools.analysis.tables import analyze, read_table
from nctools.cli import main
from nctools.config.schema import load_config
from nctools.errors import RunError, SnapshotError
from nctools.integrations.lightning import NeuralCollapseCallback
from nctools.runs import snapshots, store
from nctools.runs.layout import CONFIG_FILE, FIGURES_DIR
from nctools.runs.manifest import new_manifest
from tests.integrations.test_lightning import DIM, NUM_CLASSES, Captured, Tiny, loaders, trainer


class Logged(Tiny):
    """Logs its epoch-mean training loss, as most LightningModules do."""

    def training_step(self, batch, _):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


class Kept(NeuralCollapseCallback):
    """Keeps what it hands to ``log_dict`` (Lightning's loggers receive it as float32)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.values = {}

    def measure_and_save(self, trainer, pl_module):
        self.values[trainer.current_epoch] = values = super().measure_and_save(trainer, pl_module)
        return values


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 3-epoch fit measured at every epoch: its run directory, the values the callback
    logged by Lightning epoch, the logger's rows, the model and loaders."""
    root = tmp_path_factory.mktemp("fit")
    train, val = loaders()
    model, logger = Logged(), Captured()
    callback = Kept(save_snapshots=True, out=root / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer(logger, callbacks=[callback]).fit(model, train, val)
    return root / "run", callback.values, logger.rows, model, train, val


def copy_run(fitted, tmp_path):
    """The fit's run directory as the callback left it (no table or figure of a test)."""
    run = tmp_path / "run"
    shutil.copytree(fitted[0], run, ignore=shutil.ignore_patterns("metrics.csv", "figures"))
    return run


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-10, abs=1e-12)


def test_analyze_reproduces_every_logged_metric(fitted):
    run, logged, rows, *_ = fitted
    table = analyze(run, strict=True)
    assert sorted(logged) == [0, 1, 2]
    received = [row for row in rows if "nc/train/nc1" in row]  # the logger's, float32
    assert [row["epoch"] for row in received] == [0, 1, 2]
    for row in received:
        for key, value in logged[row["epoch"]].items():
            assert same(row[key], float(torch.tensor(value, dtype=torch.float32))), key
    assert sorted(set(table.epoch)) == [1, 2, 3]  # nctools counts epochs completed
    assert set(table.split) == {"train", "val"}  # the splits keep Lightning's names
    for r in table.itertuples():
        assert same(logged[r.epoch - 1][f"nc/{r.split}/{r.metric}"], r.value), r
    assert len(table) == sum(1 for row in logged.values() for key in row if key[:3] == "nc/")


def test_history_config_and_manifest_describe_the_fit(fitted):
    run, logged, rows, *_ = fitted
    history = store.read_history(run)
    epoch_rows = {row["epoch"]: row for row in rows if "train_loss" in row}
    assert list(history.epoch) == [1, 2, 3]
    for h in history.itertuples():
        assert h.lr == 0.1
        assert h.train_loss == pytest.approx(epoch_rows[h.epoch - 1]["train_loss"], rel=1e-7)
        assert h.train_acc == logged[h.epoch - 1]["nc/train/accuracy"]
        assert h.test_acc == logged[h.epoch - 1]["nc/val/accuracy"]
        assert math.isnan(h.train_acc_running) and math.isnan(h.test_loss) and h.seconds > 0
    config = load_config(run / CONFIG_FILE)
    # what the fit says: the module's and the dataset's class names, not nctools' defaults
    assert (config.data.dataset, config.model.arch, config.name) == ("TensorDataset", "Logged",
                                                                     "Logged")
    assert (config.train.epochs, config.snapshot.epochs) == (3, [1, 2, 3])
    assert list(snapshots.read_meta(run, 3)["splits"]) == ["train", "val"]
    saved = yaml.safe_load((run / CONFIG_FILE).read_text())
    assert saved["data"] == {"dataset": "TensorDataset", "num_classes": NUM_CLASSES}
    assert saved["model"] == {"arch": "Logged"}  # no image size, width or depth made up
    assert "unknown" in (run / CONFIG_FILE).read_text().splitlines()[1]
    assert (config.train.loss, config.train.weight_decay, config.train.batch_size) == ("ce", 0, 16)
    manifest = store.read_manifest(run)
    assert {k: manifest[k] for k in ("status", "epochs_done", "num_train", "num_test",
                                     "num_classes", "feature_dim", "snapshot_epochs")} == {
        "status": "completed", "epochs_done": 3, "num_train": 60, "num_test": 24,
        "num_classes": NUM_CLASSES, "feature_dim": DIM, "snapshot_epochs": [1, 2, 3]}


def test_last_snapshot_holds_the_final_model_features_and_classifier(fitted):
    run, _, _, model, train, val = fitted
    model.eval()
    for split, loader in (("train", train), ("val", val)):
        x = torch.cat([b[0] for b in loader])
        y = torch.cat([b[1] for b in loader])
        with torch.no_grad():
            want = model.body(x)  # the classifier's input, by slicing the model: no hook
        features, labels = snapshots.load_split(run, 3, split)
        assert torch.equal(labels, y)
        assert torch.allclose(features, want, rtol=0, atol=1e-6)
    weight, bias = snapshots.load_classifier(run, 3)
    assert torch.equal(weight, model.head.weight.detach())
    assert torch.equal(bias, model.head.bias.detach())


def test_nctools_analyze_and_plot_commands_read_it(fitted, tmp_path, capsys):
    run = copy_run(fitted, tmp_path)
    assert main(["analyze", str(run), "--quiet"]) == 0
    written = read_table(run / "metrics.csv")
    assert set(written.split) == {"train", "val"}
    for r in written.itertuples():
        assert same(fitted[1][r.epoch - 1][f"nc/{r.split}/{r.metric}"], r.value), r
    assert main(["plot", str(run)]) == 0
    figure = run / FIGURES_DIR / "collapse.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    legend = [text.get_text() for text in collapse_figure(written).legends[0].get_texts()]
    assert legend[:3] == ["TensorDataset / Logged", "train", "test"] and "val" in legend


def test_a_tampered_snapshot_is_refused(fitted, tmp_path):
    run = copy_run(fitted, tmp_path)
    path = snapshots.snapshot_dir(run, 2) / "train.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one feature
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="sha256"):
        analyze(run, strict=True)
    with pytest.warns(UserWarning, match="epoch 2"):
        table = analyze(run)
    assert sorted(set(table.epoch)) == [1, 3]


def test_default_run_directory_is_the_loggers_folder(tmp_path):
    train, val = loaders(n_train=12, n_val=6)
    logger = CSVLogger(tmp_path)
    callback = NeuralCollapseCallback(epochs=[0], save_snapshots=True, splits=("train",),
                                      snapshot_dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(logger, callbacks=[callback], max_epochs=1).fit(Tiny(), train, val)
    run = tmp_path / "lightning_logs" / "version_0" / "nctools"
    assert callback.run_dir == run
    meta = snapshots.read_meta(run, 1)
    assert (meta["dtype"], list(meta["splits"])) == ("float16", ["train"])
    assert (run / "metrics.csv").exists() is False and len(analyze(run)) > 0


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    train, val = loaders(n_train=12, n_val=6)
    callback = NeuralCollapseCallback(save_snapshots=True, out=tmp_path)
    with pytest.raises(RunError, match="no nctools run"):
        trainer(Captured(), callbacks=[callback], max_epochs=1).fit(Tiny(), train, val)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_new_fit_into_an_earlier_run_is_refused_a_resumed_one_continues(fitted, tmp_path):
    run = copy_run(fitted, tmp_path)
    train, val = loaders()
    callback = NeuralCollapseCallback(save_snapshots=True, out=run)
    with pytest.raises(RunError, match="earlier training"):
        trainer(Captured(), callbacks=[callback], max_epochs=1).fit(Tiny(), train, val)
    before = store.read_history(run)
    callback.on_fit_start(SimpleNamespace(current_epoch=2, is_global_zero=True, max_epochs=3),
                          None)
    after = store.read_history(run)  # resumed after epoch 2: epoch 3 is written again
    assert list(after.epoch) == [1, 2] and after.equals(before.iloc[:2])


def test_bad_snapshot_arguments_name_the_problem():
    with pytest.raises(ValueError, match="save_snapshots"):
        NeuralCollapseCallback(out="runs/x")
    with pytest.raises(ValueError, match="loss"):
        NeuralCollapseCallback(save_snapshots=True, loss="hinge")
    with pytest.raises(ValueError, match="snapshot_dtype"):
        NeuralCollapseCallback(save_snapshots=True, snapshot_dtype="bfloat16")


def test_manifest_is_json_with_the_run_id_kept(fitted):
    manifest = json.loads((fitted[0] / "run.json").read_text())
    assert len(manifest["run_id"]) == 32 and manifest["source"] == "lightning"
    # the one schema of nctools train's run.json, with the source after the status
    schema = list(new_manifest(
        name="", run_id="", device="cpu", world_size=1, dataset="", num_train=0, num_test=0,
        num_classes=0, feature_dim=0, epochs=1, epochs_done=0, tpt_onset_epoch=None,
        snapshot_epochs=[], source="lightning"))
    assert list(manifest) == schema

"""The training loop end to end on tiny synthetic data (seconds on a CPU).

Checks the run directory against docs/design.md, the snapshots against a fresh pass of the
checkpointed model, resume against an uninterrupted run (bit for bit), and the faults:
another config in the run directory, a diverging loss, Ctrl-C.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nctools.config.schema import (
    Config,
    load_config,
    snapshot_epochs,
)
from nctools.data.sets import load_dataset
from nctools.errors import RunError
from nctools.models.networks import build_model
from nctools.runs import snapshots, store
from tests import helpers

T = importlib.import_module("nctools.training.loop")

EPOCHS = 6
SNAPSHOTS = [1, 2, 4, 6]


def tiny_config(**train) -> Config:
    """3 classes x 16 images of 1 x 8 x 8; convnet width 8 (D = 32); 3 batches per epoch."""
    return helpers.tiny_config(snapshots=list(SNAPSHOTS), **{"epochs": EPOCHS, **train})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from threads and lose 10x on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Config, Path]:
    """One uninterrupted run, shared by the tests that only read it."""
    cfg = tiny_config()
    return cfg, T.train(cfg, tmp_path_factory.mktemp("full") / "run")


def _history(run: Path):
    return store.read_history(run).drop(columns="seconds")


def _assert_same_snapshots(run_a: Path, run_b: Path) -> None:
    assert snapshots.list_snapshots(run_a) == snapshots.list_snapshots(run_b)
    for epoch in snapshots.list_snapshots(run_a):
        for split in ("train", "test"):
            (fa, la), (fb, lb) = snapshots.load_split(run_a, epoch, split), snapshots.load_split(
                run_b, epoch, split)
            assert torch.equal(fa, fb) and torch.equal(la, lb), (epoch, split)
        classifiers = (snapshots.load_classifier(run, epoch) for run in (run_a, run_b))
        for a, b in zip(*classifiers, strict=True):
            assert torch.equal(a, b)


def test_run_directory_holds_the_design_files(full_run):
    cfg, run = full_run
    for name in ("config.yaml", "run.json", "history.csv", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg
    history = store.read_history(run)
    assert list(history.columns) == [
        "epoch", "lr", "train_loss", "train_acc_running", "train_acc", "test_loss", "test_acc",
        "seconds"]
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert (history["seconds"] > 0).all()
    assert snapshots.list_snapshots(run) == SNAPSHOTS
    assert [p.name for p in sorted((run / "snapshots").iterdir())] == [
        f"epoch-{e:04d}" for e in SNAPSHOTS]
    manifest = store.read_manifest(run)
    assert manifest["status"] == "completed"
    assert manifest["epochs_done"] == EPOCHS
    assert (manifest["num_classes"], manifest["feature_dim"]) == (3, 32)
    assert (manifest["num_train"], manifest["num_test"]) == (48, 24)
    assert manifest["dataset"] == "synthetic" and manifest["device"] == "cpu"
    assert manifest["torch_version"] == torch.__version__
    assert manifest["snapshot_epochs"] == SNAPSHOTS


def test_snapshot_shapes_dtypes_and_checksums(full_run):
    _, run = full_run
    for epoch in SNAPSHOTS:
        snapshots.verify_snapshot(run, epoch)
        train_f, train_y = snapshots.load_split(run, epoch, "train")
        test_f, _ = snapshots.load_split(run, epoch, "test")
        weight, bias = snapshots.load_classifier(run, epoch)
        assert train_f.shape == (48, 32) and test_f.shape == (24, 32)
        assert train_f.dtype == test_f.dtype == torch.float32
        assert train_y.dtype == torch.int64
        assert torch.equal(train_y, torch.arange(3).repeat_interleave(16))  # split order kept
        assert weight.shape == (3, 32) and bias.shape == (3,)


def test_lr_follows_the_multistep_schedule(full_run):
    # milestones at round(6/3) = 2 and round(12/3) = 4: /10 after epoch 2 and after epoch 4
    _, run = full_run
    lrs = store.read_history(run)["lr"].tolist()
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005], rel=1e-12)


def test_saved_features_equal_a_fresh_pass_of_the_checkpoint(full_run):
    cfg, run = full_run
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == EPOCHS
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, 3, 1, 8)
    model.load_state_dict(state["model"])
    model.eval()
    batch = T.EVAL_BATCH_FACTOR * cfg.train.batch_size
    with torch.no_grad():
        for split in ("train", "test"):
            images = getattr(data, split).images
            fresh = torch.cat([model.features(images[i : i + batch])
                               for i in range(0, len(images), batch)])
            saved, _ = snapshots.load_split(run, EPOCHS, split)
            assert torch.equal(saved, fresh), split
        weight, bias = snapshots.load_classifier(run, EPOCHS)
        assert torch.equal(weight, model.classifier.weight)
        assert torch.equal(bias, model.classifier.bias)
        # the history's test metrics of the last epoch are those of this model
        logits = model(data.test.images)
        last = store.read_history(run).iloc[-1]
        ce = F.cross_entropy(logits, data.test.labels).item()
        assert last["test_loss"] == pytest.approx(ce, rel=1e-5)
        acc = (logits.argmax(1) == data.test.labels).double().mean().item()
        assert last["test_acc"] == pytest.approx(acc, abs=1e-12)


def _stored_accuracy(run: Path, epoch: int) -> float:
    """Eval-mode training accuracy from the snapshot's stored features and classifier."""
    features, labels = snapshots.load_split(run, epoch, "train")
    weight, bias = snapshots.load_classifier(run, epoch)
    logits = F.linear(features.float(), weight, bias)
    return (logits.argmax(1) == labels).double().mean().item()


def test_tpt_onset_is_the_first_epoch_of_eval_mode_accuracy_at_the_threshold(full_run):
    """train_acc is measured (eval mode) at every snapshot and, until the onset, wherever
    the running accuracy reaches train.tpt_accuracy; the onset is its first such epoch."""
    cfg, run = full_run
    history = store.read_history(run)
    threshold = cfg.train.tpt_accuracy
    measured = history.loc[history["train_acc"].notna(), "epoch"].tolist()
    reached = history.loc[history["train_acc"] >= threshold, "epoch"]
    assert len(reached) > 0, "the tiny run should fit its 48 images"
    onset = int(reached.iloc[0])
    candidates = history.loc[(history["epoch"] <= onset)
                             & (history["train_acc_running"] >= threshold), "epoch"]
    assert set(measured) == set(SNAPSHOTS) | set(candidates)
    assert store.read_manifest(run)["tpt_onset_epoch"] == onset
    assert torch.load(run / "checkpoint.pt", weights_only=True)["tpt_onset_epoch"] == onset
    assert ((history["train_acc"] * 48).dropna() % 1 == 0).all()  # a count of 48 images


def test_stored_features_and_classifier_reproduce_the_logged_accuracy(full_run):
    _, run = full_run
    history = store.read_history(run).set_index("epoch")
    for epoch in SNAPSHOTS:
        assert history.loc[epoch, "train_acc"] == _stored_accuracy(run, epoch), epoch


def test_onset_rule_on_a_crafted_history():
    """Running accuracy at 1 early does not start the terminal phase; NaN (not measured)
    never does; the threshold is inclusive."""
    epochs = [1, 2, 3, 4, 5, 6]
    acc = [0.5, None, math.nan, 0.9985, 0.999, 1.0]
    assert store.tpt_onset(epochs, acc, 0.999) == 5
    assert store.tpt_onset(epochs, acc, 0.996) == 4
    assert store.tpt_onset(epochs, acc, 1.0) == 6
    assert store.tpt_onset(epochs[:4], acc[:4], 0.999) is None
    assert isinstance(store.tpt_onset(epochs, acc, 0.5), int)


def test_bf16_changes_nothing_on_the_cpu(full_run, tmp_path, caplog):
    cfg, run = full_run
    other = replace(cfg, train=replace(cfg.train, bf16=True))
    with caplog.at_level("INFO", logger="nctools.training.loop"):
        out = T.train(other, tmp_path / "run")
    assert _history(out).equals(_history(run))
    _assert_same_snapshots(out, run)
    onset = store.read_manifest(out)["tpt_onset_epoch"]
    assert f"epoch {onset}: eval-mode training accuracy" in caplog.text
    assert "train.bf16 applies to CUDA only" in caplog.text


def test_channels_last_on_the_cpu_trains_the_same_network(full_run, tmp_path, monkeypatch):
    """channels_last changes the memory layout (and the rounding of the convolutions),
    not the model: same history to rounding, and its own resume stays bit-identical."""
    cfg, run = full_run
    other = replace(cfg, train=replace(cfg.train, channels_last=True))
    real, layouts = T.train_step, []

    def spy(model, x, *args, **kwargs):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        layouts.append((x.is_contiguous(memory_format=torch.channels_last),
                        conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(T, "train_step", spy)
    out = T.train(other, tmp_path / "run")
    assert set(layouts) == {(True, True)}
    got, want = _history(out), _history(run)
    assert got["epoch"].equals(want["epoch"])
    for column in ("train_loss", "test_loss"):
        assert torch.allclose(torch.tensor(got[column].to_numpy()),
                              torch.tensor(want[column].to_numpy()), rtol=1e-3, atol=1e-5)
    monkeypatch.undo()
    _interrupt_at_step(monkeypatch, step=8)  # inside epoch 3
    with pytest.raises(KeyboardInterrupt):
        T.train(other, tmp_path / "resumed")
    monkeypatch.undo()
    resumed = T.train(other, tmp_path / "resumed")
    assert _history(resumed).equals(got)
    _assert_same_snapshots(resumed, out)


@pytest.mark.parametrize("every", [0, 3])
def test_eval_every_skips_test_passes_and_nothing_else(full_run, tmp_path, every):
    """train.eval_every: the test split is evaluated every K epochs, at snapshot epochs and
    at the last; the other rows have NaN test columns, and training is unchanged."""
    cfg, run = full_run
    other = replace(cfg, train=replace(cfg.train, eval_every=every))
    out = T.train(other, tmp_path / "run")
    got, want = _history(out), _history(run)
    evaluated = set(SNAPSHOTS) | {EPOCHS} | ({e for e in range(1, EPOCHS + 1) if e % every == 0}
                                            if every else set())
    skipped = got["epoch"].map(lambda e: e not in evaluated)
    assert skipped.sum() == EPOCHS - len(evaluated) > 0
    assert got.loc[skipped, ["test_loss", "test_acc"]].isna().all().all()
    assert got.loc[~skipped].equals(want.loc[~skipped])
    train_columns = ["epoch", "lr", "train_loss", "train_acc_running", "train_acc"]
    assert got[train_columns].equals(want[train_columns])
    _assert_same_snapshots(out, run)


def test_float16_snapshots_are_the_float32_features_rounded(full_run, tmp_path):
    cfg, run = full_run
    # 2 epochs: the lr of epoch 1 is 0.05 as in the 6-epoch run, so epoch 1 is the same
    cfg16 = replace(cfg, train=replace(cfg.train, epochs=2),
                    snapshot=replace(cfg.snapshot, epochs=[1], dtype="float16"))
    run16 = T.train(cfg16, tmp_path / "run16")
    snapshots.verify_snapshot(run16, 1)
    assert snapshots.read_meta(run16, 1)["dtype"] == "float16"
    for split in ("train", "test"):
        f16, _ = snapshots.load_split(run16, 1, split)
        f32, _ = snapshots.load_split(run, 1, split)
        assert f16.dtype == torch.float16
        assert torch.equal(f16, f32.half()), split
    # the logged accuracy is that of the stored (rounded) features
    assert store.read_history(run16)["train_acc"].iloc[0] == _stored_accuracy(run16, 1)


def _interrupt_at_step(monkeypatch, step: int, via_signal: bool = False,
                       signum: int = signal.SIGINT) -> list[int]:
    """Make train_step raise Ctrl-C at call ``step`` (1-based), or send ``signum`` during
    it; returns the call counter."""
    real, calls = T.train_step, [0]

    def step_then_stop(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step and not via_signal:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if calls[0] == step:
            os.kill(os.getpid(), signum)  # the loop must finish this step, then stop
        return out

    monkeypatch.setattr(T, "train_step", step_then_stop)
    return calls


def test_resume_after_ctrl_c_is_bit_identical(full_run, tmp_path, monkeypatch, caplog):
    cfg, run = full_run
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, step=8)  # 3 steps per epoch: inside epoch 3
    logger = "nctools.training.loop"
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING", logger=logger):
        T.train(cfg, out)
    manifest = store.read_manifest(out)
    assert (manifest["status"], manifest["epochs_done"]) == ("interrupted", 2)
    assert f"nctools train {out / 'config.yaml'} --out {out}" in caplog.text
    assert store.read_history(out)["epoch"].tolist() == [1, 2]
    monkeypatch.undo()
    T.train(cfg, out)
    assert _history(out).equals(_history(run))
    _assert_same_snapshots(out, run)
    assert store.read_manifest(out)["status"] == "completed"
    resumed, uninterrupted = (store.load_checkpoint(r / "checkpoint.pt") for r in (out, run))
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_current_step(full_run, tmp_path, monkeypatch, signum):
    """Ctrl-C, or the SIGTERM a batch scheduler sends: finish the step, save, stop."""
    cfg, run = full_run
    out = tmp_path / "run"
    calls = _interrupt_at_step(monkeypatch, step=13, via_signal=True, signum=signum)  # epoch 5
    handler = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, out)
    assert calls[0] == 13  # the signalled step ran to its end, no further step started
    assert signal.getsignal(signum) is handler  # restored
    manifest = store.read_manifest(out)
    assert (manifest["epochs_done"], manifest["status"]) == (4, "interrupted")
    monkeypatch.undo()
    T.train(cfg, out)
    assert _history(out).equals(_history(run))
    _assert_same_snapshots(out, run)


def test_files_past_the_checkpoint_are_rewritten_on_resume(full_run, tmp_path, monkeypatch):
    """A crash after epoch 4's history row but before its checkpoint leaves a stale row and a
    partial snapshot behind; the resume replays epoch 4 over them."""
    cfg, run = full_run
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, step=11)  # inside epoch 4: checkpoint of epoch 3
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, out)
    monkeypatch.undo()
    store.append_history(out, {"epoch": 4, "lr": 9.0, "train_loss": 9.0, "train_acc": 0.0,
                               "test_loss": 9.0, "test_acc": 0.0, "seconds": 1.0})
    partial = snapshots.snapshot_dir(out, 4)
    partial.mkdir(parents=True)
    (partial / "train.safetensors").write_bytes(b"half a file")
    T.train(cfg, out)
    assert _history(out).equals(_history(run))
    _assert_same_snapshots(out, run)


def test_a_completed_run_is_left_as_it_is(full_run):
    cfg, run = full_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert T.train(cfg, run) == run
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_another_config_in_the_run_dir_is_refused(full_run):
    cfg, run = full_run
    other = replace(cfg, train=replace(cfg.train, lr=0.1))
    with pytest.raises(RunError) as err:
        T.train(other, run)
    message = str(err.value)
    assert "train.lr: 0.05 -> 0.1" in message
    assert "another --out" in message and "--resume" in message
    # with resume=True the saved config wins (here: the run is complete, nothing changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert T.train(other, run, resume=True) == run
    assert any("train.lr" in str(w.message) for w in caught)


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(RunError, match="no run to resume"):
        T.train(tiny_config(), tmp_path / "nothing", resume=True)


def test_a_folder_of_other_files_is_not_trained_into(tmp_path):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"holds files but no nctools run \(no config\.yaml\)"):
        T.train(tiny_config(), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / f".config.yaml.tmp-{os.uname().nodename}-1").write_text("")  # a killed start
    assert store.read_manifest(T.train(tiny_config(), empty))["status"] == "completed"


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config()
    out = tmp_path / "run"
    real, calls = T.train_step, [0]

    def blow_up(model, *args, **kwargs):
        calls[0] += 1
        loss, hits = real(model, *args, **kwargs)
        if calls[0] >= 7:  # epoch 3 onwards: the weights go to NaN as in a real divergence
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            loss = torch.tensor(float("nan"))
        return loss, hits

    monkeypatch.setattr(T, "train_step", blow_up)
    with pytest.raises(RunError) as err:
        T.train(cfg, out)
    message = str(err.value)
    assert "diverged at epoch 3" in message
    assert f"{out / 'checkpoint.pt'} (epoch 2)" in message
    manifest = store.read_manifest(out)
    assert (manifest["status"], manifest["epochs_done"]) == ("diverged", 2)
    assert store.read_history(out)["epoch"].tolist() == [1, 2]
    assert snapshots.list_snapshots(out) == [1, 2]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_huge_learning_rate_diverges_in_the_first_epoch(tmp_path):
    cfg = tiny_config(lr=1e6, loss="mse")
    with pytest.raises(RunError, match=r"diverged at epoch 1 .*checkpoint\.pt \(epoch 0\)"):
        T.train(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0  # the initialisation, still loadable


def test_a_distributed_launch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunError, match="WORLD_SIZE=2"):
        T.train(tiny_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_snapshot_schedule_is_the_config_one(full_run):
    cfg, run = full_run
    assert snapshots.list_snapshots(run) == snapshot_epochs(cfg.snapshot.epochs, EPOCHS)


def test_a_run_that_failed_before_its_first_epoch_restarts_with_a_changed_config(
        tmp_path, monkeypatch):
    """A logger library that cannot be opened stops the run before epoch 1 (run.json says
    "failed" and why, no epoch done): the folder then takes the corrected config, as a new
    run would, instead of refusing it as another run's."""
    def missing(*args, **kwargs):
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(T, "open_loggers", missing)
    run = tmp_path / "run"
    with pytest.raises(ImportError, match="tensorboard"):
        T.train(tiny_config(loggers=["tensorboard"]), run)
    assert store.read_manifest(run)["status"] == "failed"
    assert "No module named 'tensorboard'" in store.read_manifest(run)["error"]
    assert store.read_manifest(run)["epochs_done"] == 0
    monkeypatch.undo()
    fixed = helpers.tiny_config(epochs=2)  # also fewer epochs: a new run, not a shorter one
    assert T.train(fixed, run) == run
    assert store.read_manifest(run)["status"] == "completed"
    assert load_config(run / "config.yaml") == fixed
    assert store.read_history(run)["epoch"].tolist() == [1, 2]
    fresh = tmp_path / "fresh"  # the same numbers as a run started in a new folder
    T.train(fixed, fresh)
    assert _history(run).equals(_history(fresh))
    _assert_same_snapshots(run, fresh)

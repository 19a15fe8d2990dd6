"""train.loggers: TensorBoard's and MLflow's own readers find each history row and, with
snapshot.measure, each snapshot's metrics equal to what `nctools analyze` reports."""

import dataclasses
import shutil

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nctools import analyze, train
from nctools.config.schema import load_config, validate
from nctools.errors import ConfigError, RunError
from nctools.runs import store
from nctools.runs.layout import HISTORY_FILE, LOGS_DIR
from nctools.training.loggers import mlflow_uri
from tests.helpers import tiny_config, tree_hashes


def test_tensorboard_and_mlflow_receive_history_and_snapshot_metrics(tmp_path):
    config = tiny_config(loggers=["tensorboard", "mlflow"], snapshots=[1, 3])
    config.snapshot.measure = True
    run = train(config, tmp_path / "run")
    history = pd.read_csv(run / HISTORY_FILE)
    table = analyze(run)

    def analyzed(split, metric):
        rows = table[(table.split == split) & (table.metric == metric)].sort_values("epoch")
        return list(rows.epoch), list(rows.value)

    events = EventAccumulator(str(run / LOGS_DIR))
    events.Reload()
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(list(history.train_loss), rel=1e-6)
    for split in ("train", "test"):
        epochs, values = analyzed(split, "nc1")
        curve = events.Scalars(f"nc/{split}/nc1")
        assert [e.step for e in curve] == epochs == [1, 3]
        assert [e.value for e in curve] == pytest.approx(values, rel=1e-5)

    client = MlflowClient(tracking_uri=mlflow_uri(run))
    (found,) = client.search_runs([client.get_experiment_by_name("nctools").experiment_id])
    assert found.data.params["train.epochs"] == "3"
    accuracy = client.get_metric_history(found.info.run_id, "nc/test/ncc_accuracy")
    epochs, values = analyzed("test", "ncc_accuracy")
    assert [(m.step, m.value) for m in accuracy] == list(zip(epochs, values, strict=True))
    assert [m.step for m in client.get_metric_history(found.info.run_id, "test_acc")] == [1, 2, 3]


def test_unknown_logger_is_a_config_error():
    config = dataclasses.replace(tiny_config(), train=dataclasses.replace(
        tiny_config().train, loggers=["tensorboard", "neptune"]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.loggers"):
        validate(config)


def test_analyze_export_tensorboard_writes_the_table(tmp_path, capsys):
    from nctools.cli import main

    run = train(tiny_config(epochs=2, snapshots=[2]), tmp_path / "run")
    assert main(["analyze", str(run), "--export", "tensorboard"]) == 0
    table = pd.read_csv(run / "metrics.csv")
    events = EventAccumulator(str(run / LOGS_DIR / "export"))
    events.Reload()
    for (split, metric), rows in table.groupby(["split", "metric"]):
        curve = events.Scalars(f"nc/{split}/{metric}")
        assert [e.step for e in curve] == list(rows.epoch)
        assert [e.value for e in curve] == pytest.approx(list(rows.value), rel=1e-6)
    assert [e.step for e in events.Scalars("train_acc_running")] == [1, 2]
    measured = store.read_history(run).dropna(subset=["train_acc"])["epoch"].tolist()
    assert [e.step for e in events.Scalars("train_acc")] == measured  # eval mode: where taken


def wandb_records(run_file):
    """The records of a W&B offline run file (``run-ID.wandb``), decoded with wandb's own
    protobuf schema. The file is W&B's 7-byte header (``:W&B``, magic 0xBEE1, version 0)
    then a LevelDB log: 32 KiB blocks of chunks with a 7-byte header (crc32c, length,
    type: 1 whole, 2 first, 3 middle, 4 last). wandb 0.2x+ ships no Python reader of it
    (its datastore moved into the wandb-core binary), so the framing is read here."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block end
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_history_and_snapshot_metrics(tmp_path, monkeypatch):
    import json

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)  # offline: nctools' default
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    config = tiny_config(loggers=["wandb"], snapshots=[1, 3])
    config.snapshot.measure = True
    config.train.wandb_entity = "lab"
    run = train(config, tmp_path / "run")
    history = store.read_history(run)
    table = analyze(run)

    (run_file,) = (run / LOGS_DIR / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    params = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert params["train"]["epochs"] == 3 and started.display_name == "tiny"
    assert (started.project, started.entity) == ("from-env", "lab")
    # every chart against the epoch (not W&B's _step, which counts the log calls)
    defined = [(r.metric.name or r.metric.glob_name, r.metric.step_metric)
               for r in records if r.WhichOneof("record_type") == "metric"]
    assert ("*", "epoch") in defined

    # one history row per epoch and one per snapshot with its metrics, step = epoch
    logged = [r for r in rows if "train_loss" in r]
    assert [r["epoch"] for r in logged] == [1, 2, 3]
    for column in ("lr", "train_loss", "train_acc_running", "test_loss", "test_acc"):
        assert [r[column] for r in logged] == list(history[column]), column  # JSON: exact
    measured = [r for r in rows if "nc/train/nc1" in r]
    assert [r["epoch"] for r in measured] == [1, 3]
    for (epoch, split, metric), rows_ in table.groupby(["epoch", "split", "metric"]):
        (row,) = [r for r in measured if r["epoch"] == epoch]
        value = row.get(f"nc/{split}/{metric}", float("nan"))  # NaN metrics are not logged
        assert value == pytest.approx(rows_.value.iloc[0], rel=1e-10, abs=1e-12,
                                      nan_ok=True), (epoch, split, metric)


def test_mlflow_honours_its_tracking_uri_and_logs_a_row_in_one_call(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient as Client

    calls: list[str] = []
    for name in ("log_metric", "log_batch"):
        real = getattr(Client, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if _name == "log_metric" or kwargs.get("metrics"):
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Client, name, spy)
    store_uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    assert mlflow_uri(tmp_path / "anywhere") == store_uri
    for name in ("a", "b"):
        config = tiny_config(loggers=["mlflow"], epochs=2)
        config.name = name
        train(config, tmp_path / name)
    assert calls == ["log_batch"] * 4  # one call a row: 2 runs x 2 epochs
    assert not (tmp_path / "a" / LOGS_DIR / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=store_uri)
    runs = client.search_runs([client.get_experiment_by_name("nctools").experiment_id])
    assert len(runs) == 2
    for found in runs:
        history = client.get_metric_history(found.info.run_id, "train_loss")
        want = store.read_history(tmp_path / found.info.run_name)["train_loss"]
        assert [(m.step, m.value) for m in history] == list(zip([1, 2], want, strict=True))


def test_the_runs_of_a_sweep_share_one_mlflow_store(tmp_path, monkeypatch):
    from nctools.runs.layout import SWEEP_RUNS_DIR
    from nctools.runs.sweeps import record_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record_sweep(tmp_path / "sw", {"points": []})
    point = tmp_path / "sw" / SWEEP_RUNS_DIR / "000-lr=0.1"
    assert mlflow_uri(point) == f"sqlite:///{(tmp_path / 'sw' / 'mlflow.db').resolve()}"
    alone = tmp_path / "run"
    assert mlflow_uri(alone) == f"sqlite:///{(alone / LOGS_DIR / 'mlflow.db').resolve()}"


def test_a_logs_link_to_nowhere_is_refused_before_the_run_folder_changes(tmp_path):
    """RUN/logs a link to a cleaned scratch disk: one RunError naming the link and where it
    leads, before anything is written (config.yaml of the extended run was rewritten and
    run.json left saying "running"); once the folder exists, the run extends as usual."""
    run = train(tiny_config(loggers=["tensorboard"], epochs=2), tmp_path / "run")
    shutil.rmtree(run / LOGS_DIR)
    scratch = tmp_path / "scratch" / "logs"
    (run / LOGS_DIR).symlink_to(scratch)
    before = tree_hashes(run)
    extended = tiny_config(loggers=["tensorboard"], epochs=3)
    with pytest.raises(RunError) as raised:
        train(extended, run, resume=True)
    assert str(raised.value).startswith(
        f"{run / LOGS_DIR}: is a symbolic link to {scratch}, which does not exist")
    assert "\n" not in str(raised.value)
    assert tree_hashes(run) == before
    assert store.read_manifest(run)["status"] == "completed"
    assert load_config(run / "config.yaml").train.epochs == 2

    scratch.mkdir(parents=True)
    train(extended, run, resume=True)
    events = EventAccumulator(str(run / LOGS_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [3]
    assert store.read_manifest(run)["status"] == "completed"
    assert load_config(run / "config.yaml").train.epochs == 3

"""train.loggers: TensorBoard's and MLflow's own readers find each history row and, with
snapshot.measure, each snapshot's metrics equal to what `nctools analyze` reports."""

import dataclasses

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nctools import analyze, train
from nctools.config.schema import validate
from nctools.errors import ConfigError
from nctools.runs import store
from nctools.runs.layout import HISTORY_FILE, LOGS_DIR
from nctools.training.loggers import mlflow_uri
from tests.helpers import tiny_config


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

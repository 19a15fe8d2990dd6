"""Experiment loggers for ``nctools train``: TensorBoard, MLflow and W&B, all offline.

Usage (``train.loggers: [tensorboard, mlflow]`` in the config does this inside the loop)::

    loggers = open_loggers(["tensorboard"], run_dir, config_dict, run_name="demo")
    loggers.log(epoch, {"train_loss": 0.3, "nc/train/nc1": 0.05})
    loggers.close()

Each history row goes out as scalars at step = epoch (``train_loss``, ``test_acc``, ...);
with ``snapshot.measure: true`` each snapshot's metrics follow as ``nc/<split>/<metric>``
(docs/metrics.md keys). Everything is written under ``RUN/logs/``: TensorBoard event files
in ``RUN/logs/``, an MLflow local SQLite store ``RUN/logs/mlflow.db``, a W&B offline run
in ``RUN/logs/wandb`` (``wandb sync`` uploads it later). Each library is an optional extra,
imported only when named. The module sits in ``training`` (not ``integrations``) because
the training loop, below ``integrations``, calls it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from nctools.config.schema import LOGGERS
from nctools.runs.layout import LOGS_DIR, PENULTIMATE

Sink = tuple[Callable[[int, dict[str, float]], None], Callable[[], None]]  # (log, close)


class Loggers:
    """The loggers a run writes to; ``log`` sends one step's scalars to every one."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Scalars at ``step`` (the epoch); non-numbers and NaN (skipped evaluations) left out."""
        scalars = {
            k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(float(v))
        }  # fmt: skip
        for log, _ in self.sinks:
            log(step, scalars)

    def close(self) -> None:
        for _, close in self.sinks:
            close()


def open_loggers(
    names: Iterable[str], run_dir: str | os.PathLike, config: Mapping[str, Any], run_name: str
) -> Loggers:
    """Open the named loggers (any of ``LOGGERS``) writing under ``run_dir/logs``.

    ``config`` (a plain nested dict) is recorded as the run's parameters.
    """
    logs = Path(run_dir) / LOGS_DIR
    openers = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
    sinks = []
    for name in names:
        if name not in openers:
            raise ValueError(f"train.loggers: unknown logger {name!r} (one of {LOGGERS})")
        sinks.append(openers[name](logs, config, run_name))
    return Loggers(sinks)


def _tensorboard(logs: Path, config: Mapping[str, Any], run_name: str) -> Sink:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(logs))

    def log(step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # curves appear while the run trains

    return log, writer.close


def _mlflow(logs: Path, config: Mapping[str, Any], run_name: str) -> Sink:
    from mlflow.tracking import MlflowClient

    logs.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=mlflow_uri(logs.parent))
    experiment = client.get_experiment_by_name("nctools")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "nctools", artifact_location=(logs / "mlflow-artifacts").resolve().as_uri()
    )
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    for key, value in _flatten(config).items():
        client.log_param(run_id, key, value)

    def log(step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            client.log_metric(run_id, key, value, step=step)

    return log, lambda: client.set_terminated(run_id)


def mlflow_uri(run_dir: str | os.PathLike) -> str:
    """The MLflow tracking URI of a run's local store (SQLite: MLflow's file store is
    deprecated): ``MlflowClient(tracking_uri=mlflow_uri(RUN))`` reads it back."""
    return f"sqlite:///{(Path(run_dir) / LOGS_DIR / 'mlflow.db').resolve()}"


def _wandb(logs: Path, config: Mapping[str, Any], run_name: str) -> Sink:
    import wandb

    (logs / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(mode="offline", dir=str(logs / "wandb"), project="nctools",
                     name=run_name, config=dict(config), reinit="create_new")  # fmt: skip

    def log(step: int, scalars: dict[str, float]) -> None:
        run.log({**scalars, "epoch": step})

    return log, run.finish


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def snapshot_metrics(
    splits: Mapping[str, tuple[Any, Any]], weight: Any, bias: Any
) -> dict[str, float]:
    """{``nc/<split>/<metric>``: value} of a snapshot's features, as ``nctools analyze``
    would report them (test NC4 against the train means, docs/metrics.md "On other data").

    Args:
        splits: name -> (features (n, D), labels (n,)); under torchrun each rank's shard
            (every rank must call this: the statistics are summed across processes).
        weight: (C, D), bias: (C,) or None, the classifier.
    """
    import torch.distributed as dist

    from nctools.metrics.engine import TRAIN_SPLIT, ReferenceMeans
    from nctools.metrics.measure import measure_chunks

    values: dict[str, float] = {}
    train_means = ReferenceMeans()
    for name in sorted(splits, key=lambda s: s != TRAIN_SPLIT):  # train first: its means
        features, labels = splits[name]
        result, means = measure_chunks(
            functools.partial(list, [(features, labels)]), weight, bias,
            class_means=train_means.for_split(name),
            group=dist.group.WORLD,  # None outside torchrun: this process alone
        )
        train_means.keep(name, means)
        values.update({f"nc/{name}/{key}": value for key, value in result.items()})
    return values


def export_tensorboard(run_dir: str | os.PathLike, table: Any) -> Path:
    """Write an analysed run as TensorBoard event files under ``RUN/logs/export``.

    Args:
        run_dir: the run directory (its ``history.csv`` gives the per-epoch scalars).
        table: the tidy metrics table of ``nctools.analyze`` (columns epoch, split,
            metric, value), written as ``nc/<split>/<metric>`` at step = epoch.

    Returns:
        the folder holding the event files.
    """
    from nctools.runs.store import read_history

    folder = Path(run_dir) / LOGS_DIR / "export"
    sink = Loggers([_tensorboard(folder, {}, "export")])
    try:
        for row in read_history(run_dir).to_dict("records"):
            sink.log(int(row["epoch"]), row)
        for epoch, rows in table.groupby("epoch"):
            # the penultimate features as nc/<split>/<metric>; inner layers (snapshot.layers)
            # as nc/<split>/<layer>/<metric>
            values = {"/".join(["nc", r.split, *([] if r.layer == PENULTIMATE else [r.layer]),
                                r.metric]): r.value for r in rows.itertuples()}
            sink.log(int(epoch), values)
    finally:
        sink.close()
    return folder

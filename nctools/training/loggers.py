"""Experiment loggers for ``nctools train``: TensorBoard, MLflow and W&B.

Usage (``train.loggers: [tensorboard, mlflow]`` in the config does this inside the loop)::

    loggers = open_loggers(["tensorboard"], run_dir, config_dict, run_name="demo")
    loggers.log(epoch, {"train_loss": 0.3, "nc/train/nc1": 0.05})
    loggers.close()

Each history row goes out as scalars at step = epoch (``train_loss``, ``test_acc``, ...);
with ``snapshot.measure: true`` each snapshot's metrics follow as ``nc/<split>/<metric>``
(docs/metrics.md keys). TensorBoard event files go to ``RUN/logs/``. MLflow writes to
``$MLFLOW_TRACKING_URI`` when set, else to a local SQLite store: the sweep's
``SWEEP/mlflow.db`` for a run of a sweep (its runs compare in one MLflow UI), otherwise
``RUN/logs/mlflow.db`` (:func:`mlflow_uri`). W&B runs in ``$WANDB_MODE`` (offline unless
set: ``wandb sync`` uploads the run in ``RUN/logs/wandb`` later), in the project and entity
of ``train.wandb_project`` / ``train.wandb_entity``, else ``$WANDB_PROJECT`` /
``$WANDB_ENTITY``, else project ``nctools``; its charts use ``epoch`` as their step.
Each library is an optional extra, imported only when named. The module sits in
``training`` (not ``integrations``) because the training loop, below ``integrations``,
calls it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from nctools.config.schema import LOGGERS
from nctools.errors import RunError
from nctools.runs.layout import LOGS_DIR, PENULTIMATE, SWEEP_RUNS_DIR
from nctools.runs.sweeps import is_sweep

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


def check_logs_folder(run_dir: str | os.PathLike) -> None:
    """RunError unless ``RUN/logs`` can take the loggers' files: absent, a folder, or a
    link to a folder. A link that leads nowhere (its scratch disk cleaned, say) or a file
    there would fail only once the run folder is rewritten (``config.yaml`` of an extended
    run, ``run.json`` saying ``running``), so :func:`nctools.training.loop.train` calls this
    before it changes anything."""
    logs = Path(run_dir) / LOGS_DIR
    if logs.is_symlink() and not logs.exists():
        raise RunError(f"{logs}: is a symbolic link to {logs.readlink()}, which does not "
                       "exist; train.loggers write there: create the folder it leads to, or "
                       "remove the link")
    if logs.exists() and not logs.is_dir():
        what = f"a symbolic link to {logs.readlink()}, " if logs.is_symlink() else ""
        raise RunError(f"{logs}: is {what}a file, not a folder; train.loggers write there: "
                       "move the file away")


def _tensorboard(logs: Path, config: Mapping[str, Any], run_name: str) -> Sink:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(logs))

    def log(step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # curves appear while the run trains

    return log, writer.close


MLFLOW_EXPERIMENT = "nctools"


def _mlflow(logs: Path, config: Mapping[str, Any], run_name: str) -> Sink:
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logs.mkdir(parents=True, exist_ok=True)
    uri = mlflow_uri(logs.parent)
    client = MlflowClient(tracking_uri=uri)
    # a local store keeps its artifacts beside it (MLflow's default: ./mlruns of the cwd)
    local = uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").as_uri() \
        if local else None
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    if experiment is None:
        with contextlib.suppress(MlflowException):  # another run of the sweep made it
            client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=artifacts)
        experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    assert experiment is not None  # made above, by this run or another
    run_id = client.create_run(experiment.experiment_id, run_name=run_name).info.run_id
    params = [Param(key, str(value)) for key, value in _flatten(config).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=params[start:start + 100])

    def log(step: int, scalars: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, stamp, step)
                                          for key, value in scalars.items()])

    return log, lambda: client.set_terminated(run_id)


def mlflow_uri(run_dir: str | os.PathLike) -> str:
    """The MLflow tracking URI a run logs to: ``$MLFLOW_TRACKING_URI`` when set, else a
    local SQLite store (MLflow's file store is deprecated), one per sweep for a run of a
    sweep (``SWEEP/mlflow.db``), else the run's own (``RUN/logs/mlflow.db``).
    ``MlflowClient(tracking_uri=mlflow_uri(RUN))`` reads it back."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = Path(run_dir).resolve()
    sweep = run_dir.parent.parent
    if run_dir.parent.name == SWEEP_RUNS_DIR and is_sweep(sweep):
        return f"sqlite:///{sweep / 'mlflow.db'}"
    return f"sqlite:///{run_dir / LOGS_DIR / 'mlflow.db'}"


def _wandb(logs: Path, config: Mapping[str, Any], run_name: str) -> Sink:
    import wandb

    (logs / "wandb").mkdir(parents=True, exist_ok=True)
    train = config.get("train", {})
    run = wandb.init(
        mode=None if os.environ.get("WANDB_MODE") else "offline",  # None: $WANDB_MODE
        dir=str(logs / "wandb"), name=run_name, config=dict(config), reinit="create_new",
        project=train.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "nctools",
        entity=train.get("wandb_entity") or os.environ.get("WANDB_ENTITY") or None,
    )
    # every chart against the epoch: a history row and a snapshot's metrics are two
    # log calls of one epoch, and W&B's own _step would count them
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")

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

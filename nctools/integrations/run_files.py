"""An nctools run directory written from another library's training loop (Lightning), so
that ``nctools analyze RUN`` and ``nctools plot RUN`` read it as a run of ``nctools train``.

Usage (by :class:`nctools.integrations.lightning.NeuralCollapseCallback` with
``save_snapshots=True``)::

    open_external_run(run, "lightning", done=0)          # nctools.runs.resume's decision
    config = external_config(name="MyModule", arch="MyModule", dataset="MyData", ...)
    write_records(run, history_row(...), config)          # history.csv, config.yaml
    write_epoch(run, epoch, {"train": (features, labels)}, weight, bias, "float32", None)

Every file goes through the writers ``nctools train`` uses: :func:`nctools.runs.store.
append_history`, :func:`~nctools.runs.store.save_config`, :func:`~nctools.runs.store.
write_manifest` and :func:`nctools.runs.snapshots.write_snapshot` (atomic writes, a sha256
per snapshot file in ``meta.json``; under DDP one shard per process, merged by rank 0). The
snapshot writer takes a split's features whole, so each process holds its own share of a
split's features (N/world x D, float32, on the CPU) while its snapshot is written, as
``nctools train`` does.

The config describes what is known of the run: ``data.dataset`` (the class name of the
datamodule or the training loader's dataset), ``data.num_classes``, ``model.arch`` (the
module's class name, which the plot legend shows), the optimiser's settings, ``train.loss``,
``train.tpt_accuracy``, the snapshot epochs. The keys nctools cannot know
(image size, width, depth, the schedule, ...) are left out of ``config.yaml`` (a comment
at its top says so); reading it back fills them with the schema's defaults. The manifest's
``source`` names the loop (``"lightning"``); no nctools loader knows the data set, so
``nctools train`` refuses to retrain it with an error naming ``data.dataset``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from torch import Tensor

from nctools.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    SnapshotConfig,
    TrainConfig,
    config_to_dict,
    validate,
)
from nctools.runs import snapshots, store
from nctools.runs.files import atomic_write_text
from nctools.runs.layout import CONFIG_FILE, HISTORY_COLUMNS
from nctools.runs.manifest import new_manifest, read_if_any, run_identity

UNKNOWN = "unknown"  # a name the loop does not say (a loader without a dataset)
# the config keys a loop outside nctools says something about; config.yaml holds only these
KNOWN_KEYS = {
    "data": ("dataset", "num_classes"),
    "model": ("arch",),
    "train": ("epochs", "batch_size", "loss", "lr", "momentum", "weight_decay", "device",
              "tpt_accuracy"),
    "snapshot": ("epochs", "dtype"),  # the splits: each snapshot's meta.json names them
}
CONFIG_NOTE = ("# An nctools run written from a training loop outside nctools: the keys not\n"
               "# listed here are unknown (nctools reads them as the schema's defaults).\n")


def external_config(
    *,
    name: str,
    arch: str,
    dataset: str,
    num_classes: int,
    epochs: int,
    snapshot_epochs: Sequence[int],
    loss: str,
    optimizer: torch.optim.Optimizer | None,
    batch_size: int | None,
    device: torch.device,
    dtype: str,
    tpt_accuracy: float,
) -> Config:
    """The config of a run trained outside nctools, validated (ConfigError names the key);
    ``arch`` and ``dataset`` are the loop's class names (:data:`UNKNOWN` when not known).

    ``lr``, ``momentum`` and ``weight_decay`` are the optimizer's first parameter group's
    (its initial learning rate; momentum and weight decay 0 where it has no such setting;
    ``train.schedule`` is ``constant``: the loop's own schedule is not described);
    ``batch_size`` is the training loader's (1 when it has none). The splits are not
    config keys here: a loop's names (Lightning's ``val``) are not those of ``nctools
    train``, and each snapshot's ``meta.json`` names its own.
    """
    group = optimizer.param_groups[0] if optimizer is not None else {}
    config = Config(
        name=name,
        data=DataConfig(dataset=dataset, num_classes=num_classes),
        model=ModelConfig(arch=arch),
        train=TrainConfig(
            epochs=epochs, batch_size=batch_size or 1, loss=loss,
            lr=float(group.get("initial_lr", group.get("lr", TrainConfig.lr))),
            momentum=float(group.get("momentum", 0.0)),
            weight_decay=float(group.get("weight_decay", 0.0)),
            schedule="constant", milestones=[], tpt_accuracy=tpt_accuracy,
            # the config's device names where it trained (cpu, cuda:N), else auto
            device=str(device) if device.type in ("cpu", "cuda") else "auto",
        ),
        snapshot=SnapshotConfig(epochs=sorted(set(snapshot_epochs)), dtype=dtype),
    )
    validate(config)
    return config


def history_row(epoch: int, lr: float, train_loss: float | None, values: Mapping[str, float],
                seconds: float) -> dict:
    """One ``history.csv`` row of a measured epoch: the eval-mode accuracies come from the
    measurement (``nc/<split>/accuracy``), what the loop does not say is NaN."""
    row: dict = dict.fromkeys(HISTORY_COLUMNS, math.nan)
    row.update(epoch=epoch, lr=lr, seconds=seconds,
               train_loss=math.nan if train_loss is None else float(train_loss),
               train_acc=values.get("nc/train/accuracy", math.nan),
               test_acc=values.get("nc/val/accuracy", math.nan))
    return row


def write_epoch(
    run_dir: Path,
    epoch: int,
    splits: dict[str, tuple[Tensor, Tensor]],
    weight: Tensor,
    bias: Tensor | None,
    dtype: str,
    shard: tuple[int, int] | None,
) -> None:
    """This process's snapshot files of ``epoch`` (``splits`` in the run directory's names,
    features (n, D), labels (n,)); the caller merges the shards (rank 0, after a barrier)
    with :func:`snapshots.finalize_sharded_snapshot`."""
    snapshots.write_snapshot(run_dir, epoch, splits, weight.detach().float().cpu(),
                             None if bias is None else bias.detach().float().cpu(),
                             dtype=dtype, shard=shard)


def write_records(run_dir: Path, row: dict, config: Config) -> None:
    """The history row and the config of a measured epoch (rank 0), before its snapshot:
    a reader never finds a snapshot without them."""
    store.append_history(run_dir, row)
    known = {section: {key: values[key] for key in KNOWN_KEYS[section]}
             for section, values in config_to_dict(config).items() if section in KNOWN_KEYS}
    text = yaml.safe_dump({"name": config.name, **known}, sort_keys=False,
                          default_flow_style=False)
    atomic_write_text(run_dir / CONFIG_FILE, CONFIG_NOTE + text)


def update_manifest(run_dir: Path, config: Config, *, source: str, device: torch.device,
                    world_size: int, epochs_done: int | None = None,
                    status: str = "running") -> dict:
    """Write ``run.json`` (rank 0) from the last snapshot's meta and the history; returns it.

    The schema is :func:`nctools.runs.manifest.new_manifest`'s, with ``source``.
    """
    old = read_if_any(run_dir)
    written = snapshots.list_snapshots(run_dir)
    meta = snapshots.read_meta(run_dir, written[-1]) if written else {}
    rows = {name: entry["shape"][0] for name, entry in meta.get("splits", {}).items()}
    history = store.read_history(run_dir)
    onset = store.tpt_onset(history["epoch"].astype(int).tolist(),
                            history["train_acc"].astype(float).tolist(),
                            config.train.tpt_accuracy)
    manifest = new_manifest(
        name=config.name, run_id=run_identity(run_dir), status=status,
        source=source, device=str(device), world_size=world_size, dataset=config.data.dataset,
        num_train=rows.get("train"), num_test=rows.get("val", rows.get("test")),
        num_classes=meta.get("num_classes", config.data.num_classes),
        feature_dim=meta.get("dim"), epochs=config.train.epochs,
        epochs_done=old.get("epochs_done", 0) if epochs_done is None else epochs_done,
        tpt_onset_epoch=onset, snapshot_epochs=written,
    )
    store.write_manifest(run_dir, manifest)
    return manifest

"""An nctools run directory written from another library's training loop (Lightning), so
that ``nctools analyze RUN`` and ``nctools plot RUN`` read it as a run of ``nctools train``.

Usage (by :class:`nctools.integrations.lightning.NeuralCollapseCallback` with
``save_snapshots=True``)::

    open_external_run(run, done=0)                       # rank 0, when training starts
    config = external_config(name="MyModule", source="lightning", ...)
    write_epoch(run, epoch, row, config, {"train": (features, labels)}, weight, bias)

Every file goes through the writers ``nctools train`` uses: :func:`nctools.runs.store.
append_history`, :func:`~nctools.runs.store.save_config`, :func:`~nctools.runs.store.
write_manifest` and :func:`nctools.runs.snapshots.write_snapshot` (atomic writes, a sha256
per snapshot file in ``meta.json``; under DDP one shard per process, merged by rank 0). The
snapshot writer takes a split's features whole, so each process holds its own share of a
split's features (N/world x D, float32, on the CPU) while its snapshot is written, as
``nctools train`` does.

The config describes the run for the analysis (``train.loss``, ``train.weight_decay``,
``train.tpt_accuracy``, the snapshot epochs and splits); ``data.dataset`` and ``model.arch``
name the source library (``"lightning"``), which no nctools loader knows, so ``nctools
train`` refuses to retrain it with an error naming ``data.dataset``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from nctools._version import __version__
from nctools.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    SnapshotConfig,
    TrainConfig,
    load_config,
    validate,
)
from nctools.errors import RunError
from nctools.runs import files, snapshots, store
from nctools.runs.layout import CONFIG_FILE, HISTORY_COLUMNS, MANIFEST_FILE

RUN_SPLITS = {"train": "train", "val": "test"}  # a loop's split -> the run directory's


def open_external_run(run_dir: Path, source: str, done: int, write: bool = True) -> None:
    """Make ``run_dir`` ready to receive a run of ``source`` after ``done`` epochs.

    A new or empty folder is a new run; a training resumed from a checkpoint at epoch
    ``done`` >= 1 continues the run of the same source there (later history rows are
    dropped and written again, as ``nctools train`` does). Raises RunError for a file, a
    folder holding other files, a run of ``nctools train`` or of another source, or a run
    when ``done`` is 0 (a new training would mix its snapshots with the old ones). Under DDP
    every process checks (all raise together, none waits for the others in a collective)
    and only rank 0 passes ``write=True``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: is a file, not a run folder; give a folder as out")
    if not (run_dir / CONFIG_FILE).is_file():
        if run_dir.is_dir() and any(not files.is_temp_name(p.name) for p in run_dir.iterdir()):
            raise RunError(f"{run_dir} holds files but no nctools run (no {CONFIG_FILE}); "
                           "give an empty or new folder as out")
        return
    found = load_config(run_dir / CONFIG_FILE).data.dataset
    if found != source:
        raise RunError(f"{run_dir} holds a run of data.dataset={found!r}, not one written by "
                       f"{source}; give another folder as out")
    if done == 0:
        raise RunError(f"{run_dir} holds the run of an earlier training; give another folder "
                       "as out (a training resumed from its checkpoint continues it)")
    if write:
        store.remove_stale_temps(run_dir)
        store.truncate_history(run_dir, done)


def external_config(
    *,
    name: str,
    source: str,
    num_classes: int,
    epochs: int,
    snapshot_epochs: Sequence[int],
    splits: Sequence[str],
    loss: str,
    optimizer: torch.optim.Optimizer | None,
    batch_size: int | None,
    device: torch.device,
    dtype: str,
    tpt_accuracy: float,
) -> Config:
    """The config of a run trained outside nctools, validated (ConfigError names the key).

    ``lr``, ``momentum`` and ``weight_decay`` are the optimizer's first parameter group's
    (its initial learning rate; momentum and weight decay 0 where it has no such setting;
    ``train.schedule`` is ``constant``: the loop's own schedule is not described);
    ``batch_size`` is the training loader's (1 when it has none). ``splits`` are the run
    directory's names.
    """
    group = optimizer.param_groups[0] if optimizer is not None else {}
    config = Config(
        name=name,
        data=DataConfig(dataset=source, num_classes=num_classes),
        model=ModelConfig(arch=source),
        train=TrainConfig(
            epochs=epochs, batch_size=batch_size or 1, loss=loss,
            lr=float(group.get("initial_lr", group.get("lr", TrainConfig.lr))),
            momentum=float(group.get("momentum", 0.0)),
            weight_decay=float(group.get("weight_decay", 0.0)),
            schedule="constant", milestones=[], tpt_accuracy=tpt_accuracy,
            # the config's device names where it trained (cpu, cuda:N), else auto
            device=str(device) if device.type in ("cpu", "cuda") else "auto",
        ),
        snapshot=SnapshotConfig(epochs=sorted(set(snapshot_epochs)), splits=list(splits),
                                dtype=dtype),
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
    store.save_config(config, run_dir / CONFIG_FILE)


def update_manifest(run_dir: Path, config: Config, *, source: str, device: torch.device,
                    world_size: int, epochs_done: int | None = None,
                    status: str = "running") -> dict:
    """Write ``run.json`` (rank 0) from the last snapshot's meta and the history; returns it.

    Keys as :func:`nctools.training.run_state.new_manifest`'s, plus ``source``.
    """
    old = store.read_manifest(run_dir) if (run_dir / MANIFEST_FILE).is_file() else {}
    written = snapshots.list_snapshots(run_dir)
    meta = snapshots.read_meta(run_dir, written[-1]) if written else {}
    rows = {name: entry["shape"][0] for name, entry in meta.get("splits", {}).items()}
    history = store.read_history(run_dir)
    onset = store.tpt_onset(history["epoch"].astype(int).tolist(),
                            history["train_acc"].astype(float).tolist(),
                            config.train.tpt_accuracy)
    manifest = {
        "name": config.name,
        "run_id": old.get("run_id") or uuid.uuid4().hex,
        "status": status,
        "source": source,
        "nctools_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "world_size": world_size,
        "dataset": source,
        "num_train": rows.get("train"),
        "num_test": rows.get("test"),
        "num_classes": meta.get("num_classes", config.data.num_classes),
        "feature_dim": meta.get("dim"),
        "epochs": config.train.epochs,
        "epochs_done": old.get("epochs_done", 0) if epochs_done is None else epochs_done,
        "tpt_onset_epoch": onset,
        "snapshot_epochs": written,
    }
    store.write_manifest(run_dir, manifest)
    return manifest

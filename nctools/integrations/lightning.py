"""Neural-collapse metrics inside a PyTorch Lightning run, logged by every Lightning logger.

Usage::

    from nctools.integrations.lightning import NeuralCollapseCallback
    trainer = lightning.Trainer(callbacks=[NeuralCollapseCallback(every_n_epochs=5)])
    trainer.fit(model, train_loader, val_loader)     # logs nc/train/nc1, nc/val/nc1, ...

At each chosen epoch end the callback makes eval-mode, no-grad passes over the trainer's
own train (and val) dataloaders, takes the features at the input of ``layer`` (a module
name such as ``"fc"``, as YAML and LightningCLI give it; default: the model's last
``nn.Linear``, the classifier, whose weight and bias are W and b) with a forward
pre-hook (:mod:`nctools.integrations.core`), and measures the full docs/metrics.md suite with
``nctools.metrics.measure.measure_chunks``: two streaming passes, never every feature in
memory. The model runs once per split: the first pass's features are spilled to a
temporary folder (``spill_dir``; N x D x the features' itemsize bytes per split, removed
after it) and read back for the second; ``reuse_features=False`` runs the model twice
instead and writes nothing. Under DDP each process measures (and spills) its own shard of
the data and the statistics are summed across processes (a ``DistributedSampler`` that
pads a split to a multiple of the world size counts its repeated samples twice). Metrics
of the val split use the train split's class means for NC4 (docs/metrics.md, "On other data")
when both are measured.

A LightningModule that holds a Hugging Face language model (``*ForCausalLM``,
``*LMHeadModel``, ``*ForMaskedLM``; its first such submodule) and is fed dict batches of
``input_ids``, ``attention_mask``, ``labels`` (B, T) is measured token by token
(docs/language-models.md): that model runs on each batch, its LM head is the classifier,
each position its own loss counts is a sample labelled with the token it predicts
(:mod:`nctools.models.tokens`), with the vocabulary-scale options ``vocabulary``; each
split's NC4 takes its own class means. Its token features are not written as snapshots.

With ``save_snapshots=True`` the callback also writes an nctools run directory, so that
``nctools analyze RUN`` and ``nctools plot RUN`` work on the Lightning run as on one of
``nctools train`` (:mod:`nctools.integrations.run_files`, through the same writers)::

    callback = NeuralCollapseCallback(every_n_epochs=5, save_snapshots=True)  # out: default
    # -> RUN = trainer.log_dir/nctools (lightning_logs/version_N/nctools), or
    #    default_root_dir/nctools without a logger; out="runs/mine" puts it there

At each measured epoch the features of each split are taken in one pass and kept (each
process its share, on the CPU: the snapshot writer takes a split whole), written as the
snapshot of nctools epoch ``current_epoch + 1`` (epochs completed, as ``nctools train``
counts) with the classifier and a sha256 per file; the metrics logged are those of the
features as stored, so ``nctools analyze`` reproduces them. The splits keep their
names (``train``, ``val``) in the run directory, its tables and plots. ``history.csv``
gets a row per measured epoch: ``lr`` (the optimizer's), ``train_loss``
(``trainer.callback_metrics[loss_key]`` when logged), the eval-mode ``train_acc`` and
``test_acc`` (of the val split) of the measured pass, the epoch's ``seconds``; NaN for
the rest. Under DDP each process writes its own shard and rank 0 merges them, and writes
the history, config and manifest.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from nctools.config.schema import LOSSES, SNAPSHOT_DTYPES, Config, load_config
from nctools.integrations import run_files
from nctools.integrations.core import (
    LayerInput,
    Schedule,
    SplitChunks,
    SplitKeys,
    Unpack,
    check_layer_arg,
    evaluating,
    feature_chunks,
    language_model,
    measure_splits,
    measure_token_splits,
    measured_model,
    resolve_layer,
    split_batch,
)
from nctools.integrations.spill import check_reuse
from nctools.metrics.vocab import VocabularyOptions
from nctools.runs import snapshots
from nctools.runs.layout import CONFIG_FILE
from nctools.runs.resume import open_external_run

LIGHTNING_KEYS = SplitKeys({"train": "nc/train/", "val": "nc/val/"})
SOURCE = "lightning"  # the run manifest's source of a run directory the callback writes
RUN_SUBDIR = "nctools"  # the default run directory: trainer.log_dir / RUN_SUBDIR


class NeuralCollapseCallback(pl.Callback):
    """Measure neural collapse (Papyan, Han & Donoho, PNAS 2020) at chosen epoch ends.

    Args:
        layer: the classifier ``nn.Linear`` whose input is the feature, by module name
            (``"fc"``, ``"head.proj"``) or as the module (default: the last ``nn.Linear``
            of the LightningModule); checked when the fit starts.
        epochs: the epochs to measure (0-based, Lightning's ``current_epoch``); when given,
            ``every_n_epochs`` is ignored. An epoch the fit never reaches is warned about
            when it starts.
        every_n_epochs: measure when ``(epoch + 1) % every_n_epochs == 0``.
        splits: any of ``"train"`` and ``"val"``.
        unpack: ``batch -> (inputs, labels)`` (default: a ``(x, y, ...)`` batch's first two
            items, or a dict batch's ``labels``/``label``/``y`` key and its other entries).
        save_snapshots: also write an nctools run directory (snapshots, history, config,
            manifest) that ``nctools analyze`` and ``nctools plot`` read.
        out: the run directory (default: ``trainer.log_dir``, or ``default_root_dir``
            without a logger, + ``/nctools``); only with ``save_snapshots``.
        loss: the run's ``train.loss`` in its config (``ce`` | ``mse``): ``nctools
            analyze`` adds the MSE decomposition for ``mse`` (with lambda = the
            optimizer's weight decay / 2).
        loss_key: the ``trainer.callback_metrics`` key of the training loss for
            ``history.csv`` (NaN when not logged).
        snapshot_dtype: ``float32`` | ``float16``, the features' dtype on disk.
        tpt_accuracy: the run's ``train.tpt_accuracy`` (onset of the terminal phase).
        reuse_features: run the model once per split, its features spilled to disk for
            the second pass (N x D x itemsize bytes per split); False: run it twice.
        spill_dir: where the temporary spill folder goes (default: the system's
            temporary folder); only with ``reuse_features``.
        vocabulary: a language model's options (a dict, or
            :class:`~nctools.metrics.vocab.VocabularyOptions`): ``min_count``, ``top_k``,
            ``cdnv_power``, ``global_mean``, ``ncc_samples``, ``etf_without_simplex``, as
            ``measure_language_model`` takes them; only for a language model.

    Logged with ``pl_module.log_dict`` as ``nc/<split>/<metric>`` (docs/metrics.md keys).
    """

    def __init__(
        self,
        layer: str | nn.Linear | None = None,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int = 1,
        splits: Sequence[str] = LIGHTNING_KEYS.splits,
        unpack: Unpack = split_batch,
        save_snapshots: bool = False,
        out: str | os.PathLike | None = None,
        loss: str = "ce",
        loss_key: str = "train_loss",
        snapshot_dtype: str = "float32",
        tpt_accuracy: float = 0.999,
        reuse_features: bool = True,
        spill_dir: str | os.PathLike | None = None,
        vocabulary: VocabularyOptions | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Lightning's epochs are 0-based; the schedule counts epochs completed
        self.schedule = Schedule(None if epochs is None else frozenset(int(e) + 1 for e in epochs),
                                 every_n_epochs)
        self.splits = LIGHTNING_KEYS.check(splits)
        check_layer_arg(layer)
        if out is not None and not save_snapshots:
            raise ValueError("out is the run directory of save_snapshots=True; "
                             "set save_snapshots=True or leave out unset")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {SNAPSHOT_DTYPES}, "
                             f"got {snapshot_dtype!r}")
        if not 0 < tpt_accuracy <= 1:
            raise ValueError(f"tpt_accuracy must be in (0, 1], got {tpt_accuracy!r}")
        check_reuse(reuse_features, spill_dir)
        self.reuse_features, self.spill_dir = reuse_features, spill_dir
        self.save_snapshots, self.out = save_snapshots, out
        self.loss, self.loss_key = loss, loss_key
        self.snapshot_dtype, self.tpt_accuracy = snapshot_dtype, tpt_accuracy
        self.run_dir: Path | None = None
        self._epoch_started = time.perf_counter()
        self.layer, self.unpack = layer, unpack
        self.vocabulary = VocabularyOptions.of("vocabulary", vocabulary)
        self._vocabulary_given = vocabulary is not None

    def due(self, epoch: int) -> bool:
        """Whether Lightning's (0-based) ``epoch`` is measured."""
        return self.schedule.epoch_due(epoch + 1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a wrong layer fails now, not after an epoch
        target = measured_model(pl_module, self.layer, self._vocabulary_given)
        if target is not None and self.save_snapshots:
            raise ValueError(f"save_snapshots: {type(target.model).__name__} is measured token "
                             "by token, and token features are not written as snapshots; "
                             "leave save_snapshots unset")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_epochs
        never = self.schedule.unreachable(total if total is not None and total >= 0 else None)
        if never and total is not None:
            warnings.warn(f"NeuralCollapseCallback: epochs {[e - 1 for e in never]} are beyond "
                          f"this fit (max_epochs={total}, epochs 0 to {total - 1}) and will "
                          "never be measured", stacklevel=2)
        if not self.save_snapshots:
            return
        if self.out is not None:
            self.run_dir = Path(self.out).expanduser()
        else:  # trainer.log_dir is a collective under DDP: every process asks
            self.run_dir = Path(trainer.log_dir or trainer.default_root_dir) / RUN_SUBDIR
        open_external_run(self.run_dir, SOURCE, trainer.current_epoch,
                          write=trainer.is_global_zero)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.due(trainer.current_epoch):
            return
        if self.save_snapshots:
            values = self.measure_and_save(trainer, pl_module)
        else:
            values = self.measure(trainer, pl_module)
        pl_module.log_dict(values, on_epoch=True, sync_dist=False)  # already reduced

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_status(trainer, pl_module, "completed")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        interrupted = isinstance(exception, KeyboardInterrupt)
        self._set_status(trainer, pl_module, "interrupted" if interrupted else "failed")

    def _loaders(self, trainer: pl.Trainer) -> dict[str, Any]:
        """This fit's loader(s) of each chosen split that has one."""
        loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
        return {split: loaders[split] for split in self.splits if loaders[split] is not None}

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """{``nc/<split>/<metric>``: value} for this epoch's model."""
        target = language_model(pl_module, self.layer)
        if target is not None:
            return measure_token_splits(target, self._loaders(trainer), LIGHTNING_KEYS,
                                        self.vocabulary, self.reuse_features, self.spill_dir)
        name, layer = resolve_layer(pl_module, self.layer)
        with evaluating(pl_module, layer, name) as hook:
            chunks = {split: functools.partial(feature_chunks, pl_module, hook, loader,
                                               self.unpack, pl_module.device)
                      for split, loader in self._loaders(trainer).items()}
            return measure_splits(chunks, layer, pl_module.device, LIGHTNING_KEYS,
                                  self.reuse_features, self.spill_dir)

    # -----------------------------------------------------------------------------------
    # save_snapshots: the run directory

    def measure_and_save(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        """:meth:`measure` from one pass whose features are kept and written as the snapshot
        of epoch ``current_epoch + 1`` (with the history row, config and manifest)."""
        assert self.run_dir is not None, "on_fit_start sets the run directory"
        name, layer = resolve_layer(pl_module, self.layer)
        with evaluating(pl_module, layer, name) as hook:
            held = {split: self._held(pl_module, hook, loader)
                    for split, loader in self._loaders(trainer).items()}
        chunks: dict[str, SplitChunks] = {split: functools.partial(list, [pair])
                                          for split, pair in held.items()}
        # of the features as stored, already in memory: nothing to spill
        values = measure_splits(chunks, layer, pl_module.device, LIGHTNING_KEYS,
                                reuse_features=False)
        epoch, world = trainer.current_epoch + 1, trainer.world_size
        if trainer.is_global_zero:
            config = self._config(trainer, pl_module, layer, epoch)
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else math.nan
            loss = trainer.callback_metrics.get(self.loss_key)
            row = run_files.history_row(epoch, lr, None if loss is None else float(loss),
                                        values, time.perf_counter() - self._epoch_started)
            run_files.write_records(self.run_dir, row, config)
        run_files.write_epoch(
            self.run_dir, epoch, held, layer.weight, layer.bias, self.snapshot_dtype,
            shard=(trainer.global_rank, world) if world > 1 else None,
        )
        if world > 1:
            trainer.strategy.barrier("nctools-snapshot")  # every shard is on disk
            if trainer.is_global_zero:
                snapshots.finalize_sharded_snapshot(self.run_dir, epoch, world)
        if trainer.is_global_zero:
            run_files.update_manifest(self.run_dir, config, source=SOURCE,
                                      device=pl_module.device, world_size=world,
                                      epochs_done=epoch)
        return values

    def _held(self, pl_module: pl.LightningModule, hook: LayerInput,
              loaders: Any) -> tuple[Tensor, Tensor]:
        """This process's features (n, D) float32 rounded to the snapshot dtype, and labels
        (n,) int64, on the CPU."""
        feats, labels = [], []
        for chunk, chunk_labels in feature_chunks(pl_module, hook, loaders, self.unpack,
                                                  pl_module.device):
            feats.append(chunk.float().cpu())
            labels.append(chunk_labels.cpu())
        dtype = snapshots.TORCH_DTYPES[self.snapshot_dtype]
        return torch.cat(feats).to(dtype).float(), torch.cat(labels).long()

    def _config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer: nn.Linear,
                epoch: int) -> Config:
        """The run's config: the epochs planned (all of them when ``max_epochs`` is set)
        and the snapshots written so far."""
        assert self.run_dir is not None
        written = {*snapshots.list_snapshots(self.run_dir), epoch}
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 1:
            total = max(max_epochs, epoch)
            written |= {e + 1 for e in range(max_epochs) if self.due(e)}
        else:  # trains until stopped: the epochs so far
            total = max(written)
        loader = trainer.train_dataloader
        return run_files.external_config(
            name=type(pl_module).__name__, arch=type(pl_module).__name__,
            dataset=_dataset_name(trainer), num_classes=layer.out_features,
            epochs=total, snapshot_epochs=[e for e in written if 1 <= e <= total],
            loss=self.loss,
            optimizer=trainer.optimizers[0] if trainer.optimizers else None,
            batch_size=getattr(loader, "batch_size", None), device=pl_module.device,
            dtype=self.snapshot_dtype, tpt_accuracy=self.tpt_accuracy,
        )

    def _set_status(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                    status: str) -> None:
        """How the fit ended, in ``run.json`` (rank 0, once a snapshot was written)."""
        run = self.run_dir
        if not self.save_snapshots or run is None or not trainer.is_global_zero:
            return
        if not snapshots.list_snapshots(run):
            return
        config = load_config(run / CONFIG_FILE)
        run_files.update_manifest(run, config, source=SOURCE, device=pl_module.device,
                                  world_size=trainer.world_size,
                                  epochs_done=trainer.current_epoch, status=status)


def _dataset_name(trainer: pl.Trainer) -> str:
    """The class name of the fit's training data: the datamodule's, else the training
    loader's dataset's (``unknown`` when neither is known)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return type(datamodule).__name__
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    return type(dataset).__name__ if dataset is not None else run_files.UNKNOWN

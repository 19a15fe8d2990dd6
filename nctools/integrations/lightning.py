"""Neural-collapse metrics inside a PyTorch Lightning run, logged by every Lightning logger.

Usage::

    from nctools.integrations.lightning import NeuralCollapseCallback
    trainer = lightning.Trainer(callbacks=[NeuralCollapseCallback(every_n_epochs=5)])
    trainer.fit(model, train_loader, val_loader)     # logs nc/train/nc1, nc/val/nc1, ...

At each chosen epoch end the callback makes eval-mode, no-grad passes over the trainer's
own train (and val) dataloaders, takes the features at the input of ``layer`` (default:
the model's last ``nn.Linear``, the classifier, whose weight and bias are W and b) with
a forward pre-hook, and measures the full METRICS.md suite with
``nctools.metrics.measure.measure_chunks``: two streaming passes, never every feature in
memory. Under DDP each process measures its own shard of the data and the statistics are
summed across processes (a ``DistributedSampler`` that pads a split to a multiple of
the world size counts its repeated samples twice). Metrics of the val split use the train
split's class means for NC4 (METRICS.md, "On other data") when both are measured.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from nctools.integrations.splits import measure_splits
from nctools.models.features import InputOf, last_linear

SPLITS = ("train", "val")
Unpack = Callable[[Any], tuple[Tensor, Tensor]]


def first_two(batch: Any) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of a ``(x, y, ...)`` batch."""
    return batch[0], batch[1]


class NeuralCollapseCallback(pl.Callback):
    """Measure neural collapse (Papyan, Han & Donoho, PNAS 2020) at chosen epoch ends.

    Args:
        layer: the classifier ``nn.Linear`` whose input is the feature (default: the last
            ``nn.Linear`` of the LightningModule).
        epochs: the epochs to measure (0-based, Lightning's ``current_epoch``); when given,
            ``every_n_epochs`` is ignored.
        every_n_epochs: measure when ``(epoch + 1) % every_n_epochs == 0``.
        splits: any of ``"train"`` and ``"val"``.
        unpack: ``batch -> (inputs, labels)`` (default: the batch's first two items).

    Logged with ``pl_module.log_dict`` as ``nc/<split>/<metric>`` (METRICS.md keys).
    """

    def __init__(
        self,
        layer: nn.Linear | None = None,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int = 1,
        splits: Sequence[str] = SPLITS,
        unpack: Unpack = first_two,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs}")
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits!r}")
        if layer is not None and not isinstance(layer, nn.Linear):
            raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.every_n_epochs = every_n_epochs
        self.splits = tuple(splits)
        self.unpack = unpack

    def due(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return (epoch + 1) % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.due(trainer.current_epoch):
            return
        values = self.measure(trainer, pl_module)
        pl_module.log_dict(values, on_epoch=True, sync_dist=False)  # already reduced

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """{``nc/<split>/<metric>``: value} for this epoch's model."""
        layer = self.layer if self.layer is not None else last_linear(pl_module)[1]
        loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), InputOf(layer) as hook:
                chunks = {split: functools.partial(self._features, pl_module, hook, loaders[split])
                          for split in self.splits if loaders[split] is not None}
                return measure_splits(chunks, layer, pl_module.device)
        finally:
            pl_module.train(was_training)

    def _features(
        self, pl_module: pl.LightningModule, hook: InputOf, loaders: Any
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            for batch in loader:
                inputs, labels = self.unpack(batch)
                pl_module(inputs.to(pl_module.device))
                yield hook.take(), labels.to(pl_module.device)

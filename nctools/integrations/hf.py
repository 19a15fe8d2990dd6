"""Neural-collapse metrics inside a Hugging Face ``transformers.Trainer`` run.

Usage::

    from nctools.integrations.hf import NeuralCollapseCallback
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.add_callback(NeuralCollapseCallback(trainer))
    trainer.train()      # trainer.state.log_history gains nc/train/nc1, nc/eval/nc1, ...

At each chosen epoch end the callback makes eval-mode, no-grad passes over the Trainer's
own train (and eval) dataloaders, takes the features at the input of the classification
head's last ``nn.Linear`` (``layer``, default the model's last ``nn.Linear``: BERT's and
ViT's ``classifier``) with a forward pre-hook, and measures the METRICS.md suite with
``measure_chunks`` (two streaming passes; under DDP summed across processes). The model
runs once per split: the first pass's features are spilled to a temporary folder
(``spill_dir``; N x D x the features' itemsize bytes per split, removed after it) and read
back for the second; ``reuse_features=False`` runs the model twice instead. The values
go through ``Trainer.log``, so they land in ``state.log_history`` and every ``report_to``
integration (TensorBoard, W&B, MLflow) receives them (the integrations prefix keys not
starting with ``eval_`` by ``train/``: TensorBoard shows ``train/nc/train/nc1``). The
callback holds the Trainer because a ``TrainerCallback`` is handed the model and
dataloaders but not ``Trainer.log``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from nctools.integrations.spill import check_reuse
from nctools.integrations.splits import measure_splits
from nctools.models.features import InputOf, last_linear

SPLITS = ("train", "eval")


class NeuralCollapseCallback(TrainerCallback):
    """Measure neural collapse (Papyan, Han & Donoho, PNAS 2020) at chosen epoch ends.

    Args:
        trainer: the ``transformers.Trainer`` to measure and log through.
        layer: the classifier ``nn.Linear`` whose input is the feature (default: the
            model's last ``nn.Linear``).
        epochs: the epochs to measure (1-based, as the Trainer counts finished epochs);
            when given, ``every_n_epochs`` is ignored.
        every_n_epochs: measure when the finished epoch count is a multiple of it.
        splits: any of ``"train"`` and ``"eval"``.
        label_key: the batch key holding the labels.
        reuse_features: run the model once per split, its features spilled to disk for
            the second pass (N x D x itemsize bytes per split); False: run it twice.
        spill_dir: where the temporary spill folder goes (default: the system's
            temporary folder); only with ``reuse_features``.

    Logged as ``nc/<split>/<metric>`` (METRICS.md keys).
    """

    def __init__(
        self,
        trainer: Trainer,
        layer: nn.Linear | None = None,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int = 1,
        splits: Sequence[str] = SPLITS,
        label_key: str = "labels",
        reuse_features: bool = True,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or (
            every_n_epochs < 1
        ):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if not splits or any(s not in SPLITS for s in splits):
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits!r}")
        if layer is not None and not isinstance(layer, nn.Linear):
            raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        check_reuse(reuse_features, spill_dir)
        self.reuse_features, self.spill_dir = reuse_features, spill_dir
        self.trainer, self.layer = trainer, layer
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.every_n_epochs, self.splits, self.label_key = every_n_epochs, tuple(splits), label_key

    def due(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return epoch % self.every_n_epochs == 0

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.due(round(state.epoch or 0)):
            self.trainer.log(self.measure())

    def measure(self) -> dict[str, float]:
        """{``nc/<split>/<metric>``: value} for the model as it is now."""
        model = self.trainer.model
        assert model is not None  # the Trainer was given one
        layer = self.layer if self.layer is not None else last_linear(model)[1]
        loaders = {"train": self.trainer.get_train_dataloader}
        if self.trainer.eval_dataset is not None:
            loaders["eval"] = self.trainer.get_eval_dataloader
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), InputOf(layer) as hook:
                chunks = {split: functools.partial(self._features, model, hook, loaders[split]())
                          for split in self.splits if split in loaders}
                return measure_splits(chunks, layer, layer.weight.device,
                                      self.reuse_features, self.spill_dir)
        finally:
            model.train(was_training)

    def _features(
        self, model: nn.Module, hook: InputOf, loader: Iterable[dict[str, Tensor]]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        device = next(model.parameters()).device
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items() if k != self.label_key}
            model(**inputs)
            yield hook.take(), batch[self.label_key].to(device)

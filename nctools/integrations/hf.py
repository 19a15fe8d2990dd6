"""Neural-collapse metrics inside a Hugging Face ``transformers.Trainer`` run.

Usage::

    from nctools.integrations.hf import NeuralCollapseCallback
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[NeuralCollapseCallback(layer="classifier")])
    trainer.train()      # trainer.state.log_history gains nc/nc1, eval_nc/nc1, ...

When: at each evaluation of the Trainer (``eval_strategy="steps"`` or ``"epoch"``), at the
end of each complete epoch (``every_n_epochs``, or the ``epochs`` listed) and every
``every_n_steps`` optimiser steps. A run shorter than one epoch (``max_steps``) has no
complete epoch: it is measured at its evaluations and steps only. The callback makes
eval-mode, no-grad passes over the Trainer's own train dataloader (and its eval dataloader,
which the Trainer makes at its first evaluation), takes the features at the input of the
classification head's ``nn.Linear`` (``layer``, by module name; default the model's last
``nn.Linear``: BERT's and ViT's ``classifier``) with a forward pre-hook, and measures the
docs/metrics.md suite with ``measure_chunks`` (:mod:`nctools.integrations.core`; two
streaming passes, the first spilled to disk for the second; under DDP summed across
processes).

How it reports: a ``TrainerCallback`` is handed the model and dataloaders but not
``Trainer.log``, so the callback does for its own row what ``Trainer.log`` does: it
appends ``{nc/..., epoch, step}`` to ``state.log_history`` and hands the row to every
other callback's ``on_log`` (the ``report_to`` integrations: TensorBoard, W&B, MLflow).
It never touches the Trainer's own rows, nor ``control.should_log`` (the Trainer's
``CallbackHandler.on_log`` resets it: calling it from a callback loses the Trainer's next
row). Keys: ``nc/<metric>`` for the training split and ``eval_nc/<metric>`` for the eval
split, as the Trainer names ``loss`` and ``eval_loss``; the integrations show them as
``train/nc/nc1`` and ``eval/nc/nc1``.

A language model (``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``) is measured
token by token (docs/language-models.md): its LM head is the classifier, each position of
a dict batch (``input_ids``, ``attention_mask``, ``labels`` (B, T)) that its own loss
counts is a sample, labelled with the token it predicts (:mod:`nctools.models.tokens`),
with the vocabulary-scale options ``vocabulary`` (``min_count``, ``top_k``, ...). Each
split's NC4 then takes its own class means. Other batches the suite cannot measure (a
token classifier's (B, T) labels) get one warning and no measurement; the training goes
on.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from nctools.integrations import core
from nctools.integrations.spill import check_reuse
from nctools.metrics.engine import ReferenceMeans
from nctools.metrics.vocab import VocabularyOptions

HF_KEYS = core.SplitKeys({"train": "nc/", "eval": "eval_nc/"})
Event = tuple[TrainingArguments, TrainerState, TrainerControl, dict[str, Any]]


class NeuralCollapseCallback(TrainerCallback):
    """Measure neural collapse (Papyan, Han & Donoho, PNAS 2020) during a Trainer run.

    Args:
        layer: the classifier ``nn.Linear`` whose input is the feature, by module name
            (``"classifier"``) or as the module (default: the model's last ``nn.Linear``).
        epochs: the complete epochs to measure at (1-based, as the Trainer counts them);
            when given, ``every_n_epochs`` is ignored.
        every_n_epochs: measure when the completed epoch count is a multiple of it (None:
            not at epoch ends).
        every_n_steps: also measure every this many optimiser steps (None: not by steps).
        at_evaluate: also measure at each evaluation of the Trainer.
        splits: any of ``"train"`` and ``"eval"``.
        label_key: the batch key holding the labels.
        reuse_features: run the model once per split, its features spilled to disk for
            the second pass (N x D x itemsize bytes per split); False: run it twice.
        spill_dir: where the temporary spill folder goes (default: the system's
            temporary folder); only with ``reuse_features``.
        vocabulary: a language model's options (a dict, or
            :class:`~nctools.metrics.vocab.VocabularyOptions`): ``min_count``, ``top_k``,
            ``cdnv_power``, ``global_mean``, ``ncc_samples``, ``etf_without_simplex``, as
            ``measure_language_model`` takes them; only for a language model.
    """

    def __init__(
        self,
        layer: str | nn.Linear | None = None,
        epochs: Iterable[int] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_evaluate: bool = True,
        splits: Sequence[str] = HF_KEYS.splits,
        label_key: str = "labels",
        reuse_features: bool = True,
        spill_dir: str | os.PathLike | None = None,
        vocabulary: VocabularyOptions | Mapping[str, Any] | None = None,
    ) -> None:
        self.schedule = core.Schedule(None if epochs is None else frozenset(int(e) for e in epochs),
                                 every_n_epochs, every_n_steps)
        self.splits = HF_KEYS.check(splits)
        if isinstance(layer, Trainer):
            raise ValueError("NeuralCollapseCallback takes no trainer: pass it as "
                             "Trainer(callbacks=[NeuralCollapseCallback(...)])")
        core.check_layer_arg(layer)
        check_reuse(reuse_features, spill_dir)
        self.reuse_features, self.spill_dir = reuse_features, spill_dir
        self.layer, self.at_evaluate, self.label_key = layer, at_evaluate, label_key
        self.vocabulary = VocabularyOptions.of("vocabulary", vocabulary)
        self._vocabulary_given = vocabulary is not None
        self._handler: CallbackHandler | None = None
        self._active = True  # False: a duplicate of an earlier NeuralCollapseCallback
        self._skipped = False  # one warning for an input the suite cannot measure
        self._done: tuple[int, set[str]] = (-1, set())  # (step, splits measured there)
        self._train_means = ReferenceMeans()

    # ---------------------------------------------------------------------- the events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        handler = _calling_handler()
        if handler is not None and handler is not self._handler:  # once per Trainer: added
            self._handler = handler  # twice, the same callback sees each event twice
            self._active = _first_of_kind(self, handler)
            self._done, self._skipped, self._train_means = (-1, set()), False, ReferenceMeans()
        # a wrong layer fails before training
        core.measured_model(kwargs["model"], self.layer, self._vocabulary_given)
        never = self.schedule.unreachable(state.num_train_epochs if args.max_steps <= 0
                                          else None)
        if never:
            warnings.warn(f"NeuralCollapseCallback: epochs {never} are beyond this run "
                          f"({state.num_train_epochs} epochs) and will never be measured",
                          stacklevel=2)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        done = round(state.epoch or 0)
        complete = abs((state.epoch or 0) - done) < 1e-6  # max_steps may end mid-epoch
        if complete and self.schedule.epoch_due(done):
            self._report((args, state, control, kwargs))

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.schedule.step_due(state.global_step):
            self._report((args, state, control, kwargs))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.at_evaluate and state.global_step > 0:  # a training run's evaluations
            self._report((args, state, control, kwargs))

    # ----------------------------------------------------------------------- measuring
    def measure(self, model: nn.Module, loaders: dict[str, Any]) -> dict[str, float]:
        """{``nc/<metric>`` and ``eval_nc/<metric>``: value} of the model as it is now,
        over ``loaders`` (``{"train": loader, "eval": loader}``, the chosen splits that
        have one). The eval split's NC4 takes the train split's latest class means (a
        language model's, its own)."""
        target = core.language_model(model, self.layer)
        if target is not None:
            chosen = {s: loaders[s] for s in self.splits if loaders.get(s) is not None}
            return core.measure_token_splits(target, chosen, HF_KEYS, self.vocabulary,
                                             self.reuse_features, self.spill_dir)
        name, layer = core.resolve_layer(model, self.layer)
        device = layer.weight.device
        unpack = functools.partial(core.split_batch, label_key=self.label_key)
        with core.evaluating(model, layer, name) as hook:
            chunks = {split: functools.partial(core.feature_chunks, model, hook, loaders[split],
                                               unpack, device)
                      for split in self.splits if loaders.get(split) is not None}
            return core.measure_splits(chunks, layer, device, HF_KEYS, self.reuse_features,
                                  self.spill_dir, self._train_means)

    def _report(self, event: Event) -> None:
        """Measure the splits not yet measured at this step and log them as one row."""
        state, kwargs = event[1], event[3]
        if not self._active or self._skipped:
            return
        step, done = self._done
        done = done if step == state.global_step else set()
        loaders = {"train": kwargs.get("train_dataloader"),
                   "eval": kwargs.get("eval_dataloader")}
        todo = {s: loader for s, loader in loaders.items() if s not in done}
        if not any(todo.get(s) is not None for s in self.splits):
            return
        try:
            values = self.measure(kwargs["model"], todo)
        except core.UnmeasurableError as error:
            self._skipped = True
            warnings.warn(f"NeuralCollapseCallback: not measuring this run ({error}); "
                          "training goes on", stacklevel=2)
            return
        self._done = (state.global_step, done | {s for s in todo if todo[s] is not None})
        self._log(values, event)

    def _log(self, values: dict[str, float], event: Event) -> None:
        """What ``Trainer.log`` does for a row, without resetting ``control.should_log``."""
        args, state, control, kwargs = event
        row = {**values, "epoch": state.epoch} if state.epoch is not None else dict(values)
        state.log_history.append({**row, "step": state.global_step})
        others = [] if self._handler is None else self._handler.callbacks
        for callback in others:
            if callback is not self:
                callback.on_log(args, state, control, logs=dict(row), **kwargs)


def _calling_handler() -> CallbackHandler | None:
    """The Trainer's CallbackHandler that is calling this event (``call_event``'s ``self``):
    the list of callbacks a row is handed to, as ``Trainer.log`` hands it."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


def _first_of_kind(callback: NeuralCollapseCallback, handler: CallbackHandler) -> bool:
    """Whether ``callback`` is the first NeuralCollapseCallback of the Trainer; a later one
    (the callback added twice) is warned about and stays silent, so each row is logged once."""
    ours = [c for c in handler.callbacks if isinstance(c, NeuralCollapseCallback)]
    if ours[0] is callback and len(ours) == 1:
        return True
    if ours[0] is callback:
        warnings.warn(f"NeuralCollapseCallback was added {len(ours)} times to the Trainer; "
                      "measuring and logging once (remove the duplicate)", stacklevel=3)
        return True
    return False

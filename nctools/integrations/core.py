"""What every training-loop integration does, written once: when to measure
(:class:`Schedule`), which layer (:func:`resolve_layer`), the eval-mode no-grad hooked
passes (:func:`evaluating`, :func:`feature_chunks`), how a batch splits into inputs and
labels (:func:`split_batch`, as the ecosystems' loaders yield them), and the measurement of
each split under its logged name (:func:`measure_splits`, :class:`SplitKeys`). A language
model is measured token by token instead (:func:`language_model`,
:func:`measure_token_splits`; docs/language-models.md).

Usage (by :mod:`nctools.integrations.lightning`, :mod:`nctools.integrations.hf` and
:mod:`nctools.integrations.track`)::

    name, layer = resolve_layer(model, "fc")
    with evaluating(model, layer, name) as hook:
        chunks = {"train": functools.partial(feature_chunks, model, hook, loader, unpack)}
        values = measure_splits(chunks, layer, device, SplitKeys({"train": "nc/train/"}))

Each split's features are the input of the classifier ``layer`` (W, b), taken with a
forward pre-hook; measured in two streaming passes by ``measure_chunks`` (the first
spilled to a temporary folder for the second: :mod:`nctools.integrations.spill`). Under
DDP the statistics are summed over every process of the run.

A Hugging Face language model (``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``, or a
module holding one) has (B, T) token labels: its samples are the LM head's inputs paired
with the tokens they predict, as its own loss pairs them
(:func:`nctools.models.tokens.lm_token_samples`), measured with the vocabulary-scale
conventions of :class:`nctools.metrics.vocab.VocabularyOptions`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nctools.integrations.spill import spilled
from nctools.metrics.engine import ReferenceMeans
from nctools.metrics.measure import measure_chunks
from nctools.metrics.vocab import VocabularyOptions
from nctools.models.features import InputOf, last_linear
from nctools.models.tokens import (
    Task,
    find_language_model,
    lm_head,
    lm_task,
    lm_token_samples,
    output_embeddings,
)

SplitChunks = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Unpack = Callable[[Any], tuple[Any, Tensor]]
LABEL_KEYS = ("labels", "label", "y")  # a dict batch's labels, the first key present


class UnmeasurableError(ValueError):
    """The model's batches give no (features (n, D), labels (n,)) pairs the suite measures
    (a token classifier's (B, T) labels, say): the callbacks warn and skip."""


# --------------------------------------------------------------------------- the due rule
@dataclass(frozen=True)
class Schedule:
    """When a loop's model is measured, in epochs completed (1, 2, ...) or optimiser steps.

    Args:
        epochs: the completed-epoch counts to measure at (then ``every_n_epochs`` is unused).
        every_n_epochs: measure when the completed-epoch count is a multiple of it.
        every_n_steps: also measure when the step count is a multiple of it.
    """

    epochs: frozenset[int] | None = None
    every_n_epochs: int | None = 1
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("every_n_epochs", "every_n_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    def epoch_due(self, done: int) -> bool:
        """Whether to measure after ``done`` complete epochs (``done`` >= 1)."""
        if self.epochs is not None:
            return done in self.epochs
        return self.every_n_epochs is not None and done >= 1 and done % self.every_n_epochs == 0

    def step_due(self, step: int) -> bool:
        return self.every_n_steps is not None and step >= 1 and step % self.every_n_steps == 0

    def unreachable(self, total_epochs: float | None) -> list[int]:
        """The chosen epochs a run of ``total_epochs`` never completes (none when unknown)."""
        if self.epochs is None or total_epochs is None or total_epochs < 0:
            return []
        return sorted(e for e in self.epochs if e > math.floor(total_epochs) or e < 1)


# ---------------------------------------------------------------------------- the layer
def resolve_layer(model: nn.Module, layer: str | nn.Linear | None) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the classifier whose input is the feature: ``layer`` as a module
    name of ``model`` (as YAML and LightningCLI give it), an ``nn.Linear`` of it, or None
    for the last ``nn.Linear``. Raises ValueError in one line naming ``layer``."""
    named = dict(model.named_modules())
    kind = type(model).__name__
    if layer is None:
        try:
            return last_linear(model)
        except ValueError:
            raise ValueError(f"layer: {kind} has no nn.Linear (no classifier); pass layer= "
                             "the name of the classifier module") from None
    if isinstance(layer, str):
        if layer not in named:
            linears = [n for n, m in named.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"layer: {kind} has no module {layer!r} (its nn.Linear modules: "
                             f"{', '.join(linears) or 'none'})")
        module = named[layer]
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer: {layer!r} is a {type(module).__name__}, not an nn.Linear "
                             "(the classifier W, b)")
        return layer, module
    found = next((n for n, m in named.items() if m is layer), None)
    if found is None:
        raise ValueError(f"layer: the {type(layer).__name__} given is not a module of {kind}")
    return found, layer


def check_layer_arg(layer: object) -> None:
    """A callback's ``layer`` argument before the model is known: a name, a Linear or None."""
    if layer is not None and not isinstance(layer, (str, nn.Linear)):
        raise ValueError("layer must be a module name or an nn.Linear, got "
                         f"{type(layer).__name__}")


# ----------------------------------------------------------------- the hooked eval passes
class LayerInput(InputOf):
    """:class:`InputOf` whose error names the layer that did not run."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module)
        self.name = name

    def take(self) -> Tensor:
        if self.value is None:
            raise ValueError(f"layer {self.name!r} did not run in the model's forward pass: "
                             "pass layer= the classifier the forward pass uses")
        return super().take()


@contextlib.contextmanager
def eval_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and no grad; the model's mode and the random number generators' states
    (the CPU's, and ``device``'s when it is a GPU) restored after.

    The paper's metrics are those of the network as it is used at test time (batch-norm
    running statistics, no dropout). A loader's shuffling draws from torch's generator:
    restoring it leaves the training run's own draws (batches, dropout) as they would be
    without the measurement."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def evaluating(model: nn.Module, layer: nn.Module, name: str) -> Iterator[LayerInput]:
    """:func:`eval_mode` with a hook at ``layer``'s input, removed after."""
    device = layer.weight.device if isinstance(layer, nn.Linear) else torch.device("cpu")
    hook = LayerInput(layer, name)
    try:
        with eval_mode(model, device):
            yield hook
    finally:
        hook.remove()


def split_batch(batch: Any, label_key: str | None = None) -> tuple[Any, Tensor]:
    """(inputs, labels) of a batch as the ecosystems' loaders yield it: a ``(x, y, ...)``
    tuple or list gives its first two items; a dict gives ``batch[label_key]`` (default the
    first of ``labels``, ``label``, ``y`` present) and the rest of the dict as inputs."""
    if isinstance(batch, Mapping):
        keys = (label_key,) if label_key is not None else LABEL_KEYS
        key = next((k for k in keys if k in batch), None)
        if key is None:
            raise ValueError(f"a dict batch has no labels key (looked for {', '.join(keys)}; "
                             f"it has {', '.join(map(str, batch))}): pass unpack=/label_key=")
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be (inputs, labels, ...) or a dict with a labels key, "
                     f"got {type(batch).__name__}: pass unpack=")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def run_model(model: nn.Module, inputs: Any, device: torch.device) -> None:
    """One forward pass: a dict of several inputs as keyword arguments (a Hugging Face
    model's), a dict of one input or anything else positional (``forward(x)``)."""
    if isinstance(inputs, Mapping) and len(inputs) == 1:
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, Mapping):
        model(**{k: _to(v, device) for k, v in inputs.items()})
    else:
        model(_to(inputs, device))


def feature_chunks(model: nn.Module, hook: LayerInput, loaders: Any, unpack: Unpack,
                   device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(features (n, D), labels (n,)) of each batch of ``loaders`` (a loader or a list of
    them). Raises :class:`UnmeasurableError` when the labels are not one per feature row."""
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        for batch in loader:
            inputs, labels = unpack(batch)
            run_model(model, inputs, device)
            features = hook.take()
            if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
                raise UnmeasurableError(
                    f"labels of shape {tuple(labels.shape)} for {features.shape[0]} feature "
                    f"rows at layer {hook.name!r}: one class label per sample is needed")
            yield features, labels.to(device)


# ------------------------------------------------------------------- language models
@dataclass(frozen=True)
class LanguageModel:
    """A Hugging Face language model measured token by token: ``model`` runs on the dict
    batches, its LM head (``get_output_embeddings()``) is the classifier."""

    model: nn.Module
    task: Task


def language_model(model: nn.Module, layer: str | nn.Module | None) -> LanguageModel | None:
    """The language model whose token samples a callback or ``track`` measures: ``model``
    itself or its first submodule of a language-model class (:func:`lm_task`), when
    ``layer`` is None or that model's LM head (by module name of ``model`` or itself);
    None otherwise (``model`` is measured at the input of the classifier ``layer``)."""
    found = find_language_model(model)
    if found is None:
        return None
    if layer is not None:
        chosen = dict(model.named_modules()).get(layer) if isinstance(layer, str) else layer
        if chosen is not output_embeddings(found):
            return None
    task = lm_task(found)
    assert task is not None, "find_language_model returns a model of a known task"
    return LanguageModel(found, task)


def measured_model(model: nn.Module, layer: str | nn.Linear | None,
                   vocabulary_given: bool) -> LanguageModel | None:
    """What a callback measures of ``model`` (checked when the training starts, so a wrong
    ``layer`` fails before the first epoch): a language model's tokens, or None for the
    input of the classifier ``layer`` (:func:`resolve_layer`). ``vocabulary_given``: the
    callback was given vocabulary options, which only a language model takes."""
    target = language_model(model, layer)
    if target is None:
        resolve_layer(model, layer)
        if vocabulary_given:
            raise ValueError(f"vocabulary: options of a language model's token samples, but "
                             f"{type(model).__name__} is measured at the input of a "
                             "classifier layer (leave vocabulary unset)")
    return target


def token_chunks(target: LanguageModel, loaders: Any) -> Iterator[tuple[Tensor, Tensor]]:
    """(features (N, D), labels (N,)) of every batch of ``loaders`` (a loader or a list of
    them): the token samples of :func:`nctools.models.tokens.lm_token_samples`."""
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        yield from lm_token_samples(target.model, loader, target.task)


def measure_token_splits(
    target: LanguageModel,
    loaders: Mapping[str, Any],
    keys: SplitKeys,
    options: VocabularyOptions,
    reuse_features: bool = True,
    spill_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """The metrics of the token samples of each split of ``loaders`` (in their order; a
    loader or a list of them, whose batches are dicts of ``input_ids``, ``attention_mask``,
    ``labels`` (B, T)), named by ``keys``: :func:`measure_splits` on the language model
    run in :func:`eval_mode`, its LM head the classifier."""
    weight, bias = lm_head(target.model)
    with eval_mode(target.model, weight.device):
        chunks = {split: functools.partial(token_chunks, target, loader)
                  for split, loader in loaders.items()}
        return measure_splits(chunks, (weight, bias), weight.device, keys, reuse_features,
                              spill_dir, token_options=options)


# ------------------------------------------------------------------- measuring the splits
@dataclass(frozen=True)
class SplitKeys:
    """How an ecosystem names a split's metrics: ``prefixes[split] + metric``.

    Lightning: ``nc/train/nc1``, ``nc/val/nc1``; Hugging Face: ``nc/nc1`` and
    ``eval_nc/nc1`` (its loggers show keys starting ``eval_`` as ``eval/...``, the rest as
    ``train/...``)."""

    prefixes: Mapping[str, str]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.prefixes)

    def check(self, splits: Iterable[str]) -> tuple[str, ...]:
        chosen = tuple(splits)
        if not chosen or any(s not in self.prefixes for s in chosen):
            raise ValueError(f"splits must be a non-empty subset of {self.splits}, "
                             f"got {splits!r}")
        return chosen

    def name(self, split: str, values: Mapping[str, float]) -> dict[str, float]:
        return {self.prefixes[split] + k: v for k, v in values.items()}


def measure_splits(
    chunks: Mapping[str, SplitChunks],
    layer: nn.Linear | tuple[Tensor, Tensor | None],
    device: torch.device | str,
    keys: SplitKeys,
    reuse_features: bool = True,
    spill_dir: str | os.PathLike | None = None,
    train_means: ReferenceMeans | None = None,
    token_options: VocabularyOptions | None = None,
) -> dict[str, float]:
    """The metrics of every split in ``chunks`` (in their order), named by ``keys``.

    Each value of ``chunks`` returns a fresh iterable of (features (n, D), labels (n,)) at
    the input of ``layer``, the classifier W (C, D), b (C,) (the module, or the pair).
    Splits after ``train`` take its class means for NC4 (docs/metrics.md, "On other
    data"); ``train_means`` carries them between calls. Under DDP each process passes its
    own shard and the statistics are summed over every process of the run.

    ``token_options``: the chunks are a language model's token samples, measured with
    these options; each split's NC4 then takes its own class means (the tokens measured
    differ from split to split).

    With ``reuse_features`` each split's chunks are produced once and spilled to a temporary
    folder in ``spill_dir`` for the second pass; without, ``chunks[split]`` is called twice.
    """
    values: dict[str, float] = {}
    train_means = ReferenceMeans() if train_means is None else train_means
    weight, bias = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer
    options = {} if token_options is None else token_options.measure_options()
    for split, source in chunks.items():
        passes: AbstractContextManager[SplitChunks] = (
            spilled(source, spill_dir) if reuse_features else nullcontext(source))
        with passes as split_chunks:
            result, means = measure_chunks(
                split_chunks,
                weight.detach(),
                None if bias is None else bias.detach(),
                class_means=None if token_options else train_means.for_split(split),
                device=device,
                group=dist.group.WORLD,  # None outside DDP: this process alone
                **options,
            )
        if token_options is None:
            train_means.keep(split, means)
        values.update(keys.name(split, result))
    return values

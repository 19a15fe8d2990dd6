"""`track`: neural-collapse metrics from the forward passes of a plain PyTorch loop.

Usage::

    tracker = nctools.track(model, num_classes=10)   # hooks the input of the last nn.Linear
    model.eval()
    with torch.no_grad(), tracker:
        for x, y in loader:
            model(x)
            tracker.update(y)                        # this pass's features, with labels
    print(tracker.compute()["nc1"])

The hook keeps the input of ``layer`` from the latest forward pass; :meth:`Tracker.update`
hands it, with the labels, to an :class:`~nctools.metrics.ncmetric.NCMetric`, whose
classifier is ``layer`` itself (read at ``compute``). Features from training-mode passes
can be tracked too, but then each batch was seen by a different model; the paper's
metrics are those of one model over its whole training set (an eval-mode pass).

A Hugging Face language model (``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``) is
tracked token by token (:class:`TokenTracker`, docs/language-models.md)::

    tracker = nctools.track(lm, min_count=2)         # its LM head's input
    with torch.no_grad(), tracker:
        for batch in batches:                        # input_ids, attention_mask, labels
            lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tracker.update(batch["labels"], batch["attention_mask"])   # (B, T)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from nctools.integrations.core import LanguageModel, LayerInput, language_model, resolve_layer
from nctools.metrics.measure import measure_chunks
from nctools.metrics.ncmetric import NCMetric
from nctools.metrics.vocab import VocabularyOptions
from nctools.models.features import InputOf
from nctools.models.tokens import LMHeadInput, lm_head, token_samples


class Tracker:
    """A forward hook on ``layer``'s input feeding an NCMetric; see :func:`track`."""

    def __init__(
        self, model: nn.Module, layer: str | nn.Module | None, num_classes: int,
        **metric_kwargs: Any
    ) -> None:
        name, self.layer = _chosen(model, layer)
        classifier = self.layer if isinstance(self.layer, nn.Linear) else None
        self.num_classes, self.metric_kwargs = num_classes, metric_kwargs
        self.metric: NCMetric | None = None
        if classifier is not None:
            self.metric = NCMetric(num_classes, classifier, **metric_kwargs)
            self.metric.to(classifier.weight.device)
        self.hook: InputOf = LayerInput(self.layer, name)

    def update(self, labels: Tensor) -> None:
        """Add the features of the latest forward pass, (B, D), labelled ``labels`` (B,)."""
        features = self.hook.take()
        if self.metric is None:  # a layer other than a Linear: D known only now
            self.metric = NCMetric(self.num_classes, dim=features.shape[1], **self.metric_kwargs)
            self.metric.to(features.device)
        self.metric.update(features, labels)

    def compute(self) -> dict[str, Tensor]:
        """``NCMetric.compute()``: the docs/metrics.md keys as 0-d tensors."""
        if self.metric is None:
            raise ValueError("track: no batch yet (call update(labels) after a forward pass)")
        empty = [int(c) for c in torch.nonzero(self.metric.counts == 0).flatten()]
        try:
            return self.metric.compute()
        except ValueError as error:
            if not empty:
                raise
            raise ValueError(f"track: class {empty[0]} of num_classes={self.num_classes} has no "
                             f"samples ({len(empty)} of {self.num_classes} classes are empty): "
                             "num_classes may be too large for these labels") from error

    def reset(self) -> None:
        if self.metric is not None:
            self.metric.reset()

    def remove(self) -> None:
        """Remove the hook (also done on leaving a ``with`` block)."""
        self.hook.remove()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class TokenTracker(Tracker):
    """A forward hook on a language model's LM-head input keeping its token samples; see
    :func:`track`.

    The samples are those of the model's own loss (:func:`nctools.models.tokens.token_samples`:
    a causal LM's position t labelled with the token at t + 1, a masked LM's masked
    positions; -100 labels and positions the attention mask hides are not samples). They
    are kept on the CPU (N x D values, in the features' dtype) and measured at
    :meth:`compute` as ``measure_language_model`` measures them; for a corpus too large to
    keep, use that function, which streams it twice.
    """

    def __init__(self, target: LanguageModel, options: VocabularyOptions) -> None:
        self.target, self.options = target, options
        self.num_classes = int(lm_head(target.model)[0].shape[0])
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.hook = LMHeadInput(target.model)

    def update(self, labels: Tensor, attention_mask: Tensor | None = None) -> None:
        """Add the token samples of the latest forward pass, whose LM-head input was
        (B, T, D): ``labels`` (B, T) as the model's loss takes them (a causal LM's
        ``input_ids``, -100 where not a sample; a masked LM's, -100 where not masked) and
        ``attention_mask`` (B, T), 0 at padding."""
        hidden = self.hook.take()
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels: shape {tuple(labels.shape)}, but the last forward pass "
                             f"had (B, T) = {tuple(hidden.shape[:2])} token positions")
        if attention_mask is not None and attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)}, but labels "
                             f"have {tuple(labels.shape)}")
        features, targets = token_samples(hidden, labels, self.target.task, attention_mask,
                                          labels)
        self.features.append(features.cpu())
        self.labels.append(targets.cpu())

    def compute(self) -> dict[str, Tensor]:
        """The docs/metrics.md keys of the tokens so far (with ``classes_measured``), as
        0-d float64 tensors: ``measure_chunks`` with the vocabulary options, the LM head
        the classifier."""
        if not self.features:
            raise ValueError("track: no batch yet (call update(labels) after a forward pass)")
        weight, bias = lm_head(self.target.model)
        kept = list(zip(self.features, self.labels, strict=True))
        result, _ = measure_chunks(lambda: kept, weight, bias,
                                   **self.options.measure_options())
        return {key: torch.tensor(value, dtype=torch.float64) for key, value in result.items()}

    def reset(self) -> None:
        self.features, self.labels = [], []


def track(
    model: nn.Module,
    layer: str | nn.Module | None = None,
    num_classes: int | None = None,
    **metric_kwargs: Any,
) -> Tracker:
    """Track neural collapse (Papyan, Han & Donoho, PNAS 2020) from ``model``'s forward passes.

    Args:
        model: any ``nn.Module``; a Hugging Face language model (``*ForCausalLM``,
            ``*LMHeadModel``, ``*ForMaskedLM``) is tracked token by token
            (:class:`TokenTracker`, Wu & Papyan 2024).
        layer: whose input is the feature, a module or its name (default: the last
            ``nn.Linear``, which is then also the classifier W, b; a language model's LM
            head).
        num_classes: C (default: the layer's ``out_features`` when it is an ``nn.Linear``;
            a language model's vocabulary, which is the only value it takes).
        metric_kwargs: passed to :class:`NCMetric` (``keep_features=True`` for NC4,
            ``reference=`` for collapsed features far from the origin); for a language
            model, the vocabulary options of
            :class:`~nctools.metrics.vocab.VocabularyOptions` (``min_count``, ``top_k``,
            ``cdnv_power``, ``global_mean``, ``ncc_samples``, ``etf_without_simplex``).

    Returns:
        a :class:`Tracker`; call ``update(labels)`` after each forward pass (a language
        model's: ``update(labels, attention_mask)`` with (B, T) tensors).
    """
    target = language_model(model, layer)
    if target is not None:
        options = VocabularyOptions.of("track", metric_kwargs)
        tracker = TokenTracker(target, options)
        if num_classes is not None and num_classes != tracker.num_classes:
            tracker.remove()
            raise ValueError(f"track: num_classes={num_classes}, but a language model's "
                             f"classes are its vocabulary ({tracker.num_classes} tokens); "
                             "leave num_classes unset")
        return tracker
    _, chosen = _chosen(model, layer)
    if num_classes is None:
        if not isinstance(chosen, nn.Linear):
            raise ValueError("track: pass num_classes when layer is not an nn.Linear")
        num_classes = chosen.out_features
    return Tracker(model, chosen, num_classes, **metric_kwargs)


def _chosen(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the hooked layer: any module of ``model`` (by name or itself),
    or its classifier (the last ``nn.Linear``)."""
    if layer is None:
        return resolve_layer(model, None)
    named = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in named:
            raise ValueError(f"track: layer {layer!r} is not a module of {type(model).__name__}")
        return layer, named[layer]
    return next((n for n, m in named.items() if m is layer), type(layer).__name__), layer

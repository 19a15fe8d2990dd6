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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from nctools.integrations.core import LayerInput, resolve_layer
from nctools.metrics.ncmetric import NCMetric


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
        self.hook = LayerInput(self.layer, name)

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


def track(
    model: nn.Module,
    layer: str | nn.Module | None = None,
    num_classes: int | None = None,
    **metric_kwargs: Any,
) -> Tracker:
    """Track neural collapse (Papyan, Han & Donoho, PNAS 2020) from ``model``'s forward passes.

    Args:
        model: any ``nn.Module``.
        layer: whose input is the feature, a module or its name (default: the last
            ``nn.Linear``, which is then also the classifier W, b).
        num_classes: C (default: the layer's ``out_features`` when it is an ``nn.Linear``).
        metric_kwargs: passed to :class:`NCMetric` (``keep_features=True`` for NC4,
            ``reference=`` for collapsed features far from the origin).

    Returns:
        a :class:`Tracker`; call ``update(labels)`` after each forward pass.
    """
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

"""`NCMetric`: the neural-collapse suite as a ``torchmetrics.Metric``.

Usage::

    metric = NCMetric(num_classes=10, classifier=model.fc)   # D read from the classifier
    for x, y in loader:
        metric.update(penultimate(x), y)                      # any chunking, dtype, device
    values = metric.compute()                                 # docs/metrics.md keys -> 0-d tensors

The state is :class:`~nctools.metrics.stats.ClassStats`' own (counts, shifted sums,
squared norms and the full D x D second moment, float64), registered with
``dist_reduce_fx="sum"`` and accumulated by ``ClassStats.update`` (one route): merging,
``forward``'s batch-then-merge and the DDP ``sync`` are all plain sums, so under DDP
``compute()`` gives the metrics of the union of every process's data.

A sum is exact across processes only if every process takes its moments about the same
per-class point. ``ClassStats`` alone picks each class's first sample and agrees on a
common point before its all-reduce; torchmetrics syncs by summing states with no such
step, so here the point is fixed at construction: zero, or ``reference`` (e.g. the class
means of the previous epoch). The trade-off is precision in the collapsed regime: about
zero, Sigma_W = E[hh^T] - mu mu^T cancels digits when features are far from the origin
compared with their within-class spread (features ~1e3 with spread ~1e-3 keep ~4
significant digits of NC1 in float64; about a reference near the means, ~10). Pass
``reference`` when NC1 falls below ~1e-6 relative to ||mu||^2.

NC1 needs Sigma_W in full here (D x D float64: 2 MiB at D = 512, 32 MiB at D = 2048),
because the eigenvectors of Sigma_B are not known until the means are; ``nctools.measure``
avoids that with a second pass, which a metric fed once per batch cannot make.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from nctools.limits import check_fits
from nctools.metrics.decisions import DecisionTally
from nctools.metrics.engine import BEYOND_KEYS, METRIC_KEYS, class_metrics, nc4_metrics
from nctools.metrics.inputs import as_tensor, check_not_meta, check_num_classes, dtype_name
from nctools.metrics.stats import BLOCK_ELEMENTS, ClassStats
from nctools.models.tokens import flatten_tokens

F64 = torch.float64
NC4_KEYS = ("ncc_mismatch", "accuracy", "ncc_accuracy")
# metrics that need the classifier (W, b): NaN without one
CLASSIFIER_KEYS = (
    "equinorm_weights", "equiangular_weights", "maxangle_weights", "etf_weights",
    "self_duality", "ncc_mismatch", "accuracy",
)  # fmt: skip
Classifier = nn.Linear | tuple[Tensor, Tensor | None] | Tensor


class NCMetric(Metric):
    """Every NC1-NC4 metric of docs/metrics.md (Papyan, Han & Donoho, PNAS 2020), streaming.

    Args:
        num_classes: C (>= 2).
        classifier: the last layer, read at :meth:`compute` (so it may keep training):
            an ``nn.Linear`` with weight (C, D) and optional bias (C,), a ``(weight, bias)``
            pair (bias may be None), or a weight alone. Without it the metrics that need
            W are NaN (with a warning).
        keep_features: also keep every sample (a ``dist_reduce_fx="cat"`` state, the
            torchmetrics convention for what cannot be summed) so that :meth:`compute` can
            tally NC4 (``ncc_mismatch``, ``accuracy``, ``ncc_accuracy``), which needs the
            final class means and therefore a second look at each sample. Without it the
            three NC4 keys are NaN. Memory: N x D values.
        global_mean: ``"samples"`` (the paper's mu_G, the mean of all samples; the only
            choice for now).
        dim: D, the width of the features given to :meth:`update`; taken from
            ``classifier`` or ``reference`` when omitted, so required without either
            (an inner layer: ``NCMetric(num_classes=C, dim=D)``).
        reference: (C, D) or (D,) the fixed point the moments are taken about (default 0),
            identical on every process; see the module docstring for when to pass one.
        kwargs: torchmetrics' own (``dist_sync_on_step``, ``process_group``, ...).

    ``compute()`` returns a dict of the docs/metrics.md keys (``METRIC_KEYS``) to 0-d float64
    tensors. Like ``nctools.measure`` it raises ValueError naming an empty class, so a
    ``forward`` call (which measures its batch alone) needs every class in the batch.
    The keys left NaN by the construction (no classifier, no kept features) are said once,
    by the first ``compute()``; ``forward``'s per-batch values are NaN there without a
    word, as torchmetrics' ``forward`` is called every step.

    The state (float64, plus the kept features) is sized before it is allocated: a
    ``num_classes`` x ``dim`` larger than this machine's memory is refused with the size.
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False  # forward: batch state, then a sum into the running state

    counts: Tensor
    sums: Tensor
    sq_norms: Tensor
    scatter: Tensor
    shift: Tensor
    features: list[Tensor]
    labels: list[Tensor]

    def __init__(
        self,
        num_classes: int,
        classifier: Classifier | None = None,
        keep_features: bool = False,
        global_mean: str = "samples",
        *,
        dim: int | None = None,
        reference: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)
        if global_mean != "samples":
            raise ValueError(f"global_mean must be 'samples', got {global_mean!r}")
        self.global_mean_choice = global_mean
        # kept out of the module tree: the metric must not move, copy or save the user's layer
        object.__setattr__(self, "classifier", classifier)
        self.keep_features = bool(keep_features)
        dim = _feature_dim(num_classes, dim, classifier, reference)
        self.dim = dim
        if classifier is not None:
            _check_classifier(classifier, num_classes, dim)
        # counts, sums, squared norms, the D x D scatter and the shift, float64
        check_fits("NCMetric(num_classes, dim)",
                   8 * (2 * num_classes + 2 * num_classes * dim + dim * dim),
                   f"the float64 state of C = {num_classes} classes x D = {dim}")
        shift = torch.zeros(num_classes, dim, dtype=F64)
        if reference is not None:
            reference = as_tensor("reference", reference).detach().to(F64)
            if tuple(reference.shape) not in ((dim,), (num_classes, dim)):
                raise ValueError(
                    f"reference must have shape (D,) = ({dim},) or (C, D) = "
                    f"{(num_classes, dim)}, got {tuple(reference.shape)}"
                )
            if not bool(torch.isfinite(reference).all()):
                raise ValueError("reference contains NaN or Inf values")
            shift = shift + reference
        # fixed, identical on every process, moved with the module; saved in state_dict
        # (the sums are about it) and checked on load and on merge
        self.register_buffer("shift", shift, persistent=True)
        self.add_state("counts", torch.zeros(num_classes, dtype=F64), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(num_classes, dim, dtype=F64), dist_reduce_fx="sum")
        self.add_state("sq_norms", torch.zeros(num_classes, dtype=F64), dist_reduce_fx="sum")
        self.add_state("scatter", torch.zeros(dim, dim, dtype=F64), dist_reduce_fx="sum")
        if self.keep_features:
            self.add_state("features", [], dist_reduce_fx="cat")
            self.add_state("labels", [], dist_reduce_fx="cat")

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another NCMetric's state (torchmetrics' merge): both must have been built with
        the same ``reference``, the point their sums are taken about."""
        if isinstance(incoming_state, NCMetric) and not torch.equal(
            self.shift, incoming_state.shift.to(self.shift.device)
        ):
            raise ValueError("merge_state: the metrics were built with different reference= "
                             "(their moments are about different points); give both the same")
        super().merge_state(incoming_state)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load the states and the ``reference`` they are about (ValueError naming reference
        if it has another shape or is not finite); a state dict saved without it keeps
        this metric's."""
        key = prefix + "shift"
        if key not in state_dict:
            state_dict[key] = self.shift
        loaded = as_tensor("reference", state_dict[key])
        if tuple(loaded.shape) != tuple(self.shift.shape) or not loaded.dtype.is_floating_point:
            raise ValueError(f"reference in the state dict has shape {tuple(loaded.shape)} "
                             f"({dtype_name(loaded)}); this metric's is "
                             f"{tuple(self.shift.shape)} float64")
        if not bool(torch.isfinite(loaded).all()):
            raise ValueError("reference in the state dict contains NaN or Inf values")
        state_dict[key] = loaded.to(F64)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _stats(self) -> ClassStats:
        return ClassStats.from_state(
            self.counts, self.sums, self.sq_norms, self.scatter, self.shift.to(self.counts.device)
        )

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` (n, D) any float dtype and device (detached; moved to
        the metric's device), ``labels`` (n,) integers in [0, C); or token positions,
        features (B, T, D) with labels (B, T), -100 where a position is not a sample
        (:func:`nctools.models.tokens.flatten_tokens`)."""
        for name, value in (("features", features), ("labels", labels)):
            if isinstance(value, Tensor):
                check_not_meta(name, value)
        if features.ndim == 3:
            features, labels = flatten_tokens(features, labels)
        self._stats().update(features, labels)  # checks the inputs before adding anything
        if self.keep_features:
            device = self.counts.device
            # float16/bfloat16 widen exactly to float32; float64 stays float64
            dtype = torch.promote_types(features.dtype, torch.float32)
            self.features.append(features.detach().to(device=device, dtype=dtype))
            self.labels.append(labels.detach().to(device=device, dtype=torch.long))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """torchmetrics' forward (the batch's own values, the batch added to the state),
        silent about the keys the construction leaves NaN (see the class)."""
        self.__dict__["_nc_in_forward"] = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["_nc_in_forward"] = False

    def plot(
        self,
        val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
        ax: Any = None,
        *,
        keys: Sequence[str] | None = None,
    ) -> tuple[Any, Any]:
        """torchmetrics' plot: one ``compute()``/``forward`` result (a point per key) or a
        sequence of them (a line per key over the steps); ``val`` None plots ``compute()``.

        Args:
            val: the values to plot, as :meth:`compute` returns them.
            ax: a matplotlib Axes to draw on; a new figure otherwise.
            keys: the keys to draw (default: every docs/metrics.md key that is not NaN).

        Returns:
            ``(fig, ax)``, as every torchmetrics metric's ``plot``.
        """
        val = self.compute() if val is None else val
        steps = [val] if isinstance(val, dict) else list(val)
        if keys is None:
            keys = [k for k in METRIC_KEYS
                    if any(k in step and bool(torch.isfinite(step[k])) for step in steps)]
        missing = sorted({k for k in keys for step in steps if k not in step})
        if missing:
            raise ValueError(f"NCMetric.plot: keys {missing} are not in the values "
                             f"(known: {', '.join(steps[0])})")
        picked = [{k: step[k] for k in keys} for step in steps]
        return self._plot(picked[0] if isinstance(val, dict) else picked, ax)

    def compute(self) -> dict[str, Tensor]:
        """The docs/metrics.md keys as 0-d float64 tensors (NaN where undefined, see the class)."""
        stats = self._stats()
        stats.check_nonempty()
        weight, bias = self._classifier()
        if weight is None:
            _warn_once(self, "no classifier: the metrics of W (NC2 weights, NC3, NC4 "
                             "accuracy and mismatch) are NaN")  # fmt: skip
        result = class_metrics(stats, weight, stats.global_mean())
        result.update(dict.fromkeys(NC4_KEYS, float("nan")))
        if self.keep_features:
            result.update(self._decisions(stats, weight, bias))
        else:
            _warn_once(self, "keep_features=False: NC4 (ncc_mismatch, accuracy, "
                             "ncc_accuracy) needs a second look at the samples; NaN")  # fmt: skip
        if weight is None:
            result.update(dict.fromkeys(CLASSIFIER_KEYS, float("nan")))
        device = self.counts.device
        keys = (*METRIC_KEYS, *(key for key in BEYOND_KEYS if key in result))
        return {key: torch.tensor(result[key], dtype=F64, device=device) for key in keys}

    def _classifier(self) -> tuple[Tensor | None, Tensor | None]:
        """(weight (C, D), bias (C,)) float64 on the state's device, read now."""
        if self.classifier is None:
            return None, None
        weight, bias = _weight_bias(cast(Any, self.classifier))
        device = self.counts.device
        weight = weight.detach().to(device=device, dtype=F64)
        if tuple(weight.shape) != (self.num_classes, self.dim):
            raise ValueError(
                f"classifier weight must have shape (C, D) = {(self.num_classes, self.dim)}, "
                f"got {tuple(weight.shape)}"
            )
        if bias is None:
            bias = torch.zeros(self.num_classes, dtype=F64, device=device)
        bias = bias.detach().to(device=device, dtype=F64)
        if tuple(bias.shape) != (self.num_classes,):
            raise ValueError(
                f"classifier bias must have shape (C,) = ({self.num_classes},), "
                f"got {tuple(bias.shape)}"
            )
        return weight, bias

    def _decisions(
        self, stats: ClassStats, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, float]:
        """NC4 (Papyan et al. 2020, Fig. 7) over the kept samples, with the final means.

        The engine's second-pass tally (:mod:`nctools.metrics.engine`): a means-only
        ClassStats pass about the class means hands each block to :class:`DecisionTally`.
        """
        means = stats.class_means()
        tally = DecisionTally(weight, bias, means, stats.global_mean())
        no_basis = torch.zeros(self.dim, 0, dtype=F64, device=means.device)
        second = ClassStats(self.num_classes, self.dim, shift=means, basis=no_basis,
                            device=means.device)
        for feats, labs in _kept_blocks(self.features, self.labels, self.dim):
            second.update(feats, labs, on_block=tally.add, check=False)
        return nc4_metrics(tally, float(second.counts.sum()), weight is not None)


def _kept_blocks(
    features: list[Tensor] | Tensor, labels: list[Tensor] | Tensor, dim: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """The kept samples in blocks; after a DDP sync torchmetrics hands one tensor."""
    if isinstance(features, Tensor):
        features, labels = [features], [labels]  # type: ignore[list-item]
    rows = max(1, 16 * BLOCK_ELEMENTS // dim)
    for feats, labs in zip(features, labels, strict=True):
        for start in range(0, feats.shape[0], rows):
            yield feats[start : start + rows], labs[start : start + rows]


def _weight_bias(classifier: Classifier) -> tuple[Tensor, Tensor | None]:
    if isinstance(classifier, nn.Linear):
        return classifier.weight, classifier.bias
    if isinstance(classifier, Tensor):
        return classifier, None
    if isinstance(classifier, tuple) and len(classifier) == 2:
        weight, bias = classifier
        return as_tensor("classifier weight", weight), (
            None if bias is None else as_tensor("classifier bias", bias)
        )
    raise ValueError(
        "classifier must be an nn.Linear, a (weight, bias) pair or a weight tensor, "
        f"got {type(classifier).__name__}"
    )


def _feature_dim(
    num_classes: int, dim: int | None, classifier: Classifier | None, reference: Any
) -> int:
    """D from ``dim``, else the classifier's weight, else ``reference``'s last axis."""
    if dim is None and classifier is not None:
        dim = int(_weight_bias(classifier)[0].shape[-1])
    if dim is None and reference is not None:
        dim = int(as_tensor("reference", reference).shape[-1])
    if dim is None:
        raise ValueError(f"NCMetric(num_classes={num_classes}) without a classifier needs "
                         f"dim=, the width D of the features given to update(): e.g. "
                         f"NCMetric(num_classes={num_classes}, dim=512)")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return dim


def _check_classifier(classifier: Classifier, num_classes: int, dim: int) -> None:
    """ValueError at construction for a classifier of another C (or D): compute() reads it."""
    weight, bias = _weight_bias(classifier)
    shape = tuple(weight.shape)
    if shape != (num_classes, dim):
        raise ValueError(f"classifier weight has shape {shape} (C, D) but num_classes is "
                         f"{num_classes} and dim {dim}: give the classifier of the "
                         f"{num_classes} classes")
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(f"classifier bias has shape {tuple(bias.shape)} but num_classes is "
                         f"{num_classes}")


def _warn_once(metric: NCMetric, message: str) -> None:
    if metric.__dict__.get("_nc_in_forward"):
        return
    seen: set[str] = metric.__dict__.setdefault("_nc_warned", set())
    if message not in seen:
        seen.add(message)
        warnings.warn(f"NCMetric: {message}", stacklevel=3)

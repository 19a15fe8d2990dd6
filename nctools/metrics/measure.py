"""`measure` and `measure_chunks`: every NC1-NC4 metric of docs/metrics.md from features,
labels and a classifier.

Usage::

    from nctools.metrics import measure
    metrics = measure(features, labels, weight, bias)   # dict of docs/metrics.md keys -> float

These are the public entry points of the measurement engine
(:class:`nctools.metrics.engine.Engine`, whose docstring tells how each metric is
computed): they check their inputs once, here, and drive the engine's two passes over the
features, whole (`measure`) or in chunks streamed from disk (`measure_chunks`), across
processes only when a process group is given (``torch.distributed.all_reduce``): like
torchmetrics' functional API, a call inside an initialised process group makes no
collective call unless asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from nctools.metrics.engine import (
    BEYOND_KEYS,
    CLASSIFIER_FREE_KEYS,
    METRIC_KEYS,
    Engine,
    Layer,
)
from nctools.metrics.inputs import (
    as_tensor,
    check_finite,
    check_labels,
    check_num_classes,
    dtype_name,
)
from nctools.metrics.stats import ClassStats
from nctools.metrics.vocab import GLOBAL_MEANS

__all__ = ["BEYOND_KEYS", "CLASSIFIER_FREE_KEYS", "METRIC_KEYS", "class_means", "measure",
           "measure_chunks"]

F64 = torch.float64
CHUNK_ELEMENTS = 1 << 22  # feature values per chunk streamed from disk (e.g. 8192 x 512)

Chunks = Callable[[], Iterable[tuple[Tensor, Tensor]]]
OodChunks = Callable[[], Iterable[Tensor]]


def measure(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    weight: Tensor | np.ndarray | None = None,
    bias: Tensor | np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    class_means: Tensor | np.ndarray | None = None,
    global_mean: str = "samples",
    classes: Sequence[int] | None = None,
    drop_empty: bool = False,
    ood_features: Tensor | np.ndarray | None = None,
    mse_weight_decay: float | None = None,
    process_group: dist.ProcessGroup | None = None,
    min_count: int = 1,
    top_k: int | None = None,
    cdnv_power: int = 1,
    ncc_samples: int | None = None,
    argmax_all_classes: bool = False,
    etf_without_simplex: bool = True,
    pair_precision: str = "float64",
) -> dict[str, float]:
    """Neural-collapse metrics (Papyan, Han & Donoho, PNAS 2020, and docs/metrics.md "Beyond
    the paper") of one set of features.

    Args:
        features: (N, D) penultimate-layer activations, float16/bfloat16/float32/float64,
            CPU or CUDA (the computation runs on their device, in float64).
        labels: (N,) integers in [0, C).
        weight: (C, D) last-layer classifier rows w_c; None measures without a classifier
            (an intermediate layer): only ``CLASSIFIER_FREE_KEYS``.
        bias: (C,) classifier bias, zero if None.
        num_classes: C; defaults to weight's row count (and must agree with it), or
            without a weight to max(labels) + 1.
        class_means: optional (C, D) means from another split (e.g. the training set):
            NC4 and ``ncc_accuracy`` then use them (docs/metrics.md, "On other data").
        global_mean: ``"samples"`` (the paper's mu_G, the mean of all samples) or
            ``"classes"`` (the mean of the class means).
        classes: measure only these classes (samples, rows of W and b, decisions among
            them); C becomes len(classes).
        drop_empty: measure the classes that have samples instead of raising for empty
            ones; the result then has ``classes_measured``.
        ood_features: (N', D) out-of-distribution features: adds ``nc5``.
        mse_weight_decay: lambda of the regularised MSE loss: adds ``mse_nc1``,
            ``mse_nc23``, ``mse_perp`` (see ``BEYOND_KEYS`` for lambda of a run).
        process_group: under torch.distributed, the processes whose features (each its
            own shard) are measured as one set, summed with ``all_reduce``; every one of
            them must call. Default: this process's features alone, no communication
            (``torch.distributed.group.WORLD`` asks for every process).
        min_count, top_k: the vocabulary-scale class filters of Wu & Papyan (NeurIPS 2024,
            "Linguistic Collapse"; docs/language-models.md): measure only the classes with
            at least ``min_count`` samples, then the ``top_k`` most frequent, decided from
            the counts; the others' samples are left out and the result has
            ``classes_measured``.
        cdnv_power: 1 (Galanti et al. 2022) or 2 (||mu_c - mu_c'||^4, as Wu & Papyan's
            code) for ``cdnv``.
        ncc_samples: NC4 (``ncc_mismatch``, ``accuracy``, ``ncc_accuracy``) on this many
            samples only, evenly spaced in order (deterministic): its cost is N x C x D.
            The result then has ``ncc_samples``, the number tallied.
        argmax_all_classes: with classes left out (``drop_empty``, ``min_count``,
            ``top_k``), the classifier still decides among all C rows (a language model's
            argmax over the whole vocabulary); a decision for a class left out is wrong.
        etf_without_simplex: compute the simplex-ETF keys (equiangular, maxangle, etf,
            self_duality_etf) also when C > D + 1, where no simplex ETF exists; False:
            NaN with a warning saying so, and their C x C cost saved (a vocabulary).
        pair_precision: ``"float64"`` (exact to rounding), or ``"float32"``: GNC2 and
            CDNV's C^2 / 2 class pairs in float32 tiles summed in float64, about 3x
            faster on a CPU and within ~1e-7 (relative) at vocabulary scale (C > D + 1;
            docs/language-models.md); not for nearly collapsed means, whose GNC2
            variance can be as small as float32's rounding.

    Returns:
        dict of the defined ``METRIC_KEYS`` then ``BEYOND_KEYS`` (docs/metrics.md), as Python
        floats; NaN with a warning for a metric these data leave undefined.

    Raises:
        ValueError naming the argument: mismatched lengths, labels outside [0, C), a
        weight of the wrong shape, NaN or Inf, an empty class (unless ``drop_empty``),
        C < 2, empty input, an unknown option.
    """
    features, labels = as_tensor("features", features), as_tensor("labels", labels)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features is empty (shape {tuple(features.shape)})")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but features has {features.shape[0]} rows"
        )
    if weight is None and num_classes is None:
        check_labels(labels, 1 << 62)  # integers first, then their range
        num_classes = int(labels.max()) + 1
    if weight is not None:
        weight = as_tensor("weight", weight)
        if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
            raise ValueError(
                f"weight must have shape (C, D) with D = {features.shape[1]} (the features' "
                f"width), got {tuple(weight.shape)}"
            )
    setup = _Setup(weight, bias, num_classes, class_means, features.device, global_mean,
                   classes, mse_weight_decay, dim=features.shape[1])
    features, labels = setup.checked_chunk(features, labels)
    ood = None
    if ood_features is not None:
        ood = as_tensor("ood_features", ood_features)
        if ood.ndim != 2 or ood.shape[1] != features.shape[1] or ood.shape[0] == 0:
            raise ValueError(
                f"ood_features must have shape (N', D) with D = {features.shape[1]} and "
                f"N' > 0, got {tuple(ood.shape)}"
            )
        ood = setup.checked_ood(ood)
    options = dict(min_count=min_count, top_k=top_k, cdnv_power=cdnv_power,
                   ncc_samples=ncc_samples, argmax_all_classes=argmax_all_classes,
                   etf_without_simplex=etf_without_simplex, pair_precision=pair_precision)
    result, _ = _measure(lambda: [(features, labels)], setup, drop_empty,
                         None if ood is None else (lambda: [ood]), process_group, options)
    return result


def measure_chunks(
    chunks: Chunks,
    weight: Tensor | np.ndarray | None = None,
    bias: Tensor | np.ndarray | None = None,
    num_classes: int | None = None,
    class_means: Tensor | np.ndarray | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    global_mean: str = "samples",
    classes: Sequence[int] | None = None,
    drop_empty: bool = False,
    ood_features: Tensor | np.ndarray | OodChunks | None = None,
    mse_weight_decay: float | None = None,
    min_count: int = 1,
    top_k: int | None = None,
    cdnv_power: int = 1,
    ncc_samples: int | None = None,
    argmax_all_classes: bool = False,
    etf_without_simplex: bool = True,
    pair_precision: str = "float64",
) -> tuple[dict[str, float], Tensor]:
    """`measure` over features that arrive in chunks, possibly sharded across processes.

    Args:
        chunks: a callable returning a fresh iterable of ``(features (n, D), labels (n,))``;
            it is called twice (two passes). Under torch.distributed each process passes
            the chunks of its own shard and every process gets the metrics of the union.
        weight, bias, num_classes, class_means: as in :func:`measure` (``num_classes`` is
            required without a weight; ``class_means`` has one row per class of C).
        device: where the statistics live (default: the classifier's device).
        group: under torch.distributed, the process group whose shards are measured as
            one set (every process of it must call); None (the default): this process's
            chunks alone, no communication.
        global_mean, classes, drop_empty, mse_weight_decay, min_count, top_k,
        cdnv_power, ncc_samples, argmax_all_classes, etf_without_simplex,
            pair_precision: as in :func:`measure`.
        ood_features: (N', D) features, or a callable returning an iterable of (n', D)
            chunks of them (this process's shard); only their mean is used.

    Returns:
        The metrics dict of :func:`measure`, and the (C', D) float64 class means of the
        classes measured (to pass as ``class_means`` when measuring another split).
    """
    if weight is None and num_classes is None:
        raise ValueError("num_classes is required when weight is None")
    setup = _Setup(weight, bias, num_classes, class_means, device, global_mean, classes,
                   mse_weight_decay)

    def checked() -> Iterator[tuple[Tensor, Tensor]]:
        for feats, labs in chunks():
            yield setup.checked_chunk(as_tensor("features", feats), as_tensor("labels", labs))

    def checked_ood() -> Iterator[Tensor]:
        assert ood_features is not None
        whole = ood_features
        source = whole if callable(whole) else (lambda: [whole])
        for feats in source():
            yield setup.checked_ood(as_tensor("ood_features", feats))

    options = dict(min_count=min_count, top_k=top_k, cdnv_power=cdnv_power,
                   ncc_samples=ncc_samples, argmax_all_classes=argmax_all_classes,
                   etf_without_simplex=etf_without_simplex, pair_precision=pair_precision)
    return _measure(checked, setup, drop_empty, None if ood_features is None else checked_ood,
                    group, options)


def class_means(
    features: Tensor | np.ndarray, labels: Tensor | np.ndarray, num_classes: int
) -> Tensor:
    """(C, D) float64 class means of ``features`` (N, D) grouped by ``labels`` (N,)."""
    features = as_tensor("features", features)
    labels = as_tensor("labels", labels)
    rows = _chunk_rows(features.shape[1], num_classes)
    no_basis = torch.zeros(features.shape[1], 0)  # counts and means only
    stats = ClassStats(num_classes, features.shape[1], basis=no_basis, device=features.device)
    for start in range(0, features.shape[0], rows):
        stats.update(features[start : start + rows], labels[start : start + rows])
    stats.check_nonempty()
    return stats.class_means()



# --------------------------------------------------------------------------- helpers
def _measure(
    chunks: Chunks, setup: _Setup, drop_empty: bool, ood: OodChunks | None,
    group: dist.ProcessGroup | None, options: dict[str, Any],
) -> tuple[dict[str, float], Tensor]:
    """The engine's two passes over checked chunks, then the OOD features' mean; summed
    over the processes of ``group`` when one is given; ``options``: the engine's
    vocabulary-scale keyword arguments."""
    layer = Layer(*setup.hand_over(), setup.mse, ood=ood is not None)
    engine = Engine(setup.measured, {"features": layer}, device=setup.device,
                    global_mean=setup.global_mean, drop_empty=drop_empty,
                    class_ids=setup.subset, sync=group is not None, group=group, **options)
    for _ in range(2):
        for feats, labs in chunks():
            engine.update(feats, labs)
        engine.end_pass()
    if ood is not None:
        for feats in ood():
            engine.update_ood("features", feats)
    return engine.result(), engine.class_means()


class _Setup:
    """The checked options of one measurement (the classifier in float64, the classes
    measured, the NCC centres) and the checks each chunk of features goes through: every
    input is checked here, once, before the engine reads it."""

    def __init__(
        self, weight: Tensor | np.ndarray | None, bias: Tensor | np.ndarray | None,
        num_classes: int | None, class_means: Tensor | np.ndarray | None,
        device: torch.device | str | None, global_mean: str, classes: Sequence[int] | None,
        mse: float | None, dim: int | None = None,
    ) -> None:
        if global_mean not in GLOBAL_MEANS:
            raise ValueError(f"global_mean must be one of {GLOBAL_MEANS}, got {global_mean!r}")
        self.global_mean, self.mse = global_mean, _checked_mse(mse, weight)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        if weight is None:
            if bias is not None:
                raise ValueError("bias given without weight")
            self.total = check_num_classes(num_classes)
            self.device = torch.device(device if device is not None else "cpu")
        else:
            self.weight, self.bias, self.total = _classifier(weight, bias, num_classes, device)
            self.device, dim = self.weight.device, self.weight.shape[1]
        self.subset = _class_subset(classes, self.total)
        self.measured = self.total if self.subset is None else self.subset.numel()
        if self.measured < 2:
            raise ValueError(f"classes must name at least 2 classes, got {classes!r}")
        self.dim, self.dim_from = dim, "weight" if weight is not None else "features"
        self.class_means = self._given_means(class_means)
        self.remap: Tensor | None = None
        if self.subset is not None:
            pick = self.subset.to(self.device)
            if self.weight is not None and self.bias is not None:
                self.weight, self.bias = self.weight[pick], self.bias[pick]
            if self.class_means is not None:
                self.class_means = self.class_means[pick]
            self.remap = torch.full((self.total,), -1, dtype=torch.long)
            self.remap[self.subset] = torch.arange(self.measured)

    def hand_over(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(weight, bias, class_means) for the engine's layer, no longer held here: at a
        vocabulary's C each is a (C, D) float64 matrix the engine frees when it can."""
        held = (self.weight, self.bias, self.class_means)
        self.weight = self.bias = self.class_means = None
        return held

    def _given_means(self, class_means: Tensor | np.ndarray | None) -> Tensor | None:
        """The (C, D) ``class_means`` argument in float64 on the device, checked."""
        if class_means is None:
            return None
        given = as_tensor("class_means", class_means).to(device=self.device, dtype=F64)
        dim = self.dim if self.dim is not None else given.shape[-1]
        if tuple(given.shape) != (self.total, dim):
            raise ValueError(f"class_means must have shape (C, D) = {(self.total, dim)}, "
                             f"got {tuple(given.shape)}")
        check_finite("class_means", given)
        if self.dim is None:
            self.dim, self.dim_from = dim, "class_means"
        return given

    def checked_chunk(self, feats: Tensor, labs: Tensor) -> tuple[Tensor, Tensor]:
        """A chunk of features (n, D) and labels (n,), checked, and relabelled 0..C'-1 to
        the classes measured (the other classes' samples left out) with ``classes``."""
        if feats.ndim != 2 or feats.shape[1] == 0:
            raise ValueError(f"features must have shape (n, D), got {tuple(feats.shape)}")
        if self.dim is None:
            self.dim = feats.shape[1]
        elif feats.shape[1] != self.dim:
            raise ValueError(self._width_error(feats.shape[1]))
        if not feats.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got dtype {dtype_name(feats)}")
        if labs.ndim != 1 or labs.shape[0] != feats.shape[0]:
            raise ValueError(f"labels has shape {tuple(labs.shape)} but features has "
                             f"shape {tuple(feats.shape)}")
        check_labels(labs, self.total)
        if self.remap is None:
            return feats, labs
        new = self.remap.to(labs.device)[labs.long()]
        keep = new >= 0
        return feats[keep.to(feats.device)], new[keep]

    def _width_error(self, width: int) -> str:
        if self.dim_from == "weight":
            return (f"weight must have shape (C, D) with D = {width} (the features' width), "
                    f"got {(self.total, self.dim)}")
        if self.dim_from == "class_means":
            return (f"class_means must have shape (C, D) = {(self.total, width)}, "
                    f"got {(self.total, self.dim)}")
        return f"features must have shape (n, {self.dim}), got (n, {width})"

    def checked_ood(self, ood: Tensor) -> Tensor:
        """Out-of-distribution features (n', D), checked."""
        if ood.ndim != 2 or ood.shape[1] != self.dim:
            raise ValueError(f"ood_features must have shape (N', {self.dim}), "
                             f"got {tuple(ood.shape)}")
        if not ood.dtype.is_floating_point:
            raise ValueError(f"ood_features: features must be floating point, got dtype "
                             f"{dtype_name(ood)}")
        if not bool(torch.isfinite(ood).all()):
            raise ValueError("ood_features: features contain NaN or Inf values")
        return ood


def _checked_mse(lam: object, weight: object) -> float | None:
    """``mse_weight_decay``: None, or a finite number >= 0 given with a classifier."""
    if lam is None:
        return None
    if weight is None:
        raise ValueError("mse_weight_decay needs the classifier: weight is None")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"mse_weight_decay must be a number >= 0, got {lam!r}")
    if not np.isfinite(lam):
        raise ValueError(f"mse_weight_decay must be finite, got {lam!r}")
    return float(lam)


def _class_subset(classes: Sequence[int] | None, total: int) -> Tensor | None:
    """``classes`` as a (C',) int64 tensor of distinct ids in [0, total), or None."""
    if classes is None:
        return None
    try:
        ids = [int(c) for c in classes]
        if any(int(c) != c or isinstance(c, bool) for c in classes):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"classes must be a sequence of class ids, got {classes!r}") from None
    if len(set(ids)) != len(ids) or any(not 0 <= c < total for c in ids):
        raise ValueError(f"classes must be distinct ids in [0, {total}), got {ids}")
    return torch.tensor(ids, dtype=torch.long)


def _chunk_rows(dim: int, num_classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // (dim + 2 * num_classes))


def _classifier(
    weight: Tensor | np.ndarray,
    bias: Tensor | np.ndarray | None,
    num_classes: int | None,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor, int]:
    """(weight (C, D), bias (C,)) float64 on ``device`` (default: the weight's), and C."""
    weight = as_tensor("weight", weight)
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (C, D), got {tuple(weight.shape)}")
    num_classes = check_num_classes(weight.shape[0] if num_classes is None else num_classes)
    if weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must have shape (C, D) with C = num_classes = {num_classes}, "
            f"got {tuple(weight.shape)}"
        )
    weight = weight.to(device=device if device is not None else weight.device, dtype=F64)
    check_finite("weight", weight)
    if bias is None:
        bias = torch.zeros(num_classes, dtype=F64, device=weight.device)
    else:
        bias = as_tensor("bias", bias).to(device=weight.device, dtype=F64)
        if tuple(bias.shape) != (num_classes,):
            raise ValueError(
                f"bias must have shape (C,) = ({num_classes},), got {tuple(bias.shape)}"
            )
        check_finite("bias", bias)
    return weight, bias, num_classes

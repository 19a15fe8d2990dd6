"""`measure`: every NC1-NC4 metric of METRICS.md from features, labels and a classifier.

Usage::

    from nctools.metrics import measure
    metrics = measure(features, labels, weight, bias)   # dict of METRICS.md keys -> float

Two streaming passes over the features, in float64 chunks so memory stays within about
twice the features' own size: the first gathers class counts and means; the second
re-centres every sample on its exact class mean, keeps Sigma_W only along the <= C - 1
eigenvectors of Sigma_B (all NC1 needs; no D x D inverse), and tallies the classifier
and nearest-class-centre decisions (NC4). The same passes run on chunks streamed from
disk (`measure_chunks`) and across processes (``group``), where the statistics are
summed with ``torch.distributed.all_reduce``. Both passes are :class:`ClassStats`
updates, the one accumulation route (torch operations on blocks of rows, CPU or CUDA);
torch's own intra-op threads parallelise them, and the caller's thread settings are left
as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from nctools.metrics import functional as metrics
from nctools.metrics.decisions import DecisionTally
from nctools.metrics.inputs import as_tensor, check_finite, check_labels, check_num_classes
from nctools.metrics.stats import ClassStats

F64 = torch.float64
CHUNK_ELEMENTS = 1 << 22  # feature values per chunk streamed from disk (e.g. 8192 x 512)

METRIC_KEYS = (
    "nc1", "nc1_ratio", "cdnv",
    "equinorm_means", "equinorm_weights", "equiangular_means", "equiangular_weights",
    "maxangle_means", "maxangle_weights", "etf_means", "etf_weights",
    "self_duality",
    "ncc_mismatch", "accuracy", "ncc_accuracy",
)  # fmt: skip

Chunks = Callable[[], Iterable[tuple[Tensor, Tensor]]]


def measure(
    features: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    weight: Tensor | np.ndarray,
    bias: Tensor | np.ndarray | None = None,
    num_classes: int | None = None,
    class_means: Tensor | np.ndarray | None = None,
) -> dict[str, float]:
    """Neural-collapse metrics (Papyan, Han & Donoho, PNAS 2020) of one set of features.

    Args:
        features: (N, D) penultimate-layer activations, float16/bfloat16/float32/float64,
            CPU or CUDA (the computation runs on their device, in float64).
        labels: (N,) integers in [0, C).
        weight: (C, D) last-layer classifier rows w_c.
        bias: (C,) classifier bias, zero if None.
        num_classes: C; defaults to weight's row count and must agree with it.
        class_means: optional (C, D) means from another split (e.g. the training set):
            NC4 and ``ncc_accuracy`` then use them (METRICS.md, "On other data").

    Returns:
        dict with exactly the keys ``METRIC_KEYS`` (METRICS.md), as Python floats.

    Raises:
        ValueError naming the argument: mismatched lengths, labels outside [0, C), a
        weight of the wrong shape, NaN or Inf, an empty class, C < 2, empty input.
    """
    features = as_tensor("features", features)
    labels = as_tensor("labels", labels)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features is empty (shape {tuple(features.shape)})")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but features has {features.shape[0]} rows"
        )
    weight = as_tensor("weight", weight)
    if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must have shape (C, D) with D = {features.shape[1]} (the features' "
            f"width), got {tuple(weight.shape)}"
        )
    check_labels(labels, check_num_classes(weight.shape[0] if num_classes is None else num_classes))

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        yield features, labels

    result, _ = measure_chunks(
        chunks, weight, bias, num_classes, class_means, device=features.device
    )
    return result


def measure_chunks(
    chunks: Chunks,
    weight: Tensor | np.ndarray,
    bias: Tensor | np.ndarray | None = None,
    num_classes: int | None = None,
    class_means: Tensor | np.ndarray | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[dict[str, float], Tensor]:
    """`measure` over features that arrive in chunks, possibly sharded across processes.

    Args:
        chunks: a callable returning a fresh iterable of ``(features (n, D), labels (n,))``;
            it is called twice (two passes). Under torch.distributed each process passes
            the chunks of its own shard and every process gets the metrics of the union.
        weight, bias, num_classes, class_means: as in :func:`measure`.
        device: where the statistics live (default: the classifier's device).
        group: the process group to reduce over when torch.distributed is initialised.

    Returns:
        The metrics dict of :func:`measure`, and the (C, D) float64 class means of these
        features (to pass as ``class_means`` when measuring another split).
    """
    weight64, bias64, num_classes = _classifier(weight, bias, num_classes, device)
    device = weight64.device
    dim = weight64.shape[1]
    ncc_means = None
    if class_means is not None:
        ncc_means = as_tensor("class_means", class_means).to(device=device, dtype=F64)
        if tuple(ncc_means.shape) != (num_classes, dim):
            raise ValueError(
                f"class_means must have shape (C, D) = {(num_classes, dim)}, "
                f"got {tuple(ncc_means.shape)}"
            )
        check_finite("class_means", ncc_means)

    means_only = weight64[:0].T  # a basis of width 0: counts and sums only
    first, _ = _accumulate(
        chunks, lambda: ClassStats(num_classes, dim, basis=means_only, device=device)
    )
    first.all_reduce(group)
    if first.num_samples == 0:
        raise ValueError("features is empty (no samples in any chunk)")
    if not bool(torch.isfinite(first.sums).all()):
        raise ValueError("features contain NaN or Inf values")
    first.check_nonempty()
    means = first.class_means()
    reference = first.global_mean()
    eigvals, eigvecs = metrics.between_class_eig(means - reference)
    # Sigma_B^+ lives in the span of its r <= C - 1 eigenvectors V, so with r < D/2
    # Sigma_W is kept only there (an r x r moment); the same product x @ V serves the NCC
    # rule, as x.(mu_c - mu_G) = (x @ V) @ (M~ @ V)^T for means in that span.
    basis = eigvecs if eigvecs.shape[1] < dim // 2 else None
    coords = None if basis is None else ((means - reference) @ basis).T  # (r, C)
    tally = DecisionTally(weight64, bias64, means, reference, ncc_means, coords)
    second, tally = _accumulate(
        chunks,
        lambda: ClassStats(
            num_classes, dim, shift=means, basis=basis, device=device
        ),
        tally,
    )
    second.all_reduce(group)
    counts = tally.counts
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)

    result = collapse_metrics(second, weight64, eigvals, eigvecs)
    total = float(second.counts.sum())
    result["ncc_mismatch"] = float(counts[0]) / total
    result["accuracy"] = float(counts[1]) / total
    result["ncc_accuracy"] = float(counts[2]) / total
    return {key: result[key] for key in METRIC_KEYS}, second.class_means()


def collapse_metrics(
    stats: ClassStats,
    weight: Tensor,
    eigvals: Tensor | None = None,
    eigvecs: Tensor | None = None,
) -> dict[str, float]:
    """NC1, NC2 and NC3 metrics (METRICS.md) from class statistics and the classifier.

    Args:
        stats: accumulated statistics of all samples (every class non-empty).
        weight: (C, D) classifier rows.
        eigvals, eigvecs: Sigma_B's eigenpairs if already known (else computed here).
    """
    stats.check_nonempty()
    num_classes = stats.num_classes
    weight = weight.to(device=stats.device, dtype=F64)
    centred = stats.class_means() - stats.global_mean()
    if eigvals is None or eigvecs is None:
        eigvals, eigvecs = metrics.between_class_eig(centred)
    means_geometry = metrics.simplex_geometry(centred)
    weights_geometry = metrics.simplex_geometry(weight)
    return {
        "nc1": metrics.nc1(stats.within_class_var_along(eigvecs), eigvals, num_classes),
        "nc1_ratio": metrics.nc1_ratio(stats.within_class_trace(), centred),
        "cdnv": metrics.cdnv(centred, stats.class_variances()),
        "equinorm_means": metrics.equinorm(centred),
        "equinorm_weights": metrics.equinorm(weight),
        "equiangular_means": means_geometry["equiangular"],
        "equiangular_weights": weights_geometry["equiangular"],
        "maxangle_means": means_geometry["maxangle"],
        "maxangle_weights": weights_geometry["maxangle"],
        "etf_means": means_geometry["etf"],
        "etf_weights": weights_geometry["etf"],
        "self_duality": metrics.self_duality(weight, centred),
    }


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
def _accumulate(
    chunks: Chunks,
    make_stats: Callable[[], ClassStats],
    tally: DecisionTally | None = None,
) -> tuple[ClassStats, DecisionTally | None]:
    """One pass over the chunks into fresh statistics (and NC4 tallies)."""
    stats = make_stats()
    on_block = None if tally is None else tally.add
    for feats, labs in chunks():
        stats.update(feats, labs, on_block=on_block)
    return stats, tally


def _chunk_rows(dim: int, num_classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // (dim + 2 * num_classes))


def _classifier(
    weight: Tensor | np.ndarray,
    bias: Tensor | np.ndarray | None,
    num_classes: int | None,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor, int]:
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

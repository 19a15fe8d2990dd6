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

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from nctools.metrics import functional as metrics
from nctools.metrics.decisions import DecisionTally
from nctools.metrics.inputs import (
    as_tensor,
    check_finite,
    check_labels,
    check_num_classes,
    check_pass_rows,
)
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

# METRICS.md "Beyond the paper", returned after METRIC_KEYS when defined: nc5 needs
# ood_features, the mse_* keys need mse_weight_decay (lambda of the objective
# (1/2N) sum ||W h + b - e_y||^2 + (lambda/2)(||W||^2 + ||b||^2); for a network trained by
# nctools with loss mse (squared error summed over classes, averaged over samples) and SGD
# weight decay wd, the objective is twice that with lambda = wd / 2: pass wd / 2).
BEYOND_KEYS = (
    "separation_fuzziness",
    "gnc2_means", "gnc2_weights", "gnc2_energy_means", "gnc2_energy_weights",
    "duality_cos", "unc3", "self_duality_etf",
    "nc5",
    "mse_nc1", "mse_nc23", "mse_perp",
)  # fmt: skip

# Without a classifier (an intermediate layer), the keys that need none (METRICS.md).
CLASSIFIER_FREE_KEYS = (
    "nc1", "nc1_ratio", "cdnv", "separation_fuzziness",
    "equinorm_means", "equiangular_means", "maxangle_means", "etf_means",
    "gnc2_means", "gnc2_energy_means", "ncc_accuracy",
)  # fmt: skip

GLOBAL_MEANS = ("samples", "classes")

# Keys built on the centred class means M~: undefined when every class mean coincides.
_MEANS_KEYS = (
    "nc1", "nc1_ratio", "cdnv", "equinorm_means", "equiangular_means", "maxangle_means",
    "etf_means", "self_duality", "separation_fuzziness", "gnc2_means", "gnc2_energy_means",
    "duality_cos", "unc3", "self_duality_etf", "nc5",
)  # fmt: skip

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
) -> dict[str, float]:
    """Neural-collapse metrics (Papyan, Han & Donoho, PNAS 2020, and METRICS.md "Beyond
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
            NC4 and ``ncc_accuracy`` then use them (METRICS.md, "On other data").
        global_mean: ``"samples"`` (the paper's mu_G, the mean of all samples) or
            ``"classes"`` (the mean of the class means).
        classes: measure only these classes (samples, rows of W and b, decisions among
            them); C becomes len(classes).
        drop_empty: measure the classes that have samples instead of raising for empty
            ones; the result then has ``classes_measured``.
        ood_features: (N', D) out-of-distribution features: adds ``nc5``.
        mse_weight_decay: lambda of the regularised MSE loss: adds ``mse_nc1``,
            ``mse_nc23``, ``mse_perp`` (see ``BEYOND_KEYS`` for lambda of a run).

    Returns:
        dict of the defined ``METRIC_KEYS`` then ``BEYOND_KEYS`` (METRICS.md), as Python
        floats; NaN with a warning for a metric these data leave undefined.

    Raises:
        ValueError naming the argument: mismatched lengths, labels outside [0, C), a
        weight of the wrong shape, NaN or Inf, an empty class (unless ``drop_empty``),
        C < 2, empty input, an unknown option.
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
    if weight is not None:
        weight = as_tensor("weight", weight)
        if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
            raise ValueError(
                f"weight must have shape (C, D) with D = {features.shape[1]} (the features' "
                f"width), got {tuple(weight.shape)}"
            )
        if num_classes is None:
            num_classes = weight.shape[0]
    elif num_classes is None:
        check_labels(labels, 1 << 62)  # integers first, then their range
        num_classes = int(labels.max()) + 1
    check_labels(labels, check_num_classes(num_classes))
    ood = None
    if ood_features is not None:
        ood = as_tensor("ood_features", ood_features)
        if ood.ndim != 2 or ood.shape[1] != features.shape[1] or ood.shape[0] == 0:
            raise ValueError(
                f"ood_features must have shape (N', D) with D = {features.shape[1]} and "
                f"N' > 0, got {tuple(ood.shape)}"
            )

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        yield features, labels

    result, _ = measure_chunks(
        chunks, weight, bias, num_classes, class_means, device=features.device,
        global_mean=global_mean, classes=classes, drop_empty=drop_empty,
        ood_features=ood, mse_weight_decay=mse_weight_decay,
    )  # fmt: skip
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
) -> tuple[dict[str, float], Tensor]:
    """`measure` over features that arrive in chunks, possibly sharded across processes.

    Args:
        chunks: a callable returning a fresh iterable of ``(features (n, D), labels (n,))``;
            it is called twice (two passes). Under torch.distributed each process passes
            the chunks of its own shard and every process gets the metrics of the union.
        weight, bias, num_classes, class_means: as in :func:`measure` (``num_classes`` is
            required without a weight; ``class_means`` has one row per class of C).
        device: where the statistics live (default: the classifier's device).
        group: the process group to reduce over when torch.distributed is initialised.
        global_mean, classes, drop_empty, mse_weight_decay: as in :func:`measure`.
        ood_features: (N', D) features, or a callable returning an iterable of (n', D)
            chunks of them (this process's shard); only their mean is used.

    Returns:
        The metrics dict of :func:`measure`, and the (C', D) float64 class means of the
        classes measured (to pass as ``class_means`` when measuring another split).
    """
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"global_mean must be one of {GLOBAL_MEANS}, got {global_mean!r}")
    if weight is None:
        if bias is not None:
            raise ValueError("bias given without weight")
        if mse_weight_decay is not None:
            raise ValueError("mse_weight_decay needs the classifier: weight is None")
        if num_classes is None:
            raise ValueError("num_classes is required when weight is None")
        total = check_num_classes(num_classes)
        weight64 = bias64 = None
        device = torch.device(device if device is not None else "cpu")
    else:
        weight64, bias64, total = _classifier(weight, bias, num_classes, device)
        device = weight64.device
    if mse_weight_decay is not None:
        lam = mse_weight_decay
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"mse_weight_decay must be a number >= 0, got {lam!r}")
        if not np.isfinite(lam):
            raise ValueError(f"mse_weight_decay must be finite, got {lam!r}")
    subset = _class_subset(classes, total)
    pass_chunks = chunks if subset is None else _restricted(chunks, subset, total)
    measured = subset.numel() if subset is not None else total
    if measured < 2:
        raise ValueError(f"classes must name at least 2 classes, got {classes!r}")

    first = _accumulate(pass_chunks, lambda dim: ClassStats(
        measured, dim, basis=torch.zeros(dim, 0, dtype=F64), device=device))
    first.all_reduce(group)
    if first.num_samples == 0:
        raise ValueError("features is empty (no samples in any chunk)")
    if not bool(torch.isfinite(first.sums).all()):
        raise ValueError("features contain NaN or Inf values")
    dim = first.dim
    if weight64 is not None and weight64.shape[1] != dim:
        raise ValueError(f"weight must have shape (C, D) with D = {dim} (the features' width), "
                         f"got {tuple(weight64.shape)}")
    ids = subset if subset is not None else torch.arange(total)
    empty = torch.nonzero(first.counts == 0).flatten().cpu()
    if empty.numel() and not drop_empty:
        names = [int(ids[i]) for i in empty]
        shown = ", ".join(map(str, names[:20])) + (", ..." if len(names) > 20 else "")
        raise ValueError(
            f"labels: class {names[0]} has no samples ({len(names)} of {measured} classes "
            f"are empty: {shown}); drop_empty=True measures the others"
        )
    if empty.numel():
        kept = torch.nonzero(first.counts.cpu() > 0).flatten()
        if kept.numel() < 2:
            raise ValueError(f"labels: only {kept.numel()} class has samples; need 2")
        subset = ids[kept]
        pass_chunks = _restricted(chunks, subset, total)
        measured = subset.numel()
    keep = None if subset is None else subset.to(device)
    rows = (lambda t: t) if empty.numel() == 0 else (lambda t: t[kept.to(t.device)])
    means = rows(first.class_means())
    reference = first.global_mean() if global_mean == "samples" else means.mean(0)
    if weight64 is not None and bias64 is not None and keep is not None:
        weight64, bias64 = weight64[keep], bias64[keep]
    ncc_means = _given_means(class_means, total, dim, device, keep)

    eigvals, eigvecs = metrics.between_class_eig(means - reference)
    # Sigma_B^+ lives in the span of its r <= C - 1 eigenvectors V, so with 0 < r < D/2
    # Sigma_W is kept only there (an r x r moment); the same product x @ V serves the NCC
    # rule, as x.(mu_c - mu_G) = (x @ V) @ (M~ @ V)^T for means in that span, and settles
    # most classifier decisions (DecisionTally). The MSE decomposition needs all of Sigma_W.
    in_span = 0 < eigvecs.shape[1] < dim // 2 and mse_weight_decay is None
    basis = eigvecs if in_span else None
    if weight64 is None:  # the NCC rule itself stands in for the classifier
        centres = means - reference
        rule_w, rule_b = centres, -(centres @ reference) - centres.square().sum(1) / 2
    else:
        rule_w, rule_b = weight64, bias64
    tally = DecisionTally(rule_w, rule_b, means, reference, ncc_means, basis)
    second = _accumulate(
        pass_chunks,
        lambda dim: ClassStats(measured, dim, shift=means, basis=basis, device=device),
        tally,
        first_rows=first.num_samples,
    )
    second.all_reduce(group)
    check_pass_rows(first.num_samples, second.num_samples)  # an exhausted iterator?
    counts = tally.counts
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)

    result = collapse_metrics(second, weight64, eigvals, eigvecs, reference=reference)
    result.update(beyond_metrics(second, weight64, reference))
    n_total = float(second.counts.sum())
    if weight64 is not None:
        result["ncc_mismatch"] = float(counts[0]) / n_total
        result["accuracy"] = float(counts[1]) / n_total
    result["ncc_accuracy"] = float(counts[2]) / n_total
    if ood_features is not None:
        direction = _ood_mean(ood_features, dim, device, group) - reference
        result["nc5"] = metrics.nc5(means - reference, direction)
    if mse_weight_decay is not None and weight64 is not None and bias64 is not None:
        result.update(metrics.mse_decomposition(
            weight64, bias64, second.class_means(), second.counts,
            second.within_class_cov(), float(mse_weight_decay)))
    ordered = {k: result[k] for k in (*METRIC_KEYS, *BEYOND_KEYS) if k in result}
    _undefined_to_nan(ordered, means_coincide=eigvals.numel() == 0)
    if drop_empty:
        ordered["classes_measured"] = float(measured)
    return ordered, second.class_means()


def collapse_metrics(
    stats: ClassStats,
    weight: Tensor | None,
    eigvals: Tensor | None = None,
    eigvecs: Tensor | None = None,
    *,
    reference: Tensor | None = None,
) -> dict[str, float]:
    """NC1, NC2 and NC3 metrics (METRICS.md) from class statistics and the classifier.

    Args:
        stats: accumulated statistics of all samples (every class non-empty).
        weight: (C, D) classifier rows, or None for the classifier-free metrics only.
        eigvals, eigvecs: Sigma_B's eigenpairs if already known (else computed here).
        reference: (D,) the global mean mu_G to centre on (default: the samples' mean).
    """
    stats.check_nonempty()
    num_classes = stats.num_classes
    if reference is None:
        reference = stats.global_mean()
    centred = stats.class_means() - reference
    if eigvals is None or eigvecs is None:
        eigvals, eigvecs = metrics.between_class_eig(centred)
    means_geometry = metrics.simplex_geometry(centred)
    result = {
        "nc1": metrics.nc1(stats.within_class_var_along(eigvecs), eigvals, num_classes),
        "nc1_ratio": metrics.nc1_ratio(stats.within_class_trace(), centred),
        "cdnv": metrics.cdnv(centred, stats.class_variances()),
        "equinorm_means": metrics.equinorm(centred),
        "equiangular_means": means_geometry["equiangular"],
        "maxangle_means": means_geometry["maxangle"],
        "etf_means": means_geometry["etf"],
    }
    if weight is not None:
        weight = weight.to(device=stats.device, dtype=F64)
        weights_geometry = metrics.simplex_geometry(weight)
        result.update({
            "equinorm_weights": metrics.equinorm(weight),
            "equiangular_weights": weights_geometry["equiangular"],
            "maxangle_weights": weights_geometry["maxangle"],
            "etf_weights": weights_geometry["etf"],
            "self_duality": metrics.self_duality(weight, centred),
        })  # fmt: skip
    return result


def beyond_metrics(
    stats: ClassStats, weight: Tensor | None, reference: Tensor
) -> dict[str, float]:
    """The class-statistics metrics of METRICS.md "Beyond the paper": separation
    fuzziness (He & Su 2023), generalised NC2 (Liu et al. 2023) and NC3 (Wu & Papyan
    2024), and Zhu et al.'s (2021) self-duality; nc5 and the MSE terms need more inputs.

    Args:
        stats: second-pass statistics (class means as the shift; Sigma_W whole or in the
            span of the class-mean differences).
        weight: (C, D) float64 classifier rows, or None (classifier-free keys only).
        reference: (D,) the global mean mu_G.
    """
    means = stats.class_means()
    centred = means - reference
    result = {
        "separation_fuzziness": metrics.separation_fuzziness(
            stats.within_class_cov(), stats.basis, means, stats.counts),
    }  # fmt: skip
    gm = metrics.gnc2(centred)
    result["gnc2_means"], result["gnc2_energy_means"] = gm["variance"], gm["energy"]
    if weight is not None:
        gw = metrics.gnc2(weight)
        result["gnc2_weights"], result["gnc2_energy_weights"] = gw["variance"], gw["energy"]
        result.update(metrics.duality(weight, centred))
        result["self_duality_etf"] = metrics.self_duality_etf(weight, centred)
    return result


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
    make_stats: Callable[[int], ClassStats],
    tally: DecisionTally | None = None,
    first_rows: int | None = None,
) -> ClassStats:
    """One pass over the chunks into fresh statistics of the first chunk's width D (and
    NC4 tallies); ``first_rows``: the rows of the first pass, when this is the second."""
    stats = None
    on_block = None if tally is None else tally.add
    for feats, labs in chunks():
        feats = as_tensor("features", feats)
        if stats is None:
            if feats.ndim != 2 or feats.shape[1] == 0:
                raise ValueError(f"features must have shape (n, D), got {tuple(feats.shape)}")
            stats = make_stats(feats.shape[1])
        # NaN/Inf are caught once, in the first pass's class sums (measure_chunks)
        stats.update(feats, labs, on_block=on_block, check_finite=False)
    if stats is None:
        if first_rows is not None:
            check_pass_rows(first_rows, 0)
        raise ValueError("features is empty (no chunks)")
    return stats


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


def _restricted(chunks: Chunks, subset: Tensor, total: int) -> Chunks:
    """The chunks' samples of the classes ``subset`` only, relabelled 0..C'-1 in its order."""
    remap = torch.full((total,), -1, dtype=torch.long)
    remap[subset] = torch.arange(subset.numel())

    def restricted() -> Iterator[tuple[Tensor, Tensor]]:
        for feats, labs in chunks():
            feats, labs = as_tensor("features", feats), as_tensor("labels", labs)
            if labs.ndim != 1 or feats.ndim < 1 or labs.shape[0] != feats.shape[0]:
                raise ValueError(f"labels has shape {tuple(labs.shape)} but features has "
                                 f"shape {tuple(feats.shape)}")
            check_labels(labs, total)
            new = remap.to(labs.device)[labs.long()]
            keep = new >= 0
            yield feats[keep.to(feats.device)], new[keep]

    return restricted


def _given_means(
    class_means: Tensor | np.ndarray | None, total: int, dim: int, device: torch.device,
    keep: Tensor | None,
) -> Tensor | None:
    """The (C, D) ``class_means`` argument in float64, rows ``keep`` of it when given."""
    if class_means is None:
        return None
    given = as_tensor("class_means", class_means).to(device=device, dtype=F64)
    if tuple(given.shape) != (total, dim):
        raise ValueError(
            f"class_means must have shape (C, D) = {(total, dim)}, got {tuple(given.shape)}"
        )
    check_finite("class_means", given)
    return given if keep is None else given[keep]


def _ood_mean(
    ood: Tensor | np.ndarray | OodChunks, dim: int, device: torch.device,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """(D,) mean of the out-of-distribution features, one ClassStats pass (summed across
    processes)."""
    source = ood if callable(ood) else (lambda: [ood])
    stats = ClassStats(1, dim, basis=torch.zeros(dim, 0, dtype=F64), device=device)
    for feats in source():
        feats = as_tensor("ood_features", feats)
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise ValueError(f"ood_features must have shape (N', {dim}), "
                             f"got {tuple(feats.shape)}")
        try:
            stats.update(feats, torch.zeros(feats.shape[0], dtype=torch.long))
        except ValueError as exc:
            raise ValueError(f"ood_features: {exc}") from None
    stats.all_reduce(group)
    if stats.num_samples == 0:
        raise ValueError("ood_features is empty")
    return stats.global_mean()


def _undefined_to_nan(result: dict[str, float], means_coincide: bool) -> None:
    """Non-finite values become NaN, each with a warning saying why (never a crash)."""
    if means_coincide:
        hit = [k for k in _MEANS_KEYS if k in result]
        for key in hit:
            result[key] = math.nan
        warnings.warn(
            "all class means coincide: NC1, NC2 and NC3 of the means undefined "
            f"(NaN: {', '.join(hit)})", RuntimeWarning, stacklevel=3)
    bad = [k for k, v in result.items()
           if not math.isfinite(v) and not (means_coincide and k in _MEANS_KEYS)]
    for key in bad:
        result[key] = math.nan
    if bad:
        warnings.warn(
            f"{', '.join(bad)} undefined for these data (NaN): a zero class-mean or "
            "classifier vector, two coinciding class means or directions, or no spread",
            RuntimeWarning, stacklevel=3)


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

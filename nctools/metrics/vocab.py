"""Vocabulary-scale conventions of neural collapse in language models (Wu & Papyan,
NeurIPS 2024, "Linguistic Collapse"): which classes to measure, and CDNV with the power
of the distance their code uses.

Usage::

    kept = frequent_classes(counts, min_count=10)          # (C',) class ids, ascending
    value = cdnv(class_means[kept], class_variances[kept], power=2)

A vocabulary has tens of thousands of classes, most of them rare: a class seen a few times
has no usable mean, so the paper measures the classes with enough samples. CDNV's pairs
are C^2 / 2 at C = 50,000 (1.25e9), so they are summed in row tiles of at most
``TILE_ELEMENTS`` entries: memory holds a few tiles, never a C x C matrix.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from nctools.metrics.functional import pair_statistics

TILE_ELEMENTS = 1 << 23  # entries of one (rows, C) tile (float64: 64 MiB; two are held)
CDNV_POWERS = (1, 2)


def frequent_classes(counts: Tensor, min_count: int = 1, top_k: int | None = None) -> Tensor:
    """The classes to measure: at least ``min_count`` samples, then the ``top_k`` most frequent.

    Wu & Papyan (2024) measure the tokens with at least a minimum count (their
    ``--min_per_class``; 1 keeps every token that occurs); keeping the K most frequent
    instead fixes C across models and corpora. Ties in count keep the smaller class id.

    Args:
        counts: (C,) samples of each class.
        min_count: the fewest samples a kept class has (>= 1: an empty class has no mean).
        top_k: keep at most this many classes, the most frequent; None keeps all.

    Returns:
        (C',) int64 ids of the kept classes, ascending.
    """
    if counts.dim() != 1:
        raise ValueError(f"counts: expected shape (C,), got {tuple(counts.shape)}")
    if min_count < 1:
        raise ValueError(f"min_count: {min_count} < 1 (a class without samples has no mean)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: {top_k} < 1")
    kept = torch.nonzero(counts >= min_count).flatten()
    if top_k is not None and kept.numel() > top_k:
        # stable sort on -count: equal counts stay in id order
        order = torch.sort(-counts[kept].to(torch.float64), stable=True).indices
        kept = kept[order[:top_k]].sort().values
    return kept


def cdnv(class_means: Tensor, class_variances: Tensor, power: int = 1,
         dtype: torch.dtype = torch.float64) -> float:
    """Class-distance normalised variance, the distance raised to ``power``.

    Mean over ordered pairs c != c' of (sigma_c^2 + sigma_c'^2) / (2 ||mu_c - mu_c'||^(2p)):
    ``power=1`` is Galanti, Gyorgy & Hutter (ICLR 2022); ``power=2`` divides by
    ||mu_c - mu_c'||^4, as the Linguistic Collapse code does (``variability_cdnv(V, M, 2)``
    in Wu & Papyan's ``neural_collapse`` package), which weighs distant pairs less.

    The pairs are summed once each (the ratio is symmetric) in row tiles of at most
    ``TILE_ELEMENTS`` entries, in ``dtype`` (the tiles' sums add up in float64), by
    :func:`nctools.metrics.functional.pair_statistics`: a pair's squared distance is
    (||mu_c|| - ||mu_c'||)^2 + ||mu_c|| ||mu_c'|| ||u_c - u_c'||^2 about the means' own
    centre (u the directions), with close directions' distance taken from their
    difference, so it does not cancel against the means' size. Coinciding means give an
    infinite ratio (NaN if both variances are 0), as the formula does.

    Args:
        class_means: (C, D) mu_c (any common shift; they are centred on their mean first).
        class_variances: (C,) sigma_c^2, the mean squared distance of class c's samples to
            mu_c.
        power: 1 or 2.
        dtype: of the tiles: float64 (exact to rounding), or float32 (about 3x faster on
            a CPU; a pair's squared distance is then off by ~1e-7, relative).

    Returns:
        the mean; NaN with a warning when C < 2.
    """
    if power not in CDNV_POWERS:
        raise ValueError(f"cdnv_power: {power} is not 1 or 2")
    num_classes = class_means.shape[0]
    if class_variances.shape != (num_classes,):
        raise ValueError(f"class_variances: expected shape ({num_classes},), "
                         f"got {tuple(class_variances.shape)}")
    if num_classes < 2:
        warnings.warn("cdnv: undefined for fewer than 2 classes", stacklevel=2)
        return math.nan
    means = class_means.to(torch.float64)
    pairs = pair_statistics(means - means.mean(0), class_variances, power, dtype,
                            tile_elements=TILE_ELEMENTS)
    return pairs["cdnv"]

"""Vocabulary-scale conventions of neural collapse in language models (Wu & Papyan,
NeurIPS 2024, "Linguistic Collapse"): which classes to measure, and CDNV with the power
of the distance their code uses.

Usage::

    kept = frequent_classes(counts, min_count=10)          # (C',) class ids, ascending
    value = cdnv(class_means[kept], class_variances[kept], power=2)
    options = VocabularyOptions(min_count=10, global_mean="classes")
    metrics, _ = measure_chunks(token_chunks, weight, bias, **options.measure_options())

A vocabulary has tens of thousands of classes, most of them rare: a class seen a few times
has no usable mean, so the paper measures the classes with enough samples. CDNV's pairs
are C^2 / 2 at C = 50,000 (1.25e9), so they are summed in row tiles of at most
``TILE_ELEMENTS`` entries: memory holds a few tiles, never a C x C matrix.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from nctools.metrics.functional import PAIR_DTYPES, pair_statistics

TILE_ELEMENTS = 1 << 23  # entries of one (rows, C) tile (float64: 64 MiB; two are held)
CDNV_POWERS = (1, 2)
GLOBAL_MEANS = ("samples", "classes")


@dataclasses.dataclass(frozen=True)
class VocabularyOptions:
    """How a language model's token samples are measured (docs/language-models.md, "The
    conventions"): the options every entry point of a language model shares
    (``measure_language_model``, ``nctools measure --model hf:``, the training callbacks,
    ``track``), each checked here and named when wrong.

    Args:
        min_count, top_k: measure only the tokens with at least ``min_count`` samples,
            then the ``top_k`` most frequent (Wu & Papyan 2024's ``--min_per_class``).
        cdnv_power: 1, or 2 as the Linguistic Collapse code (||mu_c - mu_c'||^4).
        global_mean: ``"samples"`` (Papyan et al. 2020's mu_G) or ``"classes"`` (the mean
            of the class means, Wu & Papyan's centre).
        ncc_samples: NC4 on this many evenly spaced tokens (its cost is N x V x D).
        etf_without_simplex: compute the simplex-ETF keys also when C > D + 1 (by
            default NaN with a warning there: no simplex ETF exists).
        pair_precision: ``"float32"`` (GNC2 and CDNV's C^2 / 2 class pairs in float32
            tiles summed in float64: ~1e-7 relative at a vocabulary's scale, about 3x
            faster on a CPU) or ``"float64"`` (exact to rounding).
    """

    min_count: int = 1
    top_k: int | None = None
    cdnv_power: int = 1
    global_mean: str = "samples"
    ncc_samples: int | None = None
    etf_without_simplex: bool = False
    pair_precision: str = "float32"

    def __post_init__(self) -> None:
        check_vocabulary_options(self.min_count, self.top_k, self.cdnv_power,
                                 self.ncc_samples, self.pair_precision)
        if self.global_mean not in GLOBAL_MEANS:
            raise ValueError(f"global_mean must be one of {GLOBAL_MEANS}, "
                             f"got {self.global_mean!r}")
        if not isinstance(self.etf_without_simplex, bool):
            raise ValueError("etf_without_simplex must be True or False, "
                             f"got {self.etf_without_simplex!r}")

    @classmethod
    def of(cls, name: str, given: VocabularyOptions | Mapping[str, Any] | None
           ) -> VocabularyOptions:
        """``given`` as options: itself, the defaults for None, or a mapping of the
        fields (as a YAML config or LightningCLI gives it); a ValueError naming ``name``
        and the unknown keys otherwise."""
        if given is None:
            return cls()
        if isinstance(given, cls):
            return given
        if not isinstance(given, Mapping):
            raise ValueError(f"{name} must be a mapping of {', '.join(cls.fields())}, "
                             f"got {type(given).__name__}")
        unknown = sorted(str(key) for key in given if key not in cls.fields())
        if unknown:
            raise ValueError(f"{name}: {', '.join(unknown)} not among the options of a "
                             f"language model's token samples ({', '.join(cls.fields())})")
        return cls(**given)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def measure_options(self) -> dict[str, Any]:
        """The keyword arguments of ``measure_chunks`` for token samples: these options,
        the tokens that occur as labels as the classes (``drop_empty``), and the LM
        head's argmax over the whole vocabulary as NC4's classifier."""
        return {**dataclasses.asdict(self), "drop_empty": True, "argmax_all_classes": True}


def check_vocabulary_options(min_count: int, top_k: int | None, cdnv_power: int,
                             ncc_samples: int | None, pair_precision: str = "float64") -> None:
    """The vocabulary-scale options of the measurement engine, each named when wrong."""
    for name, value, low in (("min_count", min_count, 1), ("top_k", top_k, 1),
                             ("ncc_samples", ncc_samples, 1)):
        if value is None and name != "min_count":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if cdnv_power not in CDNV_POWERS:
        raise ValueError(f"cdnv_power must be 1 or 2, got {cdnv_power!r}")
    if pair_precision not in PAIR_DTYPES:
        raise ValueError(f"pair_precision must be 'float64' or 'float32', got "
                         f"{pair_precision!r}")


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

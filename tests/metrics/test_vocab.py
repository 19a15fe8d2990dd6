"""Vocabulary-scale conventions against NumPy references and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nctools
from nctools.metrics import vocab
from nctools.metrics.vocab import cdnv, frequent_classes


def zipf_counts(num_classes: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.bincount(rng.zipf(1.3, 20_000) % num_classes,
                                        minlength=num_classes))


@pytest.mark.parametrize(("min_count", "top_k"), [(1, None), (5, None), (1, 40), (3, 25),
                                                  (10_000, None), (1, 10_000)])
def test_frequent_classes_against_numpy(min_count: int, top_k: int | None) -> None:
    counts = zipf_counts(500)
    c = counts.numpy()
    want = np.flatnonzero(c >= min_count)
    if top_k is not None:
        want = np.sort(want[np.argsort(-c[want], kind="stable")[:top_k]])
    got = frequent_classes(counts, min_count, top_k)
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()


def test_top_k_breaks_ties_by_class_id() -> None:
    counts = torch.tensor([3, 7, 3, 0, 7, 3])
    assert frequent_classes(counts, top_k=3).tolist() == [0, 1, 4]
    assert frequent_classes(counts, min_count=1).tolist() == [0, 1, 2, 4, 5]


def numpy_cdnv(means: np.ndarray, variances: np.ndarray, power: int) -> float:
    diff = means[:, None, :] - means[None, :, :]
    dist2 = (diff**2).sum(-1)
    off = ~np.eye(len(means), dtype=bool)
    ratio = (variances[:, None] + variances[None, :])[off] / (2 * dist2[off] ** power)
    return float(ratio.mean())


@pytest.mark.parametrize("power", [1, 2])
def test_cdnv_against_numpy(power: int, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(300, 16, generator=gen, dtype=torch.float64) + 50.0  # an offset
    variances = torch.rand(300, generator=gen, dtype=torch.float64)
    variances[7] = 0.0
    want = numpy_cdnv(means.numpy(), variances.numpy(), power)
    assert math.isclose(cdnv(means, variances, power), want, rel_tol=1e-10)
    monkeypatch.setattr(vocab, "TILE_ELEMENTS", 7 * 300)  # 7-row tiles: tiling changes nothing
    assert math.isclose(cdnv(means, variances, power), want, rel_tol=1e-10)
    assert math.isclose(cdnv(means, variances, power, dtype=torch.float32), want, rel_tol=1e-5)


def test_power_one_is_the_engine_s_cdnv() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(40).repeat(5)
    features = torch.randn(40, 8, generator=gen, dtype=torch.float64)[labels] \
        + 0.3 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
    means = torch.stack([features[labels == c].mean(0) for c in range(40)])
    variances = torch.stack([(features[labels == c] - means[c]).square().sum(1).mean()
                             for c in range(40)])
    weight = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    engine = nctools.measure(features, labels, weight)["cdnv"]
    assert math.isclose(cdnv(means, variances, 1), engine, rel_tol=1e-10)


@pytest.mark.parametrize("num_classes", [10_000, pytest.param(50_000, marks=pytest.mark.slow)])
def test_cdnv_at_vocabulary_scale_equals_its_closed_form(num_classes: int) -> None:
    """Means at 0, 1, ..., C - 1 on a line: ordered pairs at distance k number 2 (C - k),
    so CDNV = sum_k 2 (C - k) v / k^(2p) / (C (C - 1)), exact in float64 (integer means);
    the tiles hold TILE_ELEMENTS entries, never C x C."""
    means = torch.arange(num_classes, dtype=torch.float64)[:, None]
    k = np.arange(1, num_classes, dtype=np.float64)
    assert max(1, vocab.TILE_ELEMENTS // num_classes) * num_classes <= vocab.TILE_ELEMENTS
    for power in (1, 2):
        want = float((2 * (num_classes - k) * 0.5 / k ** (2 * power)).sum()
                     / (num_classes * (num_classes - 1)))
        got = cdnv(means, torch.full((num_classes,), 0.5, dtype=torch.float64), power)
        assert math.isclose(got, want, rel_tol=1e-12)


def test_cdnv_edge_cases() -> None:
    with pytest.warns(UserWarning, match="cdnv: undefined for fewer than 2 classes"):
        assert math.isnan(cdnv(torch.zeros(1, 3), torch.ones(1)))
    assert cdnv(torch.zeros(2, 3), torch.ones(2)) == math.inf  # coinciding means
    with pytest.raises(ValueError, match="cdnv_power: 3 is not 1 or 2"):
        cdnv(torch.zeros(2, 3), torch.ones(2), power=3)
    with pytest.raises(ValueError, match=r"class_variances: expected shape \(2,\)"):
        cdnv(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="min_count: 0 < 1"):
        frequent_classes(torch.ones(3), min_count=0)
    with pytest.raises(ValueError, match=r"counts: expected shape \(C,\)"):
        frequent_classes(torch.ones(3, 1))


def test_vocabulary_options_round_trip_and_name_what_is_wrong() -> None:
    given = {"min_count": 3, "top_k": 7, "cdnv_power": 2, "global_mean": "classes",
             "ncc_samples": 11, "etf_without_simplex": True}
    options = vocab.VocabularyOptions.of("vocabulary", given)
    assert vocab.VocabularyOptions.of("vocabulary", options) is options
    assert options.measure_options() == {**given, "drop_empty": True,
                                         "argmax_all_classes": True}
    assert vocab.VocabularyOptions.of("vocabulary", None) == vocab.VocabularyOptions()
    with pytest.raises(ValueError, match=r"^vocabulary: min_cont not among the options"):
        vocab.VocabularyOptions.of("vocabulary", {"min_cont": 2})
    with pytest.raises(ValueError, match=r"^vocabulary must be a mapping of min_count, top_k"):
        vocab.VocabularyOptions.of("vocabulary", [("min_count", 2)])
    for bad, message in (({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
                         ({"global_mean": "mean"}, "global_mean must be one of"),
                         ({"etf_without_simplex": 1}, "etf_without_simplex must be True or")):
        with pytest.raises(ValueError, match=f"^{message}"):
            vocab.VocabularyOptions(**bad)

"""Vocabulary-scale conventions against NumPy references and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nctools
from nctools.metrics import functional, vocab
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
             "ncc_samples": 11, "etf_without_simplex": True, "pair_precision": "float64"}
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
                         ({"etf_without_simplex": 1}, "etf_without_simplex must be True or"),
                         ({"pair_precision": "half"}, "pair_precision must be 'float64' or")):
        with pytest.raises(ValueError, match=f"^{message}"):
            vocab.VocabularyOptions(**bad)


def numpy_gnc2(vectors: np.ndarray) -> tuple[float, float]:
    """(energy, variance) of k = -log ||u_c - u_c'|| over the pairs c < c'."""
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    upper = np.triu_indices(len(units), 1)
    k = -np.log(np.linalg.norm(units[:, None] - units[None], axis=-1)[upper])
    return float(k.mean()), float(k.var())


@pytest.mark.parametrize("power", [1, 2])
def test_pair_statistics_in_float32_tiles_are_within_1e_6(power: int) -> None:
    """C > D + 1 (a vocabulary's shape, no simplex): float32 tiles against a float64
    NumPy reference, and the float64 tiles against it to rounding; several tiles."""
    gen = torch.Generator().manual_seed(4)
    vectors = torch.randn(700, 24, generator=gen, dtype=torch.float64) + 0.5
    variances = torch.rand(700, generator=gen, dtype=torch.float64)
    energy, variance = numpy_gnc2(vectors.numpy())
    want_cdnv = numpy_cdnv(vectors.numpy(), variances.numpy(), power)
    for dtype, rel in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        got = functional.pair_statistics(vectors, variances, power, dtype,
                                         tile_elements=90 * 700)
        assert got["energy"] == pytest.approx(energy, rel=rel)
        assert got["variance"] == pytest.approx(variance, rel=rel)
        assert got["cdnv"] == pytest.approx(want_cdnv, rel=rel)
        if dtype == torch.float32:  # rounding does show: the tiles were float32
            assert got["variance"] != pytest.approx(variance, rel=1e-12)


@pytest.mark.parametrize("dense", [False, True])
def test_close_pairs_in_float32_tiles_are_recomputed_in_float64(dense: bool,
                                                                monkeypatch) -> None:
    """Directions closer than CLOSE_DIST2_32 (where 2 - 2 cos cancels in float32) take
    their distance from the float64 difference: pair by pair, or, with more of them in
    a tile than CLOSE_PAIRS_32, the whole tile in float64 first."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(60, 12, generator=gen, dtype=torch.float64)
    vectors = torch.cat([base, base + 1e-4 * torch.randn(60, 12, generator=gen,
                                                         dtype=torch.float64)])
    variances = torch.rand(120, generator=gen, dtype=torch.float64)
    energy, variance = numpy_gnc2(vectors.numpy())
    want_cdnv = numpy_cdnv(vectors.numpy(), variances.numpy(), 2)
    if dense:
        monkeypatch.setattr(functional, "CLOSE_PAIRS_32", 5)
    got = functional.pair_statistics(vectors, variances, 2, torch.float32,
                                     tile_elements=40 * 120)
    # without the recomputation, 2 - 2 cos ~ 1e-8 would be float32 noise of ~1e-7
    assert got["energy"] == pytest.approx(energy, rel=1e-6)
    assert got["variance"] == pytest.approx(variance, rel=1e-6)
    assert got["cdnv"] == pytest.approx(want_cdnv, rel=1e-6)


def test_pair_statistics_undefined_cases() -> None:
    """A zero vector: GNC2 NaN, CDNV still its distances (||v_c'||); two coinciding
    directions: energy inf, variance NaN; coinciding vectors: CDNV inf."""
    vectors = torch.tensor([[0.0, 0.0], [3.0, 4.0], [-1.0, 2.0]], dtype=torch.float64)
    variances = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = functional.pair_statistics(vectors, variances, 1, dtype)
        assert math.isnan(got["energy"]) and math.isnan(got["variance"])
        want = numpy_cdnv(vectors.numpy(), variances.numpy(), 1)
        assert got["cdnv"] == pytest.approx(want, rel=1e-6 if dtype == torch.float32 else 1e-14)
        same_direction = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
        got = functional.pair_statistics(same_direction, variances, 1, dtype)
        assert got["energy"] == math.inf and math.isnan(got["variance"])
        assert math.isfinite(got["cdnv"])  # the vectors themselves differ
        twins = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
        assert functional.pair_statistics(twins, variances, 1, dtype)["cdnv"] == math.inf


def test_right_singular_of_a_tall_matrix_equals_the_svd() -> None:
    """QR first (C > D): the same singular values and right singular vectors (up to sign)."""
    gen = torch.Generator().manual_seed(6)
    matrix = torch.randn(500, 40, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -6, 40, dtype=torch.float64)
    singular, vh = functional.right_singular(matrix)
    _, want_s, want_vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(singular, want_s, rtol=1e-12, atol=0)
    torch.testing.assert_close((vh * want_vh).sum(1).abs(), torch.ones(40, dtype=torch.float64),
                               rtol=0, atol=1e-9)

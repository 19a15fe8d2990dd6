"""The vocabulary-scale options of the engine (Wu & Papyan, NeurIPS 2024): class filters
decided from the counts, the global mean of the class means, CDNV with power 2, the ETF
keys NaN when C > D + 1, the whole classifier's argmax, and NC4 on a sample of tokens,
each against the float64 NumPy reference."""

import math
import warnings

import numpy as np
import pytest

import nctools
from nctools.metrics.engine import ETF_KEYS
from tests.reference import reference_metrics


def _zipf_data(num_classes=12, dim=16, n=900, seed=0):
    """Features around class centres, labels with Zipf-like frequencies (some classes rare)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_classes + 1)
    y = rng.choice(num_classes, size=n, p=p / p.sum())
    centres = rng.normal(size=(num_classes, dim)) * 3
    h = centres[y] + rng.normal(size=(n, dim))
    w = centres + 0.5 * rng.normal(size=(num_classes, dim))
    b = 0.1 * rng.normal(size=num_classes)
    return h, y, w, b


def _restricted(h, y, w, b, kept):
    """The samples of the ``kept`` classes relabelled 0..K-1, and their classifier rows."""
    remap = np.full(w.shape[0], -1)
    remap[kept] = np.arange(len(kept))
    keep = remap[y] >= 0
    return h[keep], remap[y[keep]], w[kept], b[kept]


@pytest.mark.parametrize(("min_count", "top_k"), [(40, None), (1, 5), (30, 4)])
def test_class_filters_equal_the_reference_on_the_kept_classes(min_count, top_k):
    h, y, w, b = _zipf_data()
    counts = np.bincount(y, minlength=12)
    kept = np.flatnonzero(counts >= min_count)
    if top_k is not None:
        kept = np.sort(kept[np.argsort(-counts[kept], kind="stable")[:top_k]])
    got = nctools.measure(h, y, w, b, min_count=min_count, top_k=top_k)
    want = reference_metrics(*_restricted(h, y, w, b, kept))
    assert got["classes_measured"] == len(kept) < 12
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_the_classes_mean_centres_on_the_mean_of_the_class_means():
    h, y, w, b = _zipf_data(seed=1)
    got = nctools.measure(h, y, w, b, global_mean="classes", min_count=20)
    kept = np.flatnonzero(np.bincount(y, minlength=12) >= 20)
    hk, yk, wk, _ = _restricted(h, y, w, b, kept)
    means = np.stack([hk[yk == c].mean(0) for c in range(len(kept))])
    centred = means - means.mean(0)  # not the samples' mean: Zipf classes differ in size
    norms = np.linalg.norm(centred, axis=1)
    assert got["equinorm_means"] == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-12)
    want = np.linalg.norm(wk / np.linalg.norm(wk) - centred / np.linalg.norm(centred)) ** 2
    assert got["self_duality"] == pytest.approx(want, rel=1e-12)


def test_cdnv_power_two_divides_by_the_fourth_power_of_the_distance():
    h, y, w, b = _zipf_data(seed=2)
    means = np.stack([h[y == c].mean(0) for c in range(12)])
    var = np.array([((h[y == c] - means[c]) ** 2).sum(1).mean() for c in range(12)])
    pairs = [(c, d) for c in range(12) for d in range(12) if c != d]
    want = np.mean([(var[c] + var[d]) / (2 * ((means[c] - means[d]) ** 2).sum() ** 2)
                    for c, d in pairs])
    assert nctools.measure(h, y, w, b, cdnv_power=2)["cdnv"] == pytest.approx(want, rel=1e-10)


def test_etf_keys_are_nan_with_the_reason_when_c_exceeds_d_plus_1():
    h, y, w, b = _zipf_data(num_classes=12, dim=4, n=1200, seed=3)
    with pytest.warns(RuntimeWarning, match=r"C > D \+ 1: no simplex ETF of C vectors") as rec:
        got = nctools.measure(h, y, w, b, etf_without_simplex=False)
    assert len(rec) == 1
    assert all(math.isnan(got[k]) for k in ETF_KEYS)
    want = reference_metrics(h, y, w, b)
    for key in ("nc1", "cdnv", "equinorm_means", "self_duality", "ncc_mismatch"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    # the default computes them (numbers unchanged), and C <= D + 1 never warns
    assert got["gnc2_means"] == nctools.measure(h, y, w, b)["gnc2_means"]
    h, y, w, b = _zipf_data(num_classes=5, dim=4, n=500, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = nctools.measure(h, y, w, b, etf_without_simplex=False)
    assert got["etf_means"] == pytest.approx(reference_metrics(h, y, w, b)["etf_means"],
                                             rel=1e-10)


def test_argmax_over_all_classes_counts_decisions_for_classes_left_out():
    h, y, _, b = _zipf_data(seed=4)
    w = np.random.default_rng(4).normal(size=(12, 16))  # an untrained head: any class wins
    got = nctools.measure(h, y, w, b, min_count=40, argmax_all_classes=True)
    kept = np.flatnonzero(np.bincount(y, minlength=12) >= 40)
    hk, yk, _, _ = _restricted(h, y, w, b, kept)
    decided = np.argmax(hk @ w.T + b, 1)  # among all 12 rows
    remap = np.full(12, -1)
    remap[kept] = np.arange(len(kept))
    means = np.stack([hk[yk == c].mean(0) for c in range(len(kept))])
    nearest = np.argmin(((hk[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (remap[decided] < 0).any()  # some decisions fall on classes left out
    assert got["ncc_mismatch"] == pytest.approx(np.mean(remap[decided] != nearest), abs=1e-15)
    assert got["accuracy"] == pytest.approx(np.mean(remap[decided] == yk), abs=1e-15)
    want = reference_metrics(*_restricted(h, y, w, b, kept))
    assert got["self_duality"] == pytest.approx(want["self_duality"], rel=1e-10)


def test_ncc_samples_tally_an_evenly_spaced_sample_in_any_chunking():
    h, y, w, b = _zipf_data(seed=5)
    got = nctools.measure(h, y, w, b, ncc_samples=100)
    index = np.arange(len(y))
    taken = (index + 1) * 100 // len(y) > index * 100 // len(y)
    assert got["ncc_samples"] == taken.sum() == 100
    means = np.stack([h[y == c].mean(0) for c in range(12)])
    decided = np.argmax(h[taken] @ w.T + b, 1)
    nearest = np.argmin(((h[taken][:, None] - means[None]) ** 2).sum(-1), 1)
    assert got["ncc_mismatch"] == pytest.approx(np.mean(decided != nearest), abs=1e-15)
    assert got["ncc_accuracy"] == pytest.approx(np.mean(nearest == y[taken]), abs=1e-15)
    chunks = lambda: [(h[i : i + 37], y[i : i + 37]) for i in range(0, len(y), 37)]  # noqa: E731
    streamed, _ = nctools.measure_chunks(chunks, w, b, ncc_samples=100)
    assert streamed == pytest.approx(got, rel=1e-12)
    full = nctools.measure(h, y, w, b, ncc_samples=10**6)  # more than N: every sample
    assert full["ncc_samples"] == len(y)


@pytest.mark.parametrize(("option", "message"), [
    ({"min_count": 0}, "min_count must be an integer >= 1, got 0"),
    ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
    ({"ncc_samples": 1.5}, "ncc_samples must be an integer >= 1, got 1.5"),
    ({"cdnv_power": 3}, "cdnv_power must be 1 or 2, got 3"),
    ({"pair_precision": "half"}, "pair_precision must be 'float64' or 'float32', got 'half'"),
    ({"min_count": 10**6}, "labels: only 0 class(es) have at least min_count = 1000000"),
])
def test_bad_options_are_one_line_errors(option, message):
    h, y, w, b = _zipf_data()
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        nctools.measure(h, y, w, b, **option)


def test_float32_pairs_change_gnc2_and_cdnv_within_1e_6_and_nothing_else():
    """``pair_precision="float32"`` at C > D + 1: GNC2 and CDNV within 1e-6 (relative) of
    float64, every other key the same to rounding."""
    h, y, w, b = _zipf_data(num_classes=300, dim=8, n=6000, seed=3)
    options = dict(drop_empty=True, etf_without_simplex=False, cdnv_power=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # C > D + 1: the ETF keys' NaN
        exact = nctools.measure(h, y, w, b, **options)
        fast = nctools.measure(h, y, w, b, pair_precision="float32", **options)
    paired = ("cdnv", "gnc2_means", "gnc2_energy_means", "gnc2_weights", "gnc2_energy_weights")
    for key, value in exact.items():
        if math.isnan(value):
            assert math.isnan(fast[key]), key
        elif key in paired:
            assert fast[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key

"""measure and the functional metrics against an independent NumPy reference (docs/metrics.md)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nctools import measure
from nctools.metrics import decisions
from nctools.metrics import functional as metrics
from nctools.metrics import stats as stats_module
from nctools.metrics.measure import METRIC_KEYS, class_means, measure_chunks
from tests.helpers import clusters
from tests.reference import reference_metrics

# docs/metrics.md, in order: the contract for the returned keys.
CONTRACT_KEYS = (
    "nc1", "nc1_ratio", "cdnv", "equinorm_means", "equinorm_weights", "equiangular_means",
    "equiangular_weights", "maxangle_means", "maxangle_weights", "etf_means", "etf_weights",
    "self_duality", "ncc_mismatch", "accuracy", "ncc_accuracy",
)  # fmt: skip


def assert_close(got, want, rtol, atol=0.0):
    # the paper's keys first, in order; the "Beyond the paper" keys after them
    assert tuple(got)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    for key in CONTRACT_KEYS:
        assert math.isclose(got[key], want[key], rel_tol=rtol, abs_tol=atol), (
            key, got[key], want[key],
        )  # fmt: skip


def test_keys_are_the_contract():
    assert METRIC_KEYS == CONTRACT_KEYS


@pytest.mark.parametrize(
    "case",
    [
        dict(num_classes=5, dim=12, per_class=30),
        dict(num_classes=7, dim=9, per_class=20, imbalance=True),
        dict(num_classes=6, dim=16, per_class=25, spread=1e-3),  # nearly collapsed
        dict(num_classes=12, dim=5, per_class=15),  # C > D: full pseudo-inverse
        dict(num_classes=2, dim=3, per_class=10),
    ],
)
@pytest.mark.parametrize("block_elements", [40, 1 << 21])  # many blocks, one
def test_matches_reference_float64(case, block_elements, monkeypatch):
    monkeypatch.setattr(stats_module, "BLOCK_ELEMENTS", block_elements)
    features, labels, weight, bias = clusters(**case)
    want = reference_metrics(features, labels, weight, bias)
    assert_close(measure(features, labels, weight, bias), want, rtol=1e-9, atol=1e-12)


def test_torch_inputs_and_no_bias():
    features, labels, weight, _ = clusters(4, 8, 20, seed=3)
    want = reference_metrics(features, labels, weight)
    got = measure(torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(weight))
    assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_float32_agrees_with_float64_reference():
    features, labels, weight, bias = clusters(10, 64, 50, seed=1)
    want = reference_metrics(features, labels, weight, bias)
    got = measure(
        torch.tensor(features, dtype=torch.float32),
        torch.from_numpy(labels),
        torch.tensor(weight, dtype=torch.float32),
        torch.tensor(bias, dtype=torch.float32),
    )
    assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_accumulated_in_float64(dtype):
    features, labels, weight, bias = clusters(5, 16, 40, seed=2)
    low = torch.tensor(features).to(dtype)
    low_weight = torch.tensor(weight).to(dtype)
    # The reference sees exactly the rounded values, so only float64 arithmetic remains.
    want = reference_metrics(low.double().numpy(), labels, low_weight.double().numpy(), bias)
    got = measure(low, torch.from_numpy(labels), low_weight, torch.from_numpy(bias))
    assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_class_means_from_another_split_drive_nc4_only():
    train = clusters(6, 10, 40, seed=4)
    test_features, test_labels, _, _ = clusters(6, 10, 15, spread=2.0, seed=5)
    weight, bias = train[2], train[3]
    train_means = class_means(train[0], train[1], 6)
    ref_means = np.stack([train[0][train[1] == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(train_means.numpy(), ref_means, rtol=1e-12)
    want = reference_metrics(test_features, test_labels, weight, bias, class_means=ref_means)
    got = measure(test_features, test_labels, weight, bias, class_means=train_means)
    assert_close(got, want, rtol=1e-9, atol=1e-12)
    own = measure(test_features, test_labels, weight, bias)
    assert got["nc1"] == pytest.approx(own["nc1"], rel=1e-12)
    assert got["ncc_accuracy"] != own["ncc_accuracy"] or got["ncc_mismatch"] != own["ncc_mismatch"]


def simplex_etf(num_classes, dim, rng):
    """C unit vectors in R^D with pairwise cosine -1/(C-1), in the first C dimensions."""
    q, _ = np.linalg.qr(rng.normal(size=(num_classes, num_classes)))
    centred = np.eye(num_classes) - 1.0 / num_classes
    vectors = np.zeros((num_classes, dim))
    vectors[:, :num_classes] = centred @ q * math.sqrt(num_classes / (num_classes - 1))
    return vectors


@pytest.mark.parametrize("num_classes,dim", [(4, 10), (10, 32), (3, 3)])
def test_exact_collapse_gives_zeros(num_classes, dim):
    rng = np.random.default_rng(7)
    etf = simplex_etf(num_classes, dim, rng)
    offset = np.zeros(dim)
    if dim > num_classes:
        offset[num_classes:] = 50.0  # a global mean outside the span of the means
    labels = np.repeat(np.arange(num_classes), 13)
    features = etf[labels] * 4.0 + offset
    got = measure(features, labels, 2.5 * etf)
    for key in CONTRACT_KEYS[:12]:
        assert abs(got[key]) < 1e-10, (key, got[key])
    assert got["ncc_mismatch"] == 0.0
    assert got["accuracy"] == 1.0 and got["ncc_accuracy"] == 1.0


@pytest.mark.parametrize("block_elements", [40, 1 << 21])  # many blocks, one
def test_large_offset_collapsed_regime(block_elements, monkeypatch):
    """Features around 1e3 with within-class std 1e-3: shifted sums keep the digits."""
    monkeypatch.setattr(stats_module, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(11)
    num_classes, dim = 5, 20
    means = 1e3 + rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), 200)
    noise = 1e-3 * rng.normal(size=(labels.size, dim))
    features = means[labels] + noise
    weight = means - means.mean(0)
    want = reference_metrics(features, labels, weight)  # two-pass, so exact enough
    got = measure(features, labels, weight)
    assert_close(got, want, rtol=1e-7, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.integers(2, 6),
    dim=st.integers(2, 9),
    scale=st.floats(1e-2, 1e2),
)
def test_invariances(seed, num_classes, dim, scale):
    rng = np.random.default_rng(seed)
    features, labels, weight, bias = clusters(num_classes, dim, 8, imbalance=True, seed=seed)
    base = measure(features, labels, weight, bias)
    # sample permutation
    order = rng.permutation(labels.size)
    assert_close(measure(features[order], labels[order], weight, bias), base, 1e-8, 1e-11)
    # class relabelling, permuting the classifier's rows with it
    perm = rng.permutation(num_classes)
    relabelled = np.argsort(perm)[labels]
    assert_close(measure(features, relabelled, weight[perm], bias[perm]), base, 1e-8, 1e-11)
    # orthogonal change of basis applied to features and weights together
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    assert_close(measure(features @ q.T, labels, weight @ q.T, bias), base, 1e-8, 1e-11)
    # positive scaling: NC1-NC3 of H and of W are scale-free
    scaled = measure(features * scale, labels, weight * scale, bias)
    for key in CONTRACT_KEYS[:12]:
        assert scaled[key] == pytest.approx(base[key], rel=1e-8, abs=1e-11), key


def test_tiled_pairwise_equals_untiled(monkeypatch):
    features, labels, weight, bias = clusters(40, 6, 5, seed=9)
    whole = measure(features, labels, weight, bias)
    monkeypatch.setattr(metrics, "TILE_ELEMENTS", 40 * 3)  # 3 rows per tile, 14 tiles
    tiled = measure(features, labels, weight, bias)
    assert_close(tiled, whole, rtol=1e-9, atol=1e-14)


BAD_INPUTS = [
    (lambda f, y, w: (f[:-1], y, w), "labels"),
    (lambda f, y, w: (f, np.where(y == 0, 5, y), w), r"\[0, 5\)"),
    (lambda f, y, w: (f, y - 1, w), r"\[0, 5\)"),
    (lambda f, y, w: (f, y, w[:, :-1]), "weight"),
    (lambda f, y, w: (f, y, w[None]), "weight"),
    (lambda f, y, w: (np.where(np.arange(f.size).reshape(f.shape) == 7, np.nan, f), y, w),
     "features contain NaN"),
    (lambda f, y, w: (np.where(np.arange(f.size).reshape(f.shape) == 3, np.inf, f), y, w),
     "features contain NaN"),
    (lambda f, y, w: (f, y, np.where(np.arange(w.size).reshape(w.shape) == 2, np.nan, w)),
     "weight contains NaN"),
    (lambda f, y, w: (f[y != 3], y[y != 3], w), "class 3 has no samples"),
    (lambda f, y, w: (f[y == 0], y[y == 0], w[:1]), "at least 2"),
    (lambda f, y, w: (f[:0], y[:0], w), "empty"),
    (lambda f, y, w: (f, y.astype(np.float32), w), "labels must be integers"),
    (lambda f, y, w: (f[:, 0], y, w), "features must be 2-D"),
]  # fmt: skip


@pytest.mark.parametrize("corrupt,message", BAD_INPUTS)
def test_bad_input_names_the_argument(corrupt, message):
    features, labels, weight, _ = clusters(5, 4, 6, seed=0)
    with pytest.raises(ValueError, match=message):
        measure(*corrupt(features, labels, weight))


def test_bad_bias_num_classes_and_class_means():
    features, labels, weight, bias = clusters(5, 4, 6, seed=0)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\) = \(5,\)"):
        measure(features, labels, weight, bias[:3])
    with pytest.raises(ValueError, match="num_classes = 6"):
        measure(features, labels, weight, num_classes=6)
    with pytest.raises(ValueError, match="class_means must have shape"):
        measure(features, labels, weight, class_means=np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"features must be a torch\.Tensor or numpy\.ndarray"):
        measure(features.tolist(), labels, weight)


def test_near_tied_classifier_decisions_match_float64(monkeypatch):
    """Logits closer than float32 can resolve are re-decided in float64 (NC4 exactness)."""
    features, labels, weight, bias = clusters(6, 16, 60, spread=2.0, seed=12)
    weight[1] = weight[0] + 1e-7 * np.random.default_rng(0).normal(size=16)  # near twins
    bias[1] = bias[0]
    want = reference_metrics(features, labels, weight, bias)
    args = (
        torch.tensor(features, dtype=torch.float32).double(),
        torch.from_numpy(labels),
        torch.from_numpy(weight),
        torch.from_numpy(bias),
    )
    got = measure(*args)
    assert got["accuracy"] == want["accuracy"]
    assert got["ncc_mismatch"] == want["ncc_mismatch"]
    assert (np.argmax(features @ weight.T + bias, 1) == 1).sum() > 0  # class 1 does win rows
    # the data need the re-decision: trusting float32 alone (no slack) gets them wrong
    monkeypatch.setattr(decisions, "F32_UNIT", 0.0)
    assert measure(*args)["accuracy"] != want["accuracy"]


@pytest.mark.parametrize("other_means", [False, True])
def test_near_tied_centre_decisions_match_float64(other_means, monkeypatch):
    """Class centres closer than float32 can resolve: the NCC rule is re-decided in
    float64, for the split's own means (products in the eigenbasis) and for means given
    from another split (products in feature space)."""
    features, labels, weight, bias = clusters(5, 24, 80, spread=2.0, seed=21)
    twin = features[labels == 0] + 1e-6 * np.random.default_rng(1).normal(size=24)
    features[labels == 1] = twin[: int((labels == 1).sum())]  # class 1 ~ class 0
    means = np.stack([features[labels == k].mean(0) for k in range(5)])
    given = means + 1e-7 if other_means else None
    want = reference_metrics(features, labels, weight, bias, class_means=given)
    got = measure(features, labels, weight, bias, class_means=given)
    assert got["ncc_mismatch"] == want["ncc_mismatch"]
    assert got["ncc_accuracy"] == want["ncc_accuracy"]
    # the data need the re-decision: trusting float32 alone (no slack) gets them wrong
    monkeypatch.setattr(decisions, "F32_UNIT", 0.0)
    rough = measure(features, labels, weight, bias, class_means=given)
    assert rough["ncc_accuracy"] != want["ncc_accuracy"]
    centres = means if given is None else given
    nearest = np.argmin(((features[:, None] - centres[None]) ** 2).sum(2), 1)
    assert 0 < (nearest[labels <= 1] == 1).sum() < (labels <= 1).sum()  # a real near-tie


@pytest.fixture
def tallies(monkeypatch):
    """The DecisionTally objects measure builds, in order (to read their counters)."""
    made = []
    init = decisions.DecisionTally.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(decisions.DecisionTally, "__init__", spy)
    return made


@pytest.mark.parametrize("spread", [0.05, 3.0])
def test_classifier_decisions_in_the_basis_match_float64(spread, tallies, monkeypatch):
    """With Sigma_B's eigenbasis kept (C - 1 < D / 2), the classifier is first decided
    from x @ B, and the part of w_k.x outside the span is bounded by
    ||w_k - B B^T w_k|| ||x_perp||: near the means (small spread) the basis settles every
    row, far from them (large spread) many rows go on to the full classifier. Either way
    the decisions are float64's; dropping the bound gets the far rows wrong."""
    features, labels, weight, bias = clusters(4, 24, 150, spread=spread, seed=31)
    weight += 0.5 * np.random.default_rng(32).normal(size=weight.shape)  # off the span
    want = reference_metrics(features, labels, weight, bias)
    monkeypatch.setattr(decisions.DecisionTally, "GIVE_UP_SHARE", 1.0)  # never give up
    got = measure(features, labels, weight, bias)
    for key in ("accuracy", "ncc_mismatch", "ncc_accuracy"):
        assert got[key] == want[key], key
    tally = tallies[-1]
    assert tally.tried == labels.size
    if spread < 1:
        assert tally.deferred == 0
        return
    assert 0 < tally.deferred < tally.tried
    settle = decisions.SureArgmax.settle
    monkeypatch.setattr(decisions.SureArgmax, "settle",
                        lambda self, x, y, extra=None: settle(self, x, y))
    assert measure(features, labels, weight, bias)["accuracy"] != want["accuracy"]


def test_classifier_in_the_basis_is_given_up_when_it_settles_too_few_rows(tallies, monkeypatch):
    """Far from the class means the basis settles few classifier decisions: after the
    trial rows the tally stops trying it, and the decisions stay float64's."""
    features, labels, weight, bias = clusters(4, 24, 500, spread=3.0, seed=31)
    weight += 0.5 * np.random.default_rng(32).normal(size=weight.shape)
    monkeypatch.setattr(decisions.DecisionTally, "TRIAL_ROWS", 300)
    monkeypatch.setattr(stats_module, "BLOCK_ELEMENTS", 24 * 100)  # blocks of 100 rows
    got = measure(features, labels, weight, bias)
    want = reference_metrics(features, labels, weight, bias)
    for key in ("accuracy", "ncc_mismatch", "ncc_accuracy"):
        assert got[key] == want[key], key
    tally = tallies[-1]
    assert tally.deferred > 0.1 * tally.tried
    assert 300 <= tally.tried < labels.size


@pytest.mark.parametrize("threads", [1, 2])
def test_intra_op_threads_give_the_reference_numbers_and_stay_as_set(threads):
    """measure leans on torch's own intra-op threads and never changes the setting."""
    features, labels, weight, bias = clusters(7, 12, 40, imbalance=True, seed=13)
    want = reference_metrics(features, labels, weight, bias)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = measure(features, labels, weight, bias)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_nearly_merged_classes_give_a_nonnegative_finite_nc1():
    """Two class means 1e-7 apart leave Sigma_B with a near-null direction above the
    pinvh cutoff: NC1 is then large, but a sum of variances over eigenvalues, never < 0."""
    rng = np.random.default_rng(21)
    means = rng.normal(size=(5, 24)) * 3
    means[1] = means[0] + 1e-7 * rng.normal(size=24)
    labels = np.repeat(np.arange(5), 40)
    features = means[labels] + 0.1 * rng.normal(size=(200, 24))
    weight = means - means.mean(0)
    got = measure(features, labels, weight)
    want = reference_metrics(features, labels, weight)
    assert math.isfinite(got["nc1"]) and got["nc1"] > 0
    assert got["nc1"] == pytest.approx(want["nc1"], rel=1e-3)


def test_pair_offsets_in_row_blocks_equal_the_whole_table(monkeypatch):
    """The per-label NCC offsets, held as factors and filled two rows at a time."""
    gen = torch.Generator().manual_seed(3)
    left = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    right = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    constant = torch.randn(6, generator=gen, dtype=torch.float64)
    want = left @ right.T + constant
    monkeypatch.setattr(decisions.PairOffsets, "BLOCK_ELEMENTS", 2 * 6)
    pairs = decisions.PairOffsets(left, right, constant)
    torch.testing.assert_close(pairs.full(), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(pairs.table32_t, want.T.float(), rtol=1e-6, atol=1e-6)
    assert pairs.max_abs == pytest.approx(float(want.abs().max()), rel=1e-14)
    torch.testing.assert_close(pairs.rows(torch.tensor([4, 0])), want[[4, 0]])
    torch.testing.assert_close(pairs.rows(3), want[3:4])


def test_pair_offsets_without_a_table_decide_as_with_one(monkeypatch):
    """Many classes: offsets formed per block (no C x C table) give the same NC4 counts."""
    features, labels, weight, bias = clusters(9, 4, 30, spread=2.5, seed=5)
    given = torch.from_numpy(np.stack([features[labels == c].mean(0) for c in range(9)]) + 0.3)
    with_table = measure(features, labels, weight, bias, class_means=given)
    monkeypatch.setattr(decisions.PairOffsets, "TABLE_ELEMENTS", 0)
    monkeypatch.setattr(decisions, "SCORE_ELEMENTS", 9 * 7)  # sub-blocks of 7 rows
    pairs = decisions.PairOffsets(torch.randn(5, 3, dtype=torch.float64),
                                  torch.randn(4, 3, dtype=torch.float64),
                                  torch.randn(4, dtype=torch.float64))
    assert pairs.table32_t is None
    torch.testing.assert_close(pairs.columns32(torch.tensor([3, 1])),
                               pairs.full()[[3, 1]].T.float())
    # without a table, max |o| is bounded, not found (that would form every offset)
    assert pairs.max_abs >= float(pairs.full().abs().max())
    without = measure(features, labels, weight, bias, class_means=given)
    want = reference_metrics(features, labels, weight, bias, class_means=given.numpy())
    for key in ("ncc_mismatch", "accuracy", "ncc_accuracy"):
        assert without[key] == with_table[key] == want[key], key


def test_a_released_tally_keeps_its_counts_and_takes_no_more_blocks():
    features, labels, weight, bias = clusters(5, 4, 20, seed=2)
    h = torch.from_numpy(features)
    y = torch.from_numpy(labels)
    means = torch.stack([h[y == c].mean(0) for c in range(5)])
    tally = decisions.DecisionTally(torch.from_numpy(weight), torch.from_numpy(bias), means,
                                    h.mean(0))
    tally.add(y, h, h - means[y])
    counts = tally.counts.clone()
    tally.release()
    assert tally.classifier is None and tally.ncc is None
    torch.testing.assert_close(tally.counts, counts)
    with pytest.raises(ValueError, match="DecisionTally: released"):
        tally.add(y, h, h - means[y])


def test_an_exhausted_iterator_as_chunks_is_named():
    """measure_chunks calls `chunks` twice: a lone iterator is empty the second time, which
    must not read as empty classes."""
    features, labels, weight, bias = clusters(4, 6, 20, seed=5)
    once = iter([(torch.from_numpy(features), torch.from_numpy(labels))])
    with pytest.raises(ValueError, match=r"chunks yielded .* \(an exhausted iterator\?\)"):
        measure_chunks(lambda: once, torch.from_numpy(weight), torch.from_numpy(bias))
    halves = [iter([(torch.from_numpy(features), torch.from_numpy(labels))]),
              iter([(torch.from_numpy(features[:40]), torch.from_numpy(labels[:40]))])]
    with pytest.raises(ValueError, match="80 rows on the first pass and 40 on the second"):
        measure_chunks(lambda: halves.pop(0), torch.from_numpy(weight))

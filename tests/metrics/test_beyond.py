"""docs/metrics.md "Beyond the paper": every new key against an independent NumPy reference.

The reference below is written plainly from docs/metrics.md (explicit loops over pairs, full
matrices, scipy's pinvh and least squares), sharing no code with nctools.
"""

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nctools import measure, measure_chunks
from nctools.metrics import functional
from nctools.metrics.measure import BEYOND_KEYS, CLASSIFIER_FREE_KEYS, METRIC_KEYS
from tests.helpers import clusters
from tests.reference import reference_metrics


def reference_beyond(H, y, W=None, b=None, C=None, global_mean="samples", ood=None, lam=None):
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y)
    C = (W.shape[0] if W is not None else y.max() + 1) if C is None else C
    N = H.shape[0]
    counts = np.array([np.sum(y == c) for c in range(C)])
    mu = np.stack([H[y == c].mean(0) for c in range(C)])
    mu_S = H.mean(0)
    mu_G = mu_S if global_mean == "samples" else mu.mean(0)
    Mc = mu - mu_G
    Sigma_W = (H - mu[y]).T @ (H - mu[y]) / N
    SS_B = sum(counts[c] * np.outer(mu[c] - mu_S, mu[c] - mu_S) for c in range(C)) / N
    out = {"separation_fuzziness": np.trace(Sigma_W @ scipy.linalg.pinvh(SS_B))}
    for suffix, V in (("means", Mc), ("weights", W)):
        if V is None:
            continue
        U = V / np.linalg.norm(V, axis=1, keepdims=True)
        pairs = itertools.combinations(range(C), 2)
        dist = np.array([np.linalg.norm(U[c] - U[d]) for c, d in pairs])
        # directions that coincide to rounding leave the log-energy undefined
        k = np.log(1 / np.where(dist < 1e-7, 0.0, dist))
        out[f"gnc2_{suffix}"] = np.var(k)
        out[f"gnc2_energy_{suffix}"] = np.mean(k)
    if W is not None:
        s = np.array([W[c] @ Mc[c] / (np.linalg.norm(W[c]) * np.linalg.norm(Mc[c]))
                      for c in range(C)])
        out["duality_cos"] = s.mean()
        out["unc3"] = s.std() / s.mean()
        G = W @ Mc.T
        target = (np.eye(C) - np.ones((C, C)) / C) / np.sqrt(C - 1)
        out["self_duality_etf"] = np.linalg.norm(G / np.linalg.norm(G) - target)
    if ood is not None:
        g = np.asarray(ood, dtype=np.float64).mean(0) - mu_G
        out["nc5"] = np.mean([abs(Mc[c] @ g) / (np.linalg.norm(Mc[c]) * np.linalg.norm(g))
                              for c in range(C)])
        raw = np.asarray(ood, dtype=np.float64).mean(0)  # NECO's uncentred form
        out["nc5_uncentred"] = np.mean([abs(mu[c] @ raw) / (np.linalg.norm(mu[c])
                                                           * np.linalg.norm(raw))
                                        for c in range(C)])
    if lam is not None:
        b = np.zeros(C) if b is None else np.asarray(b, dtype=np.float64)
        X = np.hstack([H, np.ones((N, 1))])
        Y = np.eye(C)[y]

        def loss(theta):
            return (np.sum((X @ theta.T - Y) ** 2) / (2 * N)
                    + lam / 2 * np.sum(theta ** 2))

        # ridge regression in closed form: the least-squares classifier [W_LS b_LS]
        ridge = X.T @ X / N + lam * np.eye(H.shape[1] + 1)
        theta_ls = scipy.linalg.lstsq(ridge, X.T @ Y / N)[0].T
        W_ls, b_ls = theta_ls[:, :-1], theta_ls[:, -1]
        out["mse_nc1"] = (np.trace(W_ls @ Sigma_W @ W_ls.T) / 2
                          + lam / 2 * np.sum(theta_ls ** 2))
        out["mse_nc23"] = np.sum((mu[y] @ W_ls.T + b_ls - Y) ** 2) / (2 * N)
        out["mse_perp"] = loss(np.hstack([W, b[:, None]])) - loss(theta_ls)
        out["loss"] = loss(np.hstack([W, b[:, None]]))
    return out


def notebook_mse(H, y, W, b, lam):
    """LNC1, LNC23, Lperp exactly as the authors' notebook writes them (balanced data),
    translated to NumPy: M is D x C, mu_G the mean of the class means."""
    C = W.shape[0]
    N, D = H.shape
    M = np.stack([H[y == c].mean(0) for c in range(C)]).T
    muG = M.mean(1, keepdims=True)
    Mc = M - muG
    Sb = Mc @ Mc.T / C
    Sw = (H - M.T[y]).T @ (H - M.T[y]) / N
    St = Sw + Sb
    inv = np.linalg.inv(St + lam / (lam + 1) * muG @ muG.T + lam * np.eye(D))
    w_ls = (M.T - muG.T / (1 + lam)) @ inv / C
    b_ls = (np.ones(C) / C - w_ls @ muG[:, 0]) / (1 + lam)
    lnc1 = 0.5 * (np.trace(w_ls @ (Sw + lam * np.eye(D)) @ w_ls.T) + lam * b_ls @ b_ls)
    lnc23 = 0.5 / C * np.linalg.norm(w_ls @ M + b_ls[:, None] - np.eye(C)) ** 2
    A = np.block([[St + muG @ muG.T + lam * np.eye(D), muG], [muG.T, np.ones((1, 1)) + lam]])
    delta = np.hstack([W, b[:, None]]) - np.hstack([w_ls, b_ls[:, None]])
    return {"mse_nc1": lnc1, "mse_nc23": lnc23, "mse_perp": 0.5 * np.trace(delta @ A @ delta.T)}


def assert_keys_close(got, want, keys, rtol=1e-8, atol=1e-11):
    for key in keys:
        assert math.isclose(got[key], want[key], rel_tol=rtol, abs_tol=atol), (
            key, got[key], want[key])


CLASSIFIER_KEYS = ("separation_fuzziness", "gnc2_means", "gnc2_weights", "gnc2_energy_means",
                   "gnc2_energy_weights", "duality_cos", "unc3", "self_duality_etf")


def imbalanced(num_classes, dim, seed, spread=0.8):
    """Clusters with class sizes 5..5+3(C-1), shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3
    sizes = 5 + 3 * np.arange(num_classes)
    y = np.repeat(np.arange(num_classes), sizes)
    rng.shuffle(y)
    H = centres[y] + spread * rng.normal(size=(y.size, dim)) + 2.0
    W = centres + 0.5 * rng.normal(size=centres.shape)
    return H, y, W, rng.normal(size=num_classes)


def exact_collapse(num_classes, dim, per_class=4, scale=3.0):
    """h_i = mu_{y_i}, the mu_c - mu_G a simplex ETF (dim >= C - 1), W prop. to M~, b = 0."""
    etf = np.linalg.svd(np.eye(num_classes) - 1.0 / num_classes)[0][:, : num_classes - 1]
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(dim, dim)))
    means = scale * etf @ q[: num_classes - 1] + 1.5  # a simplex in R^D, shifted
    y = np.repeat(np.arange(num_classes), per_class)
    return means[y], y, 2.0 * (means - means.mean(0)), np.zeros(num_classes)


CASES = {
    "balanced": lambda: clusters(5, 8, 30, spread=1.0, seed=3),
    "imbalanced": lambda: imbalanced(6, 7, seed=4),
    "c_above_d_plus_1": lambda: imbalanced(12, 4, seed=5, spread=0.5),
}


@pytest.mark.parametrize("global_mean", ["samples", "classes"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_new_key_matches_reference(case, global_mean):
    H, y, W, b = CASES[case]()
    rng = np.random.default_rng(9)
    ood = rng.normal(size=(17, H.shape[1])) + 1.0
    got = measure(H, y, W, b, global_mean=global_mean, ood_features=ood, mse_weight_decay=0.03)
    want = reference_beyond(H, y, W, b, global_mean=global_mean, ood=ood, lam=0.03)
    assert tuple(got) == (*METRIC_KEYS, *BEYOND_KEYS)
    assert_keys_close(got, want, [*CLASSIFIER_KEYS, "nc5"])
    assert_keys_close(got, want, ["mse_nc1", "mse_nc23", "mse_perp"], rtol=1e-7, atol=1e-10)
    # the three parts add up to the regularised loss L(W, b) on the same features
    total = got["mse_nc1"] + got["mse_nc23"] + got["mse_perp"]
    assert math.isclose(total, want["loss"], rel_tol=1e-10)
    # the paper's keys still follow docs/metrics.md with the chosen global mean
    if global_mean == "samples":
        assert_keys_close(got, reference_metrics(H, y, W, b), METRIC_KEYS)


def test_global_means_agree_on_balanced_data_and_differ_on_imbalanced():
    H, y, W, b = clusters(4, 6, 20, spread=1.0, seed=2)
    assert_keys_close(measure(H, y, W, b), measure(H, y, W, b, global_mean="classes"),
                      [*METRIC_KEYS, *CLASSIFIER_KEYS], rtol=1e-9, atol=1e-12)
    H, y, W, b = imbalanced(4, 6, seed=2)
    samples, classes = measure(H, y, W, b), measure(H, y, W, b, global_mean="classes")
    assert samples["equinorm_means"] != pytest.approx(classes["equinorm_means"], rel=1e-3)
    # He & Su's SS_B always centres on the samples' mean
    assert samples["separation_fuzziness"] == pytest.approx(classes["separation_fuzziness"],
                                                            rel=1e-12)


def test_separation_fuzziness_is_c_times_nc1_on_balanced_data():
    H, y, W, b = clusters(6, 9, 25, spread=1.5, seed=8)
    got = measure(H, y, W, b)
    assert got["separation_fuzziness"] == pytest.approx(6 * got["nc1"], rel=1e-10)


def test_mse_decomposition_is_the_notebooks_on_balanced_data():
    H, y, W, b = clusters(4, 6, 25, spread=1.0, seed=6)
    lam = 0.5 * 5e-3  # the notebook's wd = 0.5 * weight_decay
    got = measure(H, y, W, b, mse_weight_decay=lam)
    assert_keys_close(got, notebook_mse(H, y, W, b, lam), ["mse_nc1", "mse_nc23", "mse_perp"],
                      rtol=1e-8)


def test_mse_perp_vanishes_at_the_least_squares_classifier():
    H, y, _, _ = imbalanced(5, 6, seed=11)
    X = np.hstack([H, np.ones((len(y), 1))])
    theta = np.linalg.solve(X.T @ X / len(y) + 0.1 * np.eye(7), X.T @ np.eye(5)[y] / len(y)).T
    got = measure(H, y, theta[:, :-1], theta[:, -1], mse_weight_decay=0.1)
    want = reference_beyond(H, y, theta[:, :-1], theta[:, -1], lam=0.1)
    assert abs(got["mse_perp"]) < 1e-12
    assert got["mse_nc1"] + got["mse_nc23"] == pytest.approx(want["loss"], rel=1e-10)


@pytest.mark.parametrize("shape", [(5, 8), (4, 3)])  # C <= D + 1
def test_exact_collapse(shape):
    C, D = shape
    H, y, W, b = exact_collapse(C, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is defined here
        got = measure(H, y, W, b)
    for key in ("gnc2_means", "gnc2_weights", "unc3", "self_duality_etf",
                "separation_fuzziness"):
        assert abs(got[key]) < 1e-10, key
    assert got["duality_cos"] == pytest.approx(1.0, abs=1e-12)
    # the simplex's pairwise distance is sqrt(2C/(C-1)) between unit vectors
    assert got["gnc2_energy_means"] == pytest.approx(-0.5 * math.log(2 * C / (C - 1)), abs=1e-12)


def test_invariances():
    H, y, W, b = imbalanced(7, 5, seed=21)
    ood = np.random.default_rng(1).normal(size=(9, 5))
    keys = [*CLASSIFIER_KEYS, "nc5"]
    base = measure(H, y, W, b, ood_features=ood)
    rng = np.random.default_rng(2)
    order = rng.permutation(len(y))
    assert_keys_close(measure(H[order], y[order], W, b, ood_features=ood), base, keys)
    perm = rng.permutation(7)
    relabel = np.argsort(perm)[y]  # class c becomes position of c in perm
    assert_keys_close(measure(H, relabel, W[perm], b[perm], ood_features=ood), base, keys)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert_keys_close(measure(H @ q.T, y, W @ q.T, b, ood_features=ood @ q.T), base, keys)
    assert_keys_close(measure(H * 3.7, y, W * 0.2, b, ood_features=ood * 3.7), base, keys)
    # nc5 is centred on mu_G: translating all of feature space leaves it alone
    shift = rng.normal(size=5) * 10
    assert measure(H + shift, y, W, b, ood_features=ood + shift)["nc5"] == pytest.approx(
        base["nc5"], rel=1e-9)


def test_nc5_uncentred_is_the_raw_means_cosine_and_differs_on_offset_data():
    """NECO's uncentred form (Ammar et al. 2024) against the NumPy reference: on features
    far from the origin every raw mean points along the offset, so it nears 1, while the
    centred nc5 does not move with the offset."""
    H, y, W, b = imbalanced(5, 6, seed=23)
    ood = np.random.default_rng(4).normal(size=(11, 6))
    offset = np.full(6, 40.0)
    got = measure(H + offset, y, W, b, ood_features=ood + offset)
    want = reference_beyond(H + offset, y, W, b, ood=ood + offset)
    assert list(got)[list(got).index("nc5") + 1] == "nc5_uncentred"
    for key in ("nc5", "nc5_uncentred"):
        assert got[key] == pytest.approx(want[key], rel=1e-10), key
    plain = measure(H, y, W, b, ood_features=ood)
    assert got["nc5"] == pytest.approx(plain["nc5"], rel=1e-9)
    assert got["nc5_uncentred"] > 0.99 and got["nc5_uncentred"] - got["nc5"] > 0.2
    assert abs(plain["nc5_uncentred"] - got["nc5_uncentred"]) > 0.1


def test_classes_subset_is_the_filtered_problem():
    H, y, W, b = imbalanced(6, 5, seed=13)
    subset = [4, 1, 5]
    keep = np.isin(y, subset)
    relabel = np.searchsorted(sorted(subset), y[keep])
    rows = sorted(subset)
    want = reference_metrics(H[keep], relabel, W[rows], b[rows])
    want.update(reference_beyond(H[keep], relabel, W[rows], b[rows]))
    got = measure(H, y, W, b, classes=subset)
    assert_keys_close(got, want, [*METRIC_KEYS, *CLASSIFIER_KEYS])
    with pytest.raises(ValueError, match="classes"):
        measure(H, y, W, b, classes=[1, 1])
    with pytest.raises(ValueError, match="classes"):
        measure(H, y, W, b, classes=[0, 6])


def test_empty_classes_error_names_them_and_drop_empty_measures_the_rest():
    H, y, W, b = imbalanced(6, 5, seed=14)
    keep = (y != 2) & (y != 4)
    with pytest.raises(ValueError, match=r"labels: class 2 has no samples .*2, 4"):
        measure(H[keep], y[keep], W, b)
    got = measure(H[keep], y[keep], W, b, drop_empty=True)
    want = measure(H[keep], y[keep], W, b, classes=[0, 1, 3, 5])
    assert got.pop("classes_measured") == 4.0
    assert list(got) == list(want)
    assert_keys_close(got, want, list(want), rtol=1e-12, atol=1e-15)


def test_classifier_free_keys():
    H, y, W, b = imbalanced(5, 6, seed=15)
    got = measure(H, y)
    assert set(got) == set(CLASSIFIER_FREE_KEYS)
    full = measure(H, y, W, b)
    assert_keys_close(got, full, CLASSIFIER_FREE_KEYS, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="num_classes"):
        measure_chunks(lambda: [(torch.from_numpy(H), torch.from_numpy(y))])


def test_streaming_and_merging_change_nothing():
    H, y, W, b = imbalanced(6, 5, seed=16)
    ood = np.random.default_rng(3).normal(size=(20, 5))
    options = dict(global_mean="classes", classes=[0, 2, 3, 5], mse_weight_decay=0.01)
    whole = measure(H, y, W, b, ood_features=ood, **options)
    Ht, yt = torch.from_numpy(H), torch.from_numpy(y)
    cuts = [0, 7, 8, 40, len(y)]

    def chunks():
        return [(Ht[a:z], yt[a:z]) for a, z in itertools.pairwise(cuts)]

    def ood_chunks():
        return [torch.from_numpy(ood[:3]), torch.from_numpy(ood[3:])]

    streamed, means = measure_chunks(chunks, W, b, ood_features=ood_chunks, **options)
    assert_keys_close(streamed, whole, list(whole), rtol=1e-10, atol=1e-12)
    assert means.shape == (4, 5)


def test_many_classes_in_tiles(monkeypatch):
    """C > D + 1 with tiles of a few rows: the same numbers as one tile."""
    H, y, W, b = imbalanced(40, 3, seed=17, spread=0.3)
    whole = measure(H, y, W, b)
    monkeypatch.setattr(functional, "TILE_ELEMENTS", 3 * 40)
    tiled = measure(H, y, W, b)
    assert_keys_close(tiled, whole, [*METRIC_KEYS, *CLASSIFIER_KEYS], rtol=1e-9, atol=1e-12)
    assert_keys_close(tiled, reference_beyond(H, y, W, b), CLASSIFIER_KEYS)


def test_coinciding_means_warn_and_give_nan_not_an_error():
    H = np.ones((20, 4))
    y = np.arange(20) % 4
    W = np.random.default_rng(0).normal(size=(4, 4))
    with pytest.warns(RuntimeWarning, match="all class means coincide: NC1"):
        got = measure(H, y, W)
    assert math.isnan(got["nc1"]) and math.isnan(got["gnc2_means"])
    with np.errstate(all="ignore"):
        assert got["accuracy"] == reference_metrics(H, y, W)["accuracy"]
    assert not math.isnan(got["etf_weights"])


# --------------------------------------------------------------------------- hypothesis
ARGUMENT_NAMES = ("features", "labels", "weight", "bias", "num_classes", "classes",
                  "class_means", "ood_features", "mse_weight_decay", "global_mean")


@st.composite
def measure_inputs(draw):
    C = draw(st.integers(2, 6))
    D = draw(st.integers(1, 5))
    N = draw(st.integers(1, 30))
    values = st.integers(-3, 3).map(float)  # small integers: degeneracies are exact
    H = np.array(draw(st.lists(values, min_size=N * D, max_size=N * D))).reshape(N, D)
    if draw(st.booleans()):
        H[:, draw(st.integers(0, D - 1))] = 1.0  # a constant (dead) feature
    y = np.array(draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N)))
    W = np.array(draw(st.lists(values, min_size=C * D, max_size=C * D))).reshape(C, D)
    corrupt = draw(st.sampled_from(["none", "none", "nan", "inf"]))
    if corrupt != "none":
        H[draw(st.integers(0, N - 1)), draw(st.integers(0, D - 1))] = float(corrupt)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    options = {
        "drop_empty": draw(st.booleans()),
        "global_mean": draw(st.sampled_from(["samples", "classes"])),
    }
    return H.astype(dtype), y, W if draw(st.booleans()) else None, options


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(measure_inputs())
def test_measure_never_crashes_and_is_right_where_defined(inputs):
    H, y, W, options = inputs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = measure(H, y, W, **options)
    except ValueError as exc:
        assert any(name in str(exc) for name in ARGUMENT_NAMES), str(exc)
        return
    present = np.unique(y)
    if len(present) < np.max(y) + 1 or (W is not None and len(present) < W.shape[0]):
        assert got["classes_measured"] == len(present)
    keep = present
    relabel = np.searchsorted(present, y)
    Wk = None if W is None else W[keep]
    Hd = H.astype(np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference_beyond(Hd, relabel, Wk, global_mean=options["global_mean"])
        paper = reference_metrics(Hd, relabel, Wk if Wk is not None else np.ones((len(keep), 1))
                                  @ np.ones((1, H.shape[1])))
    if options["global_mean"] == "samples":  # reference_metrics centres on the samples
        want.update({k: v for k, v in paper.items() if k in got and k not in want})
    # an exact tie between two decisions is settled by rounding: not compared
    centres = np.stack([Hd[relabel == c].mean(0) for c in range(len(keep))])
    tied = [_has_tie(-((Hd[:, None] - centres[None]) ** 2).sum(-1))]
    if Wk is not None:
        tied.append(_has_tie(Hd @ Wk.T))
    skip = {"ncc_accuracy", "ncc_mismatch", "accuracy"} if any(tied) else set()
    for key, value in got.items():
        if key == "classes_measured" or key not in want or key in skip:
            continue
        if not np.isfinite(want[key]):
            assert math.isnan(value), key  # undefined: NaN, never a number
        elif not math.isnan(value):
            assert math.isclose(value, want[key], rel_tol=1e-6, abs_tol=1e-7), (
                key, value, want[key])


def _has_tie(scores):
    top = np.sort(scores, 1)
    return bool(np.any(top[:, -1] - top[:, -2] <= 1e-9 * (1 + np.abs(top[:, -1]))))

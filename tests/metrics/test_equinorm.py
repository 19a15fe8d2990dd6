"""equinorm_*: the std over C - 1, as the authors' code computes Papyan et al.'s Fig. 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nctools import measure
from nctools.metrics.functional import equinorm


def _data(num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clusters whose centred means and classifier rows have unequal norms."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, 6)) * rng.uniform(0.5, 3.0, size=(num_classes, 1))
    y = np.repeat(np.arange(num_classes), 7)
    H = means[y] + 0.3 * rng.normal(size=(y.size, 6))
    W = rng.normal(size=(num_classes, 6)) * rng.uniform(0.2, 2.0, size=(num_classes, 1))
    return H, y, W


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_equinorm_is_numpy_std_ddof1_over_mean(num_classes):
    H, y, W = _data(num_classes, seed=num_classes)
    got = measure(H, y, W)
    mu = np.stack([H[y == c].mean(0) for c in range(num_classes)])
    for key, V in (("equinorm_means", mu - H.mean(0)), ("equinorm_weights", W)):
        norms = np.linalg.norm(V, axis=1)
        want = np.std(norms, ddof=1) / np.mean(norms)
        assert got[key] == pytest.approx(want, rel=1e-10), key
        # the population std's value is sqrt((C - 1) / C) times the reported one
        population = np.std(norms) / np.mean(norms)
        assert population == pytest.approx(got[key] * math.sqrt((num_classes - 1) / num_classes),
                                           rel=1e-10), key


def test_equinorm_closed_form_and_undefined_cases():
    # norms 1 and 3: std over C - 1 = sqrt(2), mean 2
    vectors = torch.tensor([[1.0, 0.0], [0.0, -3.0]], dtype=torch.float64)
    assert equinorm(vectors) == pytest.approx(math.sqrt(2) / 2, rel=1e-15)
    assert math.isnan(equinorm(vectors[:1]))  # one vector: no std over C - 1
    assert math.isnan(equinorm(torch.zeros(3, 2, dtype=torch.float64)))  # zero mean norm


def test_zero_classifier_gives_nan_with_a_warning():
    H, y, _ = _data(4, seed=0)
    with pytest.warns(RuntimeWarning, match="equinorm_weights"):
        got = measure(H, y, np.zeros((4, 6)))
    assert math.isnan(got["equinorm_weights"])
    assert math.isfinite(got["equinorm_means"])

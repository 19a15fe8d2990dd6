"""The measurement engine (nctools.metrics.engine) against the float64 NumPy reference,
and its invariances: chunking, several layers in one sweep, the basis rule, reference
means, dropped classes."""

import math

import numpy as np
import pytest
import torch

from nctools.metrics import engine as engine_module
from nctools.metrics.engine import (
    BEYOND_KEYS,
    CLASSIFIER_FREE_KEYS,
    METRIC_KEYS,
    Engine,
    Layer,
    ReferenceMeans,
)
from tests.helpers import clusters
from tests.reference import reference_metrics


def _run(engine, features, labels, rows=None):
    """Both passes over ``features`` ({layer: (N, D)} or (N, D)) in chunks of ``rows``."""
    n = labels.shape[0]
    rows = rows or n
    for _ in range(2):
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            chunk = (features[part] if isinstance(features, torch.Tensor)
                     else {k: v[part] for k, v in features.items()})
            engine.update(chunk, labels[part])
        engine.end_pass()
    return engine


def _data(num_classes=5, dim=12, per_class=40, seed=0, **kwargs):
    h, y, w, b = clusters(num_classes, dim, per_class, seed=seed, **kwargs)
    return (torch.from_numpy(h), torch.from_numpy(y), torch.from_numpy(w), torch.from_numpy(b))


@pytest.mark.parametrize("dim", [3, 40])  # D < 2(C - 1): full Sigma_W; else in the basis
def test_engine_equals_the_numpy_reference(dim):
    h, y, w, b = _data(dim=dim)
    engine = _run(Engine(5, {"fc": Layer(w, b)}), h, y, rows=37)
    got, want = engine.result(), reference_metrics(h.numpy(), y.numpy(), w.numpy(), b.numpy())
    assert tuple(got)[: len(METRIC_KEYS)] == METRIC_KEYS
    assert set(got) - set(METRIC_KEYS) <= set(BEYOND_KEYS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    second_basis = engine.layers["fc"].stats.basis
    assert (second_basis is None) == (dim < 2 * 4 + 2)  # r = C - 1 = 4 < D / 2 keeps a basis


def test_chunking_does_not_change_any_metric():
    h, y, w, b = _data(seed=1)
    whole = _run(Engine(5, {"fc": (w, b)}), h, y).result()
    for rows in (1, 7, 64):
        parts = _run(Engine(5, {"fc": (w, b)}), h, y, rows=rows).result()
        assert parts.keys() == whole.keys()
        for key in whole:
            assert parts[key] == pytest.approx(whole[key], rel=1e-11, abs=1e-13), (rows, key)


def test_layers_in_one_sweep_equal_each_layer_alone():
    h, y, w, b = _data(seed=2)
    inner = torch.tanh(h[:, :7] * 0.3)
    both = _run(Engine(5, {"fc": Layer(w, b), "inner": Layer()}), {"fc": h, "inner": inner}, y)
    assert both.result("fc") == _run(Engine(5, {"fc": Layer(w, b)}), h, y).result()
    alone = _run(Engine(5, {"inner": Layer()}), inner, y).result()
    assert both.result("inner") == alone
    assert set(alone) == set(CLASSIFIER_FREE_KEYS)


def test_reference_means_serve_the_ncc_rule():
    h, y, w, b = _data(seed=3, spread=3.0)
    train = _data(seed=4, spread=3.0)[0]
    means = ReferenceMeans()
    assert means.for_split("train") is None and means.for_split("test") is None
    means.keep("test", train[:5])  # only the training split's means are kept
    assert means.for_split("test") is None
    train_engine = _run(Engine(5, {"fc": (w, b)}), train, y)
    means.keep("train", train_engine.class_means())
    given = means.for_split("test")
    got = _run(Engine(5, {"fc": Layer(w, b, given)}), h, y).result()
    want = reference_metrics(h.numpy(), y.numpy(), w.numpy(), b.numpy(),
                             class_means=given.numpy())
    for key in ("ncc_mismatch", "accuracy", "ncc_accuracy"):
        assert got[key] == want[key], key
    assert got["ncc_accuracy"] != _run(Engine(5, {"fc": (w, b)}), h, y).result()["ncc_accuracy"]


def test_reference_means_of_a_class_subset_are_laid_out_in_full_rows():
    means = ReferenceMeans(num_classes=4)
    means.keep("train", torch.tensor([[1.0, 2.0], [3.0, 4.0]]), classes=[3, 1])
    assert means.for_split("val").tolist() == [[0, 0], [3, 4], [0, 0], [1, 2]]


def test_dropped_empty_classes_equal_measuring_the_others():
    h, y, w, b = _data(seed=5)
    keep = y != 2
    engine = _run(Engine(5, {"fc": (w, b)}, drop_empty=True), h[keep], y[keep])
    got = engine.result()
    others = [0, 1, 3, 4]
    remap = torch.tensor([0, 1, -1, 2, 3])
    want = reference_metrics(h[keep].numpy(), remap[y[keep]].numpy(), w[others].numpy(),
                             b[others].numpy())
    assert got["classes_measured"] == 4.0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    with pytest.raises(ValueError, match=r"^labels: class 2 has no samples \(1 of 5"):
        _run(Engine(5, {"fc": (w, b)}), h[keep], y[keep])


def test_global_mean_of_the_classes_centres_on_the_mean_of_the_means():
    h, y, w, b = _data(seed=6, imbalance=True)
    got = _run(Engine(5, {"fc": (w, b)}, global_mean="classes"), h, y).result()
    means = np.stack([h.numpy()[y.numpy() == c].mean(0) for c in range(5)])
    centred = means - means.mean(0)
    norms = np.linalg.norm(centred, axis=1)
    assert got["equinorm_means"] == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-12)


def test_ood_mean_gives_nc5():
    h, y, w, b = _data(seed=7)
    ood = torch.randn(30, 12, dtype=torch.float64) + 5
    engine = Engine(5, {"fc": Layer(w, b, ood=True)})
    _run(engine, h, y)
    engine.update_ood("fc", ood[:11])
    engine.update_ood("fc", ood[11:])
    means = np.stack([h.numpy()[y.numpy() == c].mean(0) for c in range(5)])
    centre = h.numpy().mean(0)
    direction = ood.numpy().mean(0) - centre
    cos = [abs(m @ direction) / np.linalg.norm(m) / np.linalg.norm(direction)
           for m in means - centre]
    assert engine.result()["nc5"] == pytest.approx(np.mean(cos), rel=1e-12)
    empty = _run(Engine(5, {"fc": Layer(w, b, ood=True)}, ood_source="ood"), h, y)
    with pytest.raises(ValueError, match=r"^ood is empty$"):
        empty.result()


def test_a_second_pass_with_other_rows_is_refused():
    h, y, w, b = _data(seed=8)
    engine = Engine(5, {"fc": (w, b)}, source="data")
    engine.update(h, y)
    engine.end_pass()
    engine.update(h[:50], y[:50])
    with pytest.raises(ValueError, match=r"^data yielded 200 rows on the first pass and 50 on"):
        engine.end_pass()


def test_coinciding_means_are_nan_with_a_warning():
    h = torch.randint(1, 4, (6,)).double().expand(40, 6)  # one sample, exact sums
    y = torch.arange(40) % 2
    with pytest.warns(RuntimeWarning, match="all class means coincide"):
        got = _run(Engine(2, {"x": Layer()}), h, y).result()
    assert math.isnan(got["nc1"]) and math.isnan(got["etf_means"])
    assert got["ncc_accuracy"] == 0.5  # ties go to class 0


def test_nan_features_stop_the_first_pass():
    h, y, w, b = _data(seed=9)
    h[3, 2] = math.nan
    engine = Engine(5, {"fc": (w, b)})
    engine.update(h, y)
    with pytest.raises(ValueError, match=r"^features contain NaN or Inf values$"):
        engine.end_pass()
    assert engine_module.TRAIN_SPLIT == "train"

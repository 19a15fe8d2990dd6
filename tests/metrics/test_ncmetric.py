"""NCMetric: the torchmetrics form gives nctools.measure's numbers, in any chunking,
through MetricCollection, reset, forward and a 2-process DDP sync."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchmetrics import MetricCollection

import nctools
from nctools import NCMetric, measure
from nctools.metrics.measure import METRIC_KEYS
from tests.helpers import clusters, free_port
from tests.reference import reference_metrics

NC4 = ("ncc_mismatch", "accuracy", "ncc_accuracy")


def data(num_classes=4, dim=6, per_class=25, seed=0, **kwargs):
    h, y, w, b = clusters(num_classes, dim, per_class, imbalance=True, seed=seed, **kwargs)
    return tuple(torch.from_numpy(a) for a in (h, y, w, b))


def assert_close(got, expected, keys=METRIC_KEYS, rtol=1e-10):
    for key in keys:
        value = float(got[key])
        assert got[key].ndim == 0 and got[key].dtype == torch.float64, key
        assert value == pytest.approx(expected[key], rel=rtol, abs=rtol), key


def feed(metric, features, labels, chunk):
    for start in range(0, len(labels), chunk):
        metric.update(features[start : start + chunk], labels[start : start + chunk])
    return metric


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 13, 1000])
def test_equals_measure_in_any_chunking_and_dtype(dtype, chunk):
    h, y, w, b = data()
    h = h.to(dtype)
    metric = feed(NCMetric(4, (w, b), keep_features=True), h, y, chunk)
    assert_close(metric.compute(), measure(h, y, w, b))


def test_equals_the_numpy_reference_with_grad_features():
    h, y, w, b = data(seed=2)
    layer = nn.Linear(6, 4).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    features = (h * 1.0).requires_grad_(True)
    metric = feed(NCMetric(4, layer, keep_features=True), features, y, 17)
    assert_close(metric.compute(), reference_metrics(h.numpy(), y.numpy(), w.numpy(), b.numpy()))


def test_classifier_is_read_at_compute_and_not_owned():
    h, y, w, b = data(seed=3)
    layer = nn.Linear(6, 4).double()
    metric = NCMetric(4, layer, keep_features=True)
    assert list(metric.parameters()) == [] and "weight" not in str(metric.state_dict())
    metric.update(h, y)
    with torch.no_grad():  # the layer trains on after the last update
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    assert_close(metric.compute(), measure(h, y, w, b))


def test_reference_shift_keeps_collapsed_features_accurate():
    # features ~1e3 from the origin with a within-class spread of 1e-3
    h, y, w, b = data(spread=1e-3, offset=1e3, seed=4)
    expected = reference_metrics(h.numpy(), y.numpy(), w.numpy(), b.numpy())
    means = torch.stack([h[y == c].mean(0) for c in range(4)])
    for reference in (means + 1e-4, means.mean(0) * 0 + means[0]):
        metric = feed(NCMetric(4, (w, b), reference=reference), h, y, 9)
        got = metric.compute()
        # about a point near the data: NC1 to ~1e-8 (about zero it loses ~6 more digits)
        tol = 1e-8 if reference.ndim == 2 else 1e-5
        assert float(got["nc1"]) == pytest.approx(expected["nc1"], rel=tol)
        assert float(got["cdnv"]) == pytest.approx(expected["cdnv"], rel=tol)


def test_without_classifier_or_kept_features_the_missing_keys_are_nan():
    h, y, w, b = data(seed=5)
    metric = NCMetric(4, dim=6, keep_features=True)
    metric.update(h, y)
    with pytest.warns(UserWarning, match="no classifier"):
        got = metric.compute()
    expected = measure(h, y, w, b)
    free = ("nc1", "nc1_ratio", "cdnv", "equinorm_means", "equiangular_means",
            "maxangle_means", "etf_means", "ncc_accuracy")  # fmt: skip
    assert_close(got, expected, free)
    assert all(math.isnan(float(got[k])) for k in METRIC_KEYS if k not in free)
    metric = NCMetric(4, (w, b))
    metric.update(h, y)
    with pytest.warns(UserWarning, match="keep_features=False"):
        got = metric.compute()
    assert_close(got, expected, [k for k in METRIC_KEYS if k not in NC4])
    assert all(math.isnan(float(got[k])) for k in NC4)


def test_metric_collection_reset_and_forward():
    h, y, w, b = data(seed=6)
    h2, y2, _, _ = data(seed=7)
    collection = MetricCollection(
        {"kept": NCMetric(4, (w, b), keep_features=True), "sums": NCMetric(4, (w, b))},
        prefix="nc/",
    )
    collection.update(h, y)
    got = collection.compute()
    expected = measure(h, y, w, b)
    assert float(got["nc/kept_nc1"]) == pytest.approx(expected["nc1"], rel=1e-10)
    assert float(got["nc/sums_etf_means"]) == pytest.approx(expected["etf_means"], rel=1e-10)
    assert float(got["nc/kept_accuracy"]) == expected["accuracy"]

    metric = NCMetric(4, (w, b), keep_features=True)
    feed(metric, h, y, 30)
    metric.reset()
    assert float(metric.counts.sum()) == 0 and metric.features == []
    # forward returns the batch's own value and adds the batch to the running state
    batch = metric(h2, y2)
    assert_close(batch, measure(h2, y2, w, b))
    batch = metric(h, y)
    assert_close(batch, measure(h, y, w, b))
    assert_close(metric.compute(), measure(torch.cat([h2, h]), torch.cat([y2, y]), w, b))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="global_mean"):
        NCMetric(4, dim=6, global_mean="classes")
    with pytest.raises(ValueError) as err:
        NCMetric(4)
    assert str(err.value) == (
        "NCMetric(num_classes=4) without a classifier needs dim=, the width D of the "
        "features given to update(): e.g. NCMetric(num_classes=4, dim=512)")
    with pytest.raises(ValueError, match="reference must have shape"):
        NCMetric(4, dim=6, reference=torch.zeros(3, 6))
    head = nn.Linear(6, 4)
    metric = NCMetric(4, head)
    h, y, _, _ = data()
    with pytest.raises(ValueError, match="features must have shape"):
        metric.update(h[:, :5], y)
    metric.update(h, y)
    head.bias = nn.Parameter(torch.zeros(3))  # the classifier is read again at compute()
    with pytest.raises(ValueError, match="bias must have shape"):
        metric.compute()
    metric = NCMetric(4, dim=6)
    metric.update(h[y < 3], y[y < 3])
    with pytest.raises(ValueError, match="class 3 has no samples"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.compute()


# ---------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        h, y, w, b = data(seed=8)
        bounds = [0, 31, len(y)]  # unequal shards
        shard = slice(bounds[rank], bounds[rank + 1])
        metric = NCMetric(4, (w, b), keep_features=True)
        feed(metric, h[shard], y[shard], 10)
        got = metric.compute()
        np.save(f"{out_dir}/rank{rank}.npy", np.array([float(got[k]) for k in METRIC_KEYS]))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_gives_the_metrics_of_the_union(tmp_path):
    # fork: the workers inherit the imported torchmetrics (seconds of import time each)
    mp.start_processes(
        _ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    h, y, w, b = data(seed=8)
    expected = np.array([measure(h, y, w, b)[k] for k in METRIC_KEYS])
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{rank}.npy"), expected, rtol=1e-10)


def test_reference_is_state_saved_loaded_and_checked_on_merge():
    ht, yt, w, b = data(seed=8)
    offset = torch.full((6,), 3.0, dtype=torch.float64)
    first = NCMetric(4, (w, b), reference=offset)
    first.update(ht[:40], yt[:40])
    plain = NCMetric(4, (w, b))
    plain.update(ht[40:], yt[40:])
    with pytest.raises(ValueError, match=r"^merge_state: the metrics were built with "
                                         r"different reference="):
        first.merge_state(plain)
    first.persistent(True)
    saved = first.state_dict()
    assert torch.equal(saved["shift"], offset.expand(4, 6))
    loaded = NCMetric(4, (w, b), dim=6)
    loaded.load_state_dict(saved)  # the sums come with the point they are about
    second = NCMetric(4, (w, b), reference=offset)
    second.update(ht[40:], yt[40:])
    loaded.merge_state(second)
    whole = NCMetric(4, (w, b), reference=offset)
    whole.update(ht, yt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = loaded.compute(), whole.compute()
    for key in ("nc1", "cdnv", "etf_means", "self_duality"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-12), key
    saved["shift"] = torch.full((4, 5), 1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^reference in the state dict has shape \(4, 5\)"):
        NCMetric(4, dim=6).load_state_dict(saved)


def test_construction_refuses_a_classifier_of_other_classes_and_a_state_too_big():
    with pytest.raises(ValueError) as err:
        NCMetric(4, classifier=nn.Linear(8, 3))
    assert str(err.value) == ("classifier weight has shape (3, 8) (C, D) but num_classes is "
                              "4 and dim 8: give the classifier of the 4 classes")
    with pytest.raises(ValueError, match="bias has shape \\(3,\\) but num_classes is 4"):
        NCMetric(4, classifier=(torch.zeros(4, 8), torch.zeros(3)))
    # 8 bytes x (2C + 2CD + D^2) = 272,000,002,048 bytes, refused before any allocation
    with pytest.raises(ValueError, match=r"^NCMetric\(num_classes, dim\): the float64 state "
                       r"of C = 1000000000 classes x D = 16 would need 253.3 GiB, more than"):
        NCMetric(10**9, dim=16)


def test_meta_inputs_are_one_line():
    metric = NCMetric(4, dim=3)
    with pytest.raises(ValueError, match=r"^features is on the meta device"):
        metric.update(torch.empty(5, 3, device="meta"), torch.zeros(5, dtype=torch.long))
    assert float(metric.counts.sum()) == 0
    with pytest.raises(ValueError, match=r"^features is on the meta device \(shapes without "
                                         r"values\): materialise the model"):
        measure(torch.empty(5, 3, device="meta"), torch.arange(5) % 2)
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"^model parameter 0.weight is on the meta device"):
        nctools.measure_model(net, [(torch.randn(4, 3), torch.arange(4) % 2)])


def test_forward_is_silent_and_compute_warns_once():
    h, y, w, b = data(seed=3)
    metric = NCMetric(4, (w, b))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert math.isnan(float(metric(h, y)["accuracy"]))
    assert seen == []
    with pytest.warns(UserWarning, match="keep_features=False"):
        metric.compute()


def test_a_classifier_that_requires_grad_gives_no_torch_warning():
    h, y, _, _ = data(seed=4)
    head = nn.Linear(6, 4)  # weight and bias require grad, as in training
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        metric = NCMetric(4, classifier=head, keep_features=True)
        metric.update(h, y)
        got = metric.compute()
        expected = measure(h, y, head.weight, head.bias)
    assert [str(w.message) for w in seen] == []
    assert_close(got, expected)


def test_plot_draws_the_computed_values_as_torchmetrics_does():
    import matplotlib

    matplotlib.use("Agg")
    h, y, w, b = data(seed=5)
    metric = feed(NCMetric(4, (w, b), keep_features=True), h, y, 30)
    values = metric.compute()
    fig, ax = metric.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and ax in fig.axes
    drawn = {line.get_label(): float(line.get_ydata()[0]) for line in ax.lines}
    assert drawn == {k: float(values[k]) for k in METRIC_KEYS}
    steps = [metric(h, y) for _ in range(3)]
    fig, ax = metric.plot(steps, keys=["nc1", "cdnv"])
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert drawn == {k: [float(s[k]) for s in steps] for k in ("nc1", "cdnv")}
    with pytest.raises(ValueError, match=r"keys \['nc9'\] are not in the values"):
        metric.plot(keys=["nc9"])

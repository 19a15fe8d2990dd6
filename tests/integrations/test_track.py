"""nctools.track: the metrics of a plain loop's forward passes equal nctools.measure on
the same features taken without a hook."""

import pytest
import torch
from torch import nn

import nctools
from nctools import measure
from tests.helpers import make_net


def batches(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = torch.arange(n) % 3
    x += y[:, None, None, None] * 0.5  # classes apart
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)], x, y


def test_track_equals_measure_on_the_head_input():
    model = make_net(num_classes=3).eval()
    loader, x, y = batches()
    with torch.no_grad(), nctools.track(model, keep_features=True) as tracker:
        for xb, yb in loader:
            model(xb)
            tracker.update(yb)
    got = tracker.compute()
    with torch.no_grad():  # the head's input, by hand
        h = model.pool(model.block2(model.block1(x))).flatten(1)
    want = measure(h, y, model.head.weight.detach(), model.head.bias.detach())
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-10, abs=1e-12), key
    model(x)  # the hook is gone after the with block
    assert tracker.hook.value is None


def test_track_any_layer_and_bad_use():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    tracker = nctools.track(model, layer=model[1], num_classes=3)
    with torch.no_grad():
        model(x)
        tracker.update(y)
        h = model[0](x)
    tracker.remove()
    assert float(tracker.compute()["nc1"]) == pytest.approx(
        measure(h, y, torch.zeros(3, 5))["nc1"], rel=1e-10
    )
    with pytest.raises(ValueError, match="num_classes"):
        nctools.track(model, layer=model[1])
    with pytest.raises(ValueError, match="did not run"):
        nctools.track(model).update(y)


def test_track_names_the_empty_class_when_num_classes_is_too_large():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(30, 4), torch.arange(30) % 3  # classes 0, 1, 2 of 4
    with torch.no_grad(), nctools.track(model, num_classes=4) as tracker:
        model(x)
        tracker.update(y)
    with pytest.raises(ValueError, match=r"^track: class 3 of num_classes=4 has no samples "
                                         r"\(1 of 4 classes are empty\): num_classes may be "
                                         r"too large"):
        tracker.compute()


def test_track_takes_a_layer_by_name_and_names_one_that_did_not_run():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    by_name = nctools.track(model, layer="1", num_classes=3)
    by_module = nctools.track(model, layer=model[1], num_classes=3)
    with torch.no_grad():
        model(x)
    by_name.update(y)
    by_module.update(y)
    assert float(by_name.compute()["nc1"]) == float(by_module.compute()["nc1"])
    with pytest.raises(ValueError, match="layer '1' did not run"):
        by_name.update(y)
    with pytest.raises(ValueError, match="track: layer 'fc' is not a module of Sequential"):
        nctools.track(model, layer="fc", num_classes=3)

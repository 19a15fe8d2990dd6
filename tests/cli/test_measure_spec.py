"""`nctools measure --model SPEC`: zoo and user networks, weights files, layers, outputs."""

from __future__ import annotations

import csv
import io
import sys

import pytest
import torch
from safetensors.torch import save_file

from nctools.cli import main
from nctools.config.schema import DataConfig
from nctools.data.sets import load_dataset
from nctools.metrics.measure import CLASSIFIER_FREE_KEYS, METRIC_KEYS, measure
from tests.helpers import hooked, make_net, measure_json

DATA = ["--dataset", "synthetic", "--set", "data.image_size=8", "--set", "data.num_classes=3",
        "--set", "data.train_per_class=6"]
# a zoo network's own evaluation transform is the default; these tests measure the
# standardised tensors (1-channel networks, 8 px images)
OWN = [*DATA, "--set", "data.preprocess=nctools"]


def synthetic():
    return load_dataset(DataConfig(dataset="synthetic", image_size=8, num_classes=3,
                                   train_per_class=6), seed=0)


def test_user_factory_layers_match_own_hooks(capsys):
    data = synthetic()
    net = make_net(num_classes=3, in_channels=1)
    got = measure_json(capsys, "--model", "tests.helpers:make_net", *DATA,
                       "--layers", "block1,head", "--batch-size", "7")
    assert list(got) == ["block1", "head"]
    labels = data.train.labels
    block1 = measure(hooked(net, data.train.images, "block1"), labels, torch.randn(3, 8))
    head = measure(hooked(net, data.train.images, "head", True), labels,
                   net.head.weight.detach(), net.head.bias.detach())
    assert set(got["block1"]) == set(CLASSIFIER_FREE_KEYS)
    for key in CLASSIFIER_FREE_KEYS:
        assert got["block1"][key] == pytest.approx(block1[key], rel=1e-8, abs=1e-12), key
    for key in METRIC_KEYS:
        assert got["head"][key] == pytest.approx(head[key], rel=1e-8, abs=1e-12), key
    # the CSV: one row per layer, the same numbers
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--layers", "blocks",
                 "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["layer"] for r in rows] == ["block1", "block2", "head"]
    assert float(rows[2]["accuracy"]) == pytest.approx(head["accuracy"], abs=1e-15)
    assert rows[0]["accuracy"] == ""


@pytest.mark.parametrize("wrap", ["plain", "ddp", "lightning", "safetensors"])
def test_timm_weights_files(capsys, tmp_path, wrap):
    import timm

    torch.manual_seed(1)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    state = net.state_dict()
    path = tmp_path / "w.pt"
    if wrap == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif wrap == "lightning":
        torch.save({"epoch": 2, "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    elif wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    data = synthetic()
    got = measure_json(capsys, "--model", "timm:resnet10t", "--weights", str(path), *OWN)
    expected = measure(hooked(net, data.train.images, "fc", True), data.train.labels,
                       net.fc.weight.detach(), net.fc.bias.detach())
    assert list(got) == ["fc"]
    for key in METRIC_KEYS:
        assert got["fc"][key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), key


def test_torchvision_spec_and_bad_inputs(capsys, tmp_path):
    # torchvision builds 3-channel networks; the synthetic images here have one channel
    assert main(["measure", "--model", "torchvision:resnet18", *OWN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nctools: error: measure --model torchvision:resnet18: the network "
                          "fails on synthetic's images of 1 channel(s), 8 px: ")
    assert main(["measure", "--model", "torchvision:nonet", *DATA]) == 2
    assert "torchvision has no model 'nonet'" in capsys.readouterr().err
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--layers", "nope"]) == 2
    assert "no module named 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"x.weight": torch.zeros(2)}, bad)
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--weights",
                 str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nctools: error: --weights {bad}: ") and "missing keys" in err
    assert main(["measure", "--arch", "convnet", *DATA, "--layers", "a"]) == 2
    assert "--layers goes with --model" in capsys.readouterr().err


def test_test_split_uses_training_means(capsys):
    data = synthetic()
    net = make_net(num_classes=3, in_channels=1)
    got = measure_json(capsys, "--model", "tests.helpers:make_net", *DATA,
                       "--layers", "block2,head", "--split", "test")
    train_h = hooked(net, data.train.images, "head", True)
    test_h = hooked(net, data.test.images, "head", True)
    means = torch.stack([train_h[data.train.labels == c].mean(0) for c in range(3)])
    expected = measure(test_h, data.test.labels, net.head.weight.detach(),
                       net.head.bias.detach(), class_means=means)
    for key in METRIC_KEYS:
        assert got["head"][key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), key
    # block2's pooled output is the head's input: the same NCC decisions with train means
    assert got["block2"]["ncc_accuracy"] == pytest.approx(expected["ncc_accuracy"], abs=1e-15)
    nearest = torch.cdist(test_h, means).argmin(1)
    assert expected["ncc_accuracy"] == pytest.approx(
        float((nearest == data.test.labels).double().mean()), abs=1e-15)


def test_a_factory_in_the_current_folder_needs_no_pythonpath(capsys, tmp_path, monkeypatch):
    """`nctools measure --model nets:make` from the folder of nets.py, as the console script
    runs it (the current folder not on sys.path): the network of tests.helpers, the same
    numbers as naming it there."""
    (tmp_path / "nets_here.py").write_text("from tests.helpers import make_net as make\n")
    expected = measure_json(capsys, "--model", "tests.helpers:make_net", *DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    got = measure_json(capsys, "--model", "nets_here:make", *DATA)
    assert got == expected and list(got) == ["head"]

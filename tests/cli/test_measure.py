"""`nctools measure --arch A --checkpoint FILE`: against a hand-made reference, a run's
checkpoint and its settings, one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nctools.data.sets
from nctools.cli import main
from nctools.config.schema import load_config
from nctools.metrics.measure import METRIC_KEYS, class_means, measure
from nctools.runs import snapshots


@pytest.fixture
def small_synthetic(monkeypatch):
    """`--dataset synthetic` at 8 x 8 pixels, 8 + 4 samples per class: a ResNet pass in ms."""
    real = nctools.data.sets.load_dataset

    def small(cfg, seed):
        cfg = dataclasses.replace(cfg, train_per_class=8, test_per_class=4, image_size=8)
        return real(cfg, seed)

    monkeypatch.setattr(nctools.data.sets, "load_dataset", small)
    return lambda: small(nctools.data.sets.DataConfig(dataset="synthetic"), seed=0)


@pytest.fixture
def torchvision_resnet(tmp_path):
    """A randomly initialised torchvision resnet18 with a 1-channel small-image stem."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    for module in net.modules():  # non-trivial eval-mode batch norm
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def hooked(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = net.fc.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    with torch.no_grad():
        net(images)
    handle.remove()
    return captured[0]


def run_json(capsys, *argv: str) -> dict[str, float]:
    assert main(["measure", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same(got: dict, expected: dict) -> None:
    assert list(got)[: len(METRIC_KEYS)] == list(METRIC_KEYS)  # then the newer keys
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_measure_torchvision_state_dict(capsys, small_synthetic, torchvision_resnet):
    net, path = torchvision_resnet
    data = small_synthetic()
    args = ["--arch", "resnet18", "--checkpoint", str(path), "--dataset", "synthetic"]
    train_h = hooked(net, data.train.images)
    got = run_json(capsys, *args)
    assert_same(got, measure(train_h, data.train.labels, net.fc.weight.detach(),
                             net.fc.bias.detach()))
    # Test split: NC4 and ncc_accuracy against the training class means (docs/metrics.md).
    test_h = hooked(net, data.test.images)
    means = class_means(train_h, data.train.labels, 10)
    got = run_json(capsys, *args, "--split", "test", "--layer", "classifier")
    assert_same(got, measure(test_h, data.test.labels, net.fc.weight.detach(),
                             net.fc.bias.detach(), class_means=means))


def test_measure_nctools_checkpoint_and_text_table(capsys, small_synthetic, torchvision_resnet,
                                                   tmp_path):
    net, path = torchvision_resnet
    data = small_synthetic()
    expected = measure(hooked(net, data.train.images), data.train.labels,
                       net.fc.weight.detach(), net.fc.bias.detach())
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model": torch.load(path, weights_only=True)}, ckpt)
    # Batches of 32 (3 of them, the last partial) give the same features as one batch.
    args = ["--arch", "resnet18", "--dataset", "synthetic", "--batch-size", "32",
            "--checkpoint", str(ckpt)]
    assert_same(run_json(capsys, *args), expected)
    assert main(["measure", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines][: len(METRIC_KEYS)] == list(METRIC_KEYS)
    for line in lines:
        key, value = line.split()
        assert float(value) == pytest.approx(expected[key], rel=1e-5, abs=1e-12)


def test_measure_layer_must_be_linear(capsys, small_synthetic, torchvision_resnet):
    _, path = torchvision_resnet
    argv = ["measure", "--arch", "resnet18", "--checkpoint", str(path), "--dataset", "synthetic"]
    assert main([*argv, "--layer", "layer4"]) == 2
    assert capsys.readouterr().err == (
        "nctools: error: --layer 'layer4' is a Sequential, not an nn.Linear\n"
    )
    assert main([*argv, "--layer", "head"]) == 2
    assert "--layer 'head': no such module; nn.Linear layers: ['classifier']" in \
        capsys.readouterr().err


def test_measure_refuses_code_in_checkpoint(capsys, small_synthetic, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "hook": Path("x")}, evil)
    argv = ["measure", "--arch", "convnet", "--checkpoint", str(evil), "--dataset", "synthetic"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nctools: error: {evil}: checkpoint cannot be loaded safely")
    assert err.count("\n") == 1


# ----------------------------------------------------------------------------- workflow


def test_measure_a_run_checkpoint_uses_the_run_model_settings(capsys, tmp_path):
    """A run's checkpoint.pt (a convnet of non-default width) is rebuilt from its config.yaml,
    and its data set with the run's subsets, seed and standardisation: the metrics equal
    those of the run's last snapshot, taken from the same weights."""
    from nctools.training.loop import train

    config = load_config("demo", [
        "data.dataset=synthetic", "data.samples_per_class=20", "seed=5",
        "data.test_samples_per_class=null", "model.width=4",
        "train.epochs=2", "snapshot.epochs=all", "train.device=cpu"])
    run = train(config, tmp_path / "run")
    got = run_json(capsys, "--arch", "convnet", "--checkpoint", str(run / "checkpoint.pt"),
                   "--dataset", "synthetic")
    weight, bias = snapshots.load_classifier(run, 2)
    features, labels = snapshots.load_split(run, 2, "train")
    expected = measure(features, labels, weight, bias)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key


def test_measure_set_gives_a_plain_checkpoint_the_run_settings(capsys, tmp_path):
    """Without the run's config.yaml beside it, the same checkpoint measures the same
    once --set gives the run's data subsets, seed and network width."""
    from nctools.training.loop import train

    sets = ["data.dataset=synthetic", "data.samples_per_class=20", "seed=5",
            "data.test_samples_per_class=null", "model.width=4"]
    config = load_config("demo",
                         [*sets, "train.epochs=1", "snapshot.epochs=all", "train.device=cpu"])
    run = train(config, tmp_path / "run")
    plain = tmp_path / "plain.pt"
    plain.write_bytes((run / "checkpoint.pt").read_bytes())
    argv = ["--arch", "convnet", "--checkpoint", str(plain), "--dataset", "synthetic"]
    got = run_json(capsys, *argv, *[f"--set={item}" for item in sets[1:]])
    weight, bias = snapshots.load_classifier(run, 1)
    features, labels = snapshots.load_split(run, 1, "train")
    expected = measure(features, labels, weight, bias)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
    # without them the network does not fit (width 32 by default): a one-line error
    assert main(["measure", *argv]) == 2
    assert "does not fit convnet" in capsys.readouterr().err
    for bad, message in [
        ("train.lr=0.1", "--set train.lr=0.1: measure takes data.*, model.* and seed only"),
        ("model.arch=vgg11", "--set model.arch=vgg11: give model.arch as --arch"),
        ("data.samples_per_clas=3", "did you mean 'data.samples_per_class'"),
        ("data.samples_per_class=0", "--set: data.samples_per_class: must be"),
    ]:
        assert main(["measure", *argv, "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nctools: error: ") and message in err, err
        assert err.count("\n") == 1


def test_arch_and_model_name_the_same_network_alike(capsys, tmp_path):
    """--arch convnet --checkpoint and --model convnet --weights: one registry, one
    measure_model, the same numbers (the --model row of the classifier's input)."""
    from nctools.models.registry import create_model

    torch.manual_seed(0)
    path = tmp_path / "convnet.pt"
    torch.save(create_model("convnet", 3, 1, 8).state_dict(), path)
    data = ["--dataset", "synthetic", "--set", "data.image_size=8", "--set", "data.num_classes=3",
            "--set", "data.train_per_class=6", "--split", "test"]
    by_arch = run_json(capsys, "--arch", "convnet", "--checkpoint", str(path), *data)
    by_model = run_json(capsys, "--model", "convnet", "--weights", str(path), *data)
    assert by_model == {"classifier": by_arch} and len(by_arch) == 23

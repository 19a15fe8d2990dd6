"""model.stem: a stock torchvision ResNet checkpoint measures on 32 px data."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from nctools.cli import main
from nctools.config.schema import DataConfig, ModelConfig, load_config
from nctools.data.sets import load_dataset
from nctools.errors import ConfigError
from nctools.metrics.measure import METRIC_KEYS, measure
from nctools.models.networks import build_model

DATA = ["--dataset", "synthetic", "--set", "data.channels=3", "--set", "data.image_size=32",
        "--set", "data.train_per_class=3", "--set", "data.num_classes=4"]


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path_factory.mktemp("stem") / "resnet18.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_stock_resnet18_at_32px(capsys, stock):
    net, path = stock
    assert main(["measure", "--arch", "resnet18", "--checkpoint", str(path), *DATA,
                 "--set", "model.stem=imagenet", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    data = load_dataset(DataConfig(dataset="synthetic", channels=3, image_size=32,
                                   train_per_class=3, num_classes=4), seed=0)
    captured = []
    handle = net.fc.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        net(data.train.images)
    handle.remove()
    expected = measure(captured[0], data.train.labels, net.fc.weight.detach(),
                       net.fc.bias.detach())
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), key


def test_stem_mismatch_names_the_checkpoints_stem(capsys, stock):
    _, path = stock
    assert main(["measure", "--arch", "resnet18", "--checkpoint", str(path), *DATA]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: {path} does not fit resnet18: the checkpoint has the imagenet "
        "(7x7 conv) stem but the network was built with the small one: set model.stem=imagenet\n"
    )


@pytest.mark.parametrize(("stem", "size", "kernel", "pooled"), [
    ("auto", 32, 3, False), ("auto", 64, 7, True), ("imagenet", 32, 7, True),
    ("small", 64, 3, False),
])  # fmt: skip
def test_stem_choices(stem, size, kernel, pooled):
    for arch in ("resnet18", "densenet"):
        net = build_model(ModelConfig(arch=arch, stem=stem, depth=10), 3, 3, size)
        conv = net.conv1 if arch == "resnet18" else net.features.conv0
        pool = net.maxpool if arch == "resnet18" else net.features.pool0
        assert conv.kernel_size == (kernel, kernel)
        assert isinstance(pool, torch.nn.MaxPool2d) == pooled
        assert net(torch.zeros(2, 3, size, size)).shape == (2, 3)


def test_bad_stem_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.stem"):
        load_config("demo", ["model.stem=huge"])

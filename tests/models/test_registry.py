"""The one path from a name to a network: each kind of name through `create_model`, with
parameter counts against closed forms and the zoos' own constructors, output shapes, and
the one-line error of an unknown name."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from torch import nn

from nctools.config.schema import ModelConfig
from nctools.errors import ConfigError
from nctools.models import registry
from nctools.models.networks import ARCHS
from nctools.models.registry import create_model, list_models, zoo_of


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model: nn.Module, shape: tuple[int, ...]) -> torch.Size:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(shape)).shape


def test_own_network_by_name_counts_as_its_closed_form():
    # ConvNet of width w on C_in channels, C classes: three 3x3 convs (no bias) with
    # batch norm (2 parameters a channel), then a Linear(4w, C)
    w, c_in, classes = 8, 1, 10
    convs = 9 * (c_in * w + w * 2 * w + 2 * w * 4 * w)
    norms = 2 * (w + 2 * w + 4 * w)
    net = create_model("convnet", classes, c_in, 8, ModelConfig(width=w))
    assert count(net) == convs + norms + 4 * w * classes + classes == 6274
    assert logits(net, (5, 1, 8, 8)) == (5, classes)


def test_every_own_arch_is_registered_and_the_config_keeps_its_settings():
    assert list_models()[: len(ARCHS)] == list(ARCHS)
    # the config's other keys reach the builder; its arch is the name asked for
    net = create_model("densenet", 3, 3, 32, ModelConfig(arch="convnet", depth=10,
                                                         growth_rate=4))
    assert type(net).__name__ == "CifarDenseNet"
    assert logits(net, (2, 3, 32, 32)) == (2, 3)


def test_torchvision_prefix_counts_as_torchvision_documents():
    # torchvision documents resnet18 at 11,689,512 parameters with 1000 classes; with 10
    # the last layer loses 513 * 990
    net = create_model("torchvision:resnet18", 10)
    assert count(net) == 11_689_512 - 513 * 990
    assert logits(net, (2, 3, 64, 64)) == (2, 10)


def test_timm_prefix_builds_timm_s_network_with_its_input_channels():
    net = create_model("timm:test_resnet", 7, in_channels=1)
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=7, in_chans=1)
    assert count(net) == count(reference)
    assert [k for k in net.state_dict()] == [k for k in reference.state_dict()]
    assert logits(net, (3, 1, 32, 32)) == (3, 7)


def test_hf_prefix_reads_a_local_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, num_labels=4)
    saved = ViTForImageClassification(config)
    saved.save_pretrained(tmp_path)
    net = create_model(f"hf:{tmp_path}", 4)
    assert count(net) == count(saved)
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16)).logits.shape == (2, 4)


def test_factory_prefix_calls_the_user_s_function_with_what_it_takes():
    # tests.helpers.SmallNet: conv(C_in -> 8) and conv(8 -> 16), 3x3 with bias, Linear(16, C)
    net = create_model("tests.helpers:make_net", 5, in_channels=2)
    assert count(net) == (2 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 5 + 5) == 1405
    assert logits(net, (4, 2, 8, 8)) == (4, 5)
    from tests.helpers import make_net  # seeds itself: the same weights as a direct call

    for key, value in make_net(num_classes=5, in_channels=2).state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name, message", [
    ("alexnet", "'alexnet': unknown network; choose one of convnet, resnet18, resnet34, "
                "resnet50, resnet152, vgg11, vgg13, vgg16, vgg19, densenet, densenet40, "
                "densenet201, densenet250, timm:NAME, torchvision:NAME, hf:PATH, "
                "package.module:factory"),
    ("timm:nonet", "'timm:nonet': timm has no model 'nonet'"),
    ("torchvision:nonet", "'torchvision:nonet': torchvision has no model 'nonet'"),
    ("hf:/no/such/folder", "'hf:/no/such/folder': /no/such/folder is not a local model folder"),
    ("tests.helpers:nothing", "'tests.helpers:nothing': tests.helpers has no callable "
                              "'nothing'"),
    ("tests.helpers:free_port", "'tests.helpers:free_port' returned a int, not a "
                                "torch.nn.Module"),
])  # fmt: skip
def test_an_unknown_name_is_one_line_naming_it(name, message):
    with pytest.raises(ConfigError) as info:
        create_model(name, 3)
    assert str(info.value) == message


def test_a_factory_module_that_does_not_import_is_named():
    with pytest.raises(ConfigError, match=r"^'no_such_pkg\.nets:f': cannot import "
                                          r"no_such_pkg\.nets: ModuleNotFoundError: "
                                          r"No module named 'no_such_pkg'$"):
        create_model("no_such_pkg.nets:f", 3)


def test_zoo_of_and_a_second_registration():
    assert [zoo_of(n) for n in ("timm:a", "torchvision:b", "hf:/c", "pkg.mod:f", "convnet")] \
        == ["timm", "torchvision", "hf", None, None]
    with pytest.raises(ValueError, match="'convnet' is registered already"):
        registry.register("convnet")(lambda *args: nn.Identity())


def test_a_registered_name_reaches_every_caller(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "tiny", lambda name, c, ch, size, cfg:
                        nn.Sequential(nn.Flatten(), nn.Linear(ch * size * size, c)))
    net = create_model("tiny", 3, in_channels=2, image_size=4)
    assert count(net) == 2 * 4 * 4 * 3 + 3 and "tiny" in list_models()
    assert "tiny" not in sys.modules  # a name, not a module

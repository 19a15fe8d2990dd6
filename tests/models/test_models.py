"""Networks: the features/classifier contract, small-image stems, torchvision compatibility."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from nctools.config.schema import ModelConfig
from nctools.errors import CheckpointError, ConfigError
from nctools.models.networks import ARCHS, build_model, feature_dim, load_state_dict_compat

# D for each arch at the defaults: widths 4 * 32 (convnet), 512 / 2048 (ResNet), 512 (VGG);
# DenseNet-BC 40, k=12: 24 + 6k = 96 -> 48, 48 + 6k = 120 -> 60, 60 + 6k = 132;
# DenseNet-40 (no compression): 16 + 36k = 448; DenseNet-BC-250, k=24: 48 + 41k = 1032 ->
# 516, 516 + 41k = 1500 -> 750, 750 + 41k = 1734; DenseNet-201: 1920 (torchvision's).
EXPECTED_DIM = {"convnet": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
                "resnet152": 2048, "vgg11": 512, "vgg13": 512, "vgg16": 512, "vgg19": 512,
                "densenet": 132, "densenet40": 448, "densenet201": 1920, "densenet250": 1734}


def _build(arch: str, num_classes: int = 10, in_channels: int = 3, size: int = 32) -> nn.Module:
    return build_model(ModelConfig(arch=arch), num_classes, in_channels, size)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 32), (3, 28)])
def test_shapes_on_the_meta_device(arch, channels, size):
    # The meta device checks every shape without computing a single convolution.
    with torch.device("meta"):
        model = _build(arch, 7, channels, size).eval()
        x = torch.empty(2, channels, size, size)
        features, logits = model.features(x), model(x)
    assert isinstance(model.classifier, nn.Linear)
    assert feature_dim(model) == model.classifier.in_features == EXPECTED_DIM[arch]
    assert features.shape == (2, EXPECTED_DIM[arch]) and logits.shape == (2, 7)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_classifier_of_features(arch):
    # 8 px keeps the big nets cheap; the 28 and 32 px shapes are checked on the meta device.
    torch.manual_seed(0)
    model = _build(arch, 5, in_channels=1, size=8).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.classifier(model.features(x)))
    assert model.classifier.out_features == 5


def test_resnet_stem_keeps_small_images_at_full_resolution():
    small, large = _build("resnet18", size=32), _build("resnet18", in_channels=1, size=64)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert large.conv1.in_channels == 1 and isinstance(large.maxpool, nn.MaxPool2d)
    with torch.device("meta"):
        assert _build("resnet18", size=224).features(torch.empty(2, 3, 224, 224)).shape == (2, 512)


@pytest.mark.parametrize(("size", "pools"), [(32, 5), (28, 4), (16, 4), (8, 3)])
def test_vgg_drops_only_the_pools_a_small_image_cannot_take(size, pools):
    model = _build("vgg11", size=size)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == pools
    # torchvision's feature keys are kept, so its trunk weights load unchanged
    reference = make_layers(cfgs["A"], batch_norm=True).state_dict()
    keys = {k.removeprefix("features.") for k in model.state_dict() if k.startswith("features.")}
    assert keys == set(reference)


def test_densenet_depth_sets_the_blocks_and_bad_depth_names_the_key():
    model = build_model(ModelConfig(arch="densenet", depth=22, growth_rate=4), 3, 3, 32)
    assert len(model.features.denseblock1) == (22 - 4) // 6
    assert feature_dim(model) == ((8 + 3 * 4) // 2 + 3 * 4) // 2 + 3 * 4
    with pytest.raises(ConfigError, match=r"model\.depth"):
        build_model(ModelConfig(arch="densenet", depth=41), 10, 3, 32)


def test_unknown_arch_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.arch.*'resnet19'.*resnet18, resnet34"):
        _build("resnet19")
    with pytest.raises(ValueError):
        _build("")


def _torchvision_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 with the stem adapted the way nctools adapts it for 32 px."""
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(num_classes=num_classes)
    tv.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    tv.maxpool = nn.Identity()
    for m in tv.modules():  # non-trivial running statistics, so eval mode is a real test
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return tv.eval()


def test_torchvision_resnet18_state_dict_gives_identical_outputs():
    tv = _torchvision_resnet18()
    ours = _build("resnet18").eval()
    load_state_dict_compat(ours, tv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=0, rtol=0)
    torch.testing.assert_close(ours.classifier.weight, tv.fc.weight, atol=0, rtol=0)


def test_compat_strips_wrapper_prefixes_and_fills_old_batchnorm_counters():
    tv = _torchvision_resnet18()
    state = {"module." + k: v for k, v in tv.state_dict().items() if "num_batches" not in k}
    ours = _build("resnet18")
    load_state_dict_compat(ours, state)
    torch.testing.assert_close(ours.layer2[0].conv1.weight, tv.layer2[0].conv1.weight)


def test_compat_reports_shape_mismatch_missing_and_unexpected_keys():
    ours = _build("resnet18")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    state = _torchvision_resnet18(num_classes=100).state_dict()
    with pytest.raises(CheckpointError, match=r"classifier\.weight: checkpoint \(100, 512\)"):
        load_state_dict_compat(ours, state)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_compat(ours, state)
    msg = str(err.value)
    assert "missing keys layer1.0.conv1.weight" in msg and "unexpected keys extra.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # untouched
    with pytest.raises(CheckpointError, match=r"non-tensor entries epoch"):
        load_state_dict_compat(ours, {"epoch": 3, **state})


def test_compat_maps_old_densenet_layer_names():
    src = build_model(ModelConfig(arch="densenet", depth=10, growth_rate=4), 3, 3, 32)
    state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
             for k, v in src.state_dict().items()}
    assert any(".norm.1." in k for k in state)
    dst = build_model(ModelConfig(arch="densenet", depth=10, growth_rate=4), 3, 3, 32)
    load_state_dict_compat(dst, state)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_convnet_fits_a_small_training_set():
    # Terminal-phase training needs zero training error; 40 samples take a few dozen steps.
    torch.manual_seed(0)
    x = torch.randn(40, 1, 12, 12)
    y = torch.arange(40) % 4
    model = build_model(ModelConfig(arch="convnet", width=8), 4, 1, 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() == 1.0


def test_classifier_init_scale_scales_the_initial_classifier_only():
    from nctools.config.schema import ModelConfig
    from nctools.models.networks import build_model

    nets = []
    for scale in (None, 0.25, 0.0):
        torch.manual_seed(0)
        nets.append(build_model(ModelConfig(width=4, classifier_init_scale=scale), 3, 1, 8))
    base, quarter, zero = nets
    assert torch.equal(quarter.classifier.weight, base.classifier.weight * 0.25)
    assert torch.count_nonzero(zero.classifier.weight) == 0
    assert torch.equal(zero.classifier.bias, base.classifier.bias)
    for a, b in zip(base.body.parameters(), zero.body.parameters(), strict=True):
        assert torch.equal(a, b)

"""The torchvision-based networks of :mod:`nctools.models.networks`: ResNet, VGG-BN, DenseNet.

Usage::

    from nctools.models.networks import build_model   # builds these through :func:`build`

Kept apart so that importing nctools does not import torchvision (about 2 s): only a run
that builds one of these networks pays for it. Each keeps torchvision's state_dict keys,
with the last layer named ``classifier``; for images of 32 px or less the ImageNet stem
(7x7 stride-2 conv + max-pool) becomes a 3x3 stride-1 conv, as in the CIFAR variants used
by Papyan, Han & Donoho (PNAS 2020), unless ``model.stem`` says otherwise (``imagenet``
keeps torchvision's stem at any size, so stock torchvision checkpoints load; ``small``
takes the 3x3 stem at any size).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import VGG, cfgs, make_layers

from nctools.config.schema import ModelConfig
from nctools.errors import ConfigError

SMALL_IMAGE = 32  # at or below this size the stem keeps full resolution
_RESNET_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_VGG_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def build(
    arch: str, cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """A freshly initialised ``arch`` (resnet18/34/50, vgg11/13/16/19, densenet)."""
    small = small_stem(cfg.stem, image_size)
    if arch in _RESNET_LAYERS:
        block, layers = _RESNET_LAYERS[arch]
        return CifarResNet(block, layers, num_classes, in_channels, image_size, small)
    if arch in _VGG_CFG:
        return CifarVGG(_VGG_CFG[arch], num_classes, in_channels, image_size)
    if arch == "densenet":
        return CifarDenseNet(cfg.depth, cfg.growth_rate, num_classes, in_channels, image_size,
                             small)
    raise ConfigError(f"model.arch: {arch!r} is not a torchvision-based network")


def small_stem(stem: str, image_size: int) -> bool:
    """Whether ``model.stem`` (auto | imagenet | small, checked by the config loader) gives
    the 3x3 stride-1 stem."""
    return stem == "small" or (stem == "auto" and image_size <= SMALL_IMAGE)


def stem_hint(state_dict: dict[str, Tensor], model: nn.Module) -> str:
    """Which stem a checkpoint's first conv has, when the model's differs ('' otherwise)."""
    for key in ("conv1.weight", "features.conv0.weight"):
        theirs, ours = state_dict.get(key), model.state_dict().get(key)
        if theirs is None or ours is None or theirs.ndim != 4 or theirs.shape == ours.shape:
            continue
        has = "imagenet (7x7 conv)" if theirs.shape[-1] == 7 else "small (3x3 conv)"
        built = "imagenet" if ours.shape[-1] == 7 else "small"
        want = "imagenet" if theirs.shape[-1] == 7 else "small"
        return (f"the checkpoint has the {has} stem but the network was built with the "
                f"{built} one: set model.stem={want}")
    return ""


class CifarResNet(ResNet):
    """torchvision's ResNet with any input channels, a small-image stem, ``fc`` -> ``classifier``.

    features: (B, 512) for BasicBlock nets, (B, 2048) for Bottleneck nets.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        small: bool | None = None,
    ) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        if small is None:
            small = image_size <= SMALL_IMAGE
        if small:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        # ``blocks``: layer4's pooled output is the penultimate features (saved anyway)
        self.block_names = ("layer1", "layer2", "layer3")
        self.classifier = self.fc
        del self.fc  # one name for the last layer, so state_dict keys say `classifier`

    def features(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, D) after the global average pool."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class PooledTrunk(nn.Sequential):
    """torchvision's ``features`` Sequential, then (ReLU and) a global average pool.

    VGG and DenseNet store their conv trunk as an attribute named ``features``; making
    that attribute end in the pool lets ``model.features(x)`` return (B, D) as every
    nctools model must, while the state_dict keys stay torchvision's (pools hold no
    parameters).
    """

    def __init__(self, trunk: nn.Sequential, final_relu: bool = False) -> None:
        super().__init__(OrderedDict(trunk.named_children()))
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, D)."""
        x = super().forward(x)
        if self.final_relu:
            x = torch.relu(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class CifarVGG(VGG):
    """torchvision's batch-norm VGG with a global average pool and one Linear (512 -> C).

    Max-pools that would shrink a 1x1 map become identities (28 px inputs allow four
    halvings, not five); indices in ``features`` stay torchvision's. features: (B, 512).
    """

    def __init__(self, cfg: str, num_classes: int, in_channels: int = 3, image_size: int = 32):
        # VGG.__init__ would allocate the 120M-parameter ImageNet head only to discard it.
        nn.Module.__init__(self)
        trunk = make_layers(cfgs[cfg], batch_norm=True)
        trunk[0] = nn.Conv2d(in_channels, trunk[0].out_channels, 3, padding=1)
        size = image_size
        for i, layer in enumerate(trunk):
            if isinstance(layer, nn.MaxPool2d):
                if size < 2:
                    trunk[i] = nn.Identity()
                else:
                    size //= 2
        self.features = PooledTrunk(trunk)
        self.classifier = nn.Linear(512, num_classes)
        # torchvision's VGG initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CifarDenseNet(DenseNet):
    """torchvision's DenseNet-BC with three dense blocks of (depth - 4) / 6 layers.

    Huang et al. (CVPR 2017): ``depth`` counts the convs, two per bottleneck layer, plus
    the stem, two transitions and the classifier; the stem has 2 x growth_rate channels
    and transitions halve the channels. features: (B, D) after BN, ReLU, global pool.
    """

    features: nn.Module  # torchvision's trunk, then wrapped in a PooledTrunk

    def __init__(
        self,
        depth: int = 40,
        growth_rate: int = 12,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        small: bool | None = None,
    ) -> None:
        if small is None:
            small = image_size <= SMALL_IMAGE
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"model.depth must be 6n + 4 with n >= 1 (e.g. 40, 100), got {depth}")
        n = (depth - 4) // 6
        init = 2 * growth_rate
        super().__init__(growth_rate, (n, n, n), init, num_classes=num_classes)
        trunk = cast(nn.Sequential, self.features)
        stem = nn.Conv2d(in_channels, init, *((3, 1, 1) if small else (7, 2, 3)), bias=False)
        trunk.conv0 = stem
        if small:
            trunk.pool0 = nn.Identity()
        nn.init.kaiming_normal_(stem.weight)
        self.features = PooledTrunk(trunk, final_relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

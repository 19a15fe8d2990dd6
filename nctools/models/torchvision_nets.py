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
from torchvision.models.densenet import DenseNet, _Transition
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import VGG, cfgs, make_layers

from nctools.config.schema import ModelConfig
from nctools.errors import ConfigError

SMALL_IMAGE = 32  # at or below this size the stem keeps full resolution
_RESNET_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
_VGG_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def build(
    arch: str, cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """A freshly initialised ``arch``: resnet18/34/50/152, vgg11/13/16/19, densenet (BC, of
    ``model.depth`` and ``model.growth_rate``), densenet40, densenet201, densenet250.

    The named DenseNets are the ones Papyan, Han & Donoho (PNAS 2020) trained, whatever
    ``model.depth`` and ``model.growth_rate`` say: densenet40 is Huang et al.'s DenseNet-40
    (k = 12, no bottleneck, no compression), densenet250 their DenseNet-BC-250 (k = 24),
    densenet201 torchvision's four-block DenseNet-201 (k = 32).
    """
    small = small_stem(cfg.stem, image_size)
    if arch in _RESNET_LAYERS:
        block, layers = _RESNET_LAYERS[arch]
        return CifarResNet(block, layers, num_classes, in_channels, image_size, small)
    if arch in _VGG_CFG:
        return CifarVGG(_VGG_CFG[arch], num_classes, in_channels, image_size)
    if arch == "densenet":
        return CifarDenseNet(cfg.depth, cfg.growth_rate, num_classes, in_channels, image_size,
                             small)
    if arch == "densenet40":
        return PlainDenseNet(40, 12, num_classes, in_channels, small)
    if arch == "densenet250":
        return CifarDenseNet(250, 24, num_classes, in_channels, image_size, small)
    if arch == "densenet201":
        return StemmedDenseNet(32, (6, 12, 48, 32), 64, num_classes, in_channels, small)
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


class StemmedDenseNet(DenseNet):
    """torchvision's DenseNet-BC with any input channels and, if ``small``, a 3x3 stem.

    torchvision's ``DenseNet(growth_rate, block_config, num_init_features)``: bottleneck
    layers (1x1 conv to 4k channels, then 3x3 conv to k) and transitions that halve the
    channels (Huang et al., CVPR 2017); DenseNet-201 is ``(32, (6, 12, 48, 32), 64)``.
    The stem is torchvision's 7x7 stride-2 conv + max-pool, or a 3x3 stride-1 conv and no
    pool when ``small``. features: (B, D) after BN, ReLU, global pool.
    """

    features: nn.Module  # torchvision's trunk, then wrapped in a PooledTrunk

    def __init__(
        self,
        growth_rate: int,
        block_config: tuple[int, ...],
        num_init_features: int,
        num_classes: int,
        in_channels: int,
        small: bool,
    ) -> None:
        super().__init__(growth_rate, block_config, num_init_features, num_classes=num_classes)
        trunk = cast(nn.Sequential, self.features)
        shape = (3, 1, 1) if small else (7, 2, 3)
        stem = nn.Conv2d(in_channels, num_init_features, *shape, bias=False)
        trunk.conv0 = stem
        if small:
            trunk.pool0 = nn.Identity()
        nn.init.kaiming_normal_(stem.weight)
        self.features = PooledTrunk(trunk, final_relu=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CifarDenseNet(StemmedDenseNet):
    """torchvision's DenseNet-BC with three dense blocks of (depth - 4) / 6 layers.

    Huang et al. (CVPR 2017): ``depth`` counts the convs, two per bottleneck layer, plus
    the stem, two transitions and the classifier; the stem has 2 x growth_rate channels
    and transitions halve the channels. features: (B, D) after BN, ReLU, global pool.
    """

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
        super().__init__(growth_rate, (n, n, n), 2 * growth_rate, num_classes, in_channels, small)


class PlainDenseLayer(nn.Sequential):
    """BN-ReLU-3x3 conv adding ``growth_rate`` channels: (B, c, H, W) -> (B, c + k, H, W).

    Huang et al.'s (CVPR 2017) composite function H_l without the 1x1 bottleneck, which
    torchvision's ``_DenseLayer`` always has.
    """

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__(OrderedDict(
            norm1=nn.BatchNorm2d(in_channels),
            relu1=nn.ReLU(inplace=True),
            conv1=nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False),
        ))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, super().forward(x)], 1)


class PlainDenseNet(nn.Module):
    """Huang et al.'s (CVPR 2017) DenseNet for CIFAR: no bottleneck, no compression.

    A 16-channel stem conv, three dense blocks of (depth - 4) / 3 :class:`PlainDenseLayer`
    s, transitions (BN-ReLU-1x1 conv-2x2 average pool) that keep the channels, then BN,
    ReLU and the global pool. depth 40, k = 12 is their DenseNet-40 (1.0M parameters on
    CIFAR10, their Table 2), trained without their dropout as Papyan, Han & Donoho (PNAS
    2020) mention none. Module names follow torchvision's DenseNet (``features.conv0``,
    ``features.denseblock1.denselayer1.conv1``, ..., ``features.norm5``). The stem is a
    3x3 stride-1 conv when ``small``, else a 7x7 stride-2 conv + max-pool.
    features: (B, 16 + 3 (depth - 4) / 3 k); 448 for DenseNet-40.
    """

    def __init__(self, depth: int, growth_rate: int, num_classes: int, in_channels: int = 3,
                 small: bool = True) -> None:
        super().__init__()
        layers, channels = (depth - 4) // 3, 16
        trunk: OrderedDict[str, nn.Module] = OrderedDict()
        trunk["conv0"] = nn.Conv2d(in_channels, channels, *((3, 1, 1) if small else (7, 2, 3)),
                                   bias=False)
        if not small:
            trunk["pool0"] = nn.MaxPool2d(3, stride=2, padding=1)
        for b in range(1, 4):
            block = nn.Sequential()
            for i in range(1, layers + 1):
                block.add_module(f"denselayer{i}", PlainDenseLayer(channels, growth_rate))
                channels += growth_rate
            trunk[f"denseblock{b}"] = block
            if b < 3:
                trunk[f"transition{b}"] = _Transition(channels, channels)
        trunk["norm5"] = nn.BatchNorm2d(channels)
        self.features = PooledTrunk(nn.Sequential(trunk), final_relu=True)
        self.classifier = nn.Linear(channels, num_classes)
        # torchvision's DenseNet initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

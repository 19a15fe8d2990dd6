"""Networks whose penultimate features and last linear layer nctools measures.

Usage::

    model = build_model(ModelConfig(arch="resnet18"), num_classes=10, in_channels=3, image_size=32)
    h = model.features(x)          # (B, D): the input of the last layer
    logits = model.classifier(h)   # (B, C); model(x) is the same

ResNet, VGG (with batch norm) and DenseNet build on torchvision's classes
(:mod:`nctools.models.torchvision_nets`, imported when first needed) and keep their
state_dict keys, except that the last layer is always named ``classifier`` (torchvision's
ResNet calls it ``fc``; :func:`load_state_dict_compat` maps it). For images of 32 px or
less the ImageNet stem (7x7 stride-2 conv + max-pool) becomes a 3x3 stride-1 conv, as in
the CIFAR variants of these networks used by Papyan, Han & Donoho (PNAS 2020).
No pretrained weights are ever loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import Tensor, nn

from nctools.config.schema import ModelConfig
from nctools.errors import CheckpointError, ConfigError

ARCHS = (
    "convnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet152",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "densenet",
    "densenet40",
    "densenet201",
    "densenet250",
)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialised ``cfg.arch`` for (B, in_channels, image_size, image_size) inputs;
    ``cfg.classifier_init_scale`` scales the last layer's initial weights."""
    model = _build(cfg, num_classes, in_channels, image_size)
    if cfg.classifier_init_scale is not None:
        with torch.no_grad():
            classifier_of(model).weight.mul_(cfg.classifier_init_scale)
    return model


def _build(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    arch = cfg.arch.lower()
    if arch == "convnet":
        return ConvNet(num_classes, in_channels, cfg.width)
    if arch in ARCHS:
        # torchvision takes ~2 s to import: only runs that build its networks pay for it
        from nctools.models import torchvision_nets as tv_nets

        return tv_nets.build(arch, cfg, num_classes, in_channels, image_size)
    raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}; valid: {', '.join(ARCHS)}")


def classifier_of(model: nn.Module) -> nn.Linear:
    """The last linear layer ``model.classifier`` of an nctools network: W (C, D), b (C,)."""
    layer = model.classifier
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"model.classifier must be an nn.Linear, got {type(layer).__name__}")
    return layer


def penultimate(model: nn.Module, images: Tensor) -> Tensor:
    """``model.features(images)``: the penultimate features (B, D) of an nctools network."""
    features = cast(Callable[[Tensor], Tensor], model.features)
    return features(images)


def feature_dim(model: nn.Module) -> int:
    """D, the width of ``model.features(x)``: (B, D)."""
    return classifier_of(model).in_features


class ConvNet(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (width, 2 width, 4 width), global average pool.

    Small enough to train the 4000 mnist5k digits to zero error in a few CPU minutes.
    features: (B, 4 width).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in (width, 2 * width, 4 * width):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                # ceil_mode keeps a 1x1 map 1x1, so any input size of 1 px or more works
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c_in, num_classes)
        # ``snapshot.layers: blocks``: each conv-BN-ReLU-maxpool block's output but the
        # last, whose pooled output is the penultimate features themselves (saved anyway)
        self.block_names = ("body.3", "body.7")

    def features(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, 4 width)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# torchvision's old DenseNet checkpoints name layers `norm.1`, `conv.2`, ... (see
# torchvision.models.densenet._load_state_dict); modules may not contain dots any more.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def load_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a torchvision-style state_dict into an nctools model, strictly.

    Maps torchvision's ``fc.*`` to ``classifier.*``, old DenseNet ``norm.1`` keys to
    ``norm1``, and drops a ``module.`` (DistributedDataParallel) or ``_orig_mod.``
    (torch.compile) prefix. BatchNorm ``num_batches_tracked`` counters absent from old
    checkpoints keep the model's values. Raises CheckpointError listing missing and
    unexpected keys and shape mismatches; the model is untouched when it raises.
    """
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"state_dict holds non-tensor entries {_short(bad)}: pass the model's state_dict "
            "itself (e.g. checkpoint['model']), not the whole checkpoint"
        )
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key.startswith("fc.") and key not in target:
            key = "classifier." + key[len("fc.") :]
        key = _DENSENET_LEGACY.sub(r"\1\2", key)
        mapped[key] = value
    for key in target.keys() - mapped.keys():
        if key.endswith("num_batches_tracked"):
            mapped[key] = target[key]
    missing = sorted(target.keys() - mapped.keys())
    unexpected = sorted(mapped.keys() - target.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(target.keys() & mapped.keys())
        if mapped[k].shape != target[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_short(mismatched)}")
    if problems:
        name = type(model).__name__
        raise CheckpointError(f"state_dict does not fit {name}: " + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)


def _short(items: list[str], limit: int = 8) -> str:
    """At most ``limit`` names, then how many more, for one-line error messages."""
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")

"""One path from a network's name to a network: nctools' own, timm, torchvision, HF, yours.

Usage::

    from nctools.models.registry import create_model, list_models
    net = create_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    net = create_model("timm:resnet18", num_classes=10)
    net = create_model("mypackage.nets:small_cnn", num_classes=10, in_channels=1)
    list_models()   # ['convnet', 'resnet18', ..., 'timm:NAME', 'torchvision:NAME', ...]

As timm's ``_registry.py``: ONE dictionary from a name to a builder. nctools' own networks
(:data:`nctools.models.networks.ARCHS`) are registered under their names, the model zoos
under their prefix (``timm:NAME``, ``torchvision:NAME``, ``hf:PATH``), and any other
``package.module:factory`` calls the user's factory. Every command and API that takes a
network name resolves it through :func:`create_model`, so a network registered here is
known to all of them. Nothing is downloaded: zoo networks are built with random weights.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn

from nctools.config.schema import ModelConfig
from nctools.errors import ConfigError
from nctools.models import networks

# builder(name after the prefix, num_classes, in_channels, image_size, config) -> network
Builder = Callable[[str, int, int, int, ModelConfig], nn.Module]

_REGISTRY: dict[str, Builder] = {}
ZOO_PREFIXES = ("timm", "torchvision", "hf")  # zoos whose networks bring their own transform
FACTORY = "package.module:factory"


def register(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name`` (a network name, or a zoo prefix)."""

    def add(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"a network named {name!r} is registered already")
        _REGISTRY[name] = builder
        return builder

    return add


def list_models() -> list[str]:
    """Every name :func:`create_model` takes: nctools' own, then the zoos' and a factory."""
    own = [name for name in _REGISTRY if name not in ZOO_PREFIXES]
    zoos = [f"{prefix}:{'PATH' if prefix == 'hf' else 'NAME'}" for prefix in ZOO_PREFIXES]
    return [*own, *zoos, FACTORY]


def zoo_of(name: str) -> str | None:
    """The zoo prefix of ``name`` (``timm``, ``torchvision``, ``hf``), or None."""
    prefix, sep, _ = name.partition(":")
    return prefix if sep and prefix in ZOO_PREFIXES else None


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 config: ModelConfig | None = None) -> nn.Module:
    """A freshly initialised network named ``name``, for C = ``num_classes`` classes.

    ``in_channels`` and ``image_size``: the (B, in_channels, image_size, image_size) inputs
    (own networks and factories that take ``in_channels``; timm takes ``in_chans``).
    ``config``: the settings of an own network (width, depth, stem, ...); its ``arch`` is
    replaced by ``name``. Raises ConfigError naming the name and, for an unknown one,
    every choice.
    """
    config = replace(config or ModelConfig(), arch=name)
    builder = _REGISTRY.get(name.lower())
    if builder is not None:
        return builder(name.lower(), num_classes, in_channels, image_size, config)
    prefix, sep, rest = name.partition(":")
    if not (sep and prefix and rest):
        raise ConfigError(f"{name!r}: unknown network; choose one of {', '.join(list_models())}")
    builder = _REGISTRY.get(prefix, _user_factory)
    return builder(rest if prefix in _REGISTRY else name, num_classes, in_channels, image_size,
                   config)


def _own(name: str, num_classes: int, in_channels: int, image_size: int,
         config: ModelConfig) -> nn.Module:
    return networks.build_model(config, num_classes, in_channels, image_size)


for _arch in networks.ARCHS:
    register(_arch)(_own)


@register("timm")
def _timm(name: str, num_classes: int, in_channels: int, image_size: int,
          config: ModelConfig) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"'timm:{name}': timm has no model {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels)


@register("torchvision")
def _torchvision(name: str, num_classes: int, in_channels: int, image_size: int,
                 config: ModelConfig) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError(f"'torchvision:{name}': torchvision has no model {name!r}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@register("hf")
def _hf(name: str, num_classes: int, in_channels: int, image_size: int,
        config: ModelConfig) -> nn.Module:
    from transformers import AutoModelForImageClassification

    labels = hf_num_labels(name)
    if labels != num_classes:
        raise ConfigError(f"'hf:{name}': the model's config has num_labels = {labels}, "
                          f"not {num_classes} classes")
    try:
        return AutoModelForImageClassification.from_pretrained(name).eval()
    except ValueError as exc:  # a text or other non-image architecture
        if "Unrecognized configuration class" not in str(exc):
            raise ConfigError(f"'hf:{name}': {' '.join(str(exc).split())[:300]}") from None
        raise ConfigError(f"'hf:{name}': a {_hf_config(name).model_type} model is not an "
                          "image classifier (measure reads images); measure its features "
                          "in Python with nctools.measure_model") from None
    except OSError as exc:  # a config without its weights file
        raise ConfigError(f"'hf:{name}': cannot load the model "
                          f"({' '.join(str(exc).split())[:300]})") from None


def _hf_config(name: str):
    """The folder's Hugging Face config; ConfigError for a missing folder or config."""
    from transformers import AutoConfig

    if not Path(name).is_dir():
        raise ConfigError(f"'hf:{name}': {name} is not a local model folder")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        raise ConfigError(f"'hf:{name}': {name} holds no Hugging Face model (a config.json "
                          "with a model_type, as save_pretrained writes)") from None


def hf_num_labels(name: str) -> int:
    """C of the Hugging Face model in folder ``name``: its config's ``num_labels``."""
    return int(_hf_config(name).num_labels)


def declared_classes(spec: str) -> int | None:
    """The classes a network ``spec`` brings with it (an ``hf:`` folder's ``num_labels``),
    or None for a network built for whatever C it is given."""
    return hf_num_labels(spec.partition(":")[2]) if zoo_of(spec) == "hf" else None


def _user_factory(spec: str, num_classes: int, in_channels: int, image_size: int,
                  config: ModelConfig) -> nn.Module:
    """``package.module:factory`` called with the keywords its signature takes."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error the module's own code raises
        raise ConfigError(f"{spec!r}: cannot import {module_name}: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{spec!r}: {module_name} has no callable {attr!r}")
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = {"num_classes": num_classes, "in_channels": in_channels}
    needed = [n for n, p in params.items() if n not in given and p.default is p.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    if needed:
        raise ConfigError(f"{spec!r}: the factory needs {', '.join(needed)}; it is called with "
                          "num_classes and in_channels (the ones its signature names) only")
    try:
        model = factory(**{k: v for k, v in given.items() if takes_all or k in params})
    except Exception as exc:  # the user's code: its reason, on one line
        raise ConfigError(f"{spec!r}: the factory raised {type(exc).__name__}: "
                          f"{_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300] or "(no message)"

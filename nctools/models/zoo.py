"""Networks from model zoos and the user's own code, their weights and eval transforms.

Usage::

    model = build_from_spec("timm:resnet18", num_classes=10, in_channels=3)
    load_weights(model, "finetuned.safetensors")
    transform = eval_transform(model, "timm:resnet18")   # PIL image -> (3, H, W) tensor

A spec names where the network comes from:

- ``timm:NAME``          ``timm.create_model(NAME, pretrained=False, num_classes=C)``
- ``torchvision:NAME``   ``torchvision.models.get_model(NAME, weights=None, num_classes=C)``
- ``hf:PATH``            a local Hugging Face image-classification folder
                         (``AutoModelForImageClassification.from_pretrained(PATH)``)
- ``package.module:factory``  the user's own code, called with ``num_classes`` and
                         ``in_channels`` where its signature takes them

Nothing is downloaded: zoo networks are built with random weights, and the trained ones
come from ``--weights``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from nctools.errors import CheckpointError, ConfigError
from nctools.models.networks import load_state_dict_compat

ZOOS = ("timm", "torchvision", "hf")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning


def build_from_spec(spec: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A randomly initialised network named by ``spec`` (see the module docstring).

    Raises ConfigError naming ``--model`` for an unknown spec, zoo name or factory.
    """
    zoo, sep, name = spec.partition(":")
    if not sep or not zoo or not name:
        raise ConfigError(
            f"--model {spec!r}: give timm:NAME, torchvision:NAME, hf:PATH or package.module:factory"
        )
    if zoo == "timm":
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"--model {spec!r}: timm has no model {name!r}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels)
    if zoo == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ConfigError(f"--model {spec!r}: torchvision has no model {name!r}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if zoo == "hf":
        from transformers import AutoModelForImageClassification

        if not Path(name).is_dir():
            raise ConfigError(f"--model {spec!r}: {name} is not a local model folder")
        return AutoModelForImageClassification.from_pretrained(name).eval()
    return _user_factory(spec, zoo, name)(num_classes=num_classes, in_channels=in_channels)


def _user_factory(spec: str, module_name: str, attr: str) -> Callable[..., nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model {spec!r}: cannot import {module_name}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def build(**kwargs: int) -> nn.Module:
        model = factory(**{k: v for k, v in kwargs.items() if takes_all or k in params})
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--model {spec!r} returned a {type(model).__name__}, "
                              "not a torch.nn.Module")
        return model

    return build


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, whatever wraps them.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (it cannot run code): a plain state_dict, an nctools
    ``checkpoint.pt`` (its ``model``) or a Lightning checkpoint (its ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code, a truncated file, not torch at all
        raise CheckpointError(f"--weights {path}: cannot be read as weights ({exc})") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                return dict(state[key])
        return dict(state)
    raise CheckpointError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` strictly, removing wrapper prefixes the model lacks.

    A prefix of ``WRAPPER_PREFIXES`` (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``,
    a LightningModule's ``model.`` attribute) is removed while every key carries it and
    the model's own keys do not. Raises CheckpointError naming the file and the keys
    that do not fit.
    """
    state = read_state_dict(path)
    own = model.state_dict().keys()
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(
                k.startswith(prefix) for k in own
            ):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    try:
        load_state_dict_compat(model, state)
    except CheckpointError as exc:
        raise CheckpointError(f"--weights {path}: {exc}") from None


def eval_transform(model: nn.Module, spec: str) -> Callable:
    """The network's own evaluation transform: an image -> its (3, H, W) float input.

    The image is a PIL image (an image folder) or a (C, H, W) float tensor of pixels in
    [0, 1] (an in-memory data set; torchvision's tensor kernels resize it).

    - timm: ``create_transform(**resolve_data_config({}, model=model))`` (its resize,
      centre crop and mean/std; timm's ``MaybeToTensor`` passes tensors through);
    - torchvision: the architecture's default weights' ``transforms()`` (looked up by
      name, nothing downloaded; they take tensors);
    - Hugging Face: the folder's image processor (tensors already in [0, 1]: no rescale);
    - otherwise (a user's network, a torchvision name without weights, an HF folder
      without a processor): :func:`imagenet_eval_transform`.
    """
    zoo, _, name = spec.partition(":")
    if zoo == "timm":
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    if zoo == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, KeyError, AttributeError):
            return imagenet_eval_transform()
    if zoo == "hf":
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            return imagenet_eval_transform()

        def hf_transform(image):
            # in-memory pixels are floats in [0, 1] already: the processor must not rescale
            extra = {"do_rescale": False} if isinstance(image, Tensor) else {}
            return processor(images=image, return_tensors="pt", **extra)["pixel_values"][0]

        return hf_transform
    return imagenet_eval_transform()


def imagenet_eval_transform() -> Callable:
    """ImageNet's evaluation transform: resize 256, centre crop 224, ImageNet mean/std.

    PIL images are resized by PIL, tensors by torchvision's tensor kernels (antialiased).
    """
    from torchvision.transforms import v2

    from nctools.data.torchvision_sets import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose([
        v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ])  # fmt: skip

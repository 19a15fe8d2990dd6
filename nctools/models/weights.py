"""Trained weights into a built network: any state_dict file, whatever wraps it.

Usage::

    model = create_model("timm:resnet18", num_classes=10)     # nctools.models.registry
    load_weights(model, "finetuned.safetensors")

``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)`` (it cannot run code). Errors name the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from nctools.errors import CheckpointError
from nctools.models.networks import load_state_dict_compat

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, whatever wraps them.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (it cannot run code): a plain state_dict, an nctools
    ``checkpoint.pt`` (its ``model``) or a Lightning checkpoint (its ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # a truncated or foreign file: safetensors' own reason
            raise CheckpointError(f"{path}: cannot be read as safetensors "
                                  f"({_first_sentence(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code, a truncated file, not torch at all
        raise CheckpointError(f"{path}: cannot be read as weights ({_load_reason(exc)})") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                return dict(state[key])
        return dict(state)
    raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state_dict")


def _first_sentence(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def _load_reason(exc: Exception) -> str:
    """torch.load's reason, without its advice to load with ``weights_only=False`` (that
    runs the file's code, which nctools never does)."""
    if "Weights only load failed" in str(exc):
        return ("it holds pickled objects beyond tensors; nctools reads weights without "
                "running code: save model.state_dict() with torch.save, or a .safetensors file")
    return _first_sentence(exc)


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
        raise CheckpointError(f"{path}: {exc}") from None


def stem_hint(state: Mapping[str, Tensor], model: nn.Module) -> str:
    """Which stem (``model.stem``) ``state`` was trained with, when ``model``'s differs;
    "" when it is the same or the network has no stem to choose."""
    if not any(hasattr(model, name) for name in ("conv1", "features")):
        return ""
    from nctools.models.torchvision_nets import stem_hint as torchvision_stem_hint

    return torchvision_stem_hint({k.removeprefix("module."): v for k, v in state.items()},
                                 model)

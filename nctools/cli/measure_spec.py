"""``nctools measure --model SPEC``: any network of the registry, at any of its layers."""

from __future__ import annotations

import argparse
import os
import sys

from nctools.cli import measure_data
from nctools.cli.measure_data import FOLDER_PREFIX, PREPROCESS_KEY
from nctools.config.schema import DataConfig, ModelConfig
from nctools.data import model_inputs
from nctools.errors import CheckpointError, ConfigError, NctoolsError
from nctools.models import registry, transforms, weights


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``{layer: {metric: value}}`` of ``--model`` at ``--layers`` on ``--split``.

    The data are read through the network's own evaluation transform for timm,
    torchvision and hf networks, and through nctools' standardisation for the others;
    ``--set data.preprocess=model|nctools`` chooses (a folder always takes the network's).
    """
    model, data, data_cfg, seed, transform = _network_and_data(args)
    ood = None
    if args.ood_dataset is not None:
        ood = measure_data.ood_data(args.ood_dataset, data_cfg, seed, data, transform)
    if args.weights is not None:
        _load(model, args.weights, own_transform=transform is not None)
    try:
        return measure_data.measure_split(model, data, args,
                                          measure_data.parse_layers(args.layers), ood=ood)
    except ValueError as exc:
        if str(exc).startswith("ood"):
            raise NctoolsError(f"--ood-dataset {args.ood_dataset}: {exc}") from None
        raise NctoolsError(f"measure --model {args.model}: {exc}") from None
    except RuntimeError as exc:  # the network refuses the images (channels, size)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NctoolsError(
            f"measure --model {args.model}: the network fails on {args.dataset}'s images of "
            f"{data.in_channels} channel(s), {data.image_size} px: {first}"
        ) from None


def _network_and_data(args: argparse.Namespace):
    """(network, data set, its settings, seed, the network's transform or None)."""
    given, overrides = measure_data.split_preprocess(args.overrides)
    preprocess = given or ("model" if registry.zoo_of(args.model) else "nctools")
    data_cfg, seed = DataConfig(dataset=args.dataset), 0
    if args.data_root is not None:  # where an --ood-dataset is looked for too
        data_cfg.root = args.data_root
    if args.dataset.startswith(FOLDER_PREFIX):  # the network first: its transform decides
        if given == "nctools":
            raise ConfigError(f"--set {PREPROCESS_KEY}=nctools: a folder:PATH data set is "
                              "read through the network's own transform")
        path = args.dataset[len(FOLDER_PREFIX):]
        classes = _classes(args, len(model_inputs.folder_classes(path)), "class folders")
        model = build(args.model, classes, model_inputs.MODEL_CHANNELS)
        transform = transforms.eval_transform(model, args.model)
        data = model_inputs.image_folder(path, transform, split=args.split)
        return model, data, data_cfg, seed, transform
    if overrides:
        data_cfg, _, seed = measure_data.override(data_cfg, ModelConfig(), seed, overrides)
        if args.data_root is not None:
            data_cfg.root = args.data_root
    data = measure_data.dataset(data_cfg, seed, standardise=preprocess == "nctools")
    classes = _classes(args, data.num_classes, "classes")
    if preprocess == "nctools":
        return build(args.model, classes, data.in_channels), data, data_cfg, seed, None
    model = build(args.model, classes, model_inputs.MODEL_CHANNELS)  # raw pixels through
    transform = transforms.eval_transform(model, args.model)         # its own transform
    return model, model_inputs.through_transform(data, transform), data_cfg, seed, transform


def _classes(args: argparse.Namespace, data_classes: int, what: str) -> int:
    """C: the data set's, which ``--num-classes`` and an ``hf:`` config's ``num_labels``
    must agree with when given (a network of another C is never measured silently)."""
    try:
        declared = registry.declared_classes(args.model)
    except ConfigError as exc:
        raise ConfigError(f"--model {exc}") from None
    if args.num_classes is not None and declared is not None and args.num_classes != declared:
        raise ConfigError(f"--num-classes {args.num_classes}: --model {args.model}'s config "
                          f"has num_labels = {declared}")
    if args.num_classes is not None and args.num_classes != data_classes:
        raise ConfigError(f"--num-classes {args.num_classes}: --dataset {args.dataset} "
                          f"has {data_classes} {what}")
    if declared is not None and declared != data_classes:
        raise ConfigError(f"--model {args.model}: its config has num_labels = {declared}, "
                          f"--dataset {args.dataset} has {data_classes} {what}")
    return data_classes


def build(spec: str, num_classes: int, in_channels: int):
    """The registry's network ``spec``; a ``package.module:factory`` may live in the
    current folder, importable as under ``python -m``."""
    if registry.zoo_of(spec) is None and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return registry.create_model(spec, num_classes, in_channels)
    except ConfigError as exc:
        raise ConfigError(f"--model {exc}") from None


def _load(model, path: str, own_transform: bool) -> None:
    """``--weights`` into ``model``; a misfit of a zoo network says how it was built."""
    try:
        weights.load_weights(model, path)
    except CheckpointError as exc:
        unreadable = any(why in str(exc) for why in ("no such file", "cannot be read", "holds a"))
        if not own_transform or unreadable:  # the hint is for weights that do not fit
            raise CheckpointError(f"--weights {exc}") from None
        raise CheckpointError(
            f"--weights {exc} (the network was built for its own preprocessing, with 3 input "
            f"channels; --set {PREPROCESS_KEY}=nctools builds it for the data set's "
            "channels and standardisation)") from None

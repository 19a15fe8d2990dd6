"""``nctools measure --arch A --checkpoint FILE``: an nctools network from its checkpoint."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from torch import nn

from nctools.cli import measure_data
from nctools.config.schema import DataConfig, ModelConfig, load_config
from nctools.errors import CheckpointError, ConfigError, NctoolsError
from nctools.models import networks, registry, weights
from nctools.models.features import last_linear
from nctools.runs import store
from nctools.runs.layout import CONFIG_FILE


def measure(args: argparse.Namespace) -> dict[str, float]:
    """The metrics at the input of the ``--layer`` (default: the last) nn.Linear."""
    if args.arch not in networks.ARCHS:
        valid = ", ".join(networks.ARCHS)
        raise NctoolsError(f"--arch {args.arch!r}: unknown architecture; valid names: {valid}")
    state = store.load_checkpoint(Path(args.checkpoint))
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # an nctools checkpoint.pt
    data_cfg, model_cfg, seed = settings(args)
    data = measure_data.dataset(data_cfg, seed)
    if args.num_classes is not None and args.num_classes > data.num_classes:
        # a class without samples leaves the metrics undefined: refused before the
        # network (C outputs) is built, whatever its size
        raise ConfigError(f"--num-classes {args.num_classes}: more than the "
                          f"{data.num_classes} classes of --dataset {args.dataset}; every "
                          "class needs samples")
    classes = args.num_classes or data.num_classes
    model = registry.create_model(args.arch, classes, data.in_channels, data.image_size,
                                  model_cfg)
    _load(model, state, args, classes, data.in_channels)
    name = classifier_name(model, args.layer)
    ood = None
    if args.ood_dataset is not None:
        ood = measure_data.ood_data(args.ood_dataset, data_cfg, seed, data)
    try:
        # progress on a terminal only, unless --quiet
        result = measure_data.measure_split(model, data, args, [name], name, ood,
                                            progress=not args.quiet and sys.stderr.isatty())
    except ValueError as exc:  # e.g. labels beyond --num-classes
        raise NctoolsError(f"measure --checkpoint {args.checkpoint}: {exc}") from None
    return result[name]


def settings(args: argparse.Namespace) -> tuple[DataConfig, ModelConfig, int]:
    """(data, model, seed): the defaults, or the run's beside the checkpoint, then ``--set``."""
    data_cfg, seed, model_cfg = DataConfig(dataset=args.dataset), 0, ModelConfig(arch=args.arch)
    run_config = Path(args.checkpoint).parent / CONFIG_FILE
    if run_config.is_file():  # a run's checkpoint: its network, and its data if the same set
        saved = load_config(run_config)
        if saved.model.arch == args.arch:
            model_cfg = saved.model
        if saved.data.dataset.lower() == args.dataset.lower():
            # the run's subsets and their standardisation: the features it trained on
            data_cfg, seed = replace(saved.data), saved.seed
    if args.overrides:
        data_cfg, model_cfg, seed = measure_data.override(data_cfg, model_cfg, seed,
                                                          args.overrides)
    if args.data_root is not None:
        data_cfg.root = args.data_root
    return data_cfg, model_cfg, seed


def _load(model: nn.Module, state, args: argparse.Namespace, classes: int,
          channels: int) -> None:
    """The checkpoint's weights into ``model``; a misfit names the file and what differs."""
    try:
        networks.load_state_dict_compat(model, state)
    except CheckpointError as exc:
        hint = weights.stem_hint(state, model)
        where = f"{args.checkpoint} does not fit {args.arch}"
        if hint:
            raise CheckpointError(f"{where}: {hint}") from None
        raise CheckpointError(f"{where} with {classes} classes and {channels} input "
                              f"channels: {exc}") from None


def classifier_name(model: nn.Module, name: str | None) -> str:
    """The nn.Linear whose input are the features: ``--layer``, else the last one."""
    modules = dict(model.named_modules())
    if name is None:
        try:
            return last_linear(model)[0]  # nctools networks name theirs `classifier`
        except ValueError as exc:
            raise NctoolsError(str(exc)) from None
    if name not in modules:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise NctoolsError(f"--layer {name!r}: no such module; nn.Linear layers: {linears}")
    if not isinstance(modules[name], nn.Linear):
        raise NctoolsError(f"--layer {name!r} is a {type(modules[name]).__name__}, not an "
                           "nn.Linear")
    return name

"""What ``nctools measure`` feeds a network: its data set, OOD set, ``--set`` and device.

The data and network settings of ``--arch`` are the data set's and the architecture's
defaults, or a run's (when the checkpoint has the run's ``config.yaml`` beside it), then
``--set KEY=VALUE`` of ``data.*``, ``model.*`` and ``seed``, validated as in a run.
``--model`` networks read the data through their own evaluation transform (timm,
torchvision, hf) or nctools' standardisation (``--set data.preprocess=model|nctools``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import torch

from nctools.analysis.model_measure import measure_model
from nctools.config import typed_yaml
from nctools.config.schema import DEVICE_PATTERN, Config, config_from_dict, validate
from nctools.data import model_inputs, sets
from nctools.data.splits import iterate_batches
from nctools.errors import ConfigError
from nctools.models.transforms import imagenet_eval_transform
from nctools.training import distributed
from nctools.training.steps import resolve_device

FOLDER_PREFIX = "folder:"
# measure --model only: "model" (the network's own evaluation transform; the default for
# timm, torchvision and hf networks) or "nctools" (nctools' standardisation; the default
# for a user's own network)
PREPROCESS_KEY = "data.preprocess"
PREPROCESS = ("model", "nctools")


class Batches:
    """A re-iterable of one split's batches in order (``measure_model`` reads it twice)."""

    def __init__(self, split, batch_size: int, rows: range | None = None) -> None:
        self.split, self.batch_size = split, batch_size
        rows = range(len(split.labels)) if rows is None else rows
        self.indices = torch.arange(rows.start, rows.stop)

    def __iter__(self):
        return iterate_batches(self.split, self.indices, self.batch_size)


def device(name: str) -> torch.device:
    """``--device``: the rule of train.device, named as the user wrote it."""
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"--device: {name!r} is not auto, cpu, cuda or cuda:N")
    try:
        return resolve_device(name)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("train.device", "--device")) from None


def override(data_cfg, model_cfg, seed: int, overrides: Sequence[str]):
    """(data, model, seed) settings after ``--set KEY=VALUE`` items, validated as in a run."""
    merged = asdict(Config(seed=seed, data=data_cfg, model=model_cfg))
    cfg = config_from_dict(merged)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key == PREPROCESS_KEY:
            raise ConfigError(f"--set {item}: {PREPROCESS_KEY} goes with --model")
        if key in ("data.dataset", "model.arch"):
            flag = "--dataset" if key == "data.dataset" else "--arch"
            raise ConfigError(f"--set {item}: give {key} as {flag}")
        if key != "seed" and not key.startswith(("data.", "model.")):
            raise ConfigError(f"--set {item}: measure takes data.*, model.* and seed only")
        source = typed_yaml.apply_override(Config, merged, item)
        cfg = config_from_dict(merged, source)
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None
    return cfg.data, cfg.model, cfg.seed


def dataset(data_cfg, seed: int, **options):
    """The data set of ``data_cfg`` (``options`` of :func:`nctools.data.sets.load_dataset`),
    its errors naming ``--dataset``."""
    try:
        return sets.load_dataset(data_cfg, seed=seed, **options)
    except ConfigError as exc:  # named as the user wrote it, not as a config key
        raise ConfigError(str(exc).replace("data.dataset", "--dataset")) from None


def split_preprocess(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(``data.preprocess`` of ``overrides``, None if not given; the other overrides)."""
    choice, rest = None, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() != PREPROCESS_KEY:
            rest.append(item)
            continue
        choice = value.strip()
        if choice not in PREPROCESS:
            raise ConfigError(f"--set {item}: {PREPROCESS_KEY} must be one of "
                              f"{', '.join(PREPROCESS)}")
    return choice, rest


def parse_layers(text: str | None) -> list[str] | str | None:
    """``--layers a,b,c`` -> ["a", "b", "c"]; ``blocks`` stays the word; None stays None."""
    if text is None or text.strip() == "blocks":
        return None if text is None else "blocks"
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--layers {text!r}: give module names separated by commas, or blocks")
    return names


def ood_data(name: str, data_cfg, seed: int, data, transform=None, flag: str = "--ood-dataset"):
    """The out-of-distribution set ``name`` prepared as the in-distribution ``data`` is.

    Only its TEST split is measured (the held-out images; for ``folder:PATH`` PATH/val or
    PATH/test, else PATH itself). Its settings are ``data_cfg``'s (root, download, pad_to,
    the synthetic shape keys) without the class subsets, and its seed is ``seed + 1``, so
    that ``synthetic`` draws other class centres than a synthetic ``data``.

    ``transform``: the network's own evaluation transform (``--model``): the OOD images go
    through it as ``data``'s do. None: nctools' preprocessing, standardised with ``data``'s
    training mean and std, and the same channels and size are required. Raises ConfigError
    naming ``flag`` for an unknown name or images the network does not take.
    """
    if name.startswith(FOLDER_PREFIX):
        if transform is None:  # the in-distribution pixels: size, channels, mean/std
            transform = (imagenet_eval_transform() if data.channel_mean is None
                         else model_inputs.standardised_like(data))
        ood = model_inputs.image_folder(name[len(FOLDER_PREFIX):], transform, flag, labels=False)
    else:
        cfg = replace(data_cfg, dataset=name, samples_per_class=None,
                      test_samples_per_class=None)
        try:  # raw pixels: prepared below as the in-distribution set's
            ood = sets.load_dataset(cfg, seed=seed + 1, standardise=data.channel_mean is None
                               and transform is None)
        except ConfigError as exc:
            text = str(exc).replace("data.dataset", flag)
            raise ConfigError(text if text.startswith(flag) else f"{flag} {name}: {text}") from None
        if transform is not None:
            ood = model_inputs.through_transform(ood, transform, flag=flag)
    _check_fits(ood, data, name, flag)
    if not name.startswith(FOLDER_PREFIX) and transform is None and data.channel_mean is not None:
        sets.standardise_splits(ood, data.channel_mean, data.channel_std)
    return ood


def _check_fits(ood, data, name: str, flag: str) -> None:
    """The out-of-distribution images have the channels and size of the network's input."""
    if (ood.in_channels, ood.image_size) != (data.in_channels, data.image_size):
        raise ConfigError(
            f"{flag} {name}: images of {ood.in_channels} channel(s), {ood.image_size} px, but "
            f"the network takes {data.name}'s {data.in_channels} channel(s), "
            f"{data.image_size} px"
            + ("; --set data.pad_to=N pads both sets" if ood.image_size < data.image_size
               else "")
        )


def measure_split(model, data, args, layers, classifier: str | None = None, ood=None,
                  progress: bool = True) -> dict[str, dict[str, float]]:
    """:func:`~nctools.analysis.model_measure.measure_model` of ``model`` on ``args.split``.

    On the test split the nearest-class-centre rule uses the training class means
    (``reference=``); ``ood``: a data set whose test split gives nc5. Under torchrun each
    rank passes its contiguous rows (:func:`~nctools.training.distributed.shard_rows`) and
    every rank gets the metrics of the whole split. ValueError and RuntimeError pass through.
    """
    info = distributed.dist_from_env()
    dev = distributed.rank_device(device(args.device), info, key="--device")
    model.to(dev)

    def batches(part) -> Batches:  # this rank's rows of a split
        rows = distributed.shard_rows(len(part.labels), args.batch_size, info)
        return Batches(part, args.batch_size, rows if info.distributed else None)

    reference = batches(data.train) if args.split == "test" else None
    with distributed.process_group(info, dev):
        return measure_model(model, batches(getattr(data, args.split)), layers=layers,
                             classifier=classifier, device=dev, progress=progress,
                             reference=reference, ood=None if ood is None else batches(ood.test))

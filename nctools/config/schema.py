"""Typed run configuration: one dataclass per YAML section.

Usage::

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=3"])
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from importlib.resources import files
from pathlib import Path
from typing import Any

from nctools.config import typed_yaml
from nctools.config.typed_yaml import show as _show
from nctools.errors import ConfigError


@dataclass
class DataConfig:
    """Which data set to train and measure on."""

    dataset: str = "mnist5k"  # mnist5k | synthetic | mnist | fashionmnist | kmnist | cifar10 | ...
    root: str = "~/.cache/nctools/data"  # where torchvision data sets live
    download: bool = False  # let torchvision download missing files (needs internet)
    # balanced training subset (an int), one count per class (a list: imbalanced, e.g.
    # minority collapse, Fang et al. 2021); None keeps all
    samples_per_class: int | list[int] | None = None
    test_samples_per_class: int | None = None  # balanced test subset; None keeps all
    augment: bool = False  # random crop + flip on the training split (the paper uses none)
    pad_to: int | None = None  # zero-pad images to this many px square (the paper: MNIST to 32)
    # standardisation of in-memory sets: train (the training split's per-channel mean and
    # std) | mnist (the fixed MNIST constants of the authors' notebook, 1-channel sets)
    normalize: str = "train"
    # synthetic only: Gaussian class clusters shaped like images
    num_classes: int = 10
    train_per_class: int = 64
    test_per_class: int = 16
    channels: int = 1
    image_size: int = 16


@dataclass
class ModelConfig:
    """Which network to train; every network exposes ``features(x)`` and ``classifier``."""

    arch: str = "convnet"  # convnet | resnet18/34/50 | vgg11/13/16/19 | densenet
    width: int = 32  # convnet: channels of the first block (doubles per block)
    depth: int = 40  # densenet: number of layers
    growth_rate: int = 12  # densenet: channels added per layer
    # resnet/densenet first layers: auto (3x3 conv, no max-pool at <= 32 px, else ImageNet's)
    # | imagenet (torchvision's 7x7 stride-2 conv + max-pool at any size) | small (3x3 always)
    stem: str = "auto"
    # the classifier's initial weights times this (0: zeros; null: the network's own init).
    # A small start lets the rows reach the simplex instead of staying near random ones.
    classifier_init_scale: float | None = None


@dataclass
class TrainConfig:
    """Optimisation; learning rate in units of one SGD step on a batch-mean loss."""

    epochs: int = 150
    batch_size: int = 128
    loss: str = "ce"  # ce | mse (one-hot targets, Han, Papyan & Donoho 2022)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    schedule: str = "multistep"  # multistep (/10 at 1/3 and 2/3 of epochs) | cosine | constant
    # multistep: fractions of the run ([1/3, 2/3] or 0.5), at floor(fraction * epochs); or
    # whole epochs >= 1 ([116, 233]); see milestone_epochs and docs/config-notes.md
    milestones: list[float | str] = field(default_factory=lambda: [1 / 3, 2 / 3])
    gamma: float = 0.1  # multistep: factor at each milestone
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # CUDA only: bf16 autocast
    channels_last: bool = False  # channels_last memory format (faster on GPUs and CPUs)
    eval_every: int = 1  # test pass every K epochs (and at snapshots and the last); 0: only there
    # the terminal phase starts at the first epoch whose eval-mode training accuracy reaches
    # this (Papyan et al. 2020: 99.9%, 99.6% on ImageNet)
    tpt_accuracy: float = 0.999
    loggers: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb
    # W&B's project and entity (team); None: $WANDB_PROJECT / $WANDB_ENTITY, else "nctools"
    # and the account's default
    wandb_project: str | None = None
    wandb_entity: str | None = None
    drop_last: bool = False  # skip each epoch's last, incomplete batch (the authors' notebook)


@dataclass
class SnapshotConfig:
    """When to save features and classifier, and in which precision."""

    epochs: str | list[int] = "log:30"  # all | log:K | papyan | [1, 2, 5, ...]
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    dtype: str = "float32"  # float32 | float16
    # inner layers whose pooled outputs are saved beside the penultimate features (module
    # names, e.g. [layer1, layer2], or "blocks": every block of the network); [] for none
    layers: str | list[str] = field(default_factory=list)
    measure: bool = False  # measure each snapshot as it is written and send it to the loggers


@dataclass
class Config:
    """A whole run: saved as ``RUN/config.yaml`` next to everything it produced."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)


# ---------------------------------------------------------------------------------------
# Loading: YAML -> dataclasses (nctools.config.typed_yaml), errors naming the file and key.

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
LOSSES = ("ce", "mse")
SCHEDULES = ("multistep", "cosine", "constant")
SNAPSHOT_DTYPES = ("float32", "float16")
STEMS = ("auto", "imagenet", "small")  # model.stem
NORMALIZE = ("train", "mnist")  # data.normalize (nctools.data.sets.normalization)
SPLITS = ("train", "test")
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 1_000_000  # the schedule, history and manifest hold one entry per epoch
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+-][A-Za-z0-9._+ -]*")
LOGGERS = ("tensorboard", "mlflow", "wandb")  # train.loggers (nctools.training.loggers)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a nested mapping; ``source`` names it in errors."""
    return typed_yaml.build(Config, data, source=source)


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested dict of plain YAML types (the inverse of config_from_dict)."""
    return asdict(cfg)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate and return it.

    ``path`` is a file, or the name of a config shipped with nctools (``demo``,
    ``papyan2020/cifar10-resnet18``; see :func:`packaged_configs`) when no such file exists.
    Overrides use dotted keys and YAML values: ``train.epochs=3``, ``snapshot.epochs=all``,
    ``snapshot.epochs=[1,5,10]``, ``data.samples_per_class=null``.
    Raises ConfigError naming the file (or the override) and the dotted key at fault.
    """
    path = Path(path)
    if not path.exists():
        path = _packaged(path)
    data = typed_yaml.read_mapping(path, Config)
    cfg = config_from_dict(data, str(path))
    if overrides:
        if isinstance(overrides, str):  # a lone string would be split into characters
            overrides = [overrides]
        merged = config_to_dict(cfg)
        for item in overrides:
            source = typed_yaml.apply_override(Config, merged, item)
            cfg = config_from_dict(merged, source)  # type errors name the override at fault
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package (the repository's ``configs/``)."""
    root = Path(str(files("nctools.configs")))
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _packaged(path: Path) -> Path:
    """The shipped config named ``path`` (with or without ``.yaml``), or ConfigError."""
    name = path.as_posix().removesuffix(".yaml")
    if name in packaged_configs():
        return Path(str(files("nctools.configs"))) / f"{name}.yaml"
    raise ConfigError(
        f"{path}: config file not found (nor a config shipped with nctools: "
        f"{', '.join(packaged_configs())})"
    )


def diff_configs(a: Config, b: Config, ignore: Sequence[str] = ()) -> list[str]:
    """Lines ``"train.lr: 0.05 -> 0.1"`` for every dotted key where ``a`` and ``b`` differ.

    ``ignore`` lists dotted keys (or whole sections, e.g. ``"train"``) left out of the
    comparison, for settings that may change on resume such as ``train.device``.
    """
    flat_a, flat_b = (typed_yaml.flatten(config_to_dict(x)) for x in (a, b))
    lines = []
    for key in flat_a:
        if any(key == skip or key.startswith(skip + ".") for skip in ignore):
            continue
        if flat_a[key] != flat_b[key]:
            show = typed_yaml.format_value
            lines.append(f"{key}: {show(flat_a[key])} -> {show(flat_b[key])}")
    return lines


# ---------------------------------------------------------------------------------------
# Validation: value checks, each error naming its dotted key.


def snapshot_epochs(spec: str | list[int], epochs: int) -> list[int]:
    """The epochs (sorted, unique, in [1, epochs]) at which a run saves a snapshot.

    ``"all"`` -> 1..epochs. ``"papyan"`` -> the epochs Papyan et al. (2020) measured
    (:func:`papyan_epochs`). ``"log:K"`` -> K epochs spaced evenly in log(epoch), always
    holding 1 and ``epochs`` (the terminal phase is slow, Papyan et al. 2020 plot a log
    axis); where rounding makes two equal, the nearest unused epoch takes the place, so
    there are exactly min(K, epochs). A list of ints -> those epochs.
    Anything else raises ConfigError naming ``snapshot.epochs``.
    """
    key = "snapshot.epochs"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"train.epochs: must be an int >= 1, got {_show(epochs)}")
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{key}: empty list; give at least one epoch")
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ConfigError(f"{key}: list items must be ints, got {_show(item)}")
            if not 1 <= item <= epochs:
                raise ConfigError(f"{key}: epoch {item} is outside [1, {epochs}] (train.epochs)")
        return sorted(set(spec))
    if not isinstance(spec, str):
        raise ConfigError(f"{key}: expected 'all', 'log:K', 'papyan' or a list of ints, "
                          f"got {_show(spec)}")
    text = spec.strip()
    if text == "all":
        return list(range(1, epochs + 1))
    if text == "papyan":
        return papyan_epochs(epochs)
    match = re.fullmatch(r"log:(\d+)", text)
    if match is None:
        raise ConfigError(f"{key}: expected 'all', 'log:K', 'papyan' or a list of ints, "
                          f"got {_show(spec)}")
    count = int(match.group(1))
    if count < 2:
        raise ConfigError(f"{key}: log:K needs K >= 2 (it always holds epoch 1 and the last)")
    if count >= epochs:
        return list(range(1, epochs + 1))
    chosen = {1, epochs}
    for i in range(1, count - 1):
        target = epochs ** (i / (count - 1))  # geomspace(1, epochs, count)[i]
        chosen.add(_nearest_unused(target, chosen, epochs))
    return sorted(chosen)


MILESTONE_DENOMINATOR = 10**6  # a decimal milestone is read to this precision (1/3 as a float)
_FRACTION = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def milestone_value(item: float | str) -> Fraction | None:
    """One ``train.milestones`` item as an exact number, or None when it is not one.

    ``"p/q"`` (YAML reads ``1/3`` as text) is the fraction p/q exactly; a decimal below 1 is
    the nearest fraction with a denominator of at most :data:`MILESTONE_DENOMINATOR` (so
    Python's ``1 / 3`` is a third, ``0.333333`` is 333333/10^6); a number >= 1 is itself.
    """
    if isinstance(item, str):
        match = _FRACTION.fullmatch(item)
        if match is None or int(match.group(2)) == 0:
            return None
        return Fraction(int(match.group(1)), int(match.group(2)))
    if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
        return None
    value = Fraction(item)
    return value.limit_denominator(MILESTONE_DENOMINATOR) if value < 1 else value


def milestone_epochs(milestones: Sequence[float | str], epochs: int) -> list[int]:
    """The epochs after which ``multistep`` multiplies the learning rate by ``gamma``.

    A fraction f in (0, 1) of the run (``"1/3"`` or a decimal, :func:`milestone_value`) is
    epoch ``floor(f * epochs)``, at least 1 (a drop before the first epoch would start the
    run at ``lr * gamma``); a whole number >= 1 is that epoch. The paper's rule, "divided by
    10 at 1/3 and 2/3 of training" (Papyan, Han & Donoho 2020; the authors' notebook:
    ``[epochs // 3, epochs * 2 // 3]``), is ``[1/3, 2/3]``: [116, 233] of 350 epochs,
    [100, 200] of 300, [10, 20] of 30. Items are checked by :func:`validate`.
    """
    resolved = []
    for item in milestones:
        value = milestone_value(item)
        if value is None:
            raise ConfigError(f"train.milestones: {_show(item)} is not a fraction or an epoch")
        resolved.append(int(value) if value >= 1 else max(1, math.floor(value * epochs)))
    return resolved


PAPYAN_EVERY = 10  # papyan: every epoch up to this one, then
PAPYAN_LOG = 40  # this many epochs spaced evenly in log(epoch), from PAPYAN_EVERY + 1 to the last


def papyan_epochs(epochs: int) -> list[int]:
    """The snapshot epochs of Papyan, Han & Donoho (PNAS 2020) for a run of ``epochs``.

    Every epoch 1-10, then 40 epochs spaced evenly in log(epoch) from 11 to ``epochs``,
    rounded to the nearest integer (duplicates merged). For 350 epochs this is the authors'
    list of 50 epochs (1-14, 16, 17, 19, ..., 293, 320, 350); for shorter runs the same
    construction gives fewer, for runs of at most 11 epochs every epoch. Any other length
    (ImageNet's 300 epochs) is an extrapolation of the notebook's 350-epoch list: no list
    was published for it.
    """
    if epochs <= PAPYAN_EVERY + 1:
        return list(range(1, epochs + 1))
    start, stop = PAPYAN_EVERY + 1, epochs
    logs = [math.log(start) + i * (math.log(stop) - math.log(start)) / (PAPYAN_LOG - 1)
            for i in range(PAPYAN_LOG)]
    chosen = set(range(1, PAPYAN_EVERY + 1)) | {round(math.exp(v)) for v in logs}
    return sorted(e for e in chosen if 1 <= e <= epochs)


def _nearest_unused(target: float, chosen: set[int], epochs: int) -> int:
    """The epoch in [1, epochs] nearest ``target`` not in ``chosen``; ties go to the earlier."""
    below = math.floor(target)
    above = below + 1
    while below in chosen:
        below -= 1
    while above in chosen:
        above += 1
    # len(chosen) < epochs, so at least one side is still inside [1, epochs]
    options = [e for e in (below, above) if 1 <= e <= epochs]
    return min(options, key=lambda e: (abs(e - target), e))


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {rule}, got {_show(value)}")


def validate(cfg: Config) -> None:
    """Check every value of ``cfg``; raises ConfigError naming the dotted key at fault.

    Data set and architecture names are checked where their lists live (data.py, models.py).
    """
    # a Config built in code has not been through the loader's type checks
    cfg = typed_yaml.build(Config, config_to_dict(cfg))
    _check(bool(cfg.name.strip()), "name", "a non-empty string", cfg.name)
    # the name is the default run folder (runs/NAME): a path in it would write elsewhere
    _check(_SAFE_NAME.fullmatch(cfg.name) is not None and cfg.name not in (".", ".."), "name",
           "a plain folder name (letters, digits, . _ - +, no / or \\)", cfg.name)
    # torch and NumPy generators take seeds of 64 bits; the epoch generator adds to it
    _check(0 <= cfg.seed <= MAX_SEED, "seed", f"in [0, {MAX_SEED}]", cfg.seed)
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_train(cfg.train)
    _validate_snapshot(cfg.snapshot)
    snapshot_epochs(cfg.snapshot.epochs, cfg.train.epochs)


def _validate_data(data: DataConfig) -> None:
    spc = data.samples_per_class
    _check(spc is None or (min(spc, default=0) if isinstance(spc, list) else spc) >= 1,
           "data.samples_per_class", ">= 1, a non-empty list of counts >= 1, or null", spc)
    tspc = data.test_samples_per_class
    _check(tspc is None or tspc >= 1, "data.test_samples_per_class", ">= 1 or null", tspc)
    _check(data.pad_to is None or data.pad_to >= 1, "data.pad_to", ">= 1 or null", data.pad_to)
    _check(data.normalize in NORMALIZE, "data.normalize", f"one of {', '.join(NORMALIZE)}",
           data.normalize)
    # NC metrics compare class means against a simplex of C >= 2 vertices
    _check(data.num_classes >= 2, "data.num_classes", ">= 2", data.num_classes)
    for name in ("train_per_class", "test_per_class", "channels", "image_size"):
        value = getattr(data, name)
        _check(value >= 1, f"data.{name}", ">= 1", value)


def _validate_model(model: ModelConfig) -> None:
    for name in ("width", "depth", "growth_rate"):
        value = getattr(model, name)
        _check(value >= 1, f"model.{name}", ">= 1", value)
    _check(model.stem in STEMS, "model.stem", f"one of {', '.join(STEMS)}", model.stem)
    scale = model.classifier_init_scale
    _check(scale is None or (math.isfinite(scale) and scale >= 0), "model.classifier_init_scale",
           ">= 0 or null", scale)


def _validate_train(train: TrainConfig) -> None:
    _check(train.epochs >= 1, "train.epochs", ">= 1", train.epochs)
    _check(train.epochs <= MAX_EPOCHS, "train.epochs", f"<= {MAX_EPOCHS}", train.epochs)
    _check(train.batch_size >= 1, "train.batch_size", ">= 1", train.batch_size)
    _check(train.loss in LOSSES, "train.loss", f"one of {', '.join(LOSSES)}", train.loss)
    _check(math.isfinite(train.lr) and train.lr > 0, "train.lr", "> 0", train.lr)
    _check(0 <= train.momentum < 1, "train.momentum", "in [0, 1)", train.momentum)
    wd = train.weight_decay
    _check(math.isfinite(wd) and wd >= 0, "train.weight_decay", ">= 0", wd)
    schedule = train.schedule
    _check(schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES)}", schedule)
    _validate_milestones(train.milestones, train.epochs)
    _check(math.isfinite(train.gamma) and train.gamma > 0, "train.gamma", "> 0", train.gamma)
    _check(0 < train.tpt_accuracy <= 1, "train.tpt_accuracy", "in (0, 1]", train.tpt_accuracy)
    _check(train.eval_every >= 0, "train.eval_every", ">= 0", train.eval_every)
    lg = train.loggers
    _check(set(lg) <= set(LOGGERS) and len(set(lg)) == len(lg), "train.loggers",
           f"a list of distinct names from {', '.join(LOGGERS)}", lg)
    _check(bool(DEVICE_PATTERN.match(train.device)), "train.device", "auto, cpu, cuda or cuda:N",
           train.device)


def _validate_milestones(ms: list, epochs: int) -> None:
    values = [milestone_value(m) for m in ms]
    fractions = all(v is not None and 0 < v < 1 for v in values)
    # "p/q" is a fraction of the run: "3/3" is not an epoch
    whole = all(v is not None and not isinstance(m, str) and v >= 1 and v.denominator == 1
                and v < epochs for m, v in zip(ms, values, strict=True))
    _check(fractions or whole, "train.milestones",
           "fractions of the run in (0, 1) (1/3 or 0.5), or whole epochs in "
           "[1, train.epochs)", ms)
    known = [v for v in values if v is not None]  # all of them, checked above
    _check(all(a < b for a, b in itertools.pairwise(known)), "train.milestones", "increasing",
           ms)


def _validate_snapshot(snap: SnapshotConfig) -> None:
    _check(snap.dtype in SNAPSHOT_DTYPES, "snapshot.dtype", f"one of {', '.join(SNAPSHOT_DTYPES)}",
           snap.dtype)
    splits = snap.splits
    _check(bool(splits) and set(splits) <= set(SPLITS) and len(set(splits)) == len(splits),
           "snapshot.splits", "a non-empty list of distinct names from train, test", splits)
    layers = snap.layers
    _check(layers == "blocks" or (isinstance(layers, list) and len(set(layers)) == len(layers)
                                  and all(name.strip() for name in layers)),
           "snapshot.layers", "'blocks' or a list of distinct module names", layers)

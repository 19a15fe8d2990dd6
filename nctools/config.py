"""Typed run configuration: one dataclass per YAML section.

Usage::

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=3"])
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from nctools.errors import ConfigError


@dataclass
class DataConfig:
    """Which data set to train and measure on."""

    dataset: str = "mnist5k"  # mnist5k | synthetic | mnist | fashionmnist | kmnist | cifar10 | ...
    root: str = "~/.cache/nctools/data"  # where torchvision data sets live
    download: bool = False  # let torchvision download missing files (needs internet)
    samples_per_class: int | None = None  # balanced training subset; None keeps all
    test_samples_per_class: int | None = None  # balanced test subset; None keeps all
    augment: bool = False  # random crop + flip on the training split (the paper uses none)
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
    milestones: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])  # fractions of epochs
    gamma: float = 0.1  # multistep: factor at each milestone
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # CUDA only: bf16 autocast
    channels_last: bool = False  # channels_last memory format (faster on GPUs and CPUs)
    eval_every: int = 1  # test pass every K epochs (and at snapshots and the last); 0: only there


@dataclass
class SnapshotConfig:
    """When to save features and classifier, and in which precision."""

    epochs: str | list[int] = "log:30"  # all | log:K | [1, 2, 5, ...]
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    dtype: str = "float32"  # float32 | float16


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
# Loading: YAML -> dataclasses, with errors that name the file and the dotted key.

_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
LOSSES = ("ce", "mse")
SCHEDULES = ("multistep", "cosine", "constant")
SNAPSHOT_DTYPES = ("float32", "float16")
SPLITS = ("train", "test")


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_type(value: Any) -> str:
    """The YAML name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """``int | None`` -> ``'int or null'``; ``list[float]`` -> ``'list of float'``."""
    if tp is type(None):
        return "null"
    if get_origin(tp) in (Union, UnionType):
        return " or ".join(_describe(arg) for arg in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_describe(get_args(tp)[0])}"
    return tp.__name__


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError; only int -> float converts."""
    if get_origin(tp) in (Union, UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if get_origin(tp) is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(item, get_args(tp)[0]) for item in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        # bool is a subclass of int in Python, but `epochs: true` is a mistake
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads `5e-4` without a dot as a string; it is meant as a number
        if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError(f"unsupported annotation {tp!r}")  # pragma: no cover - a coding error


def _all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, sections included: ``['name', ..., 'train.lr', ...]``."""
    cls = Config if cls is None else cls
    keys = []
    for name, tp in get_type_hints(cls).items():
        keys.append(prefix + name)
        if is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return keys


def _at(source: str, key: str) -> str:
    """``'cfg.yaml: train.lr'``, or just the key when there is no file to name."""
    return f"{source}: {key}" if source else key


def _unknown_key(source: str, key: str, valid: Sequence[str]) -> ConfigError:
    # a key known in another section (`seed` under train), else a near miss among its
    # siblings (`train.epoch`); whole dotted keys would match on the section name alone
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == leaf]
    close = [f"{section}.{m}" if section else m
             for m in difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)]
    hint = (f" (did you mean '{(same_leaf or close)[0]}'?)" if same_leaf or close
            else f"; valid keys here: {', '.join(valid)}")
    return ConfigError(f"{_at(source, key)}: unknown key{hint}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Map a (nested) mapping onto dataclass ``cls``, checking keys and types."""
    if data is None:  # `model:` with nothing under it keeps the defaults
        data = {}
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_at(source, where)}: expected a mapping, got {_yaml_type(data)} {_show(data)}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(source, key, [f.name for f in fields(cls)])
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", source)
            continue
        try:
            kwargs[name] = _coerce(value, tp)
        except TypeError:
            raise ConfigError(
                f"{_at(source, key)}: expected {_describe(tp)}, "
                f"got {_yaml_type(value)} {_show(value)}"
            ) from None
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a nested mapping; ``source`` names it in errors."""
    return _build(Config, data, "", source)


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested dict of plain YAML types (the inverse of config_from_dict)."""
    return asdict(cfg)


def _field_type(key: str) -> Any:
    """The annotation of dotted ``key``, or None when no such field exists."""
    cls: Any = Config
    tp: Any = None
    for part in key.split("."):
        if not is_dataclass(cls):
            return None
        tp = get_type_hints(cls).get(part)
        if tp is None:
            return None
        cls = tp
    return tp


def _apply_override(data: dict, item: str) -> str:
    """Set one ``key=value`` on the nested dict ``data``; returns the source label."""
    source = f"--set {item}"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {key}: cannot parse value {raw!r} ({exc})") from None
    # `--set name=2024` or `--set train.device=cuda:` mean text, whatever YAML makes of them
    if _field_type(key) is str and not isinstance(value, str):
        value = raw.strip()
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key}: unknown key ({'.'.join(parts[:depth])} "
                              "is a value, not a section)")
        if part not in node:
            raise _unknown_key(source, ".".join(parts[: depth + 1]), list(node))
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    if isinstance(node.get(leaf), dict) and isinstance(value, dict):
        node[leaf].update(value)  # `train={epochs: 3}` changes one key, keeps the rest
    else:
        node[leaf] = value
    return source


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate and return it.

    Overrides use dotted keys and YAML values: ``train.epochs=3``, ``snapshot.epochs=all``,
    ``snapshot.epochs=[1,5,10]``, ``data.samples_per_class=null``.
    Raises ConfigError naming the file (or the override) and the dotted key at fault.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{line} YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"{_yaml_type(data)} {_show(data)}"
        raise ConfigError(
            f"{path}: top level must be a mapping with keys "
            f"{', '.join(f.name for f in fields(Config))}; got {got}"
        )
    cfg = config_from_dict(data, str(path))
    if overrides:
        if isinstance(overrides, str):  # a lone string would be split into characters
            overrides = [overrides]
        merged = config_to_dict(cfg)
        for item in overrides:
            source = _apply_override(merged, item)
            cfg = config_from_dict(merged, source)  # type errors name the override at fault
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (section order kept) atomically; load_config reads it back equal."""
    from nctools.store import atomic_write_text  # store imports torch; keep config light

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def diff_configs(a: Config, b: Config, ignore: Sequence[str] = ()) -> list[str]:
    """Lines ``"train.lr: 0.05 -> 0.1"`` for every dotted key where ``a`` and ``b`` differ.

    ``ignore`` lists dotted keys (or whole sections, e.g. ``"train"``) left out of the
    comparison, for settings that may change on resume such as ``train.device``.
    """
    flat_a, flat_b = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    lines = []
    for key in flat_a:
        if any(key == skip or key.startswith(skip + ".") for skip in ignore):
            continue
        if flat_a[key] != flat_b[key]:
            lines.append(f"{key}: {_format_value(flat_a[key])} -> {_format_value(flat_b[key])}")
    return lines


# ---------------------------------------------------------------------------------------
# Validation: value checks, each error naming its dotted key.


def snapshot_schedule(spec: str | list[int], epochs: int) -> list[int]:
    """The epochs (sorted, unique, in [1, epochs]) at which a run saves a snapshot.

    ``"all"`` -> 1..epochs. ``"log:K"`` -> K epochs spaced evenly in log(epoch), always
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
        raise ConfigError(f"{key}: expected 'all', 'log:K' or a list of ints, got {_show(spec)}")
    text = spec.strip()
    if text == "all":
        return list(range(1, epochs + 1))
    match = re.fullmatch(r"log:(\d+)", text)
    if match is None:
        raise ConfigError(f"{key}: expected 'all', 'log:K' or a list of ints, got {_show(spec)}")
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
    cfg = _build(Config, config_to_dict(cfg), "", "")
    data, model, train, snap = cfg.data, cfg.model, cfg.train, cfg.snapshot
    _check(bool(cfg.name.strip()), "name", "a non-empty string", cfg.name)
    _check(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
    spc = data.samples_per_class
    _check(spc is None or spc >= 1, "data.samples_per_class", ">= 1 or null", spc)
    tspc = data.test_samples_per_class
    _check(tspc is None or tspc >= 1, "data.test_samples_per_class", ">= 1 or null", tspc)
    # NC metrics compare class means against a simplex of C >= 2 vertices
    _check(data.num_classes >= 2, "data.num_classes", ">= 2", data.num_classes)
    for name in ("train_per_class", "test_per_class", "channels", "image_size"):
        value = getattr(data, name)
        _check(value >= 1, f"data.{name}", ">= 1", value)
    for name in ("width", "depth", "growth_rate"):
        value = getattr(model, name)
        _check(value >= 1, f"model.{name}", ">= 1", value)
    _check(train.epochs >= 1, "train.epochs", ">= 1", train.epochs)
    _check(train.batch_size >= 1, "train.batch_size", ">= 1", train.batch_size)
    _check(train.loss in LOSSES, "train.loss", f"one of {', '.join(LOSSES)}", train.loss)
    _check(math.isfinite(train.lr) and train.lr > 0, "train.lr", "> 0", train.lr)
    _check(0 <= train.momentum < 1, "train.momentum", "in [0, 1)", train.momentum)
    wd = train.weight_decay
    _check(math.isfinite(wd) and wd >= 0, "train.weight_decay", ">= 0", wd)
    schedule = train.schedule
    _check(schedule in SCHEDULES, "train.schedule", f"one of {', '.join(SCHEDULES)}", schedule)
    ms = train.milestones
    _check(all(0 < m < 1 for m in ms), "train.milestones", "fractions in (0, 1)", ms)
    _check(all(a < b for a, b in itertools.pairwise(ms)), "train.milestones", "increasing", ms)
    _check(math.isfinite(train.gamma) and train.gamma > 0, "train.gamma", "> 0", train.gamma)
    _check(train.eval_every >= 0, "train.eval_every", ">= 0", train.eval_every)
    _check(bool(_DEVICE.match(train.device)), "train.device", "auto, cpu, cuda or cuda:N",
           train.device)
    _check(snap.dtype in SNAPSHOT_DTYPES, "snapshot.dtype", f"one of {', '.join(SNAPSHOT_DTYPES)}",
           snap.dtype)
    splits = snap.splits
    _check(bool(splits) and set(splits) <= set(SPLITS) and len(set(splits)) == len(splits),
           "snapshot.splits", "a non-empty list of distinct names from train, test", splits)
    snapshot_schedule(snap.epochs, train.epochs)

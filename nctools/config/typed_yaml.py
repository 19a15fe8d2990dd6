"""YAML -> typed dataclasses, with errors that name the file and the dotted key.

Usage::

    data = read_mapping(Path("cfg.yaml"), Config)       # strict YAML: no key given twice
    cfg = build(Config, data, source="cfg.yaml")        # ConfigError: "cfg.yaml: train.lr: ..."
    apply_override(Config, data, "train.epochs=3")      # one --set KEY=VALUE

The machinery behind `nctools.config.schema`, independent of its sections: a dataclass field
annotated ``int``, ``float``, ``bool``, ``str``, ``list[...]``, ``X | None`` or another
dataclass takes exactly that from YAML (only int -> float converts), an unknown key gets a
"did you mean" hint, and values print back as YAML writes them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, cast, get_args, get_origin, get_type_hints

import yaml

from nctools.errors import ConfigError

_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


MAX_ALIASES = 100  # a config needs few; nested aliases ("billion laughs") grow exponentially


class AliasBudgetError(yaml.YAMLError):
    """More than :data:`MAX_ALIASES` aliases in one YAML document."""

    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(f"more than {MAX_ALIASES} YAML aliases (*name)")
        self.problem_mark = mark


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice (PyYAML silently keeps the last) and
    more than :data:`MAX_ALIASES` aliases: aliases of aliases expand exponentially in
    everything that walks the values (type checks, error messages), hundreds of MB for a
    file of a few lines."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise AliasBudgetError(self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_type(value: Any) -> str:
    """The YAML name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def show(value: Any) -> str:
    """A value's repr, cut to 60 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(tp: Any) -> str:
    """``int | None`` -> ``'int or null'``; ``list[float]`` -> ``'list of float'``."""
    if tp is type(None):
        return "null"
    if get_origin(tp) in (Union, UnionType):
        return " or ".join(describe(arg) for arg in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {describe(get_args(tp)[0])}"
    return tp.__name__


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError; only int -> float converts."""
    if get_origin(tp) in (Union, UnionType):
        for arg in get_args(tp):
            try:
                return coerce(value, arg)
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
        return [coerce(item, get_args(tp)[0]) for item in value]
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


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, sections included: ``['name', 'train.lr', ...]``."""
    keys = []
    for name, tp in get_type_hints(cls).items():
        keys.append(prefix + name)
        if is_dataclass(tp):
            keys.extend(all_keys(cast(type, tp), f"{prefix}{name}."))
    return keys


def at(source: str, key: str) -> str:
    """``'cfg.yaml: train.lr'``, or just the key when there is no file to name."""
    return f"{source}: {key}" if source else key


def unknown_key(root: type, source: str, key: str, valid: Sequence[str]) -> ConfigError:
    """ConfigError for ``key``, unknown in the config of dataclass ``root``, with a hint."""
    # a key known in another section (`seed` under train), else a near miss among its
    # siblings (`train.epoch`); whole dotted keys would match on the section name alone
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in all_keys(root) if k.rsplit(".", 1)[-1] == leaf]
    close = [f"{section}.{m}" if section else m
             for m in difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)]
    hint = (f" (did you mean '{(same_leaf or close)[0]}'?)" if same_leaf or close
            else f"; valid keys here: {', '.join(valid)}")
    return ConfigError(f"{at(source, key)}: unknown key{hint}")


def build(
    cls: type, data: Any, prefix: str = "", source: str = "", root: type | None = None
) -> Any:
    """Map a (nested) mapping onto dataclass ``cls``, checking keys and types; errors name
    ``source`` and the dotted key (``root``: the top-level dataclass, for hints)."""
    root = cls if root is None else root
    if data is None:  # `model:` with nothing under it keeps the defaults
        data = {}
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{at(source, where)}: expected a mapping, got {yaml_type(data)} {show(data)}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise unknown_key(root, source, key, [f.name for f in fields(cls)])
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = build(cast(type, tp), value, key + ".", source, root)
            continue
        try:
            kwargs[name] = coerce(value, tp)
        except TypeError:
            raise ConfigError(
                f"{at(source, key)}: expected {describe(tp)}, "
                f"got {yaml_type(value)} {show(value)}"
            ) from None
    return cls(**kwargs)


def field_type(root: type, key: str) -> Any:
    """The annotation of dotted ``key`` in dataclass ``root``, or None when there is none."""
    cls: Any = root
    tp: Any = None
    for part in key.split("."):
        if not is_dataclass(cls):
            return None
        tp = get_type_hints(cls).get(part)
        if tp is None:
            return None
        cls = tp
    return tp


def apply_override(root: type, data: dict, item: str) -> str:
    """Set one ``key=value`` on the nested dict ``data`` (the fields of dataclass ``root``);
    returns the source label."""
    source = f"--set {item}"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = yaml.load(raw, Loader=StrictLoader)  # safe: a SafeLoader subclass
    except AliasBudgetError as exc:
        raise ConfigError(f"{source}: {key}: {exc}; refused (nested aliases can take "
                          "gigabytes of memory)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {key}: cannot parse value {raw!r} ({exc})") from None
    # `--set name=2024` or `--set train.device=cuda:` mean text, whatever YAML makes of them
    if field_type(root, key) is str and not isinstance(value, str):
        value = raw.strip()
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key}: unknown key ({'.'.join(parts[:depth])} "
                              "is a value, not a section)")
        if part not in node:
            raise unknown_key(root, source, ".".join(parts[: depth + 1]), list(node))
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    if isinstance(node.get(leaf), dict) and isinstance(value, dict):
        node[leaf].update(value)  # `train={epochs: 3}` changes one key, keeps the rest
    else:
        node[leaf] = value
    return source


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{'train': {'lr': 0.1}}`` -> ``{'train.lr': 0.1}``."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def format_value(value: Any) -> str:
    """A value as YAML writes it inline: ``null``, ``true``, ``[1, 2]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def read_mapping(path: Path, root: type) -> dict:
    """The top-level mapping of YAML file ``path`` (read strictly: no key twice);
    ConfigError naming the file, the line of a syntax error, or what the top level was."""
    try:
        # a FIFO or a device would block or never end: only a regular file is read
        if path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ConfigError(f"{path}: cannot read config file ({kind})")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text (byte {exc.start}: "
                          f"{exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # safe: a SafeLoader subclass
    except AliasBudgetError as exc:
        raise ConfigError(f"{path}: line {exc.problem_mark.line + 1}: {exc}; refused "
                          "(nested aliases can take gigabytes of memory)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{line} YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"{yaml_type(data)} {show(data)}"
        raise ConfigError(
            f"{path}: top level must be a mapping with keys "
            f"{', '.join(f.name for f in fields(root))}; got {got}"
        )
    return data

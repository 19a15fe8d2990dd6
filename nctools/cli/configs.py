"""``nctools configs [show NAME]``: the configs shipped with nctools, and one of them in full."""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

from nctools.cli.common import add_command
from nctools.config.schema import packaged_configs
from nctools.errors import ConfigError


def add_parser(sub) -> None:
    p = add_command(sub, "configs", "list the configs shipped with nctools, or show one",
                    "nctools configs", "nctools configs show papyan2020/cifar10-resnet18")
    p.add_argument("action", nargs="?", metavar="show", help="print the config NAME")
    p.add_argument("name", nargs="?", metavar="NAME", help="a config of the list, e.g. demo")


def run(args: argparse.Namespace) -> int:
    if args.action not in (None, "show"):
        raise ConfigError(f"configs {args.action}: did you mean `nctools configs show "
                          f"{args.action}`?")
    if args.action is None:
        names = packaged_configs()
        width = max(len(name) for name in names)
        for name in names:
            print(f"{name:<{width}}  {description(config_file(name))}")
        return 0
    if args.name is None:
        raise ConfigError("configs show: give a NAME (`nctools configs` lists them)")
    print(config_file(args.name).read_text(), end="")
    return 0


def config_file(name: str) -> Path:
    """The YAML file of the shipped config ``name`` (``.yaml`` optional), or ConfigError."""
    name = name.removesuffix(".yaml")
    if name not in packaged_configs():
        raise ConfigError(f"configs show {name}: no such config; shipped configs: "
                          f"{', '.join(packaged_configs())}")
    return Path(str(files("nctools.configs"))) / f"{name}.yaml"


def description(path: Path) -> str:
    """A config's one-line description: the first line of its header comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().rstrip(",.:;")
        if line.strip():
            break
    return ""

"""`nctools configs`: every shipped config listed with its description, one shown in full."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from nctools.cli import main
from nctools.config.schema import packaged_configs


def shipped(name: str) -> Path:
    return Path(str(files("nctools.configs"))) / f"{name}.yaml"


def test_the_list_names_every_config_with_its_first_comment_line(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == packaged_configs() and len(names) == 24
    assert {"demo", "minority-collapse", "papyan2020/cifar10-resnet18"} <= set(names)
    width = max(len(name) for name in names)
    by_name = dict(zip(names, lines, strict=True))
    assert by_name["papyan2020/cifar10-resnet18"] == (
        f"{'papyan2020/cifar10-resnet18':<{width}}  "
        "Papyan, Han & Donoho (PNAS 2020) grid: CIFAR10 x ResNet18")
    assert by_name["minority-collapse"].split(None, 1)[1].startswith("Minority collapse")
    assert by_name["papyan-protocol"].split(None, 1)[1].startswith(
        "The protocol of Papyan, Han & Donoho (PNAS 2020) on a CPU")


@pytest.mark.parametrize("name", ["demo", "papyan2020/mnist-vgg11", "demo.yaml"])
def test_show_prints_the_file_that_load_config_reads(capsys, name):
    assert main(["configs", "show", name]) == 0
    text = capsys.readouterr().out
    assert text == shipped(name.removesuffix(".yaml")).read_text()


@pytest.mark.parametrize("argv, message", [
    (["configs", "show", "nope"], "configs show nope: no such config; shipped configs: demo, "
                                  "minority-collapse, papyan-protocol, "
                                  "papyan2020/cifar10-densenet40, "),
    (["configs", "show"], "configs show: give a NAME (`nctools configs` lists them)"),
    (["configs", "demo"], "configs demo: did you mean `nctools configs show demo`?"),
])  # fmt: skip
def test_a_wrong_name_is_one_line_with_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nctools: error: {message}") and err.count("\n") == 1, err

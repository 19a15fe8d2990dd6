"""Every shipped config loads and validates; the paper's grid keeps the paper's protocol.

The grid (configs/papyan2020/) follows Papyan, Han & Donoho (PNAS 2020) as
docs/paper-settings.md tabulates it, with a source for every setting; the tests read that
table and check every config file against it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nctools.config.schema import load_config, snapshot_epochs
from nctools.data.splits import DATASETS
from nctools.models.networks import ARCHS
from nctools.training.steps import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
GRID = sorted((ROOT / "configs" / "papyan2020").glob("*.yaml"))
PAPER_SETS = {"mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet"}
FAMILIES = ("vgg", "resnet", "densenet")


def family(arch: str) -> str:
    return next(f for f in FAMILIES if arch.startswith(f))


def test_configs_are_found():
    assert len(GRID) >= 3 * len(PAPER_SETS)
    assert ROOT / "configs" / "demo.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads_and_names_known_parts(path):
    cfg = load_config(path)  # validation included
    # load_config leaves data set and network names to data.py and models.py
    assert cfg.data.dataset in DATASETS
    assert cfg.model.arch in ARCHS
    if cfg.model.arch == "densenet":  # DenseNet-BC with three blocks: depth = 6n + 4
        assert cfg.model.depth >= 10 and (cfg.model.depth - 4) % 6 == 0


def _tables() -> tuple[list[dict], dict[str, float]]:
    """docs/paper-settings.md: the common settings (rows with a config key) and the
    learning rate of every cell."""
    settings, lrs = [], {}
    for line in (ROOT / "docs" / "paper-settings.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and "." in cells[1] and cells[1] != "key":
            settings.append(dict(zip(("setting", "key", "value", "imagenet", "source"), cells,
                                     strict=True)))
        elif len(cells) == 3 and cells[0] not in ("cell", "---"):
            lrs[cells[0]] = float(cells[1])
    return settings, lrs


def _value(text: str):
    """A table cell as the config value: YAML, with 5e-4 a float (YAML 1.1 reads a str)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


SETTINGS, LRS = _tables()
LR_GRID = np.logspace(np.log10(1e-4), np.log10(0.25), 25)
PAPYAN_350 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20, 22, 24, 27, 29,
              32, 35, 38, 42, 45, 50, 54, 59, 65, 71, 77, 85, 92, 101, 110, 121, 132, 144, 158,
              172, 188, 206, 225, 245, 268, 293, 320, 350]  # the authors' notebook


def test_the_table_of_sources_covers_every_setting_and_cell():
    assert {row["key"] for row in SETTINGS} >= {
        "train.epochs", "train.batch_size", "train.momentum", "train.weight_decay",
        "train.loss", "train.schedule", "train.gamma", "train.milestones",
        "train.tpt_accuracy", "snapshot.epochs", "data.augment", "data.pad_to"}
    assert all(row["source"] for row in SETTINGS)
    assert set(LRS) == {p.stem for p in GRID}
    # the published picks, and every learning rate a point of the paper's grid
    assert (LRS["mnist-resnet18"], LRS["cifar10-resnet18"], LRS["cifar100-resnet50"]) == (
        0.0679, 0.13025, 0.18045)
    for cell, lr in LRS.items():
        assert np.min(np.abs(LR_GRID / lr - 1)) < 1e-3, cell


@pytest.mark.parametrize("path", GRID, ids=lambda p: p.stem)
def test_grid_configs_match_the_table_of_sources(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert path.stem.startswith(cfg.data.dataset + "-")
    flat = {f"{section}.{k}": v for section in ("data", "train", "snapshot")
            for k, v in vars(getattr(cfg, section)).items()}
    column = "imagenet" if cfg.data.dataset == "imagenet" else "value"
    mnist_family = cfg.data.dataset in ("mnist", "fashionmnist")
    for row in SETTINGS:
        expected = row[column]
        if row["key"] == "data.pad_to":
            assert flat["data.pad_to"] == (32 if mnist_family else None), row
            continue
        assert flat[row["key"]] == _value(expected), (row["key"], flat[row["key"]])
    assert cfg.train.lr == LRS[path.stem]
    assert "default until swept" in path.read_text() or path.stem in (
        "mnist-resnet18", "cifar10-resnet18", "cifar100-resnet50")
    assert cfg.train.device == "auto"
    assert cfg.data.samples_per_class is not None and cfg.data.samples_per_class <= 5000
    assert not cfg.data.download


@pytest.mark.parametrize("name", ["mnist-resnet18", "imagenet-resnet50"])
def test_grid_lr_drops_tenfold_after_a_third_and_two_thirds(name):
    """After epochs 116 and 233 of 350 (350 // 3, 2 * 350 // 3), 100 and 200 of 300."""
    cfg = load_config(ROOT / "configs" / "papyan2020" / f"{name}.yaml")
    optimizer = build_optimizer(torch.nn.Linear(1, 1), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    lrs = []  # lrs[e - 1]: the lr epoch e trains with
    for _ in range(cfg.train.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr, epochs = cfg.train.lr, cfg.train.epochs
    first, second = epochs // 3, 2 * epochs // 3
    assert lrs[first - 1] == pytest.approx(lr) and lrs[first] == pytest.approx(lr / 10)
    assert lrs[second - 1] == pytest.approx(lr / 10) and lrs[second] == pytest.approx(lr / 100)
    assert lrs[-1] == pytest.approx(lr / 100)


def test_snapshot_epochs_papyan():
    assert snapshot_epochs("papyan", 350) == PAPYAN_350
    # the construction: every epoch to 10, then 40 log-spaced from 11 to the last, rounded
    for epochs in (300, 100, 1000):
        want = sorted(set(range(1, 11)) | set(np.round(np.geomspace(11, epochs, 40)).astype(int)))
        assert snapshot_epochs("papyan", epochs) == want, epochs
    assert snapshot_epochs("papyan", 7) == list(range(1, 8))
    assert snapshot_epochs(" papyan", 20) == list(range(1, 21))


def test_grid_has_a_vgg_a_resnet_and_a_densenet_per_data_set():
    seen: dict[str, set[str]] = {}
    for path in GRID:
        cfg = load_config(path)
        seen.setdefault(cfg.data.dataset, set()).add(family(cfg.model.arch))
    assert set(seen) == PAPER_SETS
    for dataset, families in seen.items():
        assert families == set(FAMILIES), dataset


def test_every_repository_config_is_shipped_and_loads_by_name(tmp_path, monkeypatch):
    """From any folder: `papyan2020/NAME` (with or without .yaml) is the shipped file."""
    from nctools.config.schema import packaged_configs

    names = {str(p.relative_to(ROOT / "configs").with_suffix("")) for p in CONFIGS}
    assert set(packaged_configs()) == names
    monkeypatch.chdir(tmp_path)
    assert load_config("papyan2020/mnist-resnet18") == load_config(
        ROOT / "configs" / "papyan2020" / "mnist-resnet18.yaml"
    )


def test_demo_config_is_mnist5k_convnet_and_one_file():
    packaged = Path(str(files("nctools.configs") / "demo.yaml"))
    repo = ROOT / "configs" / "demo.yaml"
    assert not repo.is_symlink() and repo.resolve() == packaged.resolve()
    cfg = load_config(packaged)
    assert load_config("demo") == cfg == load_config("demo.yaml")
    assert (cfg.data.dataset, cfg.model.arch) == ("mnist5k", "convnet")
    assert cfg.snapshot.epochs.startswith("log:")


def test_docs_and_imagenet_configs_state_imagenet_schedule_as_configured():
    """The paper page's ImageNet sentence names the drops the configs make (100 and 200 of
    300), and each ImageNet config says its snapshot list extrapolates the notebook's."""
    readme = " ".join((ROOT / "docs" / "reproducing.md").read_text().split())
    sentence = readme[readme.index("ImageNet trains"):].split(";")[0]  # up to its snapshots
    cfg = load_config(ROOT / "configs" / "papyan2020" / "imagenet-resnet50.yaml")
    from nctools.config.schema import milestone_epochs

    drops = milestone_epochs(cfg.train.milestones, cfg.train.epochs)
    assert drops == [100, 200]
    assert sentence.endswith(f"after epochs {drops[0]} and {drops[1]}"), sentence
    for path in GRID:
        if path.stem.startswith("imagenet-"):
            text = path.read_text()
            comment = text[: text.index("epochs: papyan")].rsplit("snapshot:", 1)[1]
            assert "an extrapolation" in comment and "350-epoch run" in comment, path


def test_the_cpu_protocol_config_is_the_papers_protocol_but_for_data_and_network():
    """configs/papyan-protocol.yaml (results/papyan-protocol/) keeps every training and
    measurement setting of a paper cell (MNIST-ResNet18); only the data size, the network
    and its width, the learning rate (swept) and evaluation cadence differ."""
    cpu = yaml.safe_load((ROOT / "configs" / "papyan-protocol.yaml").read_text())
    paper = yaml.safe_load((ROOT / "configs" / "papyan2020" / "mnist-resnet18.yaml").read_text())
    swept_or_cpu = {"lr", "eval_every", "channels_last"}
    for key, value in paper["train"].items():
        if key not in swept_or_cpu:
            assert cpu["train"][key] == value, key
    assert cpu["snapshot"] == paper["snapshot"]
    resolved = load_config(ROOT / "configs" / "papyan-protocol.yaml")
    assert resolved.data.augment is False and resolved.data.samples_per_class == 100
    assert snapshot_epochs(resolved.snapshot.epochs, resolved.train.epochs) == PAPYAN_350

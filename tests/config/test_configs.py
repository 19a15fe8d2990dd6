"""Every shipped config loads and validates; the paper's grid keeps the paper's protocol.

The grid (configs/papyan2020/) follows Papyan, Han & Donoho (PNAS 2020): 350 epochs,
batch 128, SGD momentum 0.9, weight decay 5e-4, lr / 10 at 1/3 and 2/3 of training,
snapshots log-spaced, and a VGG, a ResNet and a DenseNet for every data set.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
import torch

from nctools.config.schema import load_config, snapshot_schedule
from nctools.data.splits import DATASETS
from nctools.models.networks import ARCHS
from nctools.training.loop import build_optimizer, build_scheduler

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


@pytest.mark.parametrize("path", GRID, ids=lambda p: p.stem)
def test_grid_keeps_the_paper_protocol(path):
    cfg = load_config(path)
    tc = cfg.train
    assert cfg.name == path.stem
    assert path.stem.startswith(cfg.data.dataset + "-")
    assert (tc.epochs, tc.batch_size, tc.loss) == (350, 128, "ce")
    assert (tc.momentum, tc.weight_decay) == (0.9, 5e-4)
    assert tc.schedule == "multistep" and tc.gamma == 0.1
    assert tc.milestones == pytest.approx([1 / 3, 2 / 3])
    assert 1e-4 <= tc.lr <= 0.25  # inside the paper's sweep
    assert tc.device == "auto"
    assert cfg.snapshot.epochs == "log:50"
    assert len(snapshot_schedule(cfg.snapshot.epochs, tc.epochs)) == 50
    assert cfg.data.samples_per_class is not None and cfg.data.samples_per_class <= 5000
    assert not cfg.data.augment and not cfg.data.download


def test_grid_lr_drops_tenfold_at_117_and_233():
    cfg = load_config(GRID[0])
    optimizer = build_optimizer(torch.nn.Linear(1, 1), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    lrs = []  # lrs[e - 1]: the lr epoch e trains with
    for _ in range(cfg.train.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr = cfg.train.lr
    assert lrs[116] == pytest.approx(lr) and lrs[117] == pytest.approx(lr / 10)
    assert lrs[232] == pytest.approx(lr / 10) and lrs[233] == pytest.approx(lr / 100)
    assert lrs[-1] == pytest.approx(lr / 100)


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

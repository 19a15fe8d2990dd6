"""The paper's networks: parameter counts against the published ones, shapes, the grid.

Papyan, Han & Donoho (PNAS 2020) train VGG, ResNet and DenseNet on seven data sets. The
published counts: Huang et al. (CVPR 2017, Table 2, CIFAR10) DenseNet-40 (k = 12) 1.0M,
DenseNet-BC-250 (k = 24) 15.3M, rounded to 0.1M, so the tolerance is half of that;
torchvision's documented counts at 1000 classes (ResNet-152 60,192,808, DenseNet-201
20,013,928, ResNet-18 11,689,512), matched exactly. Big networks are built on the meta
device: shapes and parameter counts without memory or arithmetic.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nctools.config.schema import ModelConfig, load_config
from nctools.models.networks import build_model, feature_dim

ROOT = Path(__file__).resolve().parents[2]
GRID = sorted((ROOT / "configs" / "papyan2020").glob("*.yaml"))


@functools.cache
def meta_model(arch: str, classes: int, channels: int, size: int, stem: str = "auto") -> nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(arch=arch, stem=stem), classes, channels, size)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("arch", "millions"), [("densenet40", 1.0), ("densenet250", 15.3)])
def test_densenets_have_huang_et_al_s_parameter_counts(arch, millions):
    assert params(meta_model(arch, 10, 3, 32)) == pytest.approx(millions * 1e6, abs=0.05e6)


@pytest.mark.parametrize(("arch", "count"), [("resnet152", 60_192_808),
                                             ("densenet201", 20_013_928),
                                             ("resnet18", 11_689_512)])
def test_imagenet_networks_have_torchvision_s_parameter_counts(arch, count):
    assert params(meta_model(arch, 1000, 3, 224)) == count


def test_densenet40_has_no_bottleneck_and_no_compression():
    model = build_model(ModelConfig(arch="densenet40"), 10, 3, 32)
    trunk = model.features
    convs = [m for name, m in trunk.named_modules()
             if isinstance(m, nn.Conv2d) and ".denselayer" in f".{name}"]
    # 3 blocks of (40 - 4) / 3 = 12 layers, each one 3x3 conv adding k = 12 channels
    assert len(convs) == 36
    assert all(c.kernel_size == (3, 3) and c.out_channels == 12 for c in convs)
    # the channels grow 16, 28, ..., 148 in block 1; transitions keep all of them
    assert [c.in_channels for c in convs[:12]] == list(range(16, 160, 12))
    assert trunk.transition1.conv.in_channels == trunk.transition1.conv.out_channels == 160
    assert trunk.transition2.conv.in_channels == trunk.transition2.conv.out_channels == 304
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        block_out = trunk.denseblock1(trunk.conv0(x))
    assert block_out.shape == (2, 160, 32, 32)


@pytest.mark.parametrize(("arch", "classes", "channels", "size", "dim"), [
    ("densenet40", 10, 1, 32, 448),     # MNIST padded to 32 px
    ("densenet40", 10, 3, 32, 448),     # CIFAR10, SVHN
    ("densenet250", 100, 3, 32, 1734),  # CIFAR100
    ("densenet250", 10, 1, 32, 1734),   # FashionMNIST
    ("densenet201", 10, 3, 96, 1920),   # STL10
    ("densenet201", 1000, 3, 224, 1920),
    ("resnet152", 1000, 3, 224, 2048),
])
def test_output_and_penultimate_shapes(arch, classes, channels, size, dim):
    model = meta_model(arch, classes, channels, size)
    with torch.device("meta"):
        x = torch.empty(2, channels, size, size)
        features, logits = model.features(x), model(x)
    assert feature_dim(model) == dim and features.shape == (2, dim)
    assert logits.shape == (2, classes)


def test_stl10_densenet201_keeps_the_imagenet_stem():
    """96 px is above the 32 px of the small-image stem: the 7x7 stride-2 conv and max-pool
    take 96 px to 24 before the first block, as in torchvision's DenseNet-201."""
    model = meta_model("densenet201", 10, 3, 96)
    assert model.features.conv0.kernel_size == (7, 7) and model.features.conv0.stride == (2, 2)
    assert isinstance(model.features.pool0, nn.MaxPool2d)
    # DenseNet-201 at 10 classes: torchvision's count less the 990 classifier rows of 1921
    assert params(model) == 20_013_928 - 990 * 1921


def _paper_name(path: Path) -> str:
    """The paper's network from a config's first line: '... grid: CIFAR10 x DenseNet40.'"""
    match = re.search(r" x (\w+)\.$", path.read_text().splitlines()[0])
    assert match, path
    return match.group(1)


@pytest.mark.parametrize("path", GRID, ids=lambda p: p.stem)
def test_every_grid_config_builds_the_network_the_paper_names(path):
    assert load_config(path).model.arch == _paper_name(path).lower()


@functools.cache
def _script(name: str):
    """scripts/NAME.py as a module (registered: its dataclasses need sys.modules)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_docs_table_gives_each_cell_its_network_and_parameter_count():
    """docs/paper-settings.md's network table (printed by scripts/paper_networks.py): one
    row per grid config, the paper's network and arch of the config, and for the paper's
    own networks the parameter count built here."""
    script = _script("paper_networks")
    rows = {}
    for line in (ROOT / "docs" / "paper-settings.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2] in script.BUILT:
            rows[cells[0]] = cells
    assert set(rows) == {p.stem for p in GRID}
    for path in GRID:
        cfg = load_config(path)
        assert rows[path.stem][1:3] == [_paper_name(path), cfg.model.arch], path.stem
        if cfg.model.arch in ("densenet40", "densenet250", "densenet201", "resnet152"):
            count = params(meta_model(cfg.model.arch, *script.shape(cfg)))
            assert rows[path.stem][4] == f"{count:,}", path.stem


def test_gpu_check_runs_the_shipped_paper_cell_on_cifar_shaped_data():
    gpu_check = _script("gpu_check")
    config = gpu_check.paper_cell_config(epochs=3, device="cpu")
    shipped = load_config(ROOT / "configs" / "papyan2020" / "cifar10-resnet18.yaml")
    assert (config.model, config.train.lr, config.train.batch_size, config.train.loss) == (
        shipped.model, shipped.train.lr, shipped.train.batch_size, shipped.train.loss)
    data = config.data
    assert (data.num_classes, data.channels, data.image_size) == (10, 3, 32)
    assert (data.num_classes * data.train_per_class, data.num_classes * data.test_per_class) == (
        50_000, 10_000)  # CIFAR10's splits
    assert config.train.epochs == 3 and config.snapshot.epochs == [3]


@pytest.mark.slow  # a 50,257-token vocabulary in float64: about 12 s on 2 cores
def test_gpu_check_s_tiny_gpt2_agrees_with_float64_on_the_cpu(monkeypatch):
    """The language-model case of gpu_check on the CPU (its fallback without a GPU): the
    float32 pair tiles and float32 NC4 scores on every token against float64 throughout;
    and a disagreement is caught (one line, exit)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as `python scripts/gpu_check.py`
    gpu_check = _script("gpu_check")
    assert gpu_check.lm_tokens("cpu", sequences=32, seq_len=48) > 0
    from nctools.analysis import lm_measure

    measured = lm_measure.measure_language_model

    def off(*args, **kwargs):
        result = measured(*args, **kwargs)
        if kwargs.get("pair_precision") != "float64":
            result["cdnv"] *= 1 + 1e-5
        return result

    monkeypatch.setattr(lm_measure, "measure_language_model", off)
    with pytest.raises(SystemExit, match="gpu_check: cdnv of the tiny GPT-2 differs on cpu"):
        gpu_check.lm_tokens("cpu", sequences=32, seq_len=48)

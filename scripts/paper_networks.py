"""The networks of Papyan, Han & Donoho's (PNAS 2020) grid as nctools builds them, and an
estimate of the GPU hours each cell takes.

Usage::

    python scripts/paper_networks.py             # both tables of docs/paper-settings.md
    python scripts/paper_networks.py --peak-tflops 989   # GPU hours on an H100 (bf16 dense)

For every config of ``configs/papyan2020/``: the paper's network (named on the config's
first line, ``... grid: CIFAR10 x DenseNet40.``), the arch nctools builds, its parameter
count at the cell's classes, channels and image size, and its forward FLOPs on one image
(``torch.utils.flop_counter``: 2 per multiply-add of the convolutions and matmuls; batch
norm, ReLU and pooling are not counted). Networks are built on the meta device: shapes
only, no memory and no arithmetic.

GPU hours per run, an estimate: FLOPs / (peak x utilisation), where the FLOPs are
3 x forward per training image (forward + backward, the usual 1 + 2) x training images x
epochs, plus one forward per image of every evaluation pass (the test split at each
evaluated epoch, both splits at the snapshot epochs). A sweep of the paper's 25 learning
rates costs 25 runs.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nctools.config.schema import Config, ModelConfig, load_config, snapshot_epochs
from nctools.models.networks import build_model

GRID = Path(__file__).resolve().parents[1] / "configs" / "papyan2020"
# (classes, channels, image size, training images, test images) of each data set as
# torchvision (or the ImageNet folders) gives it; data.pad_to enlarges the image size
DATA = {
    "mnist": (10, 1, 28, 60_000, 10_000),
    "fashionmnist": (10, 1, 28, 60_000, 10_000),
    "cifar10": (10, 3, 32, 50_000, 10_000),
    "cifar100": (100, 3, 32, 50_000, 10_000),
    "svhn": (10, 3, 32, 73_257, 26_032),
    "stl10": (10, 3, 96, 5_000, 8_000),
    "imagenet": (1000, 3, 224, 1_281_167, 50_000),
}
# arch -> (the network as nctools builds it, where it comes from)
BUILT = {
    "vgg11": ("VGG-11-BN trunk, global pool, one linear", "torchvision trunk (Simonyan & "
              "Zisserman 2015); nctools head"),
    "vgg13": ("VGG-13-BN trunk, global pool, one linear", "torchvision trunk (Simonyan & "
              "Zisserman 2015); nctools head"),
    "vgg19": ("VGG-19-BN trunk, global pool, one linear", "torchvision trunk (Simonyan & "
              "Zisserman 2015); nctools head"),
    "resnet18": ("ResNet-18", "torchvision (He et al. 2016)"),
    "resnet50": ("ResNet-50", "torchvision (He et al. 2016)"),
    "resnet152": ("ResNet-152", "torchvision (He et al. 2016)"),
    "densenet40": ("DenseNet-40, k=12, no bottleneck, no compression",
                   "nctools' own (Huang et al. 2017)"),
    "densenet250": ("DenseNet-BC-250, k=24", "torchvision's DenseNet class (Huang et al. 2017)"),
    "densenet201": ("DenseNet-201, k=32", "torchvision (Huang et al. 2017)"),
}


@dataclass
class Cell:
    """One config of the grid and the facts both tables print."""

    name: str
    paper: str  # the paper's network, from the config's first line
    arch: str
    stem: str  # "small" (3x3 stride-1 conv) or "imagenet" (7x7 stride-2 conv + max-pool)
    params: int
    forward_flops: int  # of one image
    train_images: int
    forward_images: int  # images of every forward pass of the run: 3 per training image


def shape(cfg: Config) -> tuple[int, int, int]:
    """(classes, channels, image size) the cell's network is built for."""
    classes, channels, size, _, _ = DATA[cfg.data.dataset]
    return classes, channels, cfg.data.pad_to or size


@functools.cache
def count(arch: str, classes: int, channels: int, size: int) -> tuple[int, int, str]:
    """Parameters, forward FLOPs of one (1, channels, size, size) image and the stem."""
    with torch.device("meta"):
        model = build_model(ModelConfig(arch=arch), classes, channels, size)
        with FlopCounterMode(display=False) as flops:
            model(torch.empty(1, channels, size, size))
    params = sum(p.numel() for p in model.parameters())
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return params, flops.get_total_flops(), "imagenet" if first.kernel_size == (7, 7) else "small"


def cell(path: Path) -> Cell:
    """The facts of one config file of the grid."""
    cfg = load_config(path)
    paper = path.read_text().splitlines()[0].rstrip(".").rsplit(" x ", 1)[1]
    classes, channels, size = shape(cfg)
    params, flops, stem = count(cfg.model.arch, classes, channels, size)
    _, _, _, train_all, test = DATA[cfg.data.dataset]
    per_class = cfg.data.samples_per_class
    train = min(train_all, classes * per_class) if isinstance(per_class, int) else train_all
    epochs = cfg.train.epochs
    snapshots = set(snapshot_epochs(cfg.snapshot.epochs, epochs))
    every = cfg.train.eval_every
    evaluated = {e for e in range(1, epochs + 1) if every and e % every == 0}
    evaluated |= snapshots | {epochs}
    forwards = 3 * train * epochs + test * len(evaluated) + train * len(snapshots)
    return Cell(path.stem, paper, cfg.model.arch, stem, params, flops, train, forwards)


def network_table(cells: list[Cell]) -> list[str]:
    """docs/paper-settings.md's table of networks (six columns)."""
    rows = ["| cell | the paper's network | model.arch | as built | parameters | source |",
            "|---|---|---|---|---|---|"]
    for c in cells:
        built, source = BUILT[c.arch]
        if not c.arch.startswith("vgg"):  # a VGG starts with a 3x3 conv at any size
            built += ", 3x3 stem" if c.stem == "small" else ", ImageNet stem"
        rows.append(f"| {c.name} | {c.paper} | {c.arch} | {built} | {c.params:,} | {source} |")
    return rows


def hours_table(cells: list[Cell], peak_tflops: float, utilisation: float) -> list[str]:
    """docs/paper-settings.md's table of estimated GPU hours (seven columns)."""
    rate = peak_tflops * 1e12 * utilisation  # FLOP/s sustained
    rows = ["| cell | forward GFLOP / image | training images | PFLOP / run | "
            "GPU hours / run | GPU hours / 25-rate sweep |",
            "|---|---|---|---|---|---|"]
    total = 0.0
    for c in cells:
        flop = c.forward_flops * c.forward_images
        hours = flop / rate / 3600
        total += 25 * hours
        rows.append(f"| {c.name} | {c.forward_flops / 1e9:.3g} | {c.train_images:,} | "
                    f"{flop / 1e15:,.0f} | {_digits(hours)} | {_digits(25 * hours)} |")
    rows.append(f"| all {len(cells)} cells | | | | | {_digits(total)} |")
    return rows


def _digits(x: float) -> str:
    """x to about 3 significant digits, in fixed point (no exponent), e.g. 0.0687, 1,270."""
    places = 2 - math.floor(math.log10(x)) if x > 0 else 0
    return f"{round(x, places):,.{max(0, places)}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=312.0,
                        help="the GPU's dense bf16 peak in TFLOP/s (default: an A100's 312)")
    parser.add_argument("--utilisation", type=float, default=0.4,
                        help="the fraction of the peak sustained (default 0.4)")
    args = parser.parse_args()
    cells = [cell(path) for path in sorted(GRID.glob("*.yaml"))]
    print("\n".join(network_table(cells)))
    print()
    print("\n".join(hours_table(cells, args.peak_tflops, args.utilisation)))


if __name__ == "__main__":
    main()

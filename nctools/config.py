"""Typed run configuration: one dataclass per YAML section.

Usage::

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=3"])
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Which data set to train and measure on."""

    dataset: str = "mnist5k"  # mnist5k | synthetic | mnist | fashionmnist | kmnist | cifar10 | ...
    root: str = "~/.cache/nctools/data"  # where torchvision data sets live
    download: bool = False  # let torchvision download missing files (needs internet)
    samples_per_class: int | None = None  # balanced training subset; None keeps all
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
    channels_last: bool = False  # CUDA only: channels_last memory format


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

"""The measurement both training-loop callbacks make: each split's features at a layer's
input, two streaming passes, logged as ``nc/<split>/<metric>``.

Usage (by :mod:`nctools.integrations.lightning` and :mod:`nctools.integrations.hf`)::

    values = measure_splits({"train": train_chunks, "val": val_chunks}, model.fc, device)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from nctools.metrics.measure import measure_chunks

SplitChunks = Callable[[], Iterable[tuple[Tensor, Tensor]]]


def measure_splits(
    chunks: Mapping[str, SplitChunks], layer: nn.Linear, device: torch.device | str
) -> dict[str, float]:
    """{``nc/<split>/<metric>``: value} of every split in ``chunks`` (in their order).

    Each value of ``chunks`` returns a fresh iterable of (features (n, D), labels (n,)) at
    the input of ``layer``, the classifier W (C, D), b (C,). Splits after ``train`` take
    its class means for NC4 (METRICS.md, "On other data"). Under DDP each process passes
    its own shard and the statistics are summed over every process of the run.
    """
    values: dict[str, float] = {}
    train_means = None
    for split, split_chunks in chunks.items():
        result, means = measure_chunks(
            split_chunks,
            layer.weight.detach(),
            None if layer.bias is None else layer.bias.detach(),
            class_means=None if split == "train" else train_means,
            device=device,
        )
        if split == "train":
            train_means = means
        values.update({f"nc/{split}/{k}": v for k, v in result.items()})
    return values

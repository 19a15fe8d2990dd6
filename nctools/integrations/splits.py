"""The measurement both training-loop callbacks make: each split's features at a layer's
input, two streaming passes, logged as ``nc/<split>/<metric>``. By default the model runs
once per split: the first pass's features are spilled to a temporary folder and read back
for the second (:mod:`nctools.integrations.spill`).

Usage (by :mod:`nctools.integrations.lightning` and :mod:`nctools.integrations.hf`)::

    values = measure_splits({"train": train_chunks, "val": val_chunks}, model.fc, device)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nctools.integrations.spill import spilled
from nctools.metrics.engine import ReferenceMeans
from nctools.metrics.measure import measure_chunks

SplitChunks = Callable[[], Iterable[tuple[Tensor, Tensor]]]


def measure_splits(
    chunks: Mapping[str, SplitChunks],
    layer: nn.Linear,
    device: torch.device | str,
    reuse_features: bool = True,
    spill_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """{``nc/<split>/<metric>``: value} of every split in ``chunks`` (in their order).

    Each value of ``chunks`` returns a fresh iterable of (features (n, D), labels (n,)) at
    the input of ``layer``, the classifier W (C, D), b (C,). Splits after ``train`` take
    its class means for NC4 (docs/metrics.md, "On other data"). Under DDP each process passes
    its own shard and the statistics are summed over every process of the run.

    With ``reuse_features`` each split's chunks are produced once and spilled to a temporary
    folder in ``spill_dir`` for the second pass (each process its own shard; removed once
    the split is measured); without, ``chunks[split]`` is called twice.
    """
    values: dict[str, float] = {}
    train_means = ReferenceMeans()
    for split, source in chunks.items():
        passes: AbstractContextManager[SplitChunks] = (
            spilled(source, spill_dir) if reuse_features else nullcontext(source))
        with passes as split_chunks:
            result, means = measure_chunks(
                split_chunks,
                layer.weight.detach(),
                None if layer.bias is None else layer.bias.detach(),
                class_means=train_means.for_split(split),
                device=device,
                group=dist.group.WORLD,  # None outside DDP: this process alone
            )
        train_means.keep(split, means)
        values.update({f"nc/{split}/{k}": v for k, v in result.items()})
    return values

"""The one synthetic-data generator of the benchmark scripts: Gaussian class clusters.

Usage (from another script in this folder)::

    from synthetic import clusters
    labels, rows_of, weight, bias = clusters(n=50_000, dim=512, num_classes=10)
    features = rows_of(slice(0, 50_000))       # (n, dim) float32, made on demand

Every class has at least one sample; the classifier lies near the class means. The noise
is a tiled block of 8191 rows, so features for millions of rows are made at memory speed
and any slice of them can be regenerated (a 2 GB snapshot is written chunk by chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NOISE_ROWS = 8191  # prime, so the tiling does not line up with chunk sizes


def clusters(
    n: int, dim: int, num_classes: int, seed: int = 0, spread: float = 2.0
) -> tuple[torch.Tensor, Callable[[slice], torch.Tensor], torch.Tensor, torch.Tensor]:
    """labels (n,), a function rows -> features (rows, dim) float32, weight (C, dim), bias (C,).

    Class means are ``spread`` times standard normal vectors; features are mean + N(0, I).
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * spread
    labels = torch.cat([torch.arange(num_classes),  # every class present
                        torch.randint(0, num_classes, (n - num_classes,), generator=gen)])
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randn(min(NOISE_ROWS, n), dim, generator=gen)

    def rows_of(rows: slice) -> torch.Tensor:
        index = torch.arange(rows.start, rows.stop) % noise.shape[0]
        return means[labels[rows]] + noise[index]

    weight = means + 0.5 * torch.randn(num_classes, dim, generator=gen)
    return labels, rows_of, weight, torch.zeros(num_classes)

"""Penultimate-layer features of a whole split: the one extraction pass nctools uses.

Training snapshots and the per-epoch test metrics both call :func:`extract_features`;
code that measures a saved model should call it too, so that its features and a
snapshot's agree bit for bit (same batches, same order, same precision).

Usage::

    features, labels = extract_features(model, dataset.test, batch_size=512, device="cpu")
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nctools.data.splits import Split, iterate_batches
from nctools.errors import DataError
from nctools.models.networks import feature_dim, penultimate


@torch.no_grad()
def extract_features(
    model: nn.Module,
    split: Split,
    batch_size: int,
    device: str | torch.device,
    indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model.features`` over a full split in eval mode, without augmentation.

    The collapse metrics (Papyan, Han & Donoho, PNAS 2020) are defined on the features of
    the training set as the network sees it at test time, hence eval mode (batch-norm
    running statistics, no dropout), no augmentation and the split's own order. The pass
    runs in float32 even when training uses bf16 autocast: NC1 falls to ~1e-3 and below,
    under bf16's resolution. The model's train/eval mode is restored on return.

    Args:
        model: a network with ``features(x) -> (B, D)``, already on ``device``.
        split: ``images`` (N, C_in, H, W), ``labels`` (N,).
        batch_size: rows per forward pass (no gradients are kept, so it may exceed the
            training batch size).
        device: where the forward passes run.
        indices: (n,) the rows to extract, in this order (default: all N). Under torchrun
            each rank passes its own contiguous rows; they may be none (n = 0).

    Returns:
        features: (N, D) float32 on the CPU; labels: (N,) int64 on the CPU, in split order
        (``(n, D)`` and ``(n,)`` in the order of ``indices``).
    """
    device = torch.device(device)
    if indices is None:
        indices = torch.arange(len(split.labels))
    elif indices.numel() == 0:  # a rank without rows still writes its (empty) shard
        dim = feature_dim(model)
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for x, y in iterate_batches(split, indices, batch_size, augment=False):
            out = penultimate(model, x.to(device, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise DataError("extract_features: the split is empty (N = 0)")
    return torch.cat(feats), torch.cat(labels).long()

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
        dim = model.classifier.in_features
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for x, y in iterate_batches(split, indices, batch_size, augment=False):
            out = model.features(x.to(device, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise DataError("extract_features: the split is empty (N = 0)")
    return torch.cat(feats), torch.cat(labels).long()


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in registration order: the classifier of most
    networks (its input is the penultimate-layer feature of Papyan et al. 2020).

    Raises:
        ValueError if the model has no ``nn.Linear``.
    """
    found = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass the classifier layer"
        )
    return found[-1]


class InputOf:
    """A forward pre-hook that keeps the input of ``module`` from the latest forward pass.

    Usage::

        with InputOf(model.fc) as hook:
            model(x)
            features = hook.value          # (B, D) detached: what model.fc received

    ``value`` is the first positional input, detached and flattened to (B, D); the hook
    is removed on leaving the ``with`` block (or by :meth:`remove`).
    """

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0].detach().flatten(1)

    def take(self) -> Tensor:
        """The captured input, cleared so that a stale one is never read twice."""
        if self.value is None:
            raise ValueError("the hooked layer did not run in the last forward pass")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> InputOf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

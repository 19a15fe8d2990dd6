"""The pieces of one training step: device, optimizer, schedule, loss, batches.

Usage::

    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    gen = epoch_generator(config.seed, epoch)        # the batch order of this epoch
    loss, hits = train_step(model, x, y, optimizer, "ce", nullcontext())

The loop around them, snapshots and resume are :mod:`nctools.training.loop`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nctools.config.schema import TrainConfig, milestone_epochs
from nctools.data.splits import Split, iterate_batches
from nctools.errors import ConfigError
from nctools.training.distributed import DistInfo


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` must exist here."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise ConfigError(f"train.device: {spec!r} requested but this machine has {gpus} GPUs")
    return device


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter, as in Papyan et al. (2020)."""
    return torch.optim.SGD(
        model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, tc: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``multistep`` multiplies by ``gamma`` after each milestone: an
    epoch ``m >= 1``, or ``floor(m * epochs)`` for a fraction ``m`` of the run
    (:func:`~nctools.config.schema.milestone_epochs`; the paper's ``[1/3, 2/3]``: /10 after
    epochs 116 and 233 of 350), ``cosine`` anneals to 0 over all epochs, ``constant`` keeps
    ``lr``."""
    sched = torch.optim.lr_scheduler
    if tc.schedule == "multistep":
        milestones = milestone_epochs(tc.milestones, tc.epochs)
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=tc.gamma)
    if tc.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=tc.epochs)
    if tc.schedule == "constant":
        return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"train.schedule: {tc.schedule!r} is not multistep, cosine or constant")


def batch_loss(logits: Tensor, labels: Tensor, loss: str, reduction: str = "mean") -> Tensor:
    """Mean (or with ``reduction="sum"`` total) loss of a batch; ``logits``: (B, C),
    ``labels``: (B,).

    ``ce`` is cross-entropy; ``mse`` is the squared error to one-hot targets summed over
    classes and averaged over the batch (Han, Papyan & Donoho, ICLR 2022).
    """
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction=reduction)
    if loss == "mse":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        per_sample = (logits - target).pow(2).sum(dim=1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()
    raise ConfigError(f"train.loss: {loss!r} is not ce or mse")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s shuffle and augmentation: a function of
    ``(seed, epoch)`` only, so a resumed run replays the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_step(
    model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, loss: str,
    autocast, scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One SGD step on a batch; returns (summed loss, number correct) as device tensors,
    so the loop never waits on the GPU.

    ``scale=None`` minimises the batch's mean loss (one process). Under DDP a rank holds
    some rows of a global batch of ``n`` rows and minimises ``scale * (sum of its losses)``
    with ``scale = K / n``: DDP averages the K ranks' gradients, which gives the gradient
    of the global mean loss however unevenly the rows are split.
    """
    with autocast:
        logits = model(x)
    if scale is None:
        value = batch_loss(logits.float(), y, loss)
        total = value.detach() * len(y)
    else:
        total = batch_loss(logits.float(), y, loss, reduction="sum")
        value = total * scale
        total = total.detach()
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return total, (logits.detach().argmax(dim=1) == y).sum()


def trained_rows(rows: int, batch_size: int, drop_last: bool) -> int:
    """How many of an epoch's ``rows`` training rows are trained on: all, or with
    ``train.drop_last`` the whole batches only (ConfigError if that leaves none)."""
    if not drop_last:
        return rows
    if rows < batch_size:
        raise ConfigError(f"train.drop_last: the {rows} training samples make no whole batch "
                          f"of train.batch_size={batch_size}")
    return rows - rows % batch_size


def rank_batches(
    split: Split, order: Tensor, batch_size: int, augment: bool,
    generator: torch.Generator, dist: DistInfo, drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """This rank's rows of each global batch of ``order``: (images, labels, global rows).

    One process yields whole batches. Under DDP rank r takes rows r, r + K, ... of every
    global batch (``DistributedSampler``'s sharding, without its padding: the last, short
    batch stays as one process has it, and a rank may get no rows of it). Every rank
    yields as many batches as there are global ones, so the collectives stay in step.
    An in-memory split with augmentation is augmented a global batch at a time, so the
    random crops and flips are those of one process; a lazy (image-folder) split loads
    only this rank's rows and draws its own augmentation. ``drop_last``: the last,
    incomplete global batch is skipped, as the authors' notebook's DataLoader
    (``drop_last=True``) does; :func:`trained_rows` rows are trained.
    """
    order = order[: trained_rows(len(order), batch_size, drop_last)]
    if not dist.distributed:
        for x, y in iterate_batches(split, order, batch_size, augment, generator):
            yield x, y, len(y)
        return
    rank, world = dist.rank, dist.world_size
    if augment and not split.lazy:
        for x, y in iterate_batches(split, order, batch_size, augment, generator):
            yield x[rank::world], y[rank::world], len(y)
        return
    if augment:  # its own stream, so the ranks do not crop their rows alike
        generator = torch.Generator().manual_seed(int(generator.initial_seed()) * world + rank)
    local = iterate_batches(split, order[rank::world], batch_size // world, augment, generator)
    last: tuple[Tensor, Tensor] | None = None
    for start in range(0, len(order), batch_size):
        batch = next(local, None)
        # Only the short last batch can leave a rank without rows (build_run ensures N >= K).
        if batch is None:
            assert last is not None
            batch = (last[0][:0], last[1][:0])
        last = x, y = batch
        yield x, y, min(batch_size, len(order) - start)

"""torch.distributed for nctools: ranks from the ``torchrun`` environment, one process
group per launch, DistributedDataParallel, and the rows each rank owns.

Usage::

    torchrun --nproc_per_node=4 -m nctools train CONFIG --out RUN
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29400 --rdzv_id=nc1 -m nctools train CONFIG --out RUN

    info = dist_from_env()                       # rank, world size, local rank
    device = rank_device(resolve_device("auto"), info)  # cuda:LOCAL_RANK under torchrun
    with process_group(info, device):            # nccl on GPUs, gloo on CPUs
        ...

Everything here is PyTorch's own machinery (``torch.distributed``, DDP,
``nn.SyncBatchNorm``) with one exception: ``nn.SyncBatchNorm`` runs on GPUs only, so on
CPUs (gloo) :class:`GlobalBatchNorm` computes batch-norm statistics over the global batch
with the differentiable ``torch.distributed.nn.all_reduce``. Either way a K-process run
normalises and steps exactly as one process on the same global batches would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from nctools.errors import ConfigError, RunError

# Rank 0 writes snapshots and checkpoints while the others wait in the next collective:
# allow slow (network) file systems more than NCCL's default 10 minutes.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` launch; rank 0 of 1 without one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes history, checkpoints, manifests, output."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise RunError(f"environment variable {name}={text!r} is not an integer") from None


def dist_from_env() -> DistInfo:
    """Rank and world size as ``torchrun`` sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Raises:
        RunError: inconsistent values, or ``WORLD_SIZE`` > 1 without the rendezvous
            address (``MASTER_ADDR``/``MASTER_PORT``) that torchrun provides.
    """
    info = DistInfo(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
    )
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise RunError(f"RANK={info.rank}, WORLD_SIZE={info.world_size}, LOCAL_RANK="
                       f"{info.local_rank}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    if info.distributed:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise RunError(
                f"WORLD_SIZE={info.world_size} but {' and '.join(missing)} not set: launch "
                f"distributed runs with torchrun, e.g. `torchrun --nproc_per_node="
                f"{info.world_size} -m nctools train CONFIG --out RUN`"
            )
    return info


def rank_device(device: torch.device, info: DistInfo, key: str = "train.device") -> torch.device:
    """Under torchrun each process drives the GPU ``cuda:LOCAL_RANK``; CPUs are shared.

    ``device`` is what ``key`` resolved to; a pinned ``cuda:N`` cannot serve several
    processes and is refused.
    """
    if not info.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"{key}: {str(device)!r} pins one GPU, but under torchrun process LOCAL_RANK "
            "drives cuda:LOCAL_RANK; use auto or cuda"
        )
    gpus = torch.cuda.device_count()
    if info.local_rank >= gpus:
        raise ConfigError(f"{key}: LOCAL_RANK={info.local_rank} but this machine has {gpus} "
                          "GPUs; give torchrun --nproc_per_node <= the number of GPUs")
    return torch.device("cuda", info.local_rank)


@contextmanager
def process_group(info: DistInfo, device: torch.device) -> Iterator[None]:
    """The default process group of a torchrun launch, from its environment (``env://``).

    ``nccl`` when this rank computes on a GPU, ``gloo`` on CPUs. A no-op for one process
    or when a group already exists (the caller's to keep); destroyed on exit otherwise.
    """
    if not info.distributed or dist.is_initialized():
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    extra: dict[str, Any] = {"device_id": device} if cuda else {}
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method="env://", rank=info.rank,
        world_size=info.world_size, timeout=TIMEOUT, **extra,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` summed over every rank (in place; returned as is for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def shard_rows(num_rows: int, batch_size: int, info: DistInfo) -> range:
    """This rank's contiguous rows of a split of ``num_rows`` for a pass in ``batch_size`` batches.

    Whole batches are dealt out in contiguous runs, the first ranks taking one more when
    they do not divide evenly, so every batch a rank runs is a batch one process would
    run: features extracted under torchrun equal one process's bit for bit. Rank r's rows
    precede rank r + 1's; a rank may have none (fewer batches than ranks).
    """
    batches = -(-num_rows // batch_size)
    base, extra = divmod(batches, info.world_size)
    first = info.rank * base + min(info.rank, extra)
    last = first + base + (info.rank < extra)
    return range(min(first * batch_size, num_rows), min(last * batch_size, num_rows))


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The network that trains: ``model`` itself for one process, else its DDP wrapper.

    Call :func:`global_batch_norm` on ``model`` first (before building the optimizer).
    """
    if not info.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def global_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm layers that normalise with the statistics of the global batch.

    Without this each rank normalises its own B / K rows: the updates would depend on K,
    and the ranks' running statistics (hence their eval-mode features) would drift apart.
    GPUs get ``nn.SyncBatchNorm``; CPUs :class:`GlobalBatchNorm`. Parameters, buffers and
    state_dict keys are unchanged, so checkpoints load into a plain model.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span the batches of all ranks (CPU, gloo).

    Forward as ``nn.BatchNorm*d`` (Ioffe & Szegedy, 2015) with the mean and biased
    variance over every rank's rows of this step; the running variance takes the unbiased
    one. The two sums go through the differentiable all_reduce, so gradients flow to the
    rows of every rank as in one process. Eval mode and single processes: plain batch norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() / max(1, input.shape[1]))
        # Two passes, as one process computes them: the variance about the exact mean.
        totals = _differentiable_sum(torch.cat([input.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = input - mean.view(shape)
        var = _differentiable_sum(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            assert self.num_batches_tracked is not None  # tracked statistics exist
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.lerp_(mean.detach(), factor)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased, factor)
        return out


def _differentiable_sum(values: Tensor) -> Tensor:
    """Sum over ranks whose backward sums the gradients over ranks (all_reduce is linear)."""
    if hasattr(collectives, "all_reduce_backward"):  # autograd-aware from torch 2.10 or so
        world = cast(Any, dist.group.WORLD)
        return collectives.wait_tensor(collectives.all_reduce(values, "sum", world))
    from torch.distributed.nn.functional import all_reduce  # older torch: deprecated later

    return all_reduce(values)


def _convert(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm*d`` replaced by a :class:`GlobalBatchNorm`
    holding the same parameters and buffers."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out

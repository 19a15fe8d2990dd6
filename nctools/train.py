"""The training loop: SGD far past zero training error, snapshots at chosen epochs, resume.

Usage::

    from nctools.config import load_config
    from nctools.train import train
    run_dir = train(load_config("configs/demo.yaml"), "runs/demo")   # resumes if interrupted

Each epoch appends one row to ``RUN/history.csv``, then (on a snapshot epoch) writes the
features of the full train/test splits and the classifier, then ``RUN/checkpoint.pt``; so a
checkpoint always lies at or behind everything else on disk, and resuming from it
rewrites whatever came later. A resumed CPU run is bit-identical to an uninterrupted one:
the batch order and augmentation of epoch ``e`` come from a generator seeded by
``(seed, e)`` alone, and the global RNG state travels in the checkpoint.

Distributed training is not implemented; the seams for it are :func:`dist_from_env`
(rank and world size), ``is_main`` (guards every write) and :func:`wrap_model`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import signal
import threading
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import nctools
from nctools import store
from nctools.config import (
    Config,
    TrainConfig,
    diff_configs,
    load_config,
    save_config,
    snapshot_schedule,
)
from nctools.data import Dataset, iterate_batches, load_dataset
from nctools.errors import CheckpointError, ConfigError, RunError
from nctools.features import extract_features
from nctools.models import build_model

log = logging.getLogger(__name__)

CONFIG_FILE, CHECKPOINT_FILE = store.CONFIG_FILE, store.CHECKPOINT_FILE
RESUME_MAY_CHANGE = ("train.device",)  # where a run continues does not change what it is
EVAL_BATCH_FACTOR = 2  # no activations kept for backward; larger batches gain nothing on a CPU


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (future) distributed job; one process today."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """Rank and world size as ``torchrun`` sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    info = DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    if info.world_size > 1:
        raise RunError(
            f"WORLD_SIZE={info.world_size}: distributed training is not implemented yet; "
            "run nctools train as a single process"
        )
    return info


def wrap_model(model: nn.Module, dist: DistInfo) -> nn.Module:
    """The one place a model gets wrapped for training (DistributedDataParallel, later)."""
    return model


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` must exist here."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec != "cpu" and not re.fullmatch(r"cuda(:\d+)?", spec):
        raise ConfigError(f"train.device: {spec!r} is not auto, cpu, cuda or cuda:N")
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
    """Per-epoch schedule: ``multistep`` multiplies by ``gamma`` after ``round(m * epochs)``
    for each milestone fraction ``m`` (the paper: /10 at 1/3 and 2/3), ``cosine`` anneals
    to 0 over all epochs, ``constant`` keeps ``lr``."""
    sched = torch.optim.lr_scheduler
    if tc.schedule == "multistep":
        # >= 1: a milestone at 0 would decay the lr before the first epoch
        milestones = [max(1, round(m * tc.epochs)) for m in tc.milestones]
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=tc.gamma)
    if tc.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=tc.epochs)
    if tc.schedule == "constant":
        return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"train.schedule: {tc.schedule!r} is not multistep, cosine or constant")


def batch_loss(logits: Tensor, labels: Tensor, loss: str) -> Tensor:
    """Mean loss of a batch; ``logits``: (B, C), ``labels``: (B,).

    ``ce`` is cross-entropy; ``mse`` is the squared error to one-hot targets summed over
    classes and averaged over the batch (Han, Papyan & Donoho, ICLR 2022).
    """
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    if loss == "mse":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return (logits - target).pow(2).sum(dim=1).mean()
    raise ConfigError(f"train.loss: {loss!r} is not ce or mse")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s shuffle and augmentation: a function of
    ``(seed, epoch)`` only, so a resumed run replays the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_step(
    model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, loss: str, autocast
) -> tuple[Tensor, Tensor]:
    """One SGD step on a batch; returns (mean loss, number correct) as device tensors,
    so the loop never waits on the GPU."""
    with autocast:
        logits = model(x)
    value = batch_loss(logits.float(), y, loss)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return value.detach(), (logits.detach().argmax(dim=1) == y).sum()


class _StopOnSigint:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: stopping after the current step (Ctrl-C again to abort)")

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Run:
    """What one training run holds while it trains."""

    config: Config
    run_dir: Path
    dist: DistInfo
    device: torch.device
    dataset: Dataset
    model: nn.Module  # the bare network: features, classifier, state_dict
    net: nn.Module  # what trains: the model, or its distributed wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: list[int]  # snapshot epochs
    autocast: AbstractContextManager
    manifest: dict
    tpt_onset: int | None = None


def train(config: Config, out_dir: str | Path, resume: bool = False) -> Path:
    """Train ``config`` into the run directory ``out_dir`` and return its path.

    A new ``out_dir`` starts a run; one holding the same config continues from its last
    completed epoch; a completed run is left as it is. ``resume=True`` continues an
    existing run with its saved ``config.yaml`` (differences are warned about and ignored,
    except ``train.device``).

    Raises:
        RunError: ``out_dir`` holds a run of another config, or training diverged
            (NaN/Inf loss; the last good checkpoint and snapshots are kept).
        KeyboardInterrupt: after Ctrl-C, once a resumable state is on disk.
    """
    dist = dist_from_env()
    run_dir = Path(out_dir).expanduser()
    config, checkpoint = _open_run(run_dir, config, resume)
    if config is None:
        return run_dir
    run = _setup(config, run_dir, dist)
    start = 0
    if checkpoint is not None:
        start = _load_checkpoint(run, checkpoint)
        log.info("resuming %s after epoch %d of %d", run_dir, start, config.train.epochs)
    run.manifest.update(epochs_done=start, tpt_onset_epoch=run.tpt_onset)
    if dist.is_main:
        if checkpoint is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / CONFIG_FILE)
            _save_checkpoint(run, 0)  # the initialisation is a resumable state too
        store.truncate_history(run_dir, start)  # later rows are replayed
        store.write_manifest(run_dir, run.manifest)

    bar = tqdm(range(start + 1, config.train.epochs + 1), initial=start,
               total=config.train.epochs, unit="epoch", desc=config.name,
               disable=None if dist.is_main else True)
    with _StopOnSigint() as stop:
        try:
            for epoch in bar:
                row = _run_epoch(run, epoch, stop)
                bar.set_postfix(loss=f"{row['train_loss']:.4g}", acc=f"{row['train_acc']:.4f}",
                                test_acc=f"{row['test_acc']:.4f}")
                if stop.requested:  # Ctrl-C during the evaluation or the writes
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            _set_status(run, "interrupted")
            command = f"nctools train {shlex.quote(str(run_dir / CONFIG_FILE))} " \
                      f"--out {shlex.quote(str(run_dir))}"
            log.warning("interrupted after epoch %d of %d; resume with: %s",
                        run.manifest["epochs_done"], config.train.epochs, command)
            raise
        finally:
            bar.close()
    _set_status(run, "completed")
    return run_dir


def _setup(config: Config, run_dir: Path, dist: DistInfo) -> _Run:
    """Data, a freshly initialised model (seeded by ``config.seed``), optimizer, schedule."""
    tc = config.train
    device = resolve_device(tc.device)
    cuda = device.type == "cuda"
    if not cuda and (tc.bf16 or tc.channels_last):
        log.info("train.bf16 / train.channels_last apply to CUDA only; ignored on %s", device)
    torch.manual_seed(config.seed)
    dataset = load_dataset(config.data, config.seed)
    model = build_model(config.model, dataset.num_classes, dataset.in_channels, dataset.image_size)
    model.to(device)
    if cuda and tc.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tc)
    schedule = snapshot_schedule(config.snapshot.epochs, tc.epochs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and tc.bf16 else nullcontext()
    return _Run(
        config, run_dir, dist, device, dataset, model, wrap_model(model, dist), optimizer,
        build_scheduler(optimizer, tc), schedule, autocast,
        _manifest(config, dataset, model, device, schedule),
    )


def _run_epoch(run: _Run, epoch: int, stop: _StopOnSigint) -> dict:
    """Train one epoch, evaluate, then write its history row, snapshot and checkpoint."""
    config, tc, device = run.config, run.config.train, run.device
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    gen = epoch_generator(config.seed, epoch)
    split = run.dataset.train
    order = torch.randperm(len(split), generator=gen)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    run.net.train()
    for x, y in iterate_batches(split, order, tc.batch_size, config.data.augment, gen):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if tc.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        loss, hits = train_step(run.net, x, y, run.optimizer, tc.loss, run.autocast)
        loss_sum += loss * len(y)  # device tensors: no GPU sync per step
        correct += hits
        if stop.requested:
            raise KeyboardInterrupt
    run.scheduler.step()
    # One eval pass gives the test metrics, and on snapshot epochs the snapshot too.
    snapshot = epoch in run.schedule
    names = {"test", *config.snapshot.splits} if snapshot else {"test"}
    batch = EVAL_BATCH_FACTOR * tc.batch_size
    splits = {s: extract_features(run.model, getattr(run.dataset, s), batch, device) for s in names}
    test_loss, test_acc = _classify(run.model, *splits["test"], tc.loss)
    n = len(split)
    row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum.item() / n,
           "train_acc": correct.item() / n, "test_loss": test_loss, "test_acc": test_acc}
    if not (math.isfinite(row["train_loss"]) and math.isfinite(test_loss)):
        _diverged(run, epoch, row)  # raises; nothing of this epoch reaches the disk
    if run.tpt_onset is None and row["train_acc"] == 1.0:
        run.tpt_onset = epoch
        log.info("epoch %d: training error reached zero (onset of the terminal phase)", epoch)
    row["seconds"] = time.perf_counter() - t0
    if run.dist.is_main:
        store.append_history(run.run_dir, row)
        if snapshot:
            _write_snapshot(run, epoch, splits)
        _save_checkpoint(run, epoch)  # last: everything before it is complete
        run.manifest.update(epochs_done=epoch, tpt_onset_epoch=run.tpt_onset)
        store.write_manifest(run.run_dir, run.manifest)
    return row


@torch.no_grad()
def _classify(model: nn.Module, features: Tensor, labels: Tensor, loss: str) -> tuple[float, float]:
    """Loss and accuracy of the classifier on extracted ``features`` (N, D), on the CPU."""
    clf = model.classifier
    bias = None if clf.bias is None else clf.bias.detach().float().cpu()
    logits = F.linear(features, clf.weight.detach().float().cpu(), bias)
    acc = (logits.argmax(dim=1) == labels).double().mean().item()
    return batch_loss(logits, labels, loss).item(), acc


def _write_snapshot(run: _Run, epoch: int, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
    clf = run.model.classifier
    store.write_snapshot(
        run.run_dir, epoch, {s: splits[s] for s in run.config.snapshot.splits},
        clf.weight.detach().float().cpu(),
        None if clf.bias is None else clf.bias.detach().float().cpu(),
        dtype=run.config.snapshot.dtype,
    )


def _save_checkpoint(run: _Run, epoch: int) -> None:
    """Model, optimizer, scheduler, RNG state: tensors and plain values (weights_only)."""
    state = {
        "epoch": epoch,
        "tpt_onset_epoch": run.tpt_onset,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
        "nctools_version": nctools.__version__,
    }
    store.save_checkpoint(run.run_dir / CHECKPOINT_FILE, state)


def _load_checkpoint(run: _Run, path: Path) -> int:
    """Restore ``run`` from ``path``; returns the last completed epoch."""
    state = store.load_checkpoint(path)
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if run.device.type == "cuda" and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        run.tpt_onset = state["tpt_onset_epoch"]
        return int(state["epoch"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({e})") from e


def _open_run(run_dir: Path, config: Config, resume: bool) -> tuple[Config | None, Path | None]:
    """Decide between a new run, a resumed one and a finished one.

    Returns the config to train with (None when the run is already complete) and the
    checkpoint to resume from (None for a fresh start).
    """
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        if resume:
            raise RunError(f"{run_dir}: no run to resume (no {CONFIG_FILE} there)")
        return config, None
    saved = load_config(saved_path)
    diffs = diff_configs(saved, config, ignore=RESUME_MAY_CHANGE)
    if diffs and not resume:
        raise RunError(
            f"{run_dir} holds a run of another config ({'; '.join(diffs)}); use another "
            "--out, or pass resume=True / --resume to continue it with its saved config"
        )
    if diffs:
        warnings.warn(f"{run_dir}: resuming with its saved {CONFIG_FILE}; ignored: "
                      f"{'; '.join(diffs)}", stacklevel=3)
    manifest = store.read_manifest(run_dir) if (run_dir / store.MANIFEST_FILE).exists() else {}
    if manifest.get("status") == "completed" and manifest.get("epochs_done") == saved.train.epochs:
        log.info("%s is complete (%d epochs); nothing to do", run_dir, saved.train.epochs)
        return None, None
    checkpoint = run_dir / CHECKPOINT_FILE
    config = replace(saved, train=replace(saved.train, device=config.train.device))
    return config, checkpoint if checkpoint.exists() else None


def _manifest(config: Config, dataset: Dataset, model: nn.Module, device, schedule) -> dict:
    return {
        "name": config.name,
        "status": "running",
        "nctools_version": nctools.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "dataset": dataset.name,
        "num_train": len(dataset.train),
        "num_test": len(dataset.test),
        "num_classes": dataset.num_classes,
        "feature_dim": model.classifier.in_features,
        "epochs": config.train.epochs,
        "epochs_done": 0,
        "tpt_onset_epoch": None,
        "snapshot_epochs": list(schedule),
    }


def _set_status(run: _Run, status: str) -> None:
    run.manifest["status"] = status
    if run.dist.is_main:
        store.write_manifest(run.run_dir, run.manifest)


def _diverged(run: _Run, epoch: int, row: dict) -> None:
    _set_status(run, "diverged")
    raise RunError(
        f"training diverged at epoch {epoch} (train loss {row['train_loss']}, test loss "
        f"{row['test_loss']}); the last good checkpoint is {run.run_dir / CHECKPOINT_FILE} "
        f"(epoch {run.manifest['epochs_done']}); lower train.lr or change the config, "
        "and use another --out"
    )

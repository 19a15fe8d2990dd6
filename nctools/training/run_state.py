"""What a training run holds while it trains, and how it is built, saved and restored.

Usage (by :mod:`nctools.training.loop`)::

    config, checkpoint = open_run(run_dir, config, resume)   # nctools.runs.resume: new or resume?
    run = build_run(config, run_dir, dist, device)           # data, model, optimizer, manifest
    start = restore_checkpoint(run, checkpoint)              # the last completed epoch
    with StopOnSignal() as stop: ...                         # Ctrl-C / SIGTERM: stop cleanly

A checkpoint holds the model, optimizer, scheduler and RNG states (tensors and plain values,
loadable with ``weights_only``); the manifest (``run.json``, :mod:`nctools.runs.manifest`)
says how far the run got and how it ended.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nctools._version import __version__
from nctools.config.schema import Config, TrainConfig, load_config, snapshot_epochs
from nctools.data.sets import load_dataset
from nctools.data.splits import Dataset
from nctools.errors import CheckpointError, ConfigError
from nctools.models.features import resolve_layers
from nctools.models.networks import feature_dim
from nctools.models.registry import create_model
from nctools.runs import manifest, store
from nctools.runs.layout import CONFIG_FILE
from nctools.training.distributed import DistInfo, global_batch_norm, wrap_model
from nctools.training.steps import build_optimizer, build_scheduler
from nctools.training.writer import BackgroundWriter

log = logging.getLogger("nctools.training.loop")



class StopOnSignal:
    """The first Ctrl-C (SIGINT) or SIGTERM (what a batch scheduler sends before its
    time limit) asks the loop to stop after the current step, with a resumable state on
    disk; a second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at_epoch_end: bool = False) -> None:
        self.requested = False
        # under torchrun the ranks stop together after the epoch (agreed in its all_reduce):
        # a rank that left mid-epoch would leave the others waiting in a collective
        self.at_epoch_end = at_epoch_end
        self.agreed = False  # some rank was signalled before the last epoch's all_reduce
        self._previous: dict[int, Any] = {}

    @property
    def should_stop(self) -> bool:
        """Whether to stop now that an epoch is complete (the same on every rank)."""
        return self.agreed if self.at_epoch_end else self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after the current %s (again to abort)",
                    signal.Signals(signum).name, "epoch" if self.at_epoch_end else "step")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


@dataclass
class Run:
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
    snapshot_epochs: list[int]  # the epochs that write a snapshot
    autocast: AbstractContextManager
    manifest: dict
    tpt_onset: int | None = None
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)  # per-epoch files


def build_run(config: Config, run_dir: Path, dist: DistInfo, device: torch.device) -> Run:
    """Data, a fresh model (seeded by ``config.seed``) on ``device`` (under torchrun with
    global batch norm and its DDP wrapper), optimizer, LR schedule, snapshot epochs and the
    manifest of a run that starts or resumes now."""
    tc = config.train
    world = dist.world_size
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by WORLD_SIZE="
                          f"{world} (each process takes batch_size / WORLD_SIZE rows of a batch)")
    cuda = device.type == "cuda"
    if not cuda and tc.bf16 and dist.is_main:
        log.info("train.bf16 applies to CUDA only; ignored on %s", device)
    torch.manual_seed(config.seed)
    dataset = load_dataset(config.data, config.seed)
    if len(dataset.train) < world:
        raise ConfigError(f"data: {len(dataset.train)} training samples cannot be shared by "
                          f"WORLD_SIZE={world} processes")
    try:
        model = create_model(config.model.arch, dataset.num_classes, dataset.in_channels,
                             dataset.image_size, config.model)
    except ConfigError as exc:
        raise ConfigError(f"model.arch: {exc}") from None
    if dist.distributed:
        model = global_batch_norm(model, device)  # before the optimizer takes its parameters
    model.to(device)
    snapshot_layers_of(model, config)  # a bad snapshot.layers fails before training starts
    if tc.channels_last:  # CPUs gain too (oneDNN): 1.3-1.8x for the demo
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tc)
    snapshot_at = snapshot_epochs(config.snapshot.epochs, tc.epochs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and tc.bf16 else nullcontext()
    return Run(
        config, run_dir, dist, device, dataset, model, wrap_model(model, dist, device),
        optimizer, build_scheduler(optimizer, tc), snapshot_at, autocast,
        manifest.new_manifest(
            name=config.name, run_id=manifest.run_identity(run_dir), device=str(device),
            world_size=world, dataset=dataset.name, num_train=len(dataset.train),
            num_test=len(dataset.test), num_classes=dataset.num_classes,
            feature_dim=feature_dim(model), epochs=tc.epochs, epochs_done=0,
            tpt_onset_epoch=None, snapshot_epochs=snapshot_at),
    )


def snapshot_layers_of(model: nn.Module, config: Config) -> list[str]:
    """The inner layers of ``model`` a snapshot saves (``snapshot.layers``), checked
    against the model (ConfigError naming the key)."""
    try:
        return resolve_layers(model, config.snapshot.layers) if config.snapshot.layers else []
    except ValueError as exc:
        raise ConfigError(f"snapshot.layers: {exc}".replace("layers: layers:", "layers:")) from None


def record_progress(run: Run, progress: dict) -> None:
    """Once the checkpoint is on disk: the manifest says how far the run got."""
    run.manifest.update(progress)
    store.write_manifest(run.run_dir, dict(run.manifest))


def checkpoint_state(run: Run, epoch: int) -> dict:
    """Model, optimizer, scheduler, RNG state: tensors and plain values (weights_only)."""
    return {
        "epoch": epoch,
        "tpt_onset_epoch": run.tpt_onset,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
        "nctools_version": __version__,
    }


def restore_checkpoint(run: Run, path: Path) -> int:
    """Restore ``run`` from the checkpoint file ``path``; returns the last completed epoch."""
    state = store.load_checkpoint(path)
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if run.device.type == "cuda":  # a resumed run may see fewer GPUs than it saved
            for index, rng in enumerate(state["rng_cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, index)
        run.tpt_onset = state["tpt_onset_epoch"]
        return int(state["epoch"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({e})") from e


def record_extension(run: Run, done: int) -> bool:
    """When ``run`` continues past the ``train.epochs`` of its saved config (extended after
    epoch ``done``): its config.yaml gets the new count, run.json an ``extended`` entry, and
    the learning-rate schedule is recomputed for the new length, as an uninterrupted run of
    that length would have it at epoch ``done``. Returns whether the run was extended."""
    saved = load_config(run.run_dir / CONFIG_FILE)
    epochs = run.config.train.epochs
    if saved.train.epochs == epochs:
        return False
    previous = manifest.read_if_any(run.run_dir)
    run.manifest["extended"] = [*previous.get("extended", []), {
        "after_epoch": done, "from_epochs": saved.train.epochs, "to_epochs": epochs}]
    run.scheduler = scheduler_at(run.optimizer, run.config.train, done)
    if run.dist.is_main:
        store.save_config(run.config, run.run_dir / CONFIG_FILE)
        log.info("%s: extended from %d to %d epochs after epoch %d (schedule %s recomputed)",
                 run.run_dir, saved.train.epochs, epochs, done, run.config.train.schedule)
    return True


def scheduler_at(optimizer: torch.optim.Optimizer, tc: TrainConfig,
                 done: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of ``tc`` as it stands after ``done`` epochs, on ``optimizer``: rebuilt
    from the initial learning rate and stepped ``done`` times, the very float operations
    of an uninterrupted run."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", tc.lr)
    with warnings.catch_warnings():  # stepped without optimizer steps, on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler = build_scheduler(optimizer, tc)
        for _ in range(done):
            scheduler.step()
    return scheduler


def set_status(run: Run, status: str) -> None:
    """Record how the run ended (completed, interrupted, diverged) once its files are."""
    run.writer.wait()  # the epoch's own files first; a failed one raises here
    run.manifest["status"] = status
    if run.dist.is_main:
        store.write_manifest(run.run_dir, run.manifest)


def mark_failed(run: Run, error: BaseException) -> None:
    """After an error that stopped training (a write that failed: disk full, read-only),
    ``run.json`` says ``failed`` and why, not ``running``; best effort, as the disk that
    refused a file may refuse this one too. A status already set (diverged) is kept."""
    if run.manifest.get("status") != "running":
        return
    run.manifest["error"] = " ".join(str(error).split())[:500]
    try:
        set_status(run, "failed")
    except Exception:  # the original error is the one to report
        log.debug("could not record the failed status in run.json", exc_info=True)

"""What a training run holds, and what of it survives on disk: checkpoint, manifest, resume.

Usage (by :mod:`nctools.training.loop`)::

    config, checkpoint = open_run(run_dir, config, resume)   # new, resumed or finished run
    start = restore_checkpoint(run, checkpoint)              # the last completed epoch
    with StopOnSignal() as stop: ...                         # Ctrl-C / SIGTERM: stop cleanly

A checkpoint holds the model, optimizer, scheduler and RNG states (tensors and plain values,
loadable with ``weights_only``); the manifest (``run.json``) says how far the run got and
how it ended. A run directory holding a run of another config is refused, unless resumed
with its own saved config; only ``RESUME_MAY_CHANGE`` may differ silently.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nctools._version import __version__
from nctools.config.schema import (
    Config,
    TrainConfig,
    diff_configs,
    load_config,
    snapshot_epochs,
)
from nctools.data.sets import load_dataset
from nctools.data.splits import Dataset
from nctools.errors import CheckpointError, ConfigError, RunError
from nctools.models.features import resolve_layers
from nctools.models.networks import build_model, feature_dim
from nctools.runs import files, store
from nctools.training.distributed import DistInfo, global_batch_norm, wrap_model
from nctools.training.steps import build_optimizer, build_scheduler
from nctools.training.writer import BackgroundWriter

log = logging.getLogger("nctools.training.loop")

CONFIG_FILE, CHECKPOINT_FILE = store.CONFIG_FILE, store.CHECKPOINT_FILE
# where a run continues, and how often it looks at the test split, do not change what it is
RESUME_MAY_CHANGE = ("train.device", "train.eval_every")


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
    model = build_model(config.model, dataset.num_classes, dataset.in_channels, dataset.image_size)
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
        new_manifest(config, dataset, model, device, snapshot_at, world, run_identity(run_dir)),
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


def check_run_folder(run_dir: Path) -> None:
    """RunError unless ``run_dir`` is a folder or a new path (not a file, not a link that
    leads nowhere: mkdir would answer "File exists" for both)."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunError(f"{run_dir}: is a symbolic link to {run_dir.readlink()}, which does not "
                       "exist; give a folder as --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: is a file, not a run folder; give a folder as --out")


def resume_changes(saved: Config, requested: Config) -> tuple[list[str], int]:
    """The one rule of what a resume may change: ``(refused, epochs)``.

    ``refused`` lists the differences (``"train.lr: 0.05 -> 0.1"``) that would make it
    another run; ``RESUME_MAY_CHANGE`` keys are never among them, nor ``train.epochs``
    when it grows: ``epochs`` is then the new count (a run extended by more epochs),
    else the saved one. Fewer epochs than saved is refused (a run is not shortened).
    """
    refused = diff_configs(saved, requested, ignore=(*RESUME_MAY_CHANGE, "train.epochs"))
    epochs = saved.train.epochs
    if requested.train.epochs > epochs:
        epochs = requested.train.epochs
    elif requested.train.epochs < epochs:
        refused.append(f"train.epochs: {epochs} -> {requested.train.epochs} (a run can be "
                       "extended, not shortened)")
    return refused, epochs


def check_resume_changes(run_dir: Path, requested: Config) -> None:
    """RunError when an explicitly given config (``nctools train --resume`` with CONFIG or
    ``--set``) would change the run in ``run_dir`` beyond :func:`resume_changes`' rule."""
    refused, _ = resume_changes(load_config(run_dir / CONFIG_FILE), requested)
    if refused:
        raise RunError(
            f"train --resume: the given CONFIG/--set would change the run in {run_dir} "
            f"({'; '.join(refused)}); resume without them to continue with "
            f"{run_dir / CONFIG_FILE} (--set train.epochs=N extends it), or use another "
            "--out for a new run"
        )


def open_run(run_dir: Path, config: Config, resume: bool) -> tuple[Config | None, Path | None]:
    """Decide between a new run, a resumed one, an extended one and a finished one.

    Returns the config to train with (None when the run is already complete) and the
    checkpoint to resume from (None for a fresh start). Resumed, the run keeps its saved
    config except the ``RESUME_MAY_CHANGE`` keys, and ``train.epochs`` when ``resume`` asks
    for more (the run is extended: :func:`record_extension`); other differences are warned
    about and ignored with ``resume``, refused without it.
    """
    check_run_folder(run_dir)
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        if resume:
            raise RunError(f"{run_dir}: no run to resume (no {CONFIG_FILE} there)")
        if run_dir.is_dir() and any(not files.is_temp_name(p.name) for p in run_dir.iterdir()):
            raise RunError(
                f"{run_dir} holds files but no nctools run (no {CONFIG_FILE}); use another "
                "--out, or an empty or new folder"
            )
        return config, None
    saved = load_config(saved_path)
    refused, epochs = resume_changes(saved, config)
    if not resume and (refused or epochs != saved.train.epochs):
        diffs = diff_configs(saved, config, ignore=RESUME_MAY_CHANGE)
        raise RunError(
            f"{run_dir} holds a run of another config ({'; '.join(diffs)}); use another "
            f"--out, or continue it with its saved config: `nctools train --resume --out "
            f"{run_dir}` (add --set train.epochs=N to extend it)"
        )
    if refused:
        warnings.warn(f"{run_dir}: resuming with its saved {CONFIG_FILE}; ignored: "
                      f"{'; '.join(refused)}", stacklevel=3)
    manifest = store.read_manifest(run_dir) if (run_dir / store.MANIFEST_FILE).exists() else {}
    if manifest.get("status") == "completed" and manifest.get("epochs_done") == epochs:
        log.info("%s is complete (%d epochs); nothing to do", run_dir, epochs)
        return None, None
    checkpoint = run_dir / CHECKPOINT_FILE
    config = replace(saved, train=replace(saved.train, device=config.train.device,
                                          eval_every=config.train.eval_every, epochs=epochs))
    return config, checkpoint if checkpoint.exists() else None


def record_extension(run: Run, done: int) -> bool:
    """When ``run`` continues past the ``train.epochs`` of its saved config (extended after
    epoch ``done``): its config.yaml gets the new count, run.json an ``extended`` entry, and
    the learning-rate schedule is recomputed for the new length, as an uninterrupted run of
    that length would have it at epoch ``done``. Returns whether the run was extended."""
    saved = load_config(run.run_dir / CONFIG_FILE)
    epochs = run.config.train.epochs
    if saved.train.epochs == epochs:
        return False
    previous = store.read_manifest(run.run_dir) if (
        run.run_dir / store.MANIFEST_FILE).is_file() else {}
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


def run_identity(run_dir: Path) -> str:
    """The run's id: made once, when the run starts, and kept by every resume (``run.json``
    ``run_id``), so a run stays the same run whatever its folder is called later."""
    path = run_dir / store.MANIFEST_FILE
    if path.is_file():
        known = store.read_manifest(run_dir).get("run_id")
        if isinstance(known, str) and known:
            return known
    return uuid.uuid4().hex


def new_manifest(config: Config, dataset: Dataset, model: nn.Module, device, snapshot_epochs,
                 world_size: int = 1, run_id: str | None = None) -> dict:
    """The manifest (``run.json``) of a run that starts or resumes now."""
    return {
        "name": config.name,
        "run_id": run_id or uuid.uuid4().hex,
        "status": "running",
        "nctools_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "world_size": world_size,
        "dataset": dataset.name,
        "num_train": len(dataset.train),
        "num_test": len(dataset.test),
        "num_classes": dataset.num_classes,
        "feature_dim": feature_dim(model),
        "epochs": config.train.epochs,
        "epochs_done": 0,
        "tpt_onset_epoch": None,
        "snapshot_epochs": list(snapshot_epochs),
    }


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

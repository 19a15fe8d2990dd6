"""The training loop: SGD far past zero training error, snapshots at chosen epochs, resume.

Usage::

    from nctools.config import load_config
    from nctools.train import train
    run_dir = train(load_config("configs/demo.yaml"), "runs/demo")   # resumes if interrupted

Each epoch appends one row to ``RUN/history.csv``, then (on a snapshot epoch) writes the
features of the full train/test splits and the classifier, then ``RUN/checkpoint.pt``; so a
checkpoint always lies at or behind everything else on disk, and resuming from it
rewrites whatever came later. The history row, checkpoint and manifest are serialised at
the end of the epoch and written, in that order, while the next epoch trains
(:mod:`nctools.writer`); the pieces of a step live in :mod:`nctools.steps`. A resumed
CPU run is bit-identical to an uninterrupted one: the batch order and augmentation of
epoch ``e`` come from a generator seeded by ``(seed, e)`` alone, and the global RNG state
travels in the checkpoint.

Under ``torchrun --nproc_per_node=K -m nctools train CONFIG`` the same loop runs on K
processes with DistributedDataParallel (:mod:`nctools.distributed`): every rank draws the
same permutation of epoch ``e``, and global batch ``j`` (``train.batch_size`` rows, as in
one process) is split ``DistributedSampler``-style, rank r taking its rows r, r + K, ...;
losses are weighted so that DDP's average of the ranks' gradients is the gradient of the
global batch's mean loss, and batch norm uses the global batch's statistics. A K-process
run therefore takes the steps of the one-process run, up to the order of float sums.
Each rank extracts features for its own contiguous rows and writes them as snapshot
shards; rank 0 alone writes the history, checkpoints and the manifest.
"""

from __future__ import annotations

import io
import logging
import math
import shlex
import signal
import threading
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import nctools
from nctools import snapshots, store
from nctools.config import (
    Config,
    diff_configs,
    load_config,
    save_config,
    snapshot_schedule,
)
from nctools.data import Dataset, load_dataset
from nctools.distributed import (
    DistInfo,
    barrier,
    dist_from_env,
    global_batch_norm,
    process_group,
    rank_device,
    shard_rows,
    sum_over_ranks,
    wrap_model,
)
from nctools.errors import CheckpointError, ConfigError, RunError
from nctools.features import extract_features
from nctools.models import build_model
from nctools.steps import (
    batch_loss,
    build_optimizer,
    build_scheduler,
    epoch_generator,
    rank_batches,
    resolve_device,
    train_step,
)
from nctools.writer import BackgroundWriter

log = logging.getLogger(__name__)

CONFIG_FILE, CHECKPOINT_FILE = store.CONFIG_FILE, store.CHECKPOINT_FILE
# where a run continues, and how often it looks at the test split, do not change what it is
RESUME_MAY_CHANGE = ("train.device", "train.eval_every")
EVAL_BATCH_FACTOR = 4  # no activations kept for backward; beyond ~128 rows a CPU gains nothing


class _StopOnSignal:
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
        self._previous: dict[int, object] = {}

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

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


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
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)  # per-epoch files


def train(config: Config, out_dir: str | Path, resume: bool = False) -> Path:
    """Train ``config`` into the run directory ``out_dir`` and return its path.

    A new ``out_dir`` starts a run; one holding the same config continues from its last
    completed epoch; a completed run is left as it is. ``resume=True`` continues an
    existing run with its saved ``config.yaml`` (differences are warned about and ignored,
    except ``train.device``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this with the same arguments;
    the process group is made here from the torchrun environment and destroyed on return.

    Raises:
        RunError: ``out_dir`` holds a run of another config, or training diverged
            (NaN/Inf loss; the last good checkpoint and snapshots are kept).
        ConfigError: under torchrun, a batch size not divisible by ``WORLD_SIZE``.
        KeyboardInterrupt: after Ctrl-C, once a resumable state is on disk.
    """
    dist = dist_from_env()
    run_dir = Path(out_dir).expanduser()
    device = rank_device(resolve_device(config.train.device), dist)
    with process_group(dist, device):
        return _train(config, run_dir, resume, dist, device)


def _train(config: Config, run_dir: Path, resume: bool, dist: DistInfo,
           device: torch.device) -> Path:
    """:func:`train` once the process group (if any) exists."""
    config, checkpoint = _open_run(run_dir, config, resume)
    barrier()  # every rank has read the run directory before rank 0 writes to it
    if config is None:
        return run_dir
    run = _setup(config, run_dir, dist, device)
    start = 0
    if checkpoint is not None:
        start = _load_checkpoint(run, checkpoint)  # every rank: they start alike
        if dist.is_main:
            log.info("resuming %s after epoch %d of %d", run_dir, start, config.train.epochs)
    run.manifest.update(epochs_done=start, tpt_onset_epoch=run.tpt_onset)
    if dist.is_main:
        if checkpoint is None:
            # the first write creates run_dir; an unwritable one is a RunError naming it
            save_config(config, run_dir / CONFIG_FILE)
            _save_checkpoint(run, 0)  # the initialisation is a resumable state too
        store.remove_stale_temps(run_dir)  # what a killed run was writing
        store.truncate_history(run_dir, start)  # later rows are replayed
        store.write_manifest(run_dir, run.manifest)

    bar = tqdm(range(start + 1, config.train.epochs + 1), initial=start,
               total=config.train.epochs, unit="epoch", desc=config.name,
               disable=None if dist.is_main else True)
    last_test = ""
    with _StopOnSignal(at_epoch_end=dist.distributed) as stop:
        try:
            for epoch in bar:
                row = _run_epoch(run, epoch, stop)
                shown = {"loss": f"{row['train_loss']:.4g}", "acc": f"{row['train_acc']:.4f}"}
                if not math.isnan(row["test_acc"]):  # train.eval_every skips some epochs
                    last_test = shown["test_acc"] = f"{row['test_acc']:.4f}"
                elif last_test:
                    shown["test_acc"] = last_test
                bar.set_postfix(shown)
                if stop.should_stop:  # a signal during the evaluation or the writes
                    raise KeyboardInterrupt
            run.writer.wait()
        except KeyboardInterrupt:
            _set_status(run, "interrupted")
            command = f"nctools train {shlex.quote(str(run_dir / CONFIG_FILE))} " \
                      f"--out {shlex.quote(str(run_dir))}"
            if dist.is_main:
                log.warning("interrupted after epoch %d of %d; resume with: %s%s",
                            run.manifest["epochs_done"], config.train.epochs,
                            "torchrun ... -m " if dist.distributed else "", command)
            raise
        finally:
            bar.close()
            run.writer.close()  # no file is left half-way whatever stops the loop
    _set_status(run, "completed")
    return run_dir


def _setup(config: Config, run_dir: Path, dist: DistInfo, device: torch.device) -> _Run:
    """Data, a freshly initialised model (seeded by ``config.seed``), optimizer, schedule."""
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
    if tc.channels_last:  # CPUs gain too (oneDNN): 1.3-1.8x for the demo
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tc)
    schedule = snapshot_schedule(config.snapshot.epochs, tc.epochs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and tc.bf16 else nullcontext()
    return _Run(
        config, run_dir, dist, device, dataset, model, wrap_model(model, dist, device),
        optimizer, build_scheduler(optimizer, tc), schedule, autocast,
        _manifest(config, dataset, model, device, schedule, world),
    )


def _run_epoch(run: _Run, epoch: int, stop: _StopOnSignal) -> dict:
    """Train one epoch, evaluate, then write its history row, snapshot and checkpoint."""
    config, tc, device, dist = run.config, run.config.train, run.device, run.dist
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    gen = epoch_generator(config.seed, epoch)
    split = run.dataset.train
    order = torch.randperm(len(split), generator=gen)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    run.net.train()
    batches = rank_batches(split, order, tc.batch_size, config.data.augment, gen, dist)
    for x, y, rows in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        scale = dist.world_size / rows if dist.distributed else None
        loss, hits = train_step(run.net, x, y, run.optimizer, tc.loss, run.autocast, scale)
        loss_sum += loss  # device tensors: no GPU sync per step
        correct += hits
        if stop.requested and not stop.at_epoch_end:
            raise KeyboardInterrupt
    run.scheduler.step()
    # One eval pass gives the test metrics, and on snapshot epochs the snapshot too; each
    # rank extracts its own rows (all of them for one process). Between snapshots the test
    # split is looked at every train.eval_every epochs (0: never); its columns are NaN
    # in the other rows.
    snapshot = epoch in run.schedule
    every = tc.eval_every
    evaluate = snapshot or epoch == tc.epochs or (every > 0 and epoch % every == 0)
    names = ({"test"} if evaluate else set()) | (set(config.snapshot.splits) if snapshot else set())
    batch = EVAL_BATCH_FACTOR * tc.batch_size
    splits = {}
    for name in sorted(names):
        part = getattr(run.dataset, name)
        rows = shard_rows(len(part), batch, dist)
        indices = torch.arange(rows.start, rows.stop)
        splits[name] = extract_features(run.model, part, batch, device, indices=indices)
    test_loss, test_hits = _classify(run.model, *splits["test"], tc.loss) if evaluate else (0, 0)
    local = [test_loss, test_hits, float(stop.requested)]
    totals = torch.cat([torch.stack([loss_sum.double(), correct.double()]),
                        torch.tensor(local, dtype=torch.float64, device=device)])
    train_loss, train_hits, test_loss, test_hits, stops = sum_over_ranks(totals).tolist()
    stop.agreed = stops > 0  # every rank stops after this epoch if one was asked to
    n, n_test = len(split), len(run.dataset.test) if evaluate else math.nan
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss / n, "train_acc": train_hits / n,
           "test_loss": test_loss / n_test, "test_acc": test_hits / n_test}
    if not math.isfinite(row["train_loss"]) or (evaluate and not math.isfinite(row["test_loss"])):
        _diverged(run, epoch, row)  # raises on every rank; nothing of this epoch is written
    if run.tpt_onset is None and row["train_acc"] == 1.0:
        run.tpt_onset = epoch
        if dist.is_main:
            log.info("epoch %d: training error reached zero (onset of the terminal phase)",
                     epoch)
    row["seconds"] = time.perf_counter() - t0
    run.writer.wait()  # the previous epoch's files are complete (or their error is raised)
    history = [partial(store.append_history, run.run_dir, row)] if dist.is_main else []
    if snapshot:
        for job in history:  # a reader never finds a snapshot without its history row
            job()
        history = []
        _write_snapshot(run, epoch, splits)  # every rank: its own shard
    if dist.is_main:
        # Serialised now, written while the next epoch trains: history row, checkpoint
        # (after everything of this epoch is complete), manifest (after the checkpoint).
        buffer = io.BytesIO()
        torch.save(_checkpoint_state(run, epoch), buffer)
        progress = {"epochs_done": epoch, "tpt_onset_epoch": run.tpt_onset}
        run.writer.submit(
            *history,
            partial(store.atomic_write_bytes, run.run_dir / CHECKPOINT_FILE, buffer.getvalue()),
            partial(_record_progress, run, progress),
        )
    return row


def _record_progress(run: _Run, progress: dict) -> None:
    """Once the checkpoint is on disk: the manifest says how far the run got."""
    run.manifest.update(progress)
    store.write_manifest(run.run_dir, dict(run.manifest))


@torch.no_grad()
def _classify(model: nn.Module, features: Tensor, labels: Tensor, loss: str) -> tuple[float, int]:
    """Summed loss and number correct of the classifier on ``features`` (N, D), on the CPU."""
    clf = model.classifier
    bias = None if clf.bias is None else clf.bias.detach().float().cpu()
    logits = F.linear(features, clf.weight.detach().float().cpu(), bias)
    hits = int((logits.argmax(dim=1) == labels).sum())
    return batch_loss(logits, labels, loss, reduction="sum").item(), hits


def _write_snapshot(run: _Run, epoch: int, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
    """One file per split; under DDP one shard per rank, merged by rank 0 after a barrier."""
    clf, dist = run.model.classifier, run.dist
    snapshots.write_snapshot(
        run.run_dir, epoch, {s: splits[s] for s in run.config.snapshot.splits},
        clf.weight.detach().float().cpu(),
        None if clf.bias is None else clf.bias.detach().float().cpu(),
        dtype=run.config.snapshot.dtype,
        shard=(dist.rank, dist.world_size) if dist.distributed else None,
    )
    if dist.distributed:
        barrier()
        if dist.is_main:
            snapshots.finalize_sharded_snapshot(run.run_dir, epoch, dist.world_size)


def _save_checkpoint(run: _Run, epoch: int) -> None:
    """Write the training state now (see :func:`_checkpoint_state`)."""
    store.save_checkpoint(run.run_dir / CHECKPOINT_FILE, _checkpoint_state(run, epoch))


def _checkpoint_state(run: _Run, epoch: int) -> dict:
    """Model, optimizer, scheduler, RNG state: tensors and plain values (weights_only)."""
    return {
        "epoch": epoch,
        "tpt_onset_epoch": run.tpt_onset,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
        "nctools_version": nctools.__version__,
    }


def _load_checkpoint(run: _Run, path: Path) -> int:
    """Restore ``run`` from ``path``; returns the last completed epoch."""
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


def _open_run(run_dir: Path, config: Config, resume: bool) -> tuple[Config | None, Path | None]:
    """Decide between a new run, a resumed one and a finished one.

    Returns the config to train with (None when the run is already complete) and the
    checkpoint to resume from (None for a fresh start).
    """
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        if resume:
            raise RunError(f"{run_dir}: no run to resume (no {CONFIG_FILE} there)")
        if run_dir.is_dir() and any(not store.is_temp_name(p.name) for p in run_dir.iterdir()):
            raise RunError(
                f"{run_dir} holds files but no nctools run (no {CONFIG_FILE}); use another "
                "--out, or an empty or new folder"
            )
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


def _manifest(config: Config, dataset: Dataset, model: nn.Module, device, schedule,
              world_size: int = 1) -> dict:
    return {
        "name": config.name,
        "status": "running",
        "nctools_version": nctools.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "world_size": world_size,
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
    run.writer.wait()  # the epoch's own files first; a failed one raises here
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

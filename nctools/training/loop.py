"""The training loop: SGD far past zero training error, snapshots at chosen epochs, resume.

Usage::

    from nctools.config.schema import load_config
    from nctools.training.loop import train
    run_dir = train(load_config("configs/demo.yaml"), "runs/demo")   # resumes if interrupted

An epoch, read in :func:`run_epoch`: ``train_one_epoch -> evaluate -> snapshot ->
checkpoint``, then :func:`report` (loggers, progress).

Each epoch appends one row to ``RUN/history.csv``, then (on a snapshot epoch) writes the
features of the full train/test splits and the classifier, then ``RUN/checkpoint.pt``; so a
checkpoint always lies at or behind everything else on disk, and resuming from it
rewrites whatever came later. The history row, checkpoint and manifest are serialised at
the end of the epoch and written, in that order, while the next epoch trains
(:mod:`nctools.training.writer`). The pieces of a step live in :mod:`nctools.training.steps`;
whether a folder takes a new run or continues one in :mod:`nctools.runs.resume`; what a run
holds and how it is built and restored in :mod:`nctools.training.run_state`; the progress
bar in :mod:`nctools.training.progress`. A resumed CPU run is bit-identical to an
uninterrupted one: the batch order and augmentation of epoch ``e`` come from a generator
seeded by ``(seed, e)`` alone, and the global RNG state travels in the checkpoint.

Under ``torchrun --nproc_per_node=K -m nctools train CONFIG`` the same loop runs on K
processes with DistributedDataParallel (:mod:`nctools.training.distributed`): every rank draws the
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
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nctools.config.schema import Config, config_to_dict
from nctools.errors import RunError
from nctools.models.features import extract_split
from nctools.models.networks import classifier_of
from nctools.runs import files, snapshots, store
from nctools.runs.layout import CHECKPOINT_FILE, CONFIG_FILE
from nctools.runs.resume import open_run
from nctools.training.distributed import (
    DistInfo,
    barrier,
    dist_from_env,
    process_group,
    rank_device,
    shard_rows,
    sum_over_ranks,
)
from nctools.training.loggers import (
    Loggers,
    check_logs_folder,
    open_loggers,
    snapshot_metrics,
)
from nctools.training.progress import PROGRESS, EpochProgress
from nctools.training.run_state import (
    Run,
    StopOnSignal,
    build_run,
    checkpoint_state,
    mark_failed,
    record_extension,
    record_progress,
    restore_checkpoint,
    set_status,
    snapshot_layers_of,
)
from nctools.training.steps import (
    batch_loss,
    epoch_generator,
    rank_batches,
    resolve_device,
    train_step,
    trained_rows,
)

log = logging.getLogger(__name__)

EVAL_BATCH_FACTOR = 4  # no activations kept for backward; beyond ~128 rows a CPU gains nothing


def train(config: Config, out_dir: str | Path, resume: bool = False,
          progress: str = "bar") -> Path:
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

    ``progress``: ``"bar"`` a progress bar when stderr is a terminal; ``"auto"`` (the
    command line's) the bar on a terminal and otherwise (batch jobs, ``nohup``, Slurm
    logs) one plain line per epoch on stdout
    (:func:`nctools.training.progress.epoch_line`); ``"none"`` nothing.
    """
    if progress not in PROGRESS:
        raise ValueError(f"progress must be one of {PROGRESS}, got {progress!r}")
    dist = dist_from_env()
    run_dir = Path(out_dir).expanduser()
    device = rank_device(resolve_device(config.train.device), dist)
    with process_group(dist, device):
        return _train(config, run_dir, resume, dist, device, progress)


def _train(config: Config, run_dir: Path, resume: bool, dist: DistInfo,
           device: torch.device, progress: str = "bar") -> Path:
    """:func:`train` once the process group (if any) exists: the epochs, and how they end."""
    opened, checkpoint = open_run(run_dir, config, resume)
    if opened is not None and opened.train.loggers:
        check_logs_folder(run_dir)  # every rank, before the run folder changes at all
    barrier()  # every rank has read the run directory before rank 0 writes to it
    if opened is None:
        return run_dir
    run = build_run(opened, run_dir, dist, device)
    start = _start(run, checkpoint)
    loggers = Loggers()
    with StopOnSignal(at_epoch_end=dist.distributed) as stop, \
            EpochProgress(opened, start, progress, dist.is_main) as shown:
        try:
            if dist.is_main and opened.train.loggers:  # one that fails: run.json says why
                loggers = open_loggers(opened.train.loggers, run_dir, config_to_dict(opened),
                                       opened.name)
            for epoch in shown.epochs:
                report(epoch, run_epoch(run, epoch, stop, loggers), loggers, shown)
                if stop.should_stop:  # a signal during the evaluation or the writes
                    raise KeyboardInterrupt
            run.writer.wait()
        except KeyboardInterrupt:
            _interrupted(run)
            raise
        except Exception as exc:
            mark_failed(run, exc)  # run.json must not say "running" after a failed write
            raise
        finally:
            run.writer.close()  # no file is left half-way whatever stops the loop
            loggers.close()
    set_status(run, "completed")
    return run_dir


def _start(run: Run, checkpoint: Path | None) -> int:
    """Restore ``checkpoint`` (None: a new run, whose config and initial state are written
    first) and put the run folder in step with it; returns the last completed epoch."""
    start = 0
    if checkpoint is not None:
        start = restore_checkpoint(run, checkpoint)  # every rank: they start alike
        if run.dist.is_main:
            log.info("resuming %s after epoch %d of %d", run.run_dir, start,
                     run.config.train.epochs)
        record_extension(run, start)  # more epochs than saved: config, manifest, LR schedule
    run.manifest.update(epochs_done=start, tpt_onset_epoch=run.tpt_onset)
    if run.dist.is_main:
        if checkpoint is None:
            # the first write creates run_dir; an unwritable one is a RunError naming it
            store.save_config(run.config, run.run_dir / CONFIG_FILE)
            # the initialisation is a resumable state too
            store.save_checkpoint(run.run_dir / CHECKPOINT_FILE, checkpoint_state(run, 0))
        store.remove_stale_temps(run.run_dir)  # what a killed run was writing
        store.truncate_history(run.run_dir, start)  # later rows are replayed
        store.write_manifest(run.run_dir, run.manifest)
    return start


def _interrupted(run: Run) -> None:
    """After Ctrl-C or SIGTERM: run.json says so, and the log says how to resume."""
    set_status(run, "interrupted")
    command = f"nctools train {shlex.quote(str(run.run_dir / CONFIG_FILE))} " \
              f"--out {shlex.quote(str(run.run_dir))}"
    if run.dist.is_main:
        log.warning("interrupted after epoch %d of %d; resume with: %s%s",
                    run.manifest["epochs_done"], run.config.train.epochs,
                    "torchrun ... -m " if run.dist.distributed else "", command)


def run_epoch(run: Run, epoch: int, stop: StopOnSignal, loggers: Loggers | None = None) -> dict:
    """Train one epoch, evaluate, then write its history row, snapshot and checkpoint;
    returns the history row."""
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    loss_sum, correct = train_one_epoch(run, epoch, stop)
    seen = evaluate(run, epoch, correct)
    row = epoch_row(run, epoch, lr, loss_sum, correct, seen, stop)
    row["seconds"] = time.perf_counter() - t0
    run.writer.wait()  # the previous epoch's files are complete (or their error is raised)
    if seen.snapshot:
        snapshot(run, epoch, row, seen, loggers)
    checkpoint(run, epoch, None if seen.snapshot else row)
    return row


def train_one_epoch(run: Run, epoch: int, stop: StopOnSignal) -> tuple[Tensor, Tensor]:
    """SGD over the training split in the order and augmentation of ``(seed, epoch)``, then
    one step of the LR schedule: the summed loss and number correct of this rank's rows
    (device tensors: no GPU sync per step)."""
    tc, device, dist = run.config.train, run.device, run.dist
    gen = epoch_generator(run.config.seed, epoch)
    split = run.dataset.train
    order = torch.randperm(len(split), generator=gen)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    run.net.train()
    for x, y, rows in rank_batches(split, order, tc.batch_size, run.config.data.augment, gen,
                                   dist, tc.drop_last):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        scale = dist.world_size / rows if dist.distributed else None
        loss, hits = train_step(run.net, x, y, run.optimizer, tc.loss, run.autocast, scale)
        loss_sum += loss
        correct += hits
        if stop.requested and not stop.at_epoch_end:
            raise KeyboardInterrupt
    run.scheduler.step()
    return loss_sum, correct


@dataclass
class Evaluated:
    """What one eval-mode pass of an epoch looked at: its splits' features (this rank's
    rows: features (n, D), labels (n,)) and inner layers (``snapshot.layers``)."""

    snapshot: bool  # a snapshot epoch
    test: bool  # the test split's loss and accuracy are measured
    train: bool  # the training split's eval-mode accuracy is measured
    splits: dict[str, tuple[Tensor, Tensor]]
    inner: dict[str, dict[str, Tensor]]


def evaluate(run: Run, epoch: int, correct: Tensor) -> Evaluated:
    """One eval-mode pass over the splits this epoch needs, each rank its own rows.

    The test split on snapshot epochs, at the last epoch and every ``train.eval_every``
    epochs (0: never; its columns are NaN in the other rows); the snapshot's splits on
    snapshot epochs; the training split, for its eval-mode accuracy (the paper's, which
    starts the terminal phase), on snapshot epochs and, until the onset is found, wherever
    the running accuracy reaches ``train.tpt_accuracy``.
    """
    config, tc = run.config, run.config.train
    at_snapshot = epoch in run.snapshot_epochs
    every = tc.eval_every
    test = at_snapshot or epoch == tc.epochs or (every > 0 and epoch % every == 0)
    candidate = run.tpt_onset is None and _running_reaches(run, correct, tc.tpt_accuracy)
    train = at_snapshot or candidate
    names = ({"test"} if test else set()) | (set(config.snapshot.splits) if at_snapshot else set())
    names |= {"train"} if train else set()
    batch = EVAL_BATCH_FACTOR * tc.batch_size
    layers = snapshot_layers_of(run.model, config) if at_snapshot else []
    seen = Evaluated(at_snapshot, test, train, {}, {})
    for name in sorted(names):
        part = getattr(run.dataset, name)
        share = shard_rows(len(part), batch, run.dist)
        taps = layers if name in config.snapshot.splits else []
        feats, labels, seen.inner[name] = extract_split(
            run.model, part, batch, run.device, torch.arange(share.start, share.stop), taps)
        seen.splits[name] = (feats, labels)
    return seen


def epoch_row(run: Run, epoch: int, lr: float, loss_sum: Tensor, correct: Tensor,
              seen: Evaluated, stop: StopOnSignal) -> dict:
    """The epoch's history row, summed over the ranks (one all_reduce, which also tells
    every rank whether one of them was asked to stop); raises RunError on divergence and
    records the onset of the terminal phase."""
    tc = run.config.train
    test_loss, test_hits = _classify(run.model, *seen.splits["test"], tc.loss) if seen.test \
        else (0, 0)
    # as stored: features x classifier of the snapshot give this accuracy exactly
    _, eval_hits = _classify(run.model, *seen.splits["train"], tc.loss,
                             run.config.snapshot.dtype) if seen.train else (0, 0)
    local = [test_loss, test_hits, eval_hits, float(stop.requested)]
    totals = torch.cat([torch.stack([loss_sum.double(), correct.double()]),
                        torch.tensor(local, dtype=torch.float64, device=run.device)])
    train_loss, train_hits, test_loss, test_hits, eval_hits, stops = \
        sum_over_ranks(totals).tolist()
    stop.agreed = stops > 0  # every rank stops after this epoch if one was asked to
    n = trained_rows(len(run.dataset.train), tc.batch_size, tc.drop_last)  # rows trained on
    n_eval, n_test = len(run.dataset.train), len(run.dataset.test) if seen.test else math.nan
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss / n,
           "train_acc_running": train_hits / n,
           "train_acc": eval_hits / n_eval if seen.train else None,  # the whole split
           "test_loss": test_loss / n_test, "test_acc": test_hits / n_test}
    if not math.isfinite(row["train_loss"]) or (seen.test and not math.isfinite(row["test_loss"])):
        _diverged(run, epoch, row)  # raises on every rank; nothing of this epoch is written
    if run.tpt_onset is None and seen.train:
        run.tpt_onset = store.tpt_onset([epoch], [row["train_acc"]], tc.tpt_accuracy)
        if run.tpt_onset is not None and run.dist.is_main:
            log.info("epoch %d: eval-mode training accuracy %.4f reached train.tpt_accuracy "
                     "(onset of the terminal phase)", epoch, row["train_acc"])
    return row


def snapshot(run: Run, epoch: int, row: dict, seen: Evaluated,
             loggers: Loggers | None = None) -> None:
    """The history row first (a reader never finds a snapshot without it), then the
    snapshot (every rank its own shard) and, with ``snapshot.measure``, its metrics for
    the loggers (every rank: the statistics are summed across ranks)."""
    config = run.config
    if run.dist.is_main:
        store.append_history(run.run_dir, row)
    _write_snapshot(run, epoch, seen.splits, seen.inner)
    if config.snapshot.measure:
        clf = classifier_of(run.model)
        values = snapshot_metrics({s: seen.splits[s] for s in config.snapshot.splits},
                                  clf.weight.detach(),
                                  None if clf.bias is None else clf.bias.detach())
        if loggers is not None:
            loggers.log(epoch, values)


def checkpoint(run: Run, epoch: int, row: dict | None) -> None:
    """Rank 0 serialises the epoch's state now and the writer puts it on disk while the
    next epoch trains: the history ``row`` (None: already written with the snapshot),
    the checkpoint (after everything of this epoch is complete), the manifest (after the
    checkpoint)."""
    if not run.dist.is_main:
        return
    buffer = io.BytesIO()
    torch.save(checkpoint_state(run, epoch), buffer)
    history = [] if row is None else [partial(store.append_history, run.run_dir, row)]
    progress = {"epochs_done": epoch, "tpt_onset_epoch": run.tpt_onset}
    run.writer.submit(
        *history,
        partial(files.atomic_write_bytes, run.run_dir / CHECKPOINT_FILE, buffer.getvalue()),
        partial(record_progress, run, progress),
    )


def report(epoch: int, row: dict, loggers: Loggers, shown: EpochProgress) -> None:
    """The epoch's row to the experiment loggers and the progress bar or line."""
    loggers.log(epoch, row)
    shown.update(row)


def _running_reaches(run: Run, correct: Tensor, threshold: float) -> bool:
    """Whether the epoch's running (train-mode) accuracy, over all ranks, reaches
    ``threshold``: the epochs worth an eval-mode pass over the training split."""
    hits = sum_over_ranks(correct.double().reshape(1)).item()
    tc = run.config.train
    return hits / trained_rows(len(run.dataset.train), tc.batch_size, tc.drop_last) >= threshold


@torch.no_grad()
def _classify(model: nn.Module, features: Tensor, labels: Tensor, loss: str,
              dtype: str = "float32") -> tuple[float, int]:
    """Summed loss and number correct of the classifier on ``features`` (N, D), on the CPU.

    ``dtype`` rounds the features as a snapshot stores them first, so that the stored
    features and classifier reproduce the number correct exactly.
    """
    clf = classifier_of(model)
    bias = None if clf.bias is None else clf.bias.detach().float().cpu()
    features = features.to(snapshots.TORCH_DTYPES[dtype]).float()
    logits = F.linear(features, clf.weight.detach().float().cpu(), bias)
    hits = int((logits.argmax(dim=1) == labels).sum())
    return batch_loss(logits, labels, loss, reduction="sum").item(), hits


def _write_snapshot(run: Run, epoch: int, splits: dict[str, tuple[Tensor, Tensor]],
                    inner: dict[str, dict[str, Tensor]] | None = None) -> None:
    """One file per split; under DDP one shard per rank, merged by rank 0 after a barrier."""
    clf, dist = classifier_of(run.model), run.dist
    snapshots.write_snapshot(
        run.run_dir, epoch, {s: splits[s] for s in run.config.snapshot.splits},
        clf.weight.detach().float().cpu(),
        None if clf.bias is None else clf.bias.detach().float().cpu(),
        dtype=run.config.snapshot.dtype,
        shard=(dist.rank, dist.world_size) if dist.distributed else None,
        layers={s: layers for s, layers in (inner or {}).items() if layers},
    )
    if dist.distributed:
        barrier()
        if dist.is_main:
            snapshots.finalize_sharded_snapshot(run.run_dir, epoch, dist.world_size)


def _diverged(run: Run, epoch: int, row: dict) -> None:
    set_status(run, "diverged")
    raise RunError(
        f"training diverged at epoch {epoch} (train loss {row['train_loss']}, test loss "
        f"{row['test_loss']}); the last good checkpoint is {run.run_dir / CHECKPOINT_FILE} "
        f"(epoch {run.manifest['epochs_done']}); lower train.lr or change the config, "
        "and use another --out"
    )

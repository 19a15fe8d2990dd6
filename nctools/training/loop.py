"""The training loop: SGD far past zero training error, snapshots at chosen epochs, resume.

Usage::

    from nctools.config.schema import load_config
    from nctools.training.loop import train
    run_dir = train(load_config("configs/demo.yaml"), "runs/demo")   # resumes if interrupted

Each epoch appends one row to ``RUN/history.csv``, then (on a snapshot epoch) writes the
features of the full train/test splits and the classifier, then ``RUN/checkpoint.pt``; so a
checkpoint always lies at or behind everything else on disk, and resuming from it
rewrites whatever came later. The history row, checkpoint and manifest are serialised at
the end of the epoch and written, in that order, while the next epoch trains
(:mod:`nctools.training.writer`); the pieces of a step live in :mod:`nctools.training.steps`, the
checkpoint, manifest and resume rules in :mod:`nctools.training.run_state`. A resumed
CPU run is bit-identical to an uninterrupted one: the batch order and augmentation of
epoch ``e`` come from a generator seeded by ``(seed, e)`` alone, and the global RNG state
travels in the checkpoint.

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
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from nctools.config.schema import (
    Config,
    config_to_dict,
    snapshot_epochs,
)
from nctools.data.sets import load_dataset
from nctools.errors import ConfigError, RunError
from nctools.models.features import extract_split, resolve_layers
from nctools.models.networks import build_model, classifier_of
from nctools.runs import files, snapshots, store
from nctools.runs.store import save_config
from nctools.training.distributed import (
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
from nctools.training.loggers import Loggers, open_loggers, snapshot_metrics
from nctools.training.run_state import (
    Run,
    StopOnSignal,
    checkpoint_state,
    load_checkpoint,
    mark_failed,
    new_manifest,
    open_run,
    record_extension,
    record_progress,
    run_identity,
    save_checkpoint,
    set_status,
)
from nctools.training.steps import (
    batch_loss,
    build_optimizer,
    build_scheduler,
    epoch_generator,
    rank_batches,
    resolve_device,
    train_step,
    trained_rows,
)

log = logging.getLogger(__name__)

CONFIG_FILE, CHECKPOINT_FILE = store.CONFIG_FILE, store.CHECKPOINT_FILE
PROGRESS = ("bar", "auto", "none")  # train(progress=...)
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
    logs) one plain line per epoch on stdout (:func:`epoch_line`); ``"none"`` nothing.
    """
    if progress not in PROGRESS:
        raise ValueError(f"progress must be one of {PROGRESS}, got {progress!r}")
    dist = dist_from_env()
    run_dir = Path(out_dir).expanduser()
    device = rank_device(resolve_device(config.train.device), dist)
    with process_group(dist, device):
        return _train(config, run_dir, resume, dist, device, progress)


def epoch_line(row: dict, epochs: int) -> str:
    """One plain progress line: ``epoch 3/150 loss 0.4121 acc 0.8750 test_acc 0.8125 2.1s``
    (``acc`` the running train-mode accuracy; ``train_acc``, the eval-mode one, and
    ``test_acc`` only on epochs that measured them)."""
    line = (f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4g} "
            f"acc {row['train_acc_running']:.4f}")
    if row.get("train_acc") is not None and not math.isnan(row["train_acc"]):
        line += f" train_acc {row['train_acc']:.4f}"
    if not math.isnan(row["test_acc"]):
        line += f" test_loss {row['test_loss']:.4g} test_acc {row['test_acc']:.4f}"
    return f"{line} {row['seconds']:.1f}s"


def _train(config: Config, run_dir: Path, resume: bool, dist: DistInfo,
           device: torch.device, progress: str = "bar") -> Path:
    """:func:`train` once the process group (if any) exists."""
    opened, checkpoint = open_run(run_dir, config, resume)
    barrier()  # every rank has read the run directory before rank 0 writes to it
    if opened is None:
        return run_dir
    config = opened
    run = _setup(config, run_dir, dist, device)
    start = 0
    if checkpoint is not None:
        start = load_checkpoint(run, checkpoint)  # every rank: they start alike
        if dist.is_main:
            log.info("resuming %s after epoch %d of %d", run_dir, start, config.train.epochs)
        record_extension(run, start)  # more epochs than saved: config, manifest, LR schedule
    run.manifest.update(epochs_done=start, tpt_onset_epoch=run.tpt_onset)
    if dist.is_main:
        if checkpoint is None:
            # the first write creates run_dir; an unwritable one is a RunError naming it
            save_config(config, run_dir / CONFIG_FILE)
            save_checkpoint(run, 0)  # the initialisation is a resumable state too
        store.remove_stale_temps(run_dir)  # what a killed run was writing
        store.truncate_history(run_dir, start)  # later rows are replayed
        store.write_manifest(run_dir, run.manifest)

    bar = tqdm(range(start + 1, config.train.epochs + 1), initial=start,
               total=config.train.epochs, unit="epoch", desc=config.name,
               disable=True if progress == "none" or not dist.is_main else None)
    # without a terminal tqdm stays silent: a plain line per epoch then, for logs
    lines = dist.is_main and progress == "auto" and not sys.stdout.isatty()
    last_test = ""
    loggers = Loggers()
    if dist.is_main and config.train.loggers:
        loggers = open_loggers(config.train.loggers, run_dir, config_to_dict(config), config.name)
    with StopOnSignal(at_epoch_end=dist.distributed) as stop:
        try:
            for epoch in bar:
                row = _run_epoch(run, epoch, stop, loggers)
                loggers.log(epoch, row)
                if lines:
                    print(epoch_line(row, config.train.epochs), flush=True)
                shown = {"loss": f"{row['train_loss']:.4g}",
                         "acc": f"{row['train_acc_running']:.4f}"}
                if not math.isnan(row["test_acc"]):  # train.eval_every skips some epochs
                    last_test = shown["test_acc"] = f"{row['test_acc']:.4f}"
                elif last_test:
                    shown["test_acc"] = last_test
                bar.set_postfix(shown)
                if stop.should_stop:  # a signal during the evaluation or the writes
                    raise KeyboardInterrupt
            run.writer.wait()
        except KeyboardInterrupt:
            set_status(run, "interrupted")
            command = f"nctools train {shlex.quote(str(run_dir / CONFIG_FILE))} " \
                      f"--out {shlex.quote(str(run_dir))}"
            if dist.is_main:
                log.warning("interrupted after epoch %d of %d; resume with: %s%s",
                            run.manifest["epochs_done"], config.train.epochs,
                            "torchrun ... -m " if dist.distributed else "", command)
            raise
        except Exception as exc:
            mark_failed(run, exc)  # run.json must not say "running" after a failed write
            raise
        finally:
            bar.close()
            run.writer.close()  # no file is left half-way whatever stops the loop
            loggers.close()
    set_status(run, "completed")
    return run_dir


def _setup(config: Config, run_dir: Path, dist: DistInfo, device: torch.device) -> Run:
    """Data, a fresh model (seeded by ``config.seed``), optimizer, LR schedule, snapshot epochs."""
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
    snapshot_layers(model, config)  # a bad snapshot.layers fails before training starts
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


def _run_epoch(run: Run, epoch: int, stop: StopOnSignal, loggers: Loggers | None = None) -> dict:
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
    batches = rank_batches(split, order, tc.batch_size, config.data.augment, gen, dist,
                           tc.drop_last)
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
    # in the other rows. The training split's eval-mode accuracy (the paper's, which
    # starts the terminal phase) comes from the snapshot's own features; until the onset
    # is found it is also measured wherever the running accuracy reaches the threshold.
    snapshot = epoch in run.snapshot_epochs
    every = tc.eval_every
    evaluate = snapshot or epoch == tc.epochs or (every > 0 and epoch % every == 0)
    candidate = run.tpt_onset is None and _running_reaches(run, correct, tc.tpt_accuracy)
    measure_train = snapshot or candidate
    names = ({"test"} if evaluate else set()) | (set(config.snapshot.splits) if snapshot else set())
    names |= {"train"} if measure_train else set()
    batch = EVAL_BATCH_FACTOR * tc.batch_size
    splits, inner = {}, {}
    layers = snapshot_layers(run.model, config) if snapshot else []
    for name in sorted(names):
        part = getattr(run.dataset, name)
        share = shard_rows(len(part), batch, dist)
        indices = torch.arange(share.start, share.stop)
        taps = layers if name in config.snapshot.splits else []
        feats, labels, inner[name] = extract_split(run.model, part, batch, device, indices, taps)
        splits[name] = (feats, labels)
    test_loss, test_hits = _classify(run.model, *splits["test"], tc.loss) if evaluate else (0, 0)
    # as stored: features x classifier of the snapshot give this accuracy exactly
    dtype = config.snapshot.dtype
    _, eval_hits = _classify(run.model, *splits["train"], tc.loss, dtype) if measure_train \
        else (0, 0)
    local = [test_loss, test_hits, eval_hits, float(stop.requested)]
    totals = torch.cat([torch.stack([loss_sum.double(), correct.double()]),
                        torch.tensor(local, dtype=torch.float64, device=device)])
    train_loss, train_hits, test_loss, test_hits, eval_hits, stops = \
        sum_over_ranks(totals).tolist()
    stop.agreed = stops > 0  # every rank stops after this epoch if one was asked to
    n = trained_rows(len(split), tc.batch_size, tc.drop_last)  # the rows trained on
    n_test = len(run.dataset.test) if evaluate else math.nan
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss / n,
           "train_acc_running": train_hits / n,
           "train_acc": eval_hits / n if measure_train else None,
           "test_loss": test_loss / n_test, "test_acc": test_hits / n_test}
    if not math.isfinite(row["train_loss"]) or (evaluate and not math.isfinite(row["test_loss"])):
        _diverged(run, epoch, row)  # raises on every rank; nothing of this epoch is written
    if run.tpt_onset is None and measure_train:
        run.tpt_onset = store.tpt_onset([epoch], [row["train_acc"]], tc.tpt_accuracy)
        if run.tpt_onset is not None and dist.is_main:
            log.info("epoch %d: eval-mode training accuracy %.4f reached train.tpt_accuracy "
                     "(onset of the terminal phase)", epoch, row["train_acc"])
    row["seconds"] = time.perf_counter() - t0
    run.writer.wait()  # the previous epoch's files are complete (or their error is raised)
    history = [partial(store.append_history, run.run_dir, row)] if dist.is_main else []
    if snapshot:
        for job in history:  # a reader never finds a snapshot without its history row
            job()
        history = []
        _write_snapshot(run, epoch, splits, inner)  # every rank: its own shard
        if config.snapshot.measure:  # every rank: the statistics are summed across ranks
            clf = classifier_of(run.model)
            values = snapshot_metrics({s: splits[s] for s in config.snapshot.splits},
                                      clf.weight.detach(),
                                      None if clf.bias is None else clf.bias.detach())
            if loggers is not None:
                loggers.log(epoch, values)
    if dist.is_main:
        # Serialised now, written while the next epoch trains: history row, checkpoint
        # (after everything of this epoch is complete), manifest (after the checkpoint).
        buffer = io.BytesIO()
        torch.save(checkpoint_state(run, epoch), buffer)
        progress = {"epochs_done": epoch, "tpt_onset_epoch": run.tpt_onset}
        run.writer.submit(
            *history,
            partial(files.atomic_write_bytes, run.run_dir / CHECKPOINT_FILE, buffer.getvalue()),
            partial(record_progress, run, progress),
        )
    return row


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
    features = features.to(snapshots.SNAPSHOT_DTYPES[dtype]).float()
    logits = F.linear(features, clf.weight.detach().float().cpu(), bias)
    hits = int((logits.argmax(dim=1) == labels).sum())
    return batch_loss(logits, labels, loss, reduction="sum").item(), hits


def snapshot_layers(model: nn.Module, config: Config) -> list[str]:
    """The inner layers a snapshot saves (``snapshot.layers``), checked against the model."""
    try:
        return resolve_layers(model, config.snapshot.layers) if config.snapshot.layers else []
    except ValueError as exc:
        raise ConfigError(f"snapshot.layers: {exc}".replace("layers: layers:", "layers:")) from None


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

"""Benchmark the nctools training loop against a bare PyTorch loop, and one snapshot.

Usage::

    python scripts/bench_train.py                    # demo config (mnist5k + convnet), 5 epochs
    python scripts/bench_train.py --threads 1 --clock cpu   # on a shared, busy machine
    python scripts/bench_train.py --epochs 8 --device cuda

In one process, on the data and model of ``nctools/configs/demo.yaml`` (DataConfig and
ModelConfig defaults if it is absent), it prints:

- the median seconds per epoch of ``nctools.train.train`` (each call of its per-epoch
  function: training, the test pass, history row, checkpoint, manifest), over the epochs
  without a snapshot (all but the last; the first is dropped as warm-up);
- the median seconds per epoch of a bare loop with the same model initialisation, the
  same batches, the same optimizer and loss, and nothing else (no metrics, no test pass,
  no files), run before and after nctools (first epoch of each dropped); and the
  overhead of nctools over it in %;
- the seconds of the per-epoch test pass alone (test features + classifier);
- the seconds of one snapshot (train + test feature extraction + write_snapshot), and
  the extra cost of a snapshot epoch (train extraction + write: the test pass runs on
  every epoch anyway), each as % of a bare training epoch. Target: <= 50%.

``--clock wall`` (default) times wall-clock seconds, which swing by tens of percent on a
shared machine (the header prints the load average and the bare-loop spread);
``--clock cpu`` times the CPU seconds of this process instead, which other processes
barely disturb (with ``--threads 1`` they are the single-core cost; CPU runs only).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
import time
from dataclasses import replace
from importlib.resources import as_file, files
from pathlib import Path

import torch

from nctools import store
from nctools.config import Config, DataConfig, ModelConfig, load_config
from nctools.data import iterate_batches, load_dataset
from nctools.features import extract_features
from nctools.models import build_model

T = importlib.import_module("nctools.train")  # the module, not the function


def demo_config() -> Config:
    try:
        with as_file(files("nctools") / "configs" / "demo.yaml") as path:
            return load_config(path)
    except Exception:  # absent in an old checkout: the defaults are mnist5k + convnet
        return Config(name="demo", data=DataConfig(), model=ModelConfig())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_epochs(cfg: Config, epochs: int, device: torch.device) -> list[float]:
    """Seconds per epoch of the plain loop: same init, batches, optimizer and loss."""
    tc = cfg.train
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size).to(device)
    opt = T.build_optimizer(model, tc)
    sched = T.build_scheduler(opt, tc)
    times = []
    for epoch in range(1, epochs + 1):
        sync(device)
        t0 = clock()
        model.train()
        gen = T.epoch_generator(cfg.seed, epoch)
        order = torch.randperm(len(data.train.labels), generator=gen)
        for x, y in iterate_batches(data.train, order, tc.batch_size, cfg.data.augment, gen):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = T.batch_loss(model(x), y, tc.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        sync(device)
        times.append(clock() - t0)
    return times


def nctools_epochs(cfg: Config, out: Path) -> list[float]:
    """Seconds per epoch of nctools.train (a snapshot only at the last epoch), timed
    around each call of its per-epoch function."""
    run_epoch, times = T._run_epoch, []

    def timed(*args, **kwargs):
        t0 = clock()
        row = run_epoch(*args, **kwargs)
        times.append(clock() - t0)
        return row

    T._run_epoch = timed
    try:
        T.train(cfg, out)
    finally:
        T._run_epoch = run_epoch
    return times


def snapshot_costs(cfg: Config, run: Path, device: torch.device) -> dict[str, float]:
    """Time the test pass, the train extraction and the write of one snapshot."""
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    model.load_state_dict(store.load_checkpoint(run / store.CHECKPOINT_FILE)["model"])
    model.to(device)
    batch = T.EVAL_BATCH_FACTOR * cfg.train.batch_size
    costs = {}
    t0 = clock()
    test = extract_features(model, data.test, batch, device)
    W, b = model.classifier.weight.detach().cpu(), model.classifier.bias.detach().cpu()
    T.batch_loss(test[0] @ W.T + b, test[1], cfg.train.loss)
    costs["test pass"] = clock() - t0
    t0 = clock()
    train = extract_features(model, data.train, batch, device)
    costs["train extraction"] = clock() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = clock()
        store.write_snapshot(tmp, 1, {"train": train, "test": test}, W, b,
                             dtype=cfg.snapshot.dtype)
        costs["write"] = clock() - t0
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    base = demo_config()
    cfg = replace(
        base,
        train=replace(base.train, epochs=args.epochs, device=args.device),
        snapshot=replace(base.snapshot, epochs=[args.epochs]),
    )
    device = T.resolve_device(args.device)
    print(f"{cfg.data.dataset} + {cfg.model.arch} (width {cfg.model.width}), batch "
          f"{cfg.train.batch_size}, {args.epochs} epochs, {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
          f"{args.clock} clock")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_epochs(cfg, args.epochs, device)[1:]
        ours = nctools_epochs(cfg, Path(tmp) / "run")
        costs = snapshot_costs(cfg, Path(tmp) / "run", device)
        bare += bare_epochs(cfg, args.epochs, device)[1:]
    bare_med = statistics.median(bare)
    ours_med = statistics.median(ours[1:-1] or ours[-1:])  # epochs without a snapshot
    print(f"bare loop     {bare_med:8.3f} s/epoch  (median of {len(bare)} epochs, "
          f"range {min(bare):.3f}..{max(bare):.3f})")
    print(f"nctools.train {ours_med:8.3f} s/epoch  overhead {100 * (ours_med / bare_med - 1):+.1f}%"
          f"  (median of epochs 2..{args.epochs - 1})")
    print(f"  of which the test pass {costs['test pass']:.3f} s "
          f"({100 * costs['test pass'] / bare_med:.1f}% of a bare epoch)")
    snapshot = sum(costs.values())
    extra = costs["train extraction"] + costs["write"]
    print(f"snapshot      {snapshot:8.3f} s = {100 * snapshot / bare_med:.1f}% of a training "
          f"epoch (train extraction {costs['train extraction']:.3f}, test pass "
          f"{costs['test pass']:.3f}, write {costs['write']:.3f})")
    print(f"  extra cost of a snapshot epoch {extra:.3f} s = {100 * extra / bare_med:.1f}% "
          f"(target <= 50%); nctools' snapshot epoch took {ours[-1]:.3f} s")


if __name__ == "__main__":
    main()

"""Benchmark the nctools training loop against a bare PyTorch loop, and one snapshot.

Usage::

    python scripts/bench_train.py                    # demo config (mnist5k + convnet), 20 epochs
    python scripts/bench_train.py --threads 1 --clock cpu   # on a shared, busy machine
    python scripts/bench_train.py --epochs 8 --device cuda

In one process, on the data and model of the packaged demo config (``configs/demo.yaml``,
loaded by name), it prints:

- the overhead of ``nctools.training.loop.train`` over a bare PyTorch loop doing the same work:
  same model (and memory format), initialisation, batches, optimizer and loss, and
  nothing else. Epochs run in pairs, a bare epoch right before each nctools epoch (each
  call of its per-epoch function: training, the test pass, history row, checkpoint,
  manifest), so both see the same machine speed; the overhead is the median of the
  per-pair ratios over the epochs without a snapshot (the first is dropped as warm-up).
  With ``train.eval_every: 1`` (the default: a test pass every epoch) the bare loop ends
  each epoch with a plain evaluation of the test split (loss, accuracy: what a research
  loop logs); with ``0`` (test passes only at snapshot epochs, as the paper) it only
  trains. Target: <= 5%;
- the cost of that per-epoch test pass;
- the seconds of one snapshot (train + test feature extraction + write_snapshot) as % of
  a bare training epoch (target: <= 50%), and the extra cost of a snapshot epoch over an
  evaluated one (train extraction + write);
- on a CPU, how much faster ``train.channels_last`` makes a bare training epoch and a test
  evaluation than the default memory layout.

``--clock wall`` (default) times wall-clock seconds, which swing by tens of percent on a
shared machine (hence the pairs; the quartiles of the ratios show the spread);
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
from pathlib import Path

import torch

from nctools.config.schema import Config, load_config
from nctools.data.sets import load_dataset
from nctools.data.splits import iterate_batches
from nctools.models.features import extract_features
from nctools.models.networks import build_model
from nctools.runs import snapshots, store

T = importlib.import_module("nctools.training.loop")  # the module, not the function


def demo_config() -> Config:
    """The packaged demo config, found by name as ``nctools train demo`` finds it."""
    return load_config("demo")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The plain loop: same init, batches, optimizer, loss and memory format; with
    ``test``, each epoch ends with a plain evaluation of the test split (summed loss,
    accuracy)."""

    def __init__(self, cfg: Config, device: torch.device, test: bool) -> None:
        self.cfg, self.device, self.test = cfg, device, test
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, cfg.seed)
        data = self.data
        model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
        self.layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=self.layout)
        self.opt = T.build_optimizer(self.model, cfg.train)
        self.sched = T.build_scheduler(self.opt, cfg.train)

    def epoch(self, epoch: int) -> float:
        """Train (and evaluate) one epoch; returns its seconds."""
        tc, data, model, device = self.cfg.train, self.data, self.model, self.device
        sync(device)
        t0 = clock()
        model.train()
        gen = T.epoch_generator(self.cfg.seed, epoch)
        order = torch.randperm(len(data.train.labels), generator=gen)
        for x, y in iterate_batches(data.train, order, tc.batch_size, self.cfg.data.augment, gen):
            x, y = x.to(device).contiguous(memory_format=self.layout), y.to(device)
            loss = T.batch_loss(model(x), y, tc.loss)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.sched.step()
        if self.test:
            model.eval()
            loss_sum, correct, batch = 0.0, 0, T.EVAL_BATCH_FACTOR * tc.batch_size
            with torch.no_grad():
                for start in range(0, len(data.test.labels), batch):
                    logits = model(data.test.images[start : start + batch].to(device))
                    y = data.test.labels[start : start + batch].to(device)
                    loss_sum += T.batch_loss(logits, y, tc.loss, reduction="sum").item()
                    correct += int((logits.argmax(1) == y).sum())
        sync(device)
        return clock() - t0


def paired_epochs(cfg: Config, out: Path, bare: BareLoop) -> list[tuple[float, float]]:
    """(bare, nctools) seconds of each epoch: nctools.training.loop runs its epochs (a snapshot
    only at the last), and before each of them the bare loop runs the same epoch, so both
    sides of a pair see the same machine speed."""
    run_epoch, pairs = T.run_epoch, []

    def timed(run, epoch, *args, **kwargs):
        bare_seconds = bare.epoch(epoch)
        t0 = clock()
        row = run_epoch(run, epoch, *args, **kwargs)
        pairs.append((bare_seconds, clock() - t0))
        return row

    T.run_epoch = timed
    try:
        T.train(cfg, out)
    finally:
        T.run_epoch = run_epoch
    return pairs


def snapshot_costs(cfg: Config, run: Path, device: torch.device) -> dict[str, float]:
    """Time the test pass, the train extraction and the write of one snapshot."""
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    model.load_state_dict(store.load_checkpoint(run / store.CHECKPOINT_FILE)["model"])
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
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
        snapshots.write_snapshot(tmp, 1, {"train": train, "test": test}, W, b,
                             dtype=cfg.snapshot.dtype)
        costs["write"] = clock() - t0
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
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
        # epoch 1 (warm-up) and the last (snapshot) are left out of the pairs
        full = paired_epochs(cfg, Path(tmp) / "run", BareLoop(cfg, device, test=True))[1:-1]
        lazy = replace(cfg, train=replace(cfg.train, eval_every=0))
        skip = paired_epochs(lazy, Path(tmp) / "lazy", BareLoop(cfg, device, test=False))[1:-1]
        costs = snapshot_costs(cfg, Path(tmp) / "run", device)
    bare_test_med = statistics.median(b for b, _ in full)
    bare_med = statistics.median(b for b, _ in skip)
    for name, pairs, against in (("eval_every 1", full, "bare loop + test pass"),
                                 ("eval_every 0", skip, "bare loop")):
        ratios = [n / b for b, n in pairs]
        print(f"nctools {name}: {statistics.median(n for _, n in pairs):.3f} s/epoch, "
              f"{against} {statistics.median(b for b, _ in pairs):.3f} s/epoch: overhead "
              f"{100 * (statistics.median(ratios) - 1):+.1f}% (median of {len(pairs)} paired "
              f"epochs; quartiles {100 * (quantile(ratios, 0.25) - 1):+.1f}%.."
              f"{100 * (quantile(ratios, 0.75) - 1):+.1f}%; target <= 5%)")
    print(f"the per-epoch test pass: {bare_test_med - bare_med:.3f} s "
          f"({100 * (bare_test_med / bare_med - 1):.1f}% of a bare training epoch)")
    snapshot = sum(costs.values())
    extra = costs["train extraction"] + costs["write"]
    print(f"snapshot {snapshot:.3f} s = {100 * snapshot / bare_med:.1f}% of a bare training "
          f"epoch (target <= 50%; train extraction {costs['train extraction']:.3f}, test pass "
          f"{costs['test pass']:.3f}, write {costs['write']:.3f})")
    print(f"  extra cost of a snapshot epoch over an evaluated one {extra:.3f} s = "
          f"{100 * extra / bare_med:.1f}%")
    if device.type == "cpu":
        train_x, eval_x = layout_speedups(cfg, device)
        print(f"channels_last against the default layout (bare loop): training {train_x:.2f}x, "
              f"test evaluation {eval_x:.2f}x faster")


def layout_speedups(cfg: Config, device: torch.device, epochs: int = 6) -> tuple[float, float]:
    """Median ratios contiguous / channels_last of a bare training epoch and of a test
    evaluation, epochs of the two layouts alternating (first pair dropped)."""
    loops = {cl: BareLoop(replace(cfg, train=replace(cfg.train, channels_last=cl)), device,
                          test=False) for cl in (False, True)}  # fmt: skip
    train_ratios, eval_ratios = [], []
    for epoch in range(1, epochs + 1):
        seconds = {cl: loop.epoch(epoch) for cl, loop in loops.items()}
        evals = {}
        for cl, loop in loops.items():
            t0 = clock()
            extract_features(loop.model, loop.data.test, T.EVAL_BATCH_FACTOR * cfg.train.batch_size,
                             device)
            evals[cl] = clock() - t0
        if epoch > 1:
            train_ratios.append(seconds[False] / seconds[True])
            eval_ratios.append(evals[False] / evals[True])
    return statistics.median(train_ratios), statistics.median(eval_ratios)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    main()

"""What `nctools train` shows while it trains: a progress bar on a terminal, one plain
line per epoch in logs (batch jobs, ``nohup``, Slurm), or nothing.

Usage (by :func:`nctools.training.loop.train`)::

    with EpochProgress(config, start, progress, dist.is_main) as shown:
        for epoch in shown.epochs:
            row = ...              # the epoch's history row
            shown.update(row)
"""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm

from nctools.config.schema import Config

PROGRESS = ("bar", "auto", "none")  # train(progress=...)


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


class EpochProgress:
    """The epochs ``start + 1 .. train.epochs`` under a tqdm bar (silent without a
    terminal), and, with ``progress="auto"`` off a terminal, a plain line per epoch on
    stdout; only the main process shows anything."""

    def __init__(self, config: Config, start: int, progress: str, is_main: bool) -> None:
        self.total = config.train.epochs
        self.epochs = tqdm(range(start + 1, self.total + 1), initial=start, total=self.total,
                           unit="epoch", desc=config.name,
                           disable=True if progress == "none" or not is_main else None)
        # without a terminal tqdm stays silent: a plain line per epoch then, for logs
        self.lines = is_main and progress == "auto" and not sys.stdout.isatty()
        self.last_test = ""  # train.eval_every skips some epochs: the bar keeps the last

    def update(self, row: dict) -> None:
        """Show the history ``row`` of an epoch just trained."""
        if self.lines:
            print(epoch_line(row, self.total), flush=True)
        shown = {"loss": f"{row['train_loss']:.4g}", "acc": f"{row['train_acc_running']:.4f}"}
        if not math.isnan(row["test_acc"]):
            self.last_test = shown["test_acc"] = f"{row['test_acc']:.4f}"
        elif self.last_test:
            shown["test_acc"] = self.last_test
        self.epochs.set_postfix(shown)

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.epochs.close()

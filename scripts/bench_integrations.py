"""Benchmark the integrations' costs against what a training run already pays.

Usage::

    python scripts/bench_integrations.py                 # both cases, 5 repeats
    python scripts/bench_integrations.py --n 8192 --repeats 3

1. The Lightning callback's measurement at an epoch end (``NeuralCollapseCallback.measure``
   in its default mode: one eval-mode, no-grad pass over the train loader, hooked at the
   classifier's input, its features spilled to a temporary folder for the second
   streaming pass) against ONE eval-mode, no-grad forward pass over the same loader; and,
   for comparison, with ``reuse_features=False`` (the model run twice). Model: a small
   convnet (3 x 32 x 32 inputs, D = 256, C = 10). Target: <= 1.3x.
2. ``NCMetric.update`` on a (4096, 512) float32 chunk, C = 10, against one float32
   ``X.T @ X`` of that chunk. Target: <= 2x.

Each ratio is the median of per-repeat ratios, the two sides timed back to back so that
both see the same machine speed. Prints one line per case.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nctools.integrations.lightning import NeuralCollapseCallback
from nctools.metrics.ncmetric import NCMetric
from nctools.metrics.stats import BLOCK_ELEMENTS, add_upper_panels


class ConvNet(pl.LightningModule):
    def __init__(self, dim: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, dim, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def callback_case(n: int, repeats: int) -> tuple[float, float, float, float, float]:
    torch.manual_seed(0)
    y = torch.arange(n) % 10
    x = torch.randn(n, 3, 32, 32) + y[:, None, None, None] * 0.1
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    model = ConvNet().eval()
    trainer = types.SimpleNamespace(train_dataloader=loader, val_dataloaders=None)
    callback = NeuralCollapseCallback(splits=("train",))  # reuse_features=True: one forward
    twice = NeuralCollapseCallback(splits=("train",), reuse_features=False)

    @torch.no_grad()
    def forward_pass() -> None:
        for xb, _ in loader:
            model(xb)

    forward_pass()  # warm-up
    ratios, old_ratios, fwd, cb, old = [], [], [], [], []
    for _ in range(repeats):
        f = timed(forward_pass)
        c = timed(lambda: callback.measure(trainer, model))
        o = timed(lambda: twice.measure(trainer, model))
        fwd.append(f)
        cb.append(c)
        old.append(o)
        ratios.append(c / f)
        old_ratios.append(o / f)
    return (statistics.median(fwd), statistics.median(cb), statistics.median(ratios),
            statistics.median(old), statistics.median(old_ratios))


def update_case(repeats: int, rows: int = 4096,
                dim: int = 512) -> tuple[float, float, float, float, float]:
    """NCMetric.update against one float32 X^T X, and (to say where the time goes) the
    float64 second moment alone, added in the panels ``ClassStats`` uses and as one
    float64 X^T X."""
    torch.manual_seed(0)
    x = torch.randn(rows, dim)
    y = torch.arange(rows) % 10
    metric = NCMetric(10, dim=dim)
    metric.update(x, y)  # warm-up
    x64 = x.double()
    moment = torch.zeros(dim, dim, dtype=torch.float64)
    block = max(1, BLOCK_ELEMENTS // dim)  # the rows ClassStats takes at a time

    def panels() -> None:
        for start in range(0, rows, block):
            add_upper_panels(moment, x64[start : start + block])

    ratios, gram, upd, pan, full = [], [], [], [], []
    for _ in range(repeats):
        g = timed(lambda: x.T @ x)
        u = timed(lambda: metric.update(x, y))
        pan.append(timed(panels))
        full.append(timed(lambda: x64.T @ x64))
        gram.append(g)
        upd.append(u)
        ratios.append(u / g)
    return (statistics.median(gram), statistics.median(upd), statistics.median(ratios),
            statistics.median(pan), statistics.median(full))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="samples in the callback case")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    f, c, r, o, ro = callback_case(args.n, args.repeats)
    print(f"callback measure vs one eval forward pass (N={args.n}, D=256, C=10): "
          f"forward {f:.3f}s, callback {c:.3f}s, ratio {r:.2f}x (target <= 1.3x); "
          f"reuse_features=False {o:.3f}s, ratio {ro:.2f}x")  # fmt: skip
    g, u, r, pan, full = update_case(args.repeats)
    print(f"NCMetric.update vs float32 X.T @ X (4096 x 512, C=10): "
          f"X.T@X {g * 1e3:.1f}ms, update {u * 1e3:.1f}ms, ratio {r:.2f}x (target <= 2x); "
          f"the float64 moment alone: in panels {pan * 1e3:.1f}ms ({pan / g:.2f}x), "
          f"one float64 X.T @ X {full * 1e3:.1f}ms ({full / g:.2f}x)")


if __name__ == "__main__":
    main()

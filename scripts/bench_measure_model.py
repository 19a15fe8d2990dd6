"""Peak memory of ``nctools.measure_model`` on a stream far larger than one batch.

Usage::

    nice python scripts/bench_measure_model.py                 # N = 200,000 (the default)
    python scripts/bench_measure_model.py --n 20000 --batch 500

N synthetic images (3 x S x S, Gaussian class clusters) are generated batch by batch, the
same on both passes, never all in memory, and streamed through a small ConvNet measured
at every block and at the classifier's input (``layers="blocks"``). The script prints
the peak resident memory the measurement added above the process after start-up
(imports, the network) against what one pass must hold: one batch of inputs, every
module's activations of that batch, and each layer's class statistics (float64). The
target is a ratio of at most 1.5.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch
from torch import nn

import nctools
from nctools.analysis.model_measure import measure_model
from nctools.models.features import pool_activation


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class SyntheticStream:
    """``n`` images (3, size, size) in batches, regenerated identically on every pass."""

    def __init__(self, n: int, batch: int, size: int, classes: int) -> None:
        self.n, self.batch, self.size, self.classes = n, batch, size, classes
        self.centres = torch.randn(classes, 3, 1, 1, generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for start in range(0, self.n, self.batch):
            rows = min(self.batch, self.n - start)
            labels = torch.arange(start, start + rows) % self.classes
            noise = torch.randn(rows, 3, self.size, self.size, generator=gen)
            yield self.centres[labels] + noise, labels


def small_net(classes: int, width: int) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                             nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


def one_pass_bytes(
    net: nn.Module, stream: SyntheticStream, classes: int
) -> tuple[dict[str, float], int]:
    """MiB of the model, one batch's inputs and activations, every layer's statistics;
    and the pooled feature values a sample has over all the network's blocks."""
    inputs, _ = next(iter(stream))
    acts, dims = [], {}

    def hook(module, _inp, out):
        acts.append(out.numel() * out.element_size())

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.no_grad():
        x = inputs
        for name, child in net.named_children():
            x = child(x)
            dims[name] = pool_activation(x, "avg").shape[1]
    for h in handles:
        h.remove()
    # ClassStats per layer: counts, sums, shift (C x D), scatter (<= D x D), float64
    stats = sum(8 * (classes + 2 * classes * d + min(d, classes) ** 2) for d in dims.values())
    model = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    mib = 2**20
    need = {"model": model / mib, "batch": inputs.numel() * 4 / mib,
            "activations": sum(acts) / mib, "statistics": stats / mib}
    return need, sum(dims.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = small_net(args.classes, args.width).eval()
    stream = SyntheticStream(args.n, args.batch, args.size, args.classes)
    need, values_per_sample = one_pass_bytes(net, stream, args.classes)
    base = rss_mib()
    started = time.perf_counter()
    result = measure_model(net, stream, layers="blocks", progress=True)
    seconds = time.perf_counter() - started
    grown = peak_mib() - base
    budget = need["model"] + need["batch"] + need["activations"] + need["statistics"]
    cpu = platform.processor() or platform.machine()
    print(f"nctools {nctools.__version__}, torch {torch.__version__}, {cpu}, "
          f"{torch.get_num_threads()} threads")
    print(f"N = {args.n:,} images 3x{args.size}x{args.size}, batch {args.batch}, "
          f"{len(result)} layers, {2 * args.n / seconds:,.0f} images/s over both passes "
          f"({seconds:.1f} s)")
    print("one pass holds: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in need.items())
          + f" = {budget:.1f} MiB")
    print(f"peak RSS added by measure_model: {grown:.1f} MiB = {grown / budget:.2f} x "
          f"(model + one batch + statistics); held, the pooled features alone would be "
          f"{args.n * values_per_sample * 4 / 2**20:,.0f} MiB and the images "
          f"{args.n * 3 * args.size**2 * 4 / 2**20:,.0f} MiB")
    print("nc1 by layer: " + ", ".join(f"{k} {v['nc1']:.3g}" for k, v in result.items()))


if __name__ == "__main__":
    main()

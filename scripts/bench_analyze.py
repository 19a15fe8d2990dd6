"""Benchmark analysing one snapshot against reading its files.

Usage::

    python scripts/bench_analyze.py                       # N=50000, D=512, C=10 (+ 10000 test)
    python scripts/bench_analyze.py --n 200000 --d 256 --c 100

It writes a snapshot of synthetic float32 features (train N x D, test N/5 x D, C classes)
to a temporary run directory, then times, side by side in one process (median of
several runs, files in the page cache): reading its files as nctools does
(``snapshots.load_split`` of both splits and ``snapshots.load_classifier``, each file's sha256
checked on the bytes read) and ``analysis.measure_snapshot`` (the same reads, then every
metric of both splits). Target: analysis at most 2x the reading time. CPU seconds are
printed too, as they are steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import torch
from synthetic import clusters

from nctools.analysis.tables import measure_snapshot
from nctools.runs import snapshots


def synthetic(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, ...]:
    """features (n, d) float32, labels (n,), weight (c, d), bias (c,)."""
    labels, rows_of, weight, bias = clusters(n, d, c, seed)
    return rows_of(slice(0, n)), labels, weight, bias

def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    fn()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="training samples")
    parser.add_argument("--d", type=int, default=512, help="feature dimension")
    parser.add_argument("--c", type=int, default=10, help="classes")
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing (median)")
    args = parser.parse_args()
    features, labels, weight, bias = synthetic(args.n, args.d, args.c, seed=0)
    test_features, test_labels, _, _ = synthetic(args.n // 5, args.d, args.c, seed=1)
    with tempfile.TemporaryDirectory() as run:
        splits = {"train": (features, labels), "test": (test_features, test_labels)}
        snapshots.write_snapshot(run, 1, splits, weight, bias)

        def read() -> None:
            snapshots.load_split(run, 1, "train")
            snapshots.load_split(run, 1, "test")
            snapshots.load_classifier(run, 1)

        read(), measure_snapshot(run, 1)  # warm the page cache and the code paths
        reads = [timed(read) for _ in range(args.repeats)]
        analyses = [timed(lambda: measure_snapshot(run, 1)) for _ in range(args.repeats)]
    read_wall, read_cpu = (statistics.median(t[i] for t in reads) for i in (0, 1))
    an_wall, an_cpu = (statistics.median(t[i] for t in analyses) for i in (0, 1))
    print(f"snapshot: train {args.n} x {args.d}, test {args.n // 5} x {args.d}, C={args.c}, "
          f"float32; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"read files  {read_wall:.3f} s wall  {read_cpu:.3f} s CPU")
    print(f"analyze     {an_wall:.3f} s wall  {an_cpu:.3f} s CPU")
    print(f"ratio       {an_wall / read_wall:.2f}x wall  {an_cpu / read_cpu:.2f}x CPU"
          "  (target <= 2)")


if __name__ == "__main__":
    main()

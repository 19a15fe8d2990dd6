"""Benchmark `nctools.measure` against a per-sample loop and one float32 H^T H.

Usage::

    python scripts/bench_metrics.py                     # the three default cases
    python scripts/bench_metrics.py --n 50000 --d 512 --c 10 --repeats 5

For each case (synthetic float32 features, N x D, C classes) it prints the median time
of `measure` over several runs, the median time of one float32 ``H.T @ H`` on the same
features (the cost of a single pass that forms a D x D second moment), run in pairs
with `measure` so that the ratio (the median of the per-pair ratios) sees the same
machine speed on both sides, the time of a per-sample loop in the style common in
research code (one D x D outer product accumulated per sample: timed on a subset and
scaled linearly to N, as the table says), their ratios, and the peak resident memory
`measure` added (Linux VmHWM, reset before the call) against the size of the features.

Targets (2-core CPU): ratio to H^T H <= 1.0 at C=10 and <= 2.0 at C=100; >= 40x faster
than the per-sample loop; peak extra memory <= 2x the features.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from memory import peak_rss, reset_peak
from synthetic import clusters

from nctools import measure

CASES = [(50_000, 512, 10), (50_000, 512, 100), (50_000, 2048, 10)]
LOOP_SUBSET = 500


def synthetic(n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Gaussian clusters: features (n, d) float32, labels (n,), weight (c, d), bias (c,)."""
    labels, rows_of, weight, bias = clusters(n, d, c, seed)
    return rows_of(slice(0, n)), labels, weight, bias

def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_sample_loop(features: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
    """Sigma_W the way research code often builds it: one outer product per sample."""
    means = torch.stack([features[labels == k].mean(0) for k in range(c)]).double()
    sigma_w = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for h, y in zip(features.double(), labels, strict=True):
        diff = h - means[y]
        sigma_w += torch.outer(diff, diff)
    return sigma_w / features.shape[0]


def peak_extra_bytes(fn) -> int:
    """Peak resident memory added while ``fn`` runs (Linux: VmHWM after a reset)."""
    if not Path("/proc/self/status").exists():
        return -1
    before = reset_peak()
    fn()
    return peak_rss() - before


def run_case(n: int, d: int, c: int, repeats: int) -> dict[str, float]:
    """Time one case."""
    features, labels, weight, bias = synthetic(n, d, c)
    measure(features, labels, weight, bias)  # warm-up: allocator, BLAS threads, the build
    features.T @ features
    # Paired runs, one after the other: on a shared machine the speed drifts between
    # seconds, so the ratio is the median of per-pair ratios, not a ratio of medians.
    pairs = [
        (median_seconds(lambda: measure(features, labels, weight, bias), 1),
         median_seconds(lambda: features.T @ features, 1))
        for _ in range(repeats)
    ]  # fmt: skip
    peak = peak_extra_bytes(lambda: measure(features, labels, weight, bias))
    size = features.numel() * features.element_size()
    return {
        "measure_s": statistics.median(m for m, _ in pairs),
        "gram_s": statistics.median(g for _, g in pairs),
        "ratio_gram": statistics.median(m / g for m, g in pairs),
        "peak_mib": peak / 2**20, "peak_x": peak / size,
    }  # fmt: skip


def loop_seconds(n: int, d: int, c: int) -> float:
    """The per-sample loop on LOOP_SUBSET samples (median of 3 runs), scaled linearly to n."""
    features, labels, _, _ = synthetic(n, d, c)
    subset = min(LOOP_SUBSET, n)
    t_loop = median_seconds(lambda: per_sample_loop(features[:subset], labels[:subset], c), 3)
    return t_loop * n / subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="samples (with --d and --c: one case only)")
    parser.add_argument("--d", type=int, help="feature dimension")
    parser.add_argument("--c", type=int, help="classes")
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing (median)")
    args = parser.parse_args()
    cases = [(args.n, args.d, args.c)] if args.n and args.d and args.c else CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per-sample loop timed "
          f"on {LOOP_SUBSET} samples (median of 3) and scaled linearly to N")  # fmt: skip
    header = (
        f"{'N':>7} {'D':>5} {'C':>4} | {'measure s':>9} {'H^T H s':>8} "
        f"{'ratio':>6} | {'loop s':>8} {'speedup':>8} | {'peak MiB':>8} {'x feats':>7}"
    )
    print(header)
    print("-" * len(header))
    for n, d, c in cases:
        t_loop = loop_seconds(n, d, c)
        r = run_case(n, d, c, args.repeats)
        print(
            f"{n:>7} {d:>5} {c:>4} | {r['measure_s']:>9.3f} {r['gram_s']:>8.3f} "
            f"{r['ratio_gram']:>6.2f} | {t_loop:>8.1f} {t_loop / r['measure_s']:>7.0f}x | "
            f"{r['peak_mib']:>8.1f} {r['peak_x']:>7.2f}"
        )


if __name__ == "__main__":
    main()

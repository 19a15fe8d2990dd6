"""Benchmark nctools past memory and past a few classes: time and peak memory per case.

Usage::

    python scripts/bench_scale.py                      # all three cases (several minutes)
    python scripts/bench_scale.py --cases c1000 c10000 # only the many-class cases
    python scripts/bench_scale.py --dir /scratch/nc    # where the 2 GB snapshot goes

Cases (each in a fresh subprocess, so one case's memory never counts against another):

- ``large-n``: a float16 snapshot of N = 2,000,000 x D = 512 (C = 10; a 2 GB file) is
  written to a temporary directory, then ``nctools.analysis.measure_snapshot`` verifies
  its sha256 and streams it twice. Target: peak resident memory <= 1 GB.
- ``c1000``: ``nctools.metrics.measure`` on N = 100,000 x D = 512 float32, C = 1,000 classes.
  Target: under 30 s.
- ``c10000``: ``nctools.metrics.measure`` on N = 200,000 x D = 256 float32, C = 10,000 classes.
  Target: completes with peak resident memory <= 4 GB.

Seconds cover the measured call only (not data generation or imports). Peak RSS is the
subprocess's VmHWM (Linux), reset through /proc/self/clear_refs just before the call so
that generating the inputs does not count; ``ru_maxrss`` cannot be reset and would even
start at the parent's peak (it survives fork and exec). "RSS before" is the resident
memory at that moment: torch and nctools imported (about 0.7 GB of it, a fixed cost),
code paths warmed, and for the measure cases the input features. The script prints a
markdown table (the one in docs/scaling.md) with the CPU, thread count, torch version
and date above it; it needs Linux (/proc), about 5 GB of memory and 2 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import hardware
from memory import peak_rss, reset_peak
from synthetic import clusters

GB = 2**30
CASES = {
    # name: (what, target text, check(result) -> bool); result has seconds, peak, ...
    "large-n": ("analyze N=2,000,000 D=512 float16 snapshot (2 GB), C=10",
                "peak RSS <= 1 GB, time <= 2.5x reading + hashing the file",
                lambda r: r["peak"] <= 1 * GB and r["seconds"] <= 2.5 * r["read_hash"]),
    "c1000": ("measure N=100,000 D=512, C=1,000", "< 30 s", lambda r: r["seconds"] < 30),
    "c10000": ("measure N=200,000 D=256, C=10,000", "peak RSS <= 2 GB",
               lambda r: r["peak"] <= 2 * GB),
    "c20000": ("measure N=20,000 D=8, C=20,000", "peak RSS <= 2 GB, < 60 s",
               lambda r: r["peak"] <= 2 * GB and r["seconds"] < 60),
}


def warm_up() -> None:
    """Run every code path once on tiny data: library loading is not the case's memory."""
    from nctools.metrics.measure import measure

    gen = torch.Generator().manual_seed(1)
    measure(torch.randn(600, 8, generator=gen), torch.arange(600) % 3, torch.randn(3, 8))


def write_snapshot(folder: Path, n: int, dim: int, num_classes: int) -> None:
    from nctools.runs import snapshots

    labels, features, weight, _ = clusters(n, dim, num_classes)
    half = torch.empty(n, dim, dtype=torch.float16)
    for start in range(0, n, 1 << 16):
        rows = slice(start, min(n, start + (1 << 16)))
        half[rows] = features(rows)
    snapshots.write_snapshot(folder, 1, {"train": (half, labels)}, weight, None, dtype="float16")


def child(case: str, folder: Path) -> dict:
    """One case in this (fresh) process: returns seconds, peak RSS and RSS before the call."""
    import nctools  # noqa: F401  (the imports count towards "after imports")
    from nctools.analysis.tables import measure_snapshot
    from nctools.metrics.measure import measure
    from nctools.runs import files

    if case == "write-large-n":
        write_snapshot(folder, 2_000_000, 512, 10)
        return {}
    if case == "large-n":
        warm_up()
        start = time.perf_counter()  # the floor: read every byte and hash it, once
        for path in sorted(folder.rglob("*.safetensors")):
            files.sha256_file(path)
        read_hash = time.perf_counter() - start
        base = reset_peak()
        start = time.perf_counter()
        rows = measure_snapshot(folder, 1)
        seconds = time.perf_counter() - start
        accuracy = next(r["value"] for r in rows if r["metric"] == "accuracy")
        return {"seconds": seconds, "peak": peak_rss(), "base": base, "accuracy": accuracy,
                "read_hash": read_hash}
    n, dim, num_classes = {"c1000": (100_000, 512, 1000), "c10000": (200_000, 256, 10_000),
                           "c20000": (20_000, 8, 20_000)}[case]
    labels, features, weight, _ = clusters(n, dim, num_classes)
    h = features(slice(0, n))
    warm_up()
    base = reset_peak()
    start = time.perf_counter()
    result = measure(h, labels, weight)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": peak_rss(), "base": base,
            "accuracy": result["accuracy"]}


def run_child(case: str, folder: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", case, "--dir", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dir", type=Path, help="where the large snapshot is written "
                        "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return
    print(f"hardware: {hardware()}\n")
    rows = ["| case | seconds | peak RSS | RSS before | target | result |",
            "|---|---:|---:|---:|---|---|"]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for case in args.cases:
            what, target, check = CASES[case]
            if case == "large-n":
                written = run_child("write-large-n", Path(tmp))
                if "error" in written:
                    rows.append(f"| {what} | | | | {target} | error: {written['error']} |")
                    continue
            out = run_child(case, Path(tmp))
            if "error" in out:
                rows.append(f"| {what} | | | | {target} | error: {out['error']} |")
            else:
                ok = check(out)
                rows.append(f"| {what} | {out['seconds']:.1f} | {out['peak'] / GB:.2f} GB | "
                            f"{out['base'] / GB:.2f} GB | {target}"
                            + (f" (read + hash {out['read_hash']:.1f} s)" if "read_hash" in out
                               else "") + " | "
                            f"{'pass' if ok else 'FAIL'} |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress while the rest runs
    print("\n".join(rows))


if __name__ == "__main__":
    main()

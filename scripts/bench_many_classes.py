"""Benchmark the many-class metrics: time and peak memory per case, each in a fresh process.

Usage::

    nice python scripts/bench_many_classes.py                 # both cases (a few minutes)
    nice python scripts/bench_many_classes.py --cases gnc2-c50000

Cases:

- ``gnc2-c50000``: generalised NC2/NC3 (Liu et al. 2023; Wu & Papyan 2024) from class
  statistics alone at C = 50,000 classes (a language model's vocabulary), D = 512:
  ``gnc2`` of the centred means and of the classifier rows (1.25e9 pairs each, in row
  tiles) and ``duality`` (duality_cos, unc3). Target: peak RSS <= 4 GB (a C x C float64
  matrix would take 20 GB).
- ``measure-c20000``: ``nctools.measure`` on N = 20,000 x D = 8 float32, C = 20,000
  classes (one sample each). Target: peak RSS <= 2 GB and under 60 s.

Peak RSS is the subprocess's VmHWM (Linux), reset through /proc/self/clear_refs just
before the measured call, so generating the inputs does not count; "RSS before" is the
resident memory at that moment (torch imported, inputs made). Seconds cover the call only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from machine import hardware
from memory import peak_rss, reset_peak

GB = 2**30
CASES = {
    "gnc2-c50000": ("gnc2 + duality from class statistics, C=50,000 D=512",
                    "peak RSS <= 4 GB", lambda s, peak: peak <= 4 * GB),
    "measure-c20000": ("measure N=20,000 D=8, C=20,000", "peak RSS <= 2 GB, < 60 s",
                       lambda s, peak: peak <= 2 * GB and s < 60),
}


def child(case: str) -> dict:
    from nctools.metrics import functional
    from nctools.metrics.measure import measure

    gen = torch.Generator().manual_seed(0)
    # warm every code path on tiny data: library loading is not the case's memory
    measure(torch.randn(60, 8, generator=gen), torch.arange(60) % 3, torch.randn(3, 8))
    if case == "gnc2-c50000":
        num_classes, dim = 50_000, 512
        centred = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
        weight = centred + 0.5 * torch.randn(num_classes, dim, generator=gen,
                                             dtype=torch.float64)
        base = reset_peak()
        start = time.perf_counter()
        means_g = functional.gnc2(centred)
        print(f"  gnc2 of the means: {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
        weights_g = functional.gnc2(weight)
        dual = functional.duality(weight, centred)
        seconds = time.perf_counter() - start
        values = {"gnc2_means": means_g["variance"], "gnc2_weights": weights_g["variance"],
                  **dual}
    else:
        num_classes, dim = 20_000, 8
        labels = torch.randperm(num_classes, generator=gen)
        means = torch.randn(num_classes, dim, generator=gen) * 2
        features = means[labels] + 0.1 * torch.randn(num_classes, dim, generator=gen)
        weight = means + 0.5 * torch.randn(num_classes, dim, generator=gen)
        base = reset_peak()
        start = time.perf_counter()
        result = measure(features, labels, weight)
        seconds = time.perf_counter() - start
        values = {"accuracy": result["accuracy"], "gnc2_means": result["gnc2_means"]}
    return {"seconds": seconds, "peak": peak_rss(), "base": base, "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    print(f"hardware: {hardware()}\n")
    rows = ["| case | seconds | peak RSS | RSS before | target | result |",
            "|---|---:|---:|---:|---|---|"]
    for case in args.cases:
        what, target, check = CASES[case]
        print(f"{case} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", case],
                              stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            rows.append(f"| {what} | | | | {target} | error (exit {done.returncode}) |")
        else:
            out = json.loads(done.stdout.strip().splitlines()[-1])
            ok = check(out["seconds"], out["peak"])
            rows.append(f"| {what} | {out['seconds']:.1f} | {out['peak'] / GB:.2f} GB | "
                        f"{out['base'] / GB:.2f} GB | {target} | {'pass' if ok else 'FAIL'} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

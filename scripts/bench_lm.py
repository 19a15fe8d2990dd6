"""Benchmark token-level measurement at vocabulary scale (docs/language-models.md).

Usage::

    nice python scripts/bench_lm.py                       # GPT-2's vocabulary (minutes)
    nice python scripts/bench_lm.py --classes 5000 --tokens 200000   # a quick look

A synthetic token stream (``synthetic.zipf_tokens``: Zipf-distributed labels over C =
50,257 tokens, D = 768, 10^6 tokens, float32 features made chunk by chunk) is measured as
``nctools measure`` measures a language model: ``measure_chunks`` with the classes that
occur (``drop_empty``), the classifier's argmax over the whole vocabulary, the ETF keys
NaN (C > D + 1). Each case runs in a fresh process; side by side in one run:

- ``baseline``: one read of the features (their class sums) plus one tiled float32 Gram
  of the class means (C x C in row tiles, each tile reduced and dropped);
- ``metrics``: every metric except NC4 (``ncc_samples=1``: NC4 tallied on one token);
  target <= 5x the baseline, peak RSS <= 4 GB;
- ``nc4``: the same with NC4 on ``--ncc-samples`` tokens (default 10^4); target: within a
  further 2x;
- ``accuracy``: C = 2,000, D = 768, 5 x 10^4 tokens: the streamed float32 measurement
  against a float64 reference written plainly from whole tensors; target: every key
  compared within 1e-6 (relative).

Peak RSS is the child's VmHWM since just before the measured call (``memory.reset_peak``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
from machine import hardware
from memory import peak_rss, reset_peak
from synthetic import GPT2_DIM, GPT2_VOCAB, chunks, zipf_tokens

GB = 2**30
CHUNK = 65_536
GRAM_ROWS = 2_048
ACCURACY_TOKENS = 50_000  # the reference holds them whole, and (N, C) scores
ACCURACY_KEYS = ("nc1", "nc1_ratio", "cdnv", "equinorm_means", "equinorm_weights",
                 "self_duality", "gnc2_means", "gnc2_weights", "duality_cos", "unc3",
                 "ncc_mismatch", "accuracy", "ncc_accuracy")


def _lm_measure(labels, rows_of, weight, bias, ncc_samples, dtype=None):
    from nctools.metrics.measure import measure_chunks

    def stream():
        for feats, labs in chunks(labels, rows_of, CHUNK):
            yield (feats if dtype is None else feats.to(dtype)), labs

    result, _ = measure_chunks(stream, weight, bias, drop_empty=True, argmax_all_classes=True,
                               etf_without_simplex=False, ncc_samples=ncc_samples,
                               pair_precision="float32")
    return result


def baseline(labels, rows_of, num_classes: int) -> None:
    """One read of the features into class sums, then one tiled float32 Gram of the means."""
    sums = torch.zeros(num_classes, rows_of(slice(0, 1)).shape[1])
    for feats, labs in chunks(labels, rows_of, CHUNK):
        sums.index_add_(0, labs, feats)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    means = sums / counts[:, None]
    total = 0.0
    for start in range(0, num_classes, GRAM_ROWS):
        total += float((means[start : start + GRAM_ROWS] @ means.T).sum())


def child(case: str, classes: int, tokens: int, ncc_samples: int) -> dict:
    import warnings

    warnings.simplefilter("ignore")  # the ETF keys' NaN is the point, not news
    _lm_measure(*zipf_tokens(600, 8, 30), ncc_samples=10)  # warm every code path
    if case == "accuracy":
        return accuracy()
    labels, rows_of, weight, bias = zipf_tokens(tokens, GPT2_DIM, classes)
    base = reset_peak()
    start = time.perf_counter()
    result = None
    if case == "baseline":
        baseline(labels, rows_of, classes)
    else:
        result = _lm_measure(labels, rows_of, weight, bias,
                             1 if case == "metrics" else ncc_samples)
    seconds = time.perf_counter() - start
    values = {} if result is None else {k: result[k] for k in
                                        ("classes_measured", "gnc2_means", "unc3", "cdnv",
                                         "ncc_samples", "ncc_accuracy")}
    return {"seconds": seconds, "peak": peak_rss(), "base": base, "values": values}


def reference(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """The keys of ``ACCURACY_KEYS`` in float64 from whole tensors (the classes present)."""
    kept = torch.unique(y)
    y = torch.searchsorted(kept, y)
    c = kept.numel()
    counts = torch.bincount(y, minlength=c).double()
    mu = torch.zeros(c, h.shape[1], dtype=torch.float64).index_add_(0, y, h) / counts[:, None]
    mc = mu - h.mean(0)
    x = h - mu[y]
    sigma_w = x.T @ x / h.shape[0]
    sigma_b = mc.T @ mc / c
    var = torch.zeros(c, dtype=torch.float64).index_add_(0, y, x.square().sum(1)) / counts
    dist2 = torch.cdist(mu, mu).square()
    off = ~torch.eye(c, dtype=torch.bool)
    out = {
        "nc1": float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True))) / c,
        "nc1_ratio": float(torch.trace(sigma_w) / torch.trace(sigma_b)),
        "cdnv": float(((var[:, None] + var[None]) / (2 * dist2))[off].mean()),
        "self_duality": float((w[kept] / w[kept].norm() - mc / mc.norm()).square().sum()),
    }
    for key, v in (("means", mc), ("weights", w[kept])):
        norms = v.norm(dim=1)
        out[f"equinorm_{key}"] = float(norms.std() / norms.mean())
        u = v / norms[:, None]
        k = -0.5 * torch.log((2 - 2 * (u @ u.T))[torch.triu(off)])
        out[f"gnc2_{key}"] = float(k.var(correction=0))
    cos = (w[kept] * mc).sum(1) / (w[kept].norm(dim=1) * mc.norm(dim=1))
    out["duality_cos"] = float(cos.mean())
    out["unc3"] = float(cos.std(correction=0) / cos.mean())
    measured = torch.full((w.shape[0],), -1, dtype=torch.long)
    measured[kept] = torch.arange(c)
    decided = measured[(h @ w.T).argmax(1)]  # the argmax over every class; -1: not measured
    nearest = torch.cdist(h, mu).argmin(1)
    out["ncc_mismatch"] = float((decided != nearest).double().mean())
    out["accuracy"] = float((decided == y).double().mean())
    out["ncc_accuracy"] = float((nearest == y).double().mean())
    return out


def accuracy() -> dict:
    labels, rows_of, weight, bias = zipf_tokens(ACCURACY_TOKENS, GPT2_DIM, 2_000, seed=1)
    start = time.perf_counter()
    got = _lm_measure(labels, rows_of, weight, bias, None)
    seconds = time.perf_counter() - start
    h = rows_of(slice(0, labels.shape[0])).double()
    want = reference(h, labels, weight.double())
    worst = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-300) for k in ACCURACY_KEYS)
    return {"seconds": seconds, "peak": peak_rss(), "base": 0,
            "values": {"worst_relative_error": worst,
                       "classes_measured": got["classes_measured"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=GPT2_VOCAB)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--ncc-samples", type=int, default=10_000)
    parser.add_argument("--cases", nargs="+", default=["baseline", "metrics", "nc4",
                                                      "accuracy"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.classes, args.tokens, args.ncc_samples)))
        return
    print(f"hardware: {hardware()}\n")
    print(f"C = {args.classes}, D = {GPT2_DIM}, {args.tokens} tokens; NC4 on "
          f"{args.ncc_samples} tokens\n")
    rows = ["| case | seconds | x baseline | peak RSS | values |", "|---|---:|---:|---:|---|"]
    base_s = math.nan
    for case in args.cases:
        print(f"{case} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", case,
                               "--classes", str(args.classes), "--tokens", str(args.tokens),
                               "--ncc-samples", str(args.ncc_samples)],
                              stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            rows.append(f"| {case} | error (exit {done.returncode}) | | | |")
            continue
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if case == "baseline":
            base_s = out["seconds"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in out["values"].items())
        rows.append(f"| {case} | {out['seconds']:.1f} | {out['seconds'] / base_s:.2f} | "
                    f"{out['peak'] / GB:.2f} GB | {shown} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""The classifier rows of minority and majority classes through a run (Fang et al. 2021).

Usage::

    python scripts/minority_rows.py runs/minority-collapse --minority 7,8,9

For every snapshot of RUN it reads the classifier W (C, D) (checksums verified) and
prints a markdown table: the mean pairwise cosine cos(w_c, w_c') among the minority rows
and among the majority rows (the simplex ETF of all C classes puts every pair at
-1/(C-1)), and the two groups' mean row norms ||w_c||. Minority collapse (Fang, He, Long &
Su, PNAS 2021) shows as the minority rows' cosine rising towards 1 while the majority
rows' stays near -1/(C-1). The table in results/minority-collapse/README.md comes from it.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from nctools.runs.snapshots import list_snapshots, load_classifier


def mean_cosine(rows: torch.Tensor) -> float:
    """Mean of cos(w_a, w_b) over the pairs a < b of ``rows`` (k, D)."""
    unit = rows / rows.norm(dim=1, keepdim=True)
    pairs = list(itertools.combinations(range(rows.shape[0]), 2))
    return float(torch.stack([unit[a] @ unit[b] for a, b in pairs]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--minority", required=True, help="the minority classes, e.g. 7,8,9")
    args = parser.parse_args()
    minority = [int(c) for c in args.minority.split(",")]
    print("| epoch | minority rows, mean cos | majority rows, mean cos "
          "| minority / majority mean norm |")
    print("|---:|---:|---:|---:|")
    for epoch in list_snapshots(args.run):
        weight = load_classifier(args.run, epoch)[0].double()
        majority = [c for c in range(weight.shape[0]) if c not in minority]
        small, large = weight[minority], weight[majority]
        print(f"| {epoch} | {mean_cosine(small):.3f} | {mean_cosine(large):.3f} "
              f"| {float(small.norm(dim=1).mean()):.2f} / {float(large.norm(dim=1).mean()):.2f} |")


if __name__ == "__main__":
    main()

"""scripts/synthetic.py's token stream: Zipf's law, determinism, and chunk independence."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def synthetic():
    spec = importlib.util.spec_from_file_location("scripts_synthetic",
                                                  ROOT / "scripts" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zipf_tokens_follow_zipf_s_law() -> None:
    n, num_classes = 200_000, 1000
    labels, _, weight, bias = synthetic().zipf_tokens(n, dim=4, num_classes=num_classes)
    assert weight.shape == (num_classes, 4) and torch.equal(bias, torch.zeros(num_classes))
    counts = np.sort(np.bincount(labels.numpy(), minlength=num_classes))[::-1]
    harmonic = (1.0 / np.arange(1, num_classes + 1)).sum()
    expected = n / np.arange(1, 6) / harmonic  # the five most frequent: ~26,700 ... 5,300
    assert np.all(np.abs(counts[:5] / expected - 1) < 0.03)  # 3% ~ 4 standard errors
    slope = np.polyfit(np.log(np.arange(1, 101)), np.log(counts[:100]), 1)[0]
    assert abs(slope + 1.0) < 0.05


def test_stream_is_fixed_by_the_seed_whatever_the_chunk() -> None:
    module = synthetic()
    labels, rows_of, weight, _ = module.zipf_tokens(10_000, dim=8, num_classes=500, seed=4)
    again, rows_again, weight_again, _ = module.zipf_tokens(10_000, dim=8, num_classes=500,
                                                            seed=4)
    assert torch.equal(labels, again) and torch.equal(weight, weight_again)
    other, _, _, _ = module.zipf_tokens(10_000, dim=8, num_classes=500, seed=5)
    assert not torch.equal(labels, other)
    whole = rows_of(slice(0, 10_000))
    assert torch.equal(rows_again(slice(0, 10_000)), whole)
    for chunk in (999, 4096, 10_000):
        pieces = list(module.chunks(labels, rows_of, chunk))
        assert max(f.shape[0] for f, _ in pieces) == chunk
        assert torch.equal(torch.cat([f for f, _ in pieces]), whole)
        assert torch.equal(torch.cat([y for _, y in pieces]), labels)

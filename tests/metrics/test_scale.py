"""Analysis past memory: streamed snapshots measure as in memory, many classes, bounded RSS.

The memory test analyses a 200 MB float16 snapshot (N = 400,000, D = 256) in a fresh
subprocess and compares the growth of its peak resident memory during
``measure_snapshot`` with the file's size: streaming must not hold the split. The peak is
Linux's VmHWM, not ``ru_maxrss``: a child's ru_maxrss starts at its parent's peak (it
survives fork and exec), which would hide the growth behind pytest's own footprint.
``scripts/bench_scale.py`` runs the full-size targets (N = 2,000,000, C = 10,000).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nctools.analysis.tables import measure_snapshot
from nctools.metrics.measure import class_means, measure
from nctools.runs import snapshots, store

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clusters(n: int, dim: int, num_classes: int, seed: int = 0, noise: float = 1.0):
    """Gaussian class clusters: features (n, dim), labels (n,) with every class present,
    a classifier near the means: weight (C, dim), bias (C,)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * 3
    labels = torch.cat([torch.arange(num_classes),
                        torch.randint(0, num_classes, (n - num_classes,), generator=gen)])
    labels = labels[torch.randperm(n, generator=gen)]
    features = means[labels] + noise * torch.randn(n, dim, generator=gen)
    weight = means + 0.5 * torch.randn(num_classes, dim, generator=gen)
    return features, labels, weight, torch.randn(num_classes, generator=gen)


def in_memory(run: Path, epoch: int) -> dict[str, dict[str, float]]:
    """The metrics of a snapshot measured the pre-streaming way: whole splits in memory."""
    weight, bias = snapshots.load_classifier(run, epoch)
    train = snapshots.load_split(run, epoch, "train")
    means = class_means(*train, weight.shape[0])
    return {"train": measure(*train, weight, bias),
            "test": measure(*snapshots.load_split(run, epoch, "test"), weight, bias,
                            class_means=means)}


def assert_rows_match(rows: list[dict], expected: dict, rel: float) -> None:
    assert [(r["split"], r["metric"]) for r in rows] == [
        (s, k) for s in ("train", "test") for k in expected[s]]
    for row in rows:
        want = expected[row["split"]][row["metric"]]
        assert row["value"] == pytest.approx(want, rel=rel, abs=1e-12), row


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_snapshot_equals_in_memory_measure(tmp_path, dtype):
    h, y, weight, bias = clusters(3000, 16, 7)
    th, ty, _, _ = clusters(700, 16, 7, seed=1)
    snapshots.write_snapshot(tmp_path, 1, {"train": (h, y), "test": (th, ty)}, weight, bias,
                         dtype=dtype)
    rows = measure_snapshot(tmp_path, 1, chunk_rows=37)  # chunks cut through every class
    assert_rows_match(rows, in_memory(tmp_path, 1), rel=1e-10)


def test_thousand_classes_streamed_equal_in_memory(tmp_path):
    """C = 1000 classes of ~4 samples, chunks smaller than a tenth of the split."""
    h, y, weight, bias = clusters(4000, 24, 1000, noise=0.3)
    th, ty, _, _ = clusters(1500, 24, 1000, seed=1, noise=0.3)
    snapshots.write_snapshot(tmp_path, 3, {"train": (h, y), "test": (th, ty)}, weight, bias)
    rows = measure_snapshot(tmp_path, 3, chunk_rows=333)
    assert_rows_match(rows, in_memory(tmp_path, 3), rel=1e-9)


def test_a_corrupt_file_is_refused_before_streaming(tmp_path):
    h, y, weight, bias = clusters(200, 4, 3)
    snapshots.write_snapshot(tmp_path, 1, {"train": (h, y)}, weight, bias)
    path = snapshots.snapshot_dir(tmp_path, 1) / "train.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    path.write_bytes(bytes(data))
    with pytest.raises(store.SnapshotError, match=r"train\.safetensors.*sha256"):
        measure_snapshot(tmp_path, 1)


# ------------------------------------------------------------------ peak memory

ANALYZE = textwrap.dedent("""
    import json, sys
    import torch
    from nctools.analysis.tables import measure_snapshot
    from nctools.metrics.measure import measure

    def peak_mb():  # this process's own high-water mark (ru_maxrss has the parent's)
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    # warm every code path (and the libraries it loads) before the baseline
    g = torch.Generator().manual_seed(0)
    measure(torch.randn(600, 8, generator=g), torch.arange(600) % 3, torch.randn(3, 8))
    base = peak_mb()
    rows = measure_snapshot(sys.argv[1], 1)
    print(json.dumps({"base_mb": base, "growth_mb": peak_mb() - base,
                      "accuracy": rows[[r["metric"] for r in rows].index("accuracy")]["value"]}))
""")


def write_large_snapshot(run: Path, n: int, dim: int, num_classes: int) -> Path:
    """A float16 snapshot of n x dim features, made cheaply (a tiled noise block)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(num_classes, dim, generator=gen) * 4
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    noise = torch.randn(4099, dim, generator=gen)  # prime row count: no alignment with chunks
    features = torch.empty(n, dim, dtype=torch.float16)
    for start in range(0, n, 1 << 16):
        rows = slice(start, min(n, start + (1 << 16)))
        index = torch.arange(rows.start, rows.stop) % noise.shape[0]
        features[rows] = means[labels[rows]] + noise[index]
    snapshots.write_snapshot(run, 1, {"train": (features, labels)}, means, None, dtype="float16")
    return snapshots.snapshot_dir(run, 1) / "train.safetensors"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_memory_of_a_large_analysis_does_not_grow_with_n(tmp_path):
    path = write_large_snapshot(tmp_path, 400_000, 256, 10)
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 190
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    done = subprocess.run([sys.executable, "-c", ANALYZE, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["accuracy"] > 0.99  # the clusters are 4 sigma apart: it measured them
    assert result["growth_mb"] < size_mb / 4, result

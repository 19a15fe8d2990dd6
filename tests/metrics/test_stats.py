"""ClassStats: streaming, merging, syncing and saving give the numbers of one pass."""

import itertools
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nctools import ClassStats
from nctools.metrics import stats as stats_module
from tests.helpers import free_port


def data(num_classes=4, dim=6, n=120, offset=0.0, spread=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 3 + offset
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    labels[:num_classes] = torch.arange(num_classes)  # every class present
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return means[labels] + spread * noise, labels


def reference(features, labels, num_classes):
    """Two-pass NumPy statistics: exact enough to judge any one-pass scheme."""
    h, y = features.numpy(), labels.numpy()
    mu = np.stack([h[y == c].mean(0) for c in range(num_classes)])
    centred = h - mu[y]
    return {
        "means": mu,
        "global_mean": h.mean(0),
        "variances": np.array([(centred[y == c] ** 2).sum(1).mean() for c in range(num_classes)]),
        "within": centred.T @ centred / len(h),
        "counts": np.bincount(y, minlength=num_classes),
    }


def assert_matches(stats, ref, rtol=1e-10):
    np.testing.assert_array_equal(stats.counts.numpy(), ref["counts"])
    np.testing.assert_allclose(stats.class_means().numpy(), ref["means"], rtol=rtol)
    np.testing.assert_allclose(stats.global_mean().numpy(), ref["global_mean"], rtol=rtol)
    np.testing.assert_allclose(stats.class_variances().numpy(), ref["variances"], rtol=rtol)
    scale = np.abs(ref["within"]).max()
    np.testing.assert_allclose(stats.within_class_cov().numpy(), ref["within"], atol=rtol * scale)
    assert stats.within_class_trace() == pytest.approx(np.trace(ref["within"]), rel=rtol)


@pytest.fixture(params=["small_blocks", "one_block"])
def route(request, monkeypatch):
    """Run a test with chunks cut into blocks of 5 rows and with whole chunks as one block."""
    rows = 5 if request.param == "small_blocks" else 1 << 18
    monkeypatch.setattr(stats_module, "BLOCK_ELEMENTS", rows * 8)
    return request.param


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_any_chunking_equals_reference(chunk, route):
    features, labels = data()
    stats = ClassStats(4, 6)
    for start in range(0, len(labels), chunk):
        stats.update(features[start : start + chunk], labels[start : start + chunk])
    assert_matches(stats, reference(features, labels, 4))


def test_merge_in_any_order_equals_one_pass(route):
    features, labels = data(n=150, seed=1)
    bounds = [0, 20, 61, 99, 150]
    shards = [
        ClassStats(4, 6).update(features[a:b], labels[a:b]) for a, b in itertools.pairwise(bounds)
    ]
    ref = reference(features, labels, 4)
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        merged = ClassStats(4, 6)
        for i in order:
            merged.merge(shards[i])
        assert_matches(merged, ref)


@pytest.mark.parametrize("dim", [127, 200, 520])
def test_wide_features_accumulate_in_panels_and_stay_symmetric(dim, route):
    """D >= 128: the second moment is added panel by panel above the diagonal and mirrored;
    every block, below the diagonal too, must equal the reference, also after a merge."""
    features, labels = data(num_classes=3, dim=dim, n=90, seed=4)
    if dim >= 128:
        assert stats_module.panel_width(dim) < dim  # the panel route is the one tested
    stats = ClassStats(3, dim).update(features[:41], labels[:41])
    stats.merge(ClassStats(3, dim).update(features[41:], labels[41:]))
    assert_matches(stats, reference(features, labels, 3))


def test_float32_and_float16_chunks_accumulate_in_float64():
    features, labels = data(seed=2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        low = features.to(dtype)
        stats = ClassStats(4, 6).update(low[:50], labels[:50]).update(low[50:], labels[50:])
        assert stats.sums.dtype == torch.float64
        assert_matches(stats, reference(low.double(), labels, 4))


def test_collapsed_regime_with_large_offset(route):
    """Mean ~1e3, within-class std ~1e-3: raw moments would keep ~4 digits, shifted ~10."""
    features, labels = data(num_classes=3, dim=5, n=3000, offset=1e3, spread=1e-3, seed=3)
    stats = ClassStats(3, 5)
    for start in range(0, 3000, 256):
        stats.update(features[start : start + 256], labels[start : start + 256])
    ref = reference(features, labels, 3)
    assert_matches(stats, ref, rtol=1e-7)
    # The naive formula E[hh^T] - mu mu^T loses the within-class spread entirely here.
    h = features.numpy()
    raw = h.T @ h / len(h) - sum(
        np.outer(m, m) * n for m, n in zip(ref["means"], ref["counts"], strict=True)
    ) / len(h)
    streamed_error = np.abs(stats.within_class_cov().numpy() - ref["within"]).max()
    assert np.abs(raw - ref["within"]).max() > 1e3 * streamed_error


def test_basis_keeps_the_moment_inside_its_span(route):
    features, labels = data(dim=8, seed=4)
    full = ClassStats(4, 8).update(features, labels)
    basis = torch.randn(8, 3, dtype=torch.float64)
    projected = ClassStats(4, 8, basis=basis).update(features, labels)
    want_cov = basis.T @ full.within_class_cov() @ basis
    torch.testing.assert_close(projected.within_class_cov(), want_cov, rtol=1e-10, atol=1e-12)
    inside = basis @ torch.randn(3, 2, dtype=torch.float64)  # vectors in the span
    want = torch.diagonal(inside.T @ full.within_class_cov() @ inside)
    torch.testing.assert_close(projected.within_class_var_along(inside), want, rtol=1e-9, atol=0)
    torch.testing.assert_close(full.within_class_var_along(inside), want, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="not in the span"):
        projected.within_class_var_along(torch.eye(8, dtype=torch.float64)[:, :2])


def test_basis_moments_merge_recentre_and_round_trip(route, tmp_path):
    """The k x k moment in an orthonormal basis, through updates, merges in any order,
    re-centring (merge of differently shifted states) and save/load; along the basis
    vectors themselves its diagonal is the variance."""
    features, labels = data(dim=8, seed=7)
    basis = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64)).Q
    full = ClassStats(4, 8).update(features, labels)
    want = basis.T @ full.within_class_cov() @ basis
    parts = [ClassStats(4, 8, basis=basis) for _ in range(3)]
    for part, rows in zip(parts, (slice(0, 7), slice(7, 40), slice(40, None)), strict=True):
        part.update(features[rows], labels[rows])  # each part picks its own shifts
    merged = parts[2].merge(parts[0]).merge(parts[1])
    torch.testing.assert_close(merged.within_class_cov(), want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        merged.within_class_var_along(basis), torch.diagonal(want), rtol=1e-10, atol=1e-13
    )
    merged.save(tmp_path / "basis.safetensors")
    loaded = ClassStats.load(tmp_path / "basis.safetensors")
    assert torch.equal(loaded.scatter, merged.scatter) and torch.equal(loaded.basis, basis)
    with pytest.raises(ValueError, match="different bases"):
        merged.merge(ClassStats(4, 8))

def test_save_load_round_trip(tmp_path):
    features, labels = data(seed=5)
    stats = ClassStats(4, 6).update(features, labels)
    stats.save(tmp_path / "stats.safetensors")
    loaded = ClassStats.load(tmp_path / "stats.safetensors")
    for name in ("counts", "sums", "sq_norms", "scatter", "shift", "has_shift"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name)), name
    # a loaded state keeps accumulating like the original
    more, more_labels = data(seed=6)
    stats.update(more, more_labels)
    loaded.update(more, more_labels)
    torch.testing.assert_close(
        loaded.within_class_cov(), stats.within_class_cov(), rtol=1e-13, atol=0
    )


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        ClassStats.load(bad)


def test_update_errors_name_the_problem():
    stats = ClassStats(3, 4)
    with pytest.raises(ValueError, match=r"features must have shape \(n, 4\)"):
        stats.update(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels has shape \(4,\) but features has 5 rows"):
        stats.update(torch.zeros(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        stats.update(torch.zeros(2, 4), torch.tensor([0, 3]))
    stats.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class 2 has no samples"):
        stats.check_nonempty()


def _all_reduce_worker(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        features, labels = data(n=200, offset=50.0, seed=7)
        shard = slice(rank * 100, (rank + 1) * 100)
        stats = ClassStats(4, 6).update(features[shard], labels[shard]).all_reduce()
        stats.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes_equals_one_pass(tmp_path):
    port = free_port()
    mp.spawn(_all_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    features, labels = data(n=200, offset=50.0, seed=7)
    ref = reference(features, labels, 4)
    for rank in range(2):
        assert_matches(ClassStats.load(tmp_path / f"rank{rank}.safetensors"), ref)

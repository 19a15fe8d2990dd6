"""measure's C kernels (nctools/kernels/passes.c): the torch route's numbers, built once.

The kernels and the torch route compute the same float64 quantities in different
orders, so every metric agrees to rounding and every NC4 decision exactly; the
reference comparisons of test_metrics.py run through both routes as well.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_metrics
from test_metrics import CONTRACT_KEYS, clusters

from nctools import ClassStats, measure, native
from nctools.measure import class_means

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here")


def both_routes(monkeypatch, *args, **kwargs):
    """measure(*args) through the kernels, then through the torch route."""
    fused = measure(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setenv(native.SWITCH, "0")
        plain = measure(*args, **kwargs)
    return fused, plain


def assert_same(fused, plain):
    for key in CONTRACT_KEYS:
        assert math.isclose(fused[key], plain[key], rel_tol=1e-11, abs_tol=1e-13), (
            key, fused[key], plain[key],
        )  # fmt: skip
    for key in ("ncc_mismatch", "accuracy", "ncc_accuracy"):
        assert fused[key] == plain[key], key


CASES = [
    dict(num_classes=2, dim=3, per_class=9),
    dict(num_classes=3, dim=5, per_class=13, imbalance=True),
    dict(num_classes=7, dim=33, per_class=40, imbalance=True, spread=2.5),
    dict(num_classes=12, dim=40, per_class=25, spread=3.0),
    dict(num_classes=20, dim=48, per_class=12, spread=3.0),  # 19 + 20 (+ 20) matrix rows
    dict(num_classes=6, dim=16, per_class=30, spread=1e-3, offset=1e3),  # collapsed
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("other_means", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_give_the_torch_route_numbers(case, other_means, dtype, monkeypatch):
    """Small call slices, row blocks and matrix slices, so every remainder is taken."""
    monkeypatch.setattr(native, "CALL_ROWS", 10)
    monkeypatch.setattr(native, "CACHE_DOUBLES", 8 * case["dim"])  # blocks of 8 rows
    features, labels, weight, bias = clusters(**case)
    features = torch.tensor(features).to(dtype)
    values = features.double().numpy()  # what the reference sees: the values dtype holds
    given = None
    if other_means:
        given = class_means(features, labels, case["num_classes"]).numpy() + 0.3
    fused, plain = both_routes(monkeypatch, features, labels, weight, bias, class_means=given)
    assert_same(fused, plain)
    want = reference_metrics(values, labels, weight, bias, class_means=given)
    for key in CONTRACT_KEYS:
        assert math.isclose(fused[key], want[key], rel_tol=1e-7, abs_tol=1e-12), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_and_a_strided_view(dtype, monkeypatch):
    monkeypatch.setattr(native, "COPY_ELEMENTS", 7 * 20)  # copied in slices of 7 rows
    features, labels, weight, bias = clusters(5, 20, 30, imbalance=True, seed=3)
    low = torch.tensor(features).to(dtype)
    strided = low.T.contiguous().T  # same values, column-major: not row-contiguous
    assert not strided.is_contiguous()
    fused, plain = both_routes(monkeypatch, strided, labels, weight, bias)
    assert_same(fused, plain)
    want = reference_metrics(low.double().numpy(), labels, weight, bias)
    for key in CONTRACT_KEYS:
        assert math.isclose(fused[key], want[key], rel_tol=1e-9, abs_tol=1e-12), key


def test_class_sums_in_any_chunking(kernels):
    """Pass 1 (counts and means only) through the kernels, chunk by chunk."""
    features, labels, _, _ = clusters(6, 11, 20, imbalance=True, offset=50.0, seed=8)
    stats = ClassStats(6, 11, basis=torch.zeros(11, 0))
    for start in range(0, len(labels), 17):
        stats.update(torch.tensor(features[start : start + 17]), labels[start : start + 17])
    want = np.stack([features[labels == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(stats.class_means().numpy(), want, rtol=1e-13)
    np.testing.assert_array_equal(stats.counts.numpy(), np.bincount(labels))


def test_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NCTOOLS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.available()
    built = native.built_path()
    assert built.parent == tmp_path and built.exists()
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})  # as a new process starts

    def no_build(*args):
        raise AssertionError("the cached build was not used")

    monkeypatch.setattr(native, "_build", no_build)
    assert native.available()
    assert built.stat().st_mtime_ns == stamp


def test_an_unloadable_cached_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("NCTOOLS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    native.built_path().write_bytes(b"not a shared library")
    assert native.available()
    assert native.built_path().read_bytes() != b"not a shared library"


def test_without_a_compiler_measure_takes_the_torch_route(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NCTOOLS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level("INFO", logger="nctools.native"):
        assert not native.available()
    assert "no-such-compiler" in caplog.text and "torch route" in caplog.text  # says why
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind
    features, labels, weight, bias = clusters(4, 9, 15, seed=5)
    want = reference_metrics(features, labels, weight, bias)
    got = measure(features, labels, weight, bias)
    for key in CONTRACT_KEYS:
        assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-12), key


def test_the_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(native.SWITCH, "0")
    assert native.library() is None and not native.available()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.integers(2, 12),
    dim=st.integers(1, 40),
    per_class=st.integers(1, 12),
    float32=st.booleans(),
    block_rows=st.sampled_from([4, 8, 64]),
)
def test_any_shape_gives_the_torch_route_numbers(seed, num_classes, dim, per_class, float32,
                                                 block_rows):
    """Shapes where D is not a multiple of the vector width, N not of the tile, C > D
    (pass 2 then keeps the whole D x D moment, on the torch route), single-row classes."""
    features, labels, weight, bias = clusters(num_classes, dim, per_class, imbalance=True,
                                              spread=2.0, seed=seed)  # fmt: skip
    inputs = torch.tensor(features, dtype=torch.float32 if float32 else torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "CACHE_DOUBLES", block_rows * dim)
        patch.setattr(native, "CALL_ROWS", 13)
        assert_same(*both_routes(patch, inputs, labels, weight, bias))

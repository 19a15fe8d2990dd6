"""The torch route of `ClassStats.update`: blocks of rows centred and accumulated by torch ops.

Usage (by :meth:`nctools.stats.ClassStats.update`)::

    add_by_class(stats, h, y, batch_counts, on_block)   # few, large classes
    add_by_rows(stats, h, y, on_block)                  # many small classes
    add_sums(stats, h, y, raw)                          # counts and sums only

Each sample enters as x = h - s_y, formed once in float64 per cache-sized block of rows
(``BLOCK_ELEMENTS``) and read there by a sum, a dot product and one matrix product (the
second moment, or its restriction to the statistics' basis). On the CPU `nctools.measure`
runs the same accumulation through the C kernels of :mod:`nctools.native` when it can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from nctools.stats import ClassStats

F64 = torch.float64
BLOCK_ELEMENTS = 1 << 18  # float64 elements of one centred block: 2 MiB, stays in cache
OnBlock = Callable[[Tensor | int, Tensor, Tensor, Tensor | None], None]


def add_sums(stats: ClassStats, h: Tensor, y: Tensor, raw: Tensor) -> None:
    """raw (C, D) float64 += the per-class sums of h (n, D), converted block by block."""
    block_rows = min(max(1, BLOCK_ELEMENTS // stats.dim), h.shape[0])
    converted = torch.empty(block_rows, stats.dim, dtype=F64, device=stats.device)
    for start in range(0, h.shape[0], block_rows):
        rows = y[start : start + block_rows]
        block = converted[: rows.shape[0]]
        block.copy_(h[start : start + block_rows])
        raw.index_add_(0, rows, block)


def add_by_class(
    stats: ClassStats, h: Tensor, y: Tensor, batch_counts: Tensor, on_block: OnBlock | None
) -> None:
    """Rows gathered class by class (a stable sort of the labels), blocks centred by
    broadcasting the class's shift: few, large classes."""
    grouped = h.shape[0] < 2 or bool((y[1:] >= y[:-1]).all())
    order = None if grouped else torch.argsort(y, stable=True)
    ends, counts = torch.cumsum(batch_counts, 0).tolist(), batch_counts.tolist()
    block_rows = min(max(1, BLOCK_ELEMENTS // stats.dim), max(counts))
    # Reused block buffers: fresh large allocations cost page faults on every call.
    centred = torch.empty(block_rows, stats.dim, dtype=F64, device=stats.device)
    gathered = None if grouped else torch.empty_like(centred, dtype=h.dtype)
    for c in torch.nonzero(batch_counts).flatten().tolist():
        begin = ends[c] - counts[c]
        for start in range(begin, ends[c], block_rows):
            stop = min(start + block_rows, ends[c])
            if grouped:
                block = h[start:stop]
            else:
                rows = order[start:stop]
                block = torch.index_select(h, 0, rows, out=gathered[: stop - start])
            # convert, then subtract in float64: a mixed-dtype sub would allocate a
            # float64 temporary per block (page faults, serialised across threads)
            x = centred[: stop - start]
            x.copy_(block).sub_(stats.shift[c])
            stats.sums[c] += x.sum(0)
            projected = None
            if stats.keeps_moments:
                flat = x.view(-1)
                stats.sq_norms[c] += torch.dot(flat, flat)
                projected = add_second_moment(stats, x)
            if on_block is not None:
                on_block(c, block, x, projected)


def add_by_rows(stats: ClassStats, h: Tensor, y: Tensor, on_block: OnBlock | None) -> None:
    """Blocks of consecutive rows centred by gathering each row's shift: many small classes."""
    block_rows = min(max(1, BLOCK_ELEMENTS // stats.dim), h.shape[0])
    centred = torch.empty(block_rows, stats.dim, dtype=F64, device=stats.device)
    shifts = torch.empty_like(centred)
    for start in range(0, h.shape[0], block_rows):
        rows = y[start : start + block_rows]
        x = centred[: rows.shape[0]]
        x.copy_(h[start : start + block_rows])  # x = h - s_y, all in float64
        x.sub_(torch.index_select(stats.shift, 0, rows, out=shifts[: rows.shape[0]]))
        stats.sums.index_add_(0, rows, x)
        projected = None
        if stats.keeps_moments:
            stats.sq_norms.index_add_(0, rows, torch.linalg.vector_norm(x, dim=1).square())
            projected = add_second_moment(stats, x)
        if on_block is not None:
            on_block(rows, h[start : start + block_rows], x, projected)


def add_second_moment(stats: ClassStats, x: Tensor) -> Tensor | None:
    """Add x^T x (or its restriction to the basis) for a centred block x: (rows, D).

    Returns x @ basis (rows, k), or None when the full D x D moment is kept.
    """
    if stats.basis is None:
        stats.scatter.addmm_(x.T, x)
        return None
    projected_t = stats.basis_t @ x.T  # (k, rows)
    if stats.diagonal:
        stats.scatter += projected_t.square().sum(1)
    else:
        stats.scatter.addmm_(projected_t, projected_t.T)
    return projected_t.T

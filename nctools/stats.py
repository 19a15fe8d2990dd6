"""`ClassStats`: float64 streaming sufficient statistics of features grouped by class.

Usage::

    stats = ClassStats(num_classes=10, dim=512)
    for features, labels in loader:          # any chunking, any device, any float dtype
        stats.update(features, labels)
    stats.merge(other_shard_stats)           # or stats.all_reduce() under torch.distributed
    means = stats.class_means()              # (C, D)

State is sum-reducible (counts, sums, second moments), so merging two accumulators is
an addition and syncing across processes is one ``all_reduce(SUM)``, as in torchmetrics.

Accuracy in the collapsed regime: every sample is accumulated as h - s_c, where the
shift s_c is a per-class reference point near the class mean (the first batch's class
mean unless given). Second moments about s_c are then of the size of the within-class
spread itself, so recovering Sigma_W = E[(h - mu_c)(h - mu_c)^T] does not cancel
digits against a large offset (features around 1e3 with a within-class std of 1e-3
keep ~10 significant digits in float64, where raw moments keep ~4).

With ``basis`` (a D x k matrix B) the second moment is kept only inside its span, as
the k x k matrix sum (B^T x)(B^T x)^T, instead of the whole D x D one: that is all NC1
needs once the class means are known, since Sigma_B^+ lives in their span
(``nctools.measure`` runs this as its second pass, with B = the centred means). A basis
with k = 0 keeps counts and sums only: the class means, in one cheap pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from nctools import blocks, native

F64 = torch.float64
_STATE = ("counts", "sums", "sq_norms", "scatter")
GROUP_MIN_ROWS = 256  # group a chunk by class when classes average at least this many rows


class ClassStats:
    """Per-class counts, shifted sums and second moments, in float64.

    Args:
        num_classes: C.
        dim: D, the feature dimension.
        shift: optional (C, D) per-class reference points. Give the same shift on every
            process to skip the shift agreement in :meth:`all_reduce`; give the class means
            (from a first pass) for the most accurate second moments.
        basis: optional (D, k) matrix B; keep the second moment only inside its span.
        diagonal: with a basis, keep only the diagonal of that k x k moment, the second
            moments along the basis vectors themselves (all NC1 needs when B is Sigma_B's
            eigenbasis; k multiply-adds per sample instead of k^2).
        device: where the state lives (default: the shift's device, else the CPU).

    State (all float64):
        counts: (C,) n_c.  sums: (C, D) sum of h - s_c.  sq_norms: (C,) sum ||h - s_c||^2.
        scatter: (D, D) sum (h - s_y)(h - s_y)^T, or (k, k) B^T (that) B with a basis,
            or its diagonal (k,) with ``diagonal``.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        shift: Tensor | None = None,
        basis: Tensor | None = None,
        diagonal: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes}, {dim}")
        if device is None:
            device = shift.device if shift is not None else "cpu"
        self.num_classes, self.dim = num_classes, dim
        self.counts = torch.zeros(num_classes, dtype=F64, device=device)
        self.sums = torch.zeros(num_classes, dim, dtype=F64, device=device)
        self.sq_norms = torch.zeros(num_classes, dtype=F64, device=device)
        self.fixed_shift = shift is not None
        if shift is None:
            self.shift = torch.zeros(num_classes, dim, dtype=F64, device=device)
            self.has_shift = torch.zeros(num_classes, dtype=torch.bool, device=device)
        else:
            _check_shape("shift", shift, (num_classes, dim))
            self.shift = shift.to(device=device, dtype=F64).clone()
            self.has_shift = torch.ones(num_classes, dtype=torch.bool, device=device)
        self.basis = None
        self.keeps_moments = basis is None or basis.shape[-1] > 0
        if basis is not None:
            if basis.ndim != 2 or basis.shape[0] != dim:
                raise ValueError(f"basis must have shape (D={dim}, k), got {tuple(basis.shape)}")
            self.basis = basis.to(device=device, dtype=F64).contiguous()
            self.basis_t = self.basis.T.contiguous()  # (k, D): B^T x^T is the faster product
            width = self.basis.shape[1]
            shape = (width,) if diagonal else (width, width)
            self.scatter = torch.zeros(shape, dtype=F64, device=device)
        elif diagonal:
            raise ValueError("diagonal=True keeps the second moment along a basis: give one")
        else:
            self.scatter = torch.zeros(dim, dim, dtype=F64, device=device)
        self.diagonal = diagonal

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    # ----------------------------------------------------------------- accumulation
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        on_block: blocks.OnBlock | None = None,
    ) -> ClassStats:
        """Add a chunk of samples.

        Each sample enters as x = h - s_y, formed once in float64 per cache-sized block of
        rows and read there by a sum, a dot product and one matrix product
        (:mod:`nctools.blocks`). Two equivalent routes keep those products large: with
        few, large classes the rows of each class
        are gathered block by block (a stable sort of the labels) and centred by
        broadcasting the class's shift; with many small classes, blocks of consecutive
        rows are centred by gathering each row's shift.

        Args:
            features: (n, D) any float dtype, any device (moved to the state's device).
            labels: (n,) integers in [0, C).
            on_block: optional ``fn(y, h, x, xb)`` called with each block's labels
                (rows,), or the class as an int when the block is all of one class, its
                samples h (rows, D) as given, their centred form x = h - s_y (rows, D)
                float64, and x @ basis (None without a basis), so a caller can reuse them
                (``measure`` tallies NC4). h and x live in reused buffers: they are valid
                only during the call.
        """
        h, y = self.checked(features, labels)
        if h.shape[0] == 0:
            return self
        self._set_new_shifts(h, y)
        batch_counts = torch.bincount(y, minlength=self.num_classes)
        self.counts += batch_counts.to(F64)
        if not self.keeps_moments and on_block is None:
            self._update_sums(h, y, batch_counts)
        elif h.shape[0] >= GROUP_MIN_ROWS * int((batch_counts > 0).sum()):
            blocks.add_by_class(self, h, y, batch_counts, on_block)
        else:
            blocks.add_by_rows(self, h, y, on_block)
        return self

    def _set_new_shifts(self, h: Tensor, y: Tensor) -> None:
        """A class seen for the first time takes its first sample as its shift.

        Any point within the class's own spread keeps the second moments free of
        cancellation; the exact mean is not needed.
        """
        n = y.shape[0]
        positions = torch.arange(n, device=y.device)
        first = torch.full((self.num_classes,), n, dtype=torch.long, device=y.device)
        first.scatter_reduce_(0, y, positions, reduce="amin")
        new = (first < n) & ~self.has_shift
        if bool(new.any()):
            self.shift[new] = h[first[new]].to(F64)
            self.has_shift |= new

    def _update_sums(self, h: Tensor, y: Tensor, batch_counts: Tensor) -> None:
        """Counts and sums only: raw float64 row sums per class, then re-centred.

        Without second moments the shift buys no accuracy (a float64 sum of n values
        keeps the mean to ~n * 1e-16 of their size), so rows are summed as they come (no
        gathering) and sum(h - s_c) = sum(h) - n_c s_c.
        """
        raw = torch.zeros_like(self.sums)
        lib = native.library() if self.device.type == "cpu" else None
        if lib is not None:  # one fused sweep (nctools/kernels/passes.c)
            native.class_sums(lib, h, y, raw)
        else:
            blocks.add_sums(self, h, y, raw)
        self.sums += raw - batch_counts.to(F64)[:, None] * self.shift

    def checked(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(features, int64 labels) on the state's device; ValueError if malformed."""
        features = torch.as_tensor(features)
        labels = torch.as_tensor(labels)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (n, {self.dim}), got {tuple(features.shape)}"
            )
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"labels has {labels.numel()} entries but features has {features.shape[0]} rows"
            )
        if not features.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        h = features.to(device=self.device)
        y = labels.to(device=self.device, dtype=torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), "
                f"got values from {int(y.min())} to {int(y.max())}"
            )
        return h, y

    def merge(self, other: ClassStats) -> ClassStats:
        """Add another accumulator's samples into this one (the order does not matter)."""
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"cannot merge ClassStats of (C, D) = {(other.num_classes, other.dim)} "
                f"into {(self.num_classes, self.dim)}"
            )
        if (self.basis is None) != (other.basis is None) or (
            self.basis is not None and not torch.equal(self.basis, other.basis.to(self.device))
        ) or self.diagonal != other.diagonal:
            raise ValueError("cannot merge ClassStats kept in different bases")
        adopt = other.has_shift.to(self.device) & ~self.has_shift
        self.shift[adopt] = other.shift.to(self.device)[adopt]
        self.has_shift |= adopt
        state = other._state_about(self.shift)
        for name, value in zip(_STATE, state, strict=True):
            getattr(self, name).add_(value)
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> ClassStats:
        """Sum the statistics of every process in ``group`` into every process.

        The state goes in one ``all_reduce(SUM)``. Unless the shift was given at
        construction, a preceding small reduction first agrees on one shift per class
        (the mean of the processes' shifts), to which each process re-centres its state.
        Without an initialised process group this is a no-op.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if not self.fixed_shift:
            seen = self.has_shift[:, None].to(F64)
            packed = torch.cat([self.shift * seen, seen], 1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            seen = packed[:, -1] > 0
            agreed = torch.where(seen[:, None], packed[:, :-1] / packed[:, -1:].clamp_min(1), 0.0)
            state = self._state_about(agreed)
            for name, value in zip(_STATE, state, strict=True):
                setattr(self, name, value)
            self.shift, self.has_shift = agreed, seen
        flat = torch.cat([getattr(self, name).flatten() for name in _STATE])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for name in _STATE:
            value = getattr(self, name)
            value.copy_(flat[offset : offset + value.numel()].view_as(value))
            offset += value.numel()
        return self

    def _state_about(self, new_shift: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This state re-centred from ``self.shift`` to ``new_shift`` (C, D), exactly.

        With d_c = s_c - s'_c and h - s' = (h - s) + d: sums gain n d, squared norms gain
        2 sum.d + n ||d||^2, and the second moment gains T^T d + d^T T + d^T diag(n) d.
        """
        new_shift = new_shift.to(self.device)
        delta = self.shift - new_shift
        n = self.counts
        sums = self.sums + n[:, None] * delta
        sq_norms = self.sq_norms + 2.0 * (self.sums * delta).sum(1) + n * delta.square().sum(1)
        if self.basis is None:
            cross = self.sums.T @ delta
            scatter = self.scatter + cross + cross.T + delta.T @ (n[:, None] * delta)
        elif self.diagonal:  # the diagonal of the line below
            t_b, d_b = self.sums @ self.basis, delta @ self.basis
            scatter = self.scatter + 2.0 * (t_b * d_b).sum(0) + (n[:, None] * d_b.square()).sum(0)
        else:
            t_b, d_b = self.sums @ self.basis, delta @ self.basis
            cross = t_b.T @ d_b
            scatter = self.scatter + cross + cross.T + d_b.T @ (n[:, None] * d_b)
        return self.counts.clone(), sums, sq_norms, scatter

    # ----------------------------------------------------------------- derived statistics
    def check_nonempty(self) -> None:
        """Raise ValueError naming the first class with no samples."""
        empty = torch.nonzero(self.counts == 0).flatten()
        if empty.numel():
            raise ValueError(
                f"labels: class {int(empty[0])} has no samples "
                f"({empty.numel()} of {self.num_classes} classes are empty)"
            )

    def class_means(self) -> Tensor:
        """(C, D) mu_c = s_c + sum(h - s_c) / n_c."""
        return self.shift + self.sums / self.counts[:, None]

    def global_mean(self) -> Tensor:
        """(D,) mu_G = (1/N) sum_i h_i, the mean of all samples (Papyan et al. 2020)."""
        total = self.sums.sum(0) + (self.counts[:, None] * self.shift).sum(0)
        return total / self.counts.sum()

    def class_variances(self) -> Tensor:
        """(C,) sigma_c^2 = (1/n_c) sum_{y_i = c} ||h_i - mu_c||^2."""
        n = self.counts
        return (self.sq_norms - self.sums.square().sum(1) / n) / n

    def within_class_trace(self) -> float:
        """Tr(Sigma_W) = (1/N) sum_i ||h_i - mu_{y_i}||^2."""
        n = self.counts
        return float((self.sq_norms - self.sums.square().sum(1) / n).sum() / n.sum())

    def within_class_cov(self) -> Tensor:
        """Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T: (D, D), or with a
        basis B its (k, k) restriction B^T Sigma_W B (its diagonal (k,) with ``diagonal``)."""
        n = self.counts
        sums = self.sums if self.basis is None else self.sums @ self.basis
        if self.diagonal:
            return (self.scatter - (sums.square() / n[:, None]).sum(0)) / n.sum()
        return (self.scatter - sums.T @ (sums / n[:, None])) / n.sum()

    def within_class_var_along(self, vectors: Tensor) -> Tensor:
        """(r,) v^T Sigma_W v for each column v of ``vectors`` (D, r).

        With a basis B the vectors must lie in its span: v = B t, and v^T Sigma_W v =
        t^T (B^T Sigma_W B) t with t from least squares (any exact solution gives the
        same value).
        """
        vectors = vectors.to(device=self.device, dtype=F64)
        cov = self.within_class_cov()
        if self.diagonal:
            if not torch.equal(vectors, self.basis):
                raise ValueError("with diagonal=True, vectors must be the basis itself")
            return cov
        if self.basis is None:
            return ((cov @ vectors) * vectors).sum(0)
        coords = torch.linalg.lstsq(self.basis.cpu(), vectors.cpu(), driver="gelsd").solution
        coords = coords.to(self.device)
        residual = (self.basis @ coords - vectors).norm() / max(float(vectors.norm()), 1e-300)
        if residual > 1e-8:
            raise ValueError(
                f"vectors are not in the span of this ClassStats' basis (residual {residual:.1e})"
            )
        return ((cov @ coords) * coords).sum(0)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (no pickle)."""
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _STATE}
        tensors["shift"] = self.shift.cpu()
        tensors["has_shift"] = self.has_shift.to(torch.uint8).cpu()
        if self.basis is not None:
            tensors["basis"] = self.basis.cpu()
        meta = {
            "format": "nctools.ClassStats/1",
            "fixed_shift": str(int(self.fixed_shift)),
            "diagonal": str(int(self.diagonal)),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> ClassStats:
        """Read a state written by :meth:`save`; ValueError naming the file if malformed."""
        try:
            tensors = load_file(str(path), device=str(device))
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        missing = [k for k in (*_STATE, "shift", "has_shift") if k not in tensors]
        if missing:
            raise ValueError(f"{path}: not a ClassStats file (missing {', '.join(missing)})")
        num_classes, dim = tensors["sums"].shape
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        diagonal = meta.get("diagonal") == "1" and "basis" in tensors
        stats = cls(num_classes, dim, basis=tensors.get("basis"), diagonal=diagonal, device=device)
        for name in _STATE:
            _check_shape(f"{path}: {name}", tensors[name], tuple(getattr(stats, name).shape))
            setattr(stats, name, tensors[name].to(F64))
        stats.shift = tensors["shift"].to(F64)
        stats.has_shift = tensors["has_shift"].bool()
        stats.fixed_shift = meta.get("fixed_shift") == "1"
        return stats


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")

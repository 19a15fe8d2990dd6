"""`ClassStats`: float64 streaming sufficient statistics of features grouped by class.

Usage::

    stats = ClassStats(num_classes=10, dim=512)
    for features, labels in loader:          # any chunking, any device, any float dtype
        stats.update(features, labels)
    stats.merge(other_shard_stats)           # or stats.all_reduce() under torch.distributed
    means = stats.class_means()              # (C, D)

State is sum-reducible as stored (counts, sums, second moments about a per-class
reference fixed before accumulation), so merging two accumulators is an addition and
syncing across processes is one ``all_reduce(SUM)``, as in torchmetrics. This is the
only accumulation route nctools has: the same torch operations on the CPU and on CUDA.

Accuracy in the collapsed regime: every sample is accumulated as h - s_c, where the
shift s_c is a per-class reference point near the class mean (given, or the class's first
sample). Second moments about s_c are then of the size of the within-class spread itself,
so recovering Sigma_W = E[(h - mu_c)(h - mu_c)^T] does not cancel digits against a large
offset (features around 1e3 with a within-class std of 1e-3 keep ~10 significant digits
in float64, where raw moments keep ~4). Shifts taken from the data differ between
processes; :meth:`all_reduce` agrees on one per class first (an exact re-centring).

With ``basis`` (a D x k matrix B) the second moment is kept only inside its span, as the
k x k matrix sum (B^T x)(B^T x)^T, instead of the whole D x D one: that is all NC1 needs
once the class means are known, since Sigma_B^+ lives in their span (``nctools.measure``
runs this as its second pass, with B = Sigma_B's eigenvectors). A basis with k = 0 keeps
counts and sums only: the class means, in one cheap pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from nctools.metrics.inputs import as_tensor, check_labels, dtype_name

F64 = torch.float64
_STATE = ("counts", "sums", "sq_norms", "scatter")
BLOCK_ELEMENTS = 1 << 19  # float64 values of one centred block of rows (4 MiB)
OnBlock = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"], None]


class ClassStats:
    """Per-class counts, shifted sums and second moments, in float64.

    Args:
        num_classes: C.
        dim: D, the feature dimension.
        shift: optional (C, D) per-class reference points, fixed for the whole
            accumulation. Give the same shift on every process and :meth:`all_reduce` is
            one SUM; give the class means (from a first pass) for the most accurate second
            moments. Without it each class takes its first sample.
        basis: optional (D, k) matrix B; keep the second moment only inside its span.
        device: where the state lives (default: the shift's device, else the CPU).

    State (all float64):
        counts: (C,) n_c.  sums: (C, D) sum of h - s_c.  sq_norms: (C,) sum ||h - s_c||^2.
        scatter: (D, D) sum (h - s_y)(h - s_y)^T, or (k, k) B^T (that) B with a basis.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        shift: Tensor | None = None,
        basis: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
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
            self.shift = shift.detach().to(device=device, dtype=F64).clone()
            self.has_shift = torch.ones(num_classes, dtype=torch.bool, device=device)
        self.basis: Tensor | None = None
        if basis is not None:
            if basis.ndim != 2 or basis.shape[0] != dim:
                raise ValueError(f"basis must have shape (D={dim}, k), got {tuple(basis.shape)}")
            self.basis = basis.detach().to(device=device, dtype=F64).contiguous()
            width = self.basis.shape[1]
            self.scatter = torch.zeros(width, width, dtype=F64, device=device)
        else:
            self.scatter = torch.zeros(dim, dim, dtype=F64, device=device)

    @classmethod
    def from_state(
        cls,
        counts: Tensor,
        sums: Tensor,
        sq_norms: Tensor,
        scatter: Tensor,
        shift: Tensor,
        *,
        has_shift: Tensor | None = None,
        basis: Tensor | None = None,
    ) -> ClassStats:
        """A ClassStats over existing float64 state tensors, without copying them.

        :meth:`update` adds into these very tensors (in place), and the derived statistics
        read them, so a container that owns the state (``nctools.NCMetric`` registers it as
        torchmetrics states) accumulates through this class's one route.

        Args:
            counts: (C,).  sums: (C, D).  sq_norms: (C,).  scatter: (D, D), or (k, k) with
                ``basis`` (D, k).  All float64 on one device, about ``shift``.
            shift: (C, D) the per-class reference points the state is taken about.
            has_shift: (C,) bool, which shifts are set; None means all of them, fixed for
                the whole accumulation (then an all-reduce is one SUM).
        """
        num_classes, dim = sums.shape
        width = dim if basis is None else basis.shape[1]
        for name, value, shape in (
            ("counts", counts, (num_classes,)),
            ("sq_norms", sq_norms, (num_classes,)),
            ("scatter", scatter, (width, width)),
            ("shift", shift, (num_classes, dim)),
        ):
            _check_shape(name, value, shape)
        for name, value in (("counts", counts), ("sums", sums), ("sq_norms", sq_norms),
                            ("scatter", scatter), ("shift", shift)):  # fmt: skip
            if value.dtype != F64:
                raise ValueError(f"{name} must be float64, got {dtype_name(value)}")
        stats = cls.__new__(cls)
        stats.num_classes, stats.dim = num_classes, dim
        stats.counts, stats.sums, stats.sq_norms, stats.scatter = counts, sums, sq_norms, scatter
        stats.shift = shift
        stats.fixed_shift = has_shift is None
        stats.has_shift = (
            torch.ones(num_classes, dtype=torch.bool, device=counts.device)
            if has_shift is None
            else has_shift.to(device=counts.device, dtype=torch.bool)
        )
        stats.basis = None if basis is None else basis.to(device=counts.device, dtype=F64)
        return stats

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def keeps_moments(self) -> bool:
        """False for a basis of width 0: counts and sums only."""
        return self.scatter.numel() > 0

    # ----------------------------------------------------------------- accumulation
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        on_block: OnBlock | None = None,
        *,
        check_finite: bool = True,
        check: bool = True,
    ) -> ClassStats:
        """Add a chunk of samples.

        The chunk is taken in blocks of rows (``BLOCK_ELEMENTS`` float64 values each):
        each block is converted to float64 once, centred on its rows' shifts
        (x = h - s_y), and read by one ``index_add`` for the sums, one for the squared
        norms and one matrix product for the second moment (or its restriction to the
        basis). The same torch operations run on every device.

        Args:
            features: (n, D) any float dtype, any device (moved to the state's device);
                with or without grad (detached: statistics are not differentiated).
            labels: (n,) integers in [0, C).
            on_block: optional ``fn(y, h, x, xb, x_sq)`` called with each block's labels
                (rows,), its samples h (rows, D) as given, their centred form x = h - s_y
                (rows, D) float64, x @ basis (rows, k) (None without a basis) and the
                squared norms ||x||^2 (rows,) (None without second moments), so a caller
                can reuse them (``measure`` tallies NC4). x lives in a reused buffer:
                valid only during the call.
            check_finite: refuse NaN/Inf features (one min/max reduction per block).
            check: check the inputs at all (below). The measurement engine
                (:mod:`nctools.metrics.engine`) turns it off: its entry points have checked
                them, and NaN or Inf show in its first pass's class sums.

        Raises:
            ValueError naming the argument: wrong shapes, non-float features, non-integer
            labels or labels outside [0, C), NaN or Inf features. Nothing is added then.
        """
        if check:
            h, y = self.checked(features, labels, check_finite)
        else:
            h, y = features.detach().to(self.device), labels.to(self.device, torch.long)
        if h.shape[0] == 0:
            return self
        self._set_new_shifts(h, y)
        batch_counts = torch.bincount(y, minlength=self.num_classes).to(F64)
        self.counts += batch_counts
        block_rows = min(max(1, BLOCK_ELEMENTS // self.dim), h.shape[0])
        if not self.keeps_moments and on_block is None:
            self._add_sums(h, y, batch_counts, block_rows)
            return self
        # reused buffers: fresh large allocations per block cost page faults and let the
        # allocator's heap grow with the number of blocks
        centred = torch.empty(block_rows, self.dim, dtype=F64, device=self.device)
        shifts = torch.empty_like(centred)
        basis_t = None if self.basis is None else self.basis.T.contiguous()
        # half precision converts to float64 2.4x faster by way of float32 (both exact)
        half = h.dtype in (torch.float16, torch.bfloat16)
        for start in range(0, h.shape[0], block_rows):
            rows = y[start : start + block_rows]
            block = h[start : start + block_rows]
            x = centred[: rows.shape[0]]
            x.copy_(block.float() if half else block)  # converted, then centred, in float64
            x.sub_(torch.index_select(self.shift, 0, rows, out=shifts[: rows.shape[0]]))
            self.sums.index_add_(0, rows, x)
            projected = row_sq = None
            if self.keeps_moments:
                row_sq = torch.linalg.vector_norm(x, dim=1).square_()
                self.sq_norms.index_add_(0, rows, row_sq)
                if basis_t is None:
                    add_upper_panels(self.scatter, x)
                else:
                    # B^T x^T, (k, rows): MKL's fast shape for a thin B (up to 2x x @ B)
                    projected_t = torch.mm(basis_t, x.T)
                    self.scatter.addmm_(projected_t, projected_t.T)
                    projected = projected_t.T
            if on_block is not None:
                on_block(rows, block, x, projected, row_sq)
        if self.keeps_moments and basis_t is None:
            mirror_upper_panels(self.scatter)
        return self

    def _add_sums(self, h: Tensor, y: Tensor, batch_counts: Tensor, block_rows: int) -> None:
        """Counts and sums only: raw float64 row sums per class, then re-centred once.

        Without second moments the shift buys no accuracy (a float64 sum of n values keeps
        the mean to ~n * 1e-16 of their size), so rows are summed as they come and
        sum(h - s_c) = sum(h) - n_c s_c: no per-row gather of the shift, and no (C, D)
        temporary (at a vocabulary's C, 300 MB a chunk): the classes of the chunk only.
        """
        converted = torch.empty(block_rows, self.dim, dtype=F64, device=self.device)
        for start in range(0, h.shape[0], block_rows):
            rows = y[start : start + block_rows]
            x = converted[: rows.shape[0]]
            block = h[start : start + block_rows]
            x.copy_(block.float() if block.dtype in (torch.float16, torch.bfloat16) else block)
            self.sums.index_add_(0, rows, x)
        present = torch.nonzero(batch_counts).flatten()
        self.sums.index_add_(0, present, self.shift[present] * batch_counts[present, None],
                             alpha=-1.0)

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

    def checked(
        self, features: Tensor, labels: Tensor, check_finite: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(features, int64 labels) on the state's device; ValueError if malformed.

        The same checks as :func:`nctools.measure`: float features of shape (n, D), all
        finite (unless ``check_finite`` is False); integer labels (n,) in [0, C).
        """
        features = as_tensor("features", features).detach()
        labels = as_tensor("labels", labels).detach()
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (n, {self.dim}), got {tuple(features.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but features has "
                f"{features.shape[0]} rows"
            )
        if not features.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got dtype {dtype_name(features)}")
        check_labels(labels, self.num_classes)
        h = features.to(device=self.device)
        if not check_finite:
            return h, labels.to(device=self.device, dtype=torch.long)
        # NaN and Inf show in a block's min or max (torch propagates NaN there): one
        # reduction per block without a temporary, and one check for the chunk
        step = max(1, BLOCK_ELEMENTS // self.dim)
        extremes = [torch.stack(torch.aminmax(h[start : start + step]))
                    for start in range(0, h.shape[0], step)]
        if extremes and not bool(torch.isfinite(torch.cat(extremes)).all()):
            raise ValueError("features contain NaN or Inf values")
        return h, labels.to(device=self.device, dtype=torch.long)

    def merge(self, other: ClassStats) -> ClassStats:
        """Add another accumulator's samples into this one (the order does not matter)."""
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"cannot merge ClassStats of (C, D) = {(other.num_classes, other.dim)} "
                f"into {(self.num_classes, self.dim)}"
            )
        if (self.basis is None) != (other.basis is None) or (
            self.basis is not None
            and other.basis is not None
            and not torch.equal(self.basis, other.basis.to(self.device))
        ):
            raise ValueError("cannot merge ClassStats kept in different bases")
        adopt = other.has_shift.to(self.device) & ~self.has_shift
        self.shift[adopt] = other.shift.to(self.device)[adopt]
        self.has_shift |= adopt
        state = other.state_about(self.shift)
        for name, value in zip(_STATE, state, strict=True):
            getattr(self, name).add_(value.to(self.device))
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
            state = self.state_about(agreed)
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

    def state_about(self, new_shift: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(counts, sums, sq_norms, scatter) re-centred from ``self.shift`` to ``new_shift``
        (C, D), exactly.

        With d_c = s_c - s'_c and h - s' = (h - s) + d: sums gain n d, squared norms gain
        2 sum.d + n ||d||^2, and the second moment gains T^T d + d^T T + d^T diag(n) d
        (T the sums; with a basis B, each of these projected on B).
        """
        new_shift = new_shift.to(self.device)
        delta = self.shift - new_shift
        n = self.counts
        sums = self.sums + n[:, None] * delta
        sq_norms = self.sq_norms + 2.0 * (self.sums * delta).sum(1) + n * delta.square().sum(1)
        t, d = self.sums, delta
        if self.basis is not None:
            t, d = t @ self.basis, d @ self.basis
        cross = t.T @ d
        scatter = self.scatter + cross + cross.T + d.T @ (n[:, None] * d)
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
        return (self.sq_norms - torch.linalg.vector_norm(self.sums, dim=1).square() / n) / n

    def within_class_trace(self) -> float:
        """Tr(Sigma_W) = (1/N) sum_i ||h_i - mu_{y_i}||^2."""
        n = self.counts
        return float((self.sq_norms - torch.linalg.vector_norm(self.sums, dim=1).square() / n)
                     .sum() / n.sum())

    def within_class_cov(self) -> Tensor:
        """Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T: (D, D), or with a
        basis B its (k, k) restriction B^T Sigma_W B."""
        n = self.counts
        sums = self.sums if self.basis is None else self.sums @ self.basis
        return (self.scatter - sums.T @ (sums / n[:, None])) / n.sum()

    def within_class_var_along(self, vectors: Tensor) -> Tensor:
        """(r,) v^T Sigma_W v for each column v of ``vectors`` (D, r).

        With a basis B the vectors must lie in its span: v = B t, and v^T Sigma_W v =
        t^T (B^T Sigma_W B) t with t from least squares (any exact solution gives the
        same value).
        """
        vectors = vectors.to(device=self.device, dtype=F64)
        cov = self.within_class_cov()
        if self.basis is not None and torch.equal(vectors, self.basis):
            return torch.diagonal(cov).clone()
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
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        sums = tensors["sums"]
        if sums.ndim != 2:
            raise ValueError(f"{path}: sums must have shape (C, D), got {tuple(sums.shape)}")
        fixed = meta.get("fixed_shift") == "1"
        try:
            counts, sums, sq_norms, scatter = (tensors[name].to(F64) for name in _STATE)
            return cls.from_state(
                counts, sums, sq_norms, scatter, tensors["shift"].to(F64),
                has_shift=None if fixed else tensors["has_shift"],
                basis=tensors.get("basis"),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def panel_width(dim: int) -> int:
    """Columns per panel of the D x D second moment (all of D below 128)."""
    return dim if dim < 128 else max(64, -(-dim // 8))


def add_upper_panels(scatter: Tensor, x: Tensor) -> None:
    """scatter += x^T x on and above the diagonal panels only: (D, D) += (rows, D)^T (rows, D).

    Row panel [i, i + b) gets x[:, i:i+b]^T x[:, i:]: about (1 + b/D) / 2 of a full product's
    work (a symmetric rank-k update, which torch does not expose; 1.8x faster than
    ``addmm_`` at D = 512 in float64). The blocks below the diagonal panels are stale
    until :func:`mirror_upper_panels`.
    """
    dim = scatter.shape[0]
    width = panel_width(dim)
    if width == dim:
        scatter.addmm_(x.T, x)
        return
    for start in range(0, dim, width):
        scatter[start : start + width, start:].addmm_(x[:, start : start + width].T, x[:, start:])


def mirror_upper_panels(scatter: Tensor) -> None:
    """Copy the panels :func:`add_upper_panels` fills onto the blocks below them, so the
    (D, D) matrix is whole (symmetric) again."""
    dim = scatter.shape[0]
    width = panel_width(dim)
    for start in range(0, dim - width, width):
        end = start + width
        scatter[end:, start:end] = scatter[start:end, end:].T

"""NC4's two decision rules, tallied block by block, exactly as float64 decides them.

Usage::

    tally = DecisionTally(weight, bias, means, global_mean)   # float64 (C, D), (C,), ...
    stats.update(features, labels, on_block=tally.add)        # a ClassStats pass
    disagree, classifier_right, ncc_right = tally.counts      # (3,) float64

Papyan, Han & Donoho (PNAS 2020), Fig. 7: the classifier's decision argmax_k w_k.h + b_k
against the nearest class centre argmin_k ||h - mu_k||. Both run as float32 products
with a proven rounding bound (:class:`SureArgmax`); the rows the bound cannot settle are
re-decided in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

F64 = torch.float64
F32_UNIT = 2.0**-24  # unit roundoff of float32
SCORE_ELEMENTS = 1 << 22  # float32 scores of one sub-block of rows (16 MiB)


class DecisionTally:
    """Counts of NC4 events (Papyan et al. 2020, Fig. 7), fed block by block.

    ``ClassStats.update`` hands over each block of samples h and its centred form
    x = h - s_y (float64), so both rules are evaluated without another pass:

    - the classifier argmax_k w_k.h + b_k, from h itself;
    - the nearest class centre argmin_k ||h - m_k||^2, ranked by the equivalent
      argmax_k z.(m_k - r) - ||m_k - r||^2 / 2 with z = h - r (formed in float64) for a
      common reference r (the global mean), which keeps the dot products free of
      cancellation against an offset; the offset is the same for every row, so no
      per-label table is formed (at a vocabulary's C, C x C x D work). With a basis B
      whose span holds the centres, z.(m_k - r) is (B^T z).(B^T (m_k - r)), an
      r-dimensional product, B^T z = x @ B + B^T (s_y - r).

    With a basis, the classifier is first tried in it too: w_k.h + b_k = (s_y.w_k + b_k)
    + (B^T w_k).(B^T x) + w_k.x_perp, where x_perp = x - B B^T x is what the basis leaves
    out, |w_k.x_perp| <= ||w_k - B B^T w_k|| ||x_perp||, and ||x_perp||^2 = ||x||^2 -
    ||B^T x||^2 comes from norms already at hand. A row whose winner that bound settles is
    decided by an r-dimensional product instead of a D-dimensional one (features near
    their class means, the terminal phase, make almost every row such a row); the others
    go through the full classifier.

    The products run in float32 and the decisions stay those of float64: see
    :class:`SureArgmax`.

    Args:
        weight: (C, D), bias: (C,) float64 classifier, or None: the NCC rule alone (the
            first two counts stay zero).
        shift: (C, D) the s_c of the blocks.   reference: (D,) r.
        ncc_means: (C, D) centres m_k of the NCC rule; None means the shift (own means).
        basis: (D, r) orthonormal columns B of the ClassStats the blocks come from, when
            they arrive with x @ B computed (the span must hold the centres s_k - r when
            ``ncc_means`` is None).
        classifier_ids: (K,) when the classifier has K rows other than the C classes
            measured: the measured class of each row, -1 for a row of no measured class
            (its decision is then wrong and disagrees with the NCC rule).
    """

    # the classifier in the basis is given up once, after TRIAL_ROWS rows, more than
    # GIVE_UP_SHARE of its rows needed the full classifier as well (features far from
    # the span, as early in training: the basis then only adds work)
    TRIAL_ROWS = 4096
    GIVE_UP_SHARE = 0.1

    def __init__(
        self,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor,
        reference: Tensor,
        ncc_means: Tensor | None = None,
        basis: Tensor | None = None,
        classifier_ids: Tensor | None = None,
    ) -> None:
        centres = (shift if ncc_means is None else ncc_means) - reference
        self.in_basis = basis is not None and ncc_means is None
        self.classifier = None if weight is None or bias is None else SureArgmax(weight.T, bias)
        self.reference = reference
        # (C, r) B^T (m_k - r); in the basis, row y is also B^T (s_y - r) (m = s)
        coords = centres @ basis if self.in_basis and basis is not None else centres
        self.coords = coords if self.in_basis else None
        self.ncc: SureArgmax | None = SureArgmax(coords.T, -centres.square().sum(1) / 2)
        del centres
        self.tallied = torch.zeros(3, dtype=torch.int64, device=shift.device)
        self.num_classes = shift.shape[0]
        self.classifier_in_basis: SureArgmax | None = None
        self.off_span = 0.0
        self.tried, self.deferred = 0, 0
        self.classifier_ids = (None if classifier_ids is None
                               else classifier_ids.to(shift.device, torch.long))
        if (weight is not None and bias is not None and basis is not None
                and classifier_ids is None
                and shift.shape[0] * weight.shape[0] <= PairOffsets.TABLE_ELEMENTS):
            in_span = weight @ basis  # (C, r)
            # max_k ||w_k - B B^T w_k||, enlarged past its own rounding
            off_span = float((weight - in_span @ basis.T).norm(dim=1).max())
            self.off_span = off_span * (1 + 1e-6) + 1e-300
            self.classifier_in_basis = SureArgmax(in_span.T, PairOffsets(shift, weight, bias))

    @property
    def counts(self) -> Tensor:
        """(3,) float64: rows where the two rules disagree, rows the classifier gets
        right, rows the NCC rule gets right."""
        return self.tallied.to(F64)

    def add(
        self,
        labels: Tensor | int,
        h: Tensor,
        x: Tensor,
        projected: Tensor | None = None,
        x_sq: Tensor | None = None,
    ) -> None:
        """Tally one block: labels (rows,) (or one int when the whole block is of one
        class), samples h (rows, D) in any float dtype, x = h - s_y (rows, D) float64, and
        when the statistics keep a basis B, x @ B (rows, r) and ||x||^2 (rows,) float64."""
        if self.ncc is None:
            raise ValueError("DecisionTally: released, it tallies no more blocks")
        if self.in_basis and projected is None:
            raise ValueError("DecisionTally: centres in a basis need blocks with x @ basis")
        ncc = self.ncc
        # rows at a time so that the (rows, C) scores stay within SCORE_ELEMENTS
        step = max(1, SCORE_ELEMENTS // self.num_classes)
        for start in range(0, h.shape[0], step):
            part = slice(start, start + step)
            y = labels if isinstance(labels, int) else labels[part]
            p = None if projected is None else projected[part]
            if p is not None and self.coords is not None:  # B^T (h - r)
                nearest = ncc(Scored.of(p + self.coords[y]), y)
            else:
                nearest = ncc(Scored.of(h[part].to(F64) - self.reference), y)
            if self.classifier is None:
                self.tallied[2] += (nearest == y).sum()
                continue
            if p is not None and x_sq is not None and self._try_basis():
                p_sq = p.square().sum(1)
                in_basis = Scored(p, p.float(), p_sq.sqrt().float())
                predicted = self._classify_in_basis(h[part], y, in_basis, p_sq, x_sq[part])
            else:
                predicted = self.classifier(Scored.of(h[part]), y)
            if self.classifier_ids is not None:
                predicted = self.classifier_ids[predicted]
            hits = torch.stack((predicted != nearest, predicted == y, nearest == y))
            self.tallied += hits.sum(1)

    def release(self) -> None:
        """Drop the classifier and the centres (several (C, D) matrices) once every block
        is tallied: only :attr:`counts` is read after that; :meth:`add` then refuses."""
        self.classifier = self.classifier_in_basis = self.coords = None
        self.ncc = None

    def _try_basis(self) -> bool:
        """Whether the classifier in the basis is still worth trying."""
        if self.classifier_in_basis is None:
            return False
        return self.tried < self.TRIAL_ROWS or self.deferred <= self.GIVE_UP_SHARE * self.tried

    def _classify_in_basis(
        self, h: Tensor, labels: Tensor | int, projected: Scored, p_sq: Tensor, x_sq: Tensor
    ) -> Tensor:
        """Classifier decisions (rows,) from x @ B (rows, r) with its squared norms p_sq,
        the rows the off-span bound leaves open re-decided by the full classifier on h
        (rows, D); x_sq: ||x||^2 (rows,)."""
        assert self.classifier_in_basis is not None and self.classifier is not None
        # ||x_perp||^2 = ||x||^2 - ||B^T x||^2, enlarged past the rounding of both and of
        # B's orthonormality (a relative 1e-10 of ||x||^2, far above either)
        perp_sq = (x_sq - p_sq).clamp_min_(0.0).add_(x_sq, alpha=1e-10)
        extra = perp_sq.sqrt_().mul_(4 * self.off_span).float()
        winner, open_rows = self.classifier_in_basis.settle(projected, labels, extra)
        self.tried += h.shape[0]
        self.deferred += open_rows.numel()
        if open_rows.numel():
            rows_labels = labels if isinstance(labels, int) else labels[open_rows]
            winner[open_rows] = self.classifier(Scored.of(h[open_rows]), rows_labels)
        return winner


class Scored(NamedTuple):
    """Rows to score: x (rows, n) as given (float64 for the re-decisions), its float32
    rounding and their Euclidean norms (rows,) float32 (at most float32's rounding off)."""

    x: Tensor
    x32: Tensor
    norms: Tensor

    @classmethod
    def of(cls, x: Tensor) -> Scored:
        x32 = x.float()
        return cls(x, x32, torch.linalg.vector_norm(x32, dim=1))


class PairOffsets:
    """The (C', C) offsets o[y, k] = a_y.b_k + c_k of samples labelled y, held as their
    factors, float64 rows formed on demand.

    With few classes (C' x C <= ``TABLE_ELEMENTS``) the float32 rounding of the whole table
    is kept for lookup, filled in blocks of rows (no C x C float64 matrix exists), and
    ``max_abs`` is max |o|; with many, each block's rows are formed when needed and rounded
    the same way, so memory never grows as C^2 (C = 20,000 would need 1.6 GB as a table),
    and ``max_abs`` is the bound max ||a_y|| max ||b_k|| + max |c_k| >= max |o| (Cauchy-
    Schwarz): finding the max itself would form all C' x C offsets, C' x C x D work (at a
    vocabulary's C more than every other step of a measurement). :class:`SureArgmax`
    needs only a bound.

    Args:
        left: (C', D) float64 a_y.  right: (C, D) float64 b_k.  constant: (C,) float64 c_k.
    """

    BLOCK_ELEMENTS = 1 << 22  # float64 values of one block of rows (32 MiB)
    TABLE_ELEMENTS = 1 << 24  # a float32 table up to this size (64 MiB) is kept

    def __init__(self, left: Tensor, right: Tensor, constant: Tensor) -> None:
        self.left, self.right, self.constant = left, right.T, constant
        self.shape = (left.shape[0], right.shape[0])
        keep = self.shape[0] * self.shape[1] <= self.TABLE_ELEMENTS
        # kept transposed, (C, C'): a block's offsets are then gathered as the (C, rows)
        # columns its scores are laid out in
        self.table32_t: Tensor | None = None
        if not keep:
            self.max_abs = (float(left.norm(dim=1).max()) * float(right.norm(dim=1).max())
                            + float(constant.abs().max()))
            return
        table = torch.empty(self.shape[::-1], dtype=torch.float32, device=left.device)
        self.max_abs = 0.0
        step = max(1, self.BLOCK_ELEMENTS // max(1, self.shape[1]))
        for start in range(0, self.shape[0], step):
            block = self.rows(torch.arange(start, min(start + step, self.shape[0])))
            table[:, start : start + step] = block.T
            self.max_abs = max(self.max_abs, float(block.abs().max()))
        self.table32_t = table

    def rows(self, labels: Tensor | int) -> Tensor:
        """(len(labels), C) float64 offsets of samples labelled ``labels`` ((1, C) for an int)."""
        if isinstance(labels, int):
            labels = torch.tensor([labels], device=self.left.device)
        return torch.addmm(self.constant, self.left[labels], self.right)

    def columns32(self, labels: Tensor | int) -> Tensor:
        """(C, len(labels)) the float32 rounding of :meth:`rows`, transposed (what the
        float32 scores add); (C, 1) for an int."""
        if isinstance(labels, int):
            labels = torch.tensor([labels], device=self.left.device)
        if self.table32_t is not None:
            return self.table32_t.index_select(1, labels)
        return self.rows(labels).T.float()

    def full(self) -> Tensor:
        """The whole (C', C) float64 table (for few classes)."""
        return self.rows(torch.arange(self.shape[0], device=self.left.device))


class SureArgmax:
    """argmax_k (x.a_k + o_k) exactly as float64 decides it, at float32 speed.

    Scores are formed in float32 (one matrix product with the offset added): with the
    inputs rounded too, each is within E = (n + 6) u (||x|| max_k ||a_k|| + max |o|) of
    the exact score (Higham, Accuracy and Stability of Numerical Algorithms, 2002,
    eq. 3.5; u = 2^-24, any summation order; ||x|| is taken in float32, or rounded to it
    from float64, and enlarged by its own worst rounding). A row where only the top score
    lies within 4 E of the top has the float64 winner; the few rows where several do are
    recomputed in float64.

    Args:
        matrix: (n, C) float64 A with columns a_k.
        offset: (C,) float64 o, the same for every row, or per label a
            :class:`PairOffsets`, whose row y is the offset of the samples labelled y.
    """

    def __init__(self, matrix: Tensor, offset: Tensor | PairOffsets) -> None:
        self.matrix, self.offset = matrix, offset  # as given: a (C, D) weight's .T, no copy
        self.matrix32 = matrix.T.float().contiguous()  # (C, n): A^T x^T is MKL's fast shape
        self.per_label = isinstance(offset, PairOffsets)
        if isinstance(offset, PairOffsets):
            self.offset32, self.max_offset = None, offset.max_abs
        else:
            self.offset32, self.max_offset = offset.float(), float(offset.abs().max())
        n = matrix.shape[0]
        self.unit = 4 * (n + 8) * F32_UNIT * (1 + 2 * (n + 2) * F32_UNIT)
        self.max_norm = float(matrix.norm(dim=0).max())

    def __call__(self, rows: Scored, labels: Tensor | int) -> Tensor:
        """Winners (rows,) int64 for the rows x (rows, n) of ``rows``, labelled ``labels``
        (rows,) or one int for the whole block (used only with a per-label offset)."""
        winner, open_rows = self.settle(rows, labels)
        if open_rows.numel():
            exact = self.offset
            if isinstance(exact, PairOffsets):
                exact = exact.rows(labels if isinstance(labels, int) else labels[open_rows])
            winner[open_rows] = (rows.x[open_rows].to(F64) @ self.matrix + exact).argmax(1)
        return winner

    def settle(
        self, rows: Scored, labels: Tensor | int, extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Winners (rows,) int64 of the rows the float32 scores settle, and the indices of
        the rows they leave open (their winner entries are arbitrary).

        Args:
            rows, labels: as in :meth:`__call__`.
            extra: optional (rows,) float32 further slack per row, added to 4 E (a bound on
                how far each exact score may lie from the one this matrix gives, times 4).
        """
        if isinstance(self.offset, PairOffsets):
            offset = self.offset.columns32(labels)
        else:
            assert self.offset32 is not None
            offset = self.offset32[:, None]
        # (C, rows): A^T x^T is MKL's fast shape, and the reductions below then run
        # along contiguous rows of scores
        scores = torch.addmm(offset, self.matrix32, rows.x32.T)
        slack = rows.norms.mul(self.unit * self.max_norm).add_(self.unit * self.max_offset)
        if extra is not None:
            slack.add_(extra)
        # the top score and every score within 4E of it (``max`` with indices is several
        # times slower than ``amax`` here); a sure row has exactly one such score, and its
        # class is the winner
        close = scores >= scores.amax(0).sub_(slack)
        count = close.sum(0, dtype=torch.int32)
        close_class, close_row = close.nonzero(as_tuple=True)
        winner = torch.empty(scores.shape[1], dtype=torch.long, device=scores.device)
        winner[close_row] = close_class  # open rows are decided by the caller
        return winner, torch.nonzero(count != 1).flatten()

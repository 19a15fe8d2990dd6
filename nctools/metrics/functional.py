"""Neural-collapse metrics as pure functions of class statistics (no models, no data).

Every function takes float64 tensors and returns a Python float; the definitions and
key names are those of docs/metrics.md, after Papyan, Han & Donoho, "Prevalence of neural
collapse during the terminal phase of deep learning training", PNAS 2020 (figure
numbers below refer to that paper).

Pairwise quantities (cosines, class distances, Gram matrices) are computed in row
tiles, so memory is O(tile x C) rather than O(C^2) and thousands of classes fit; GNC2 and
CDNV of the same vectors share one pass over their tiles (:func:`pair_statistics`), in
float64 or, at vocabulary scale, in float32 tiles (docs/language-models.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS64 = torch.finfo(torch.float64).eps
TILE_ELEMENTS = 1 << 21  # elements of one (tile, C) block: 16 MiB of float64
CLOSE_DIST2 = 1e-4  # unit vectors this close: their distance from the difference itself
COINCIDE_DIST2 = 64 * EPS64  # unit vectors this close coincide, to rounding (GNC2 undefined)
# pair_statistics: entries of one (rows, C) tile (two such buffers are held), the squared
# distance below which a float32 tile's pair is recomputed exactly (float32's cosine is
# off by ~1e-7, so this keeps a pair's relative error under ~1e-5), and the number of such
# pairs in a tile above which the whole tile is recomputed in float64 instead, pair by pair
PAIR_TILE_ELEMENTS = 1 << 23
CLOSE_DIST2_32 = 1e-2
CLOSE_PAIRS_32 = 4096
PAIR_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _tile_rows(num_classes: int) -> int:
    return max(1, min(num_classes, TILE_ELEMENTS // max(num_classes, 1)))


def between_class_eig(centred_means: Tensor) -> tuple[Tensor, Tensor]:
    """Non-zero eigenpairs of the between-class covariance Sigma_B (Papyan et al. 2020).

    Sigma_B = M~^T M~ / C has rank at most C - 1, so its eigenvectors come from the
    singular values and right singular vectors of the C x D centred means
    (:func:`right_singular`) rather than from a D x D eigendecomposition.
    Eigenvalues below ``max_eig * D * eps`` count as zero (scipy.linalg.pinvh's cutoff).

    Args:
        centred_means: (C, D) rows mu_c - mu_G.

    Returns:
        eigvals: (r,) positive eigenvalues of Sigma_B, descending.
        eigvecs: (D, r) orthonormal eigenvectors, one per column.
    """
    num_classes, dim = centred_means.shape
    singular, vh = right_singular(centred_means)
    eigvals = singular.square() / num_classes
    if eigvals.numel() == 0 or float(eigvals.max()) == 0.0:
        return eigvals[:0], vh[:0].T
    keep = eigvals > eigvals.max() * dim * EPS64
    return eigvals[keep], vh[keep].T


def right_singular(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values (k,) descending and right singular vectors V^T (k, D) of a (C, D)
    matrix, k = min(C, D): its thin SVD without the left factor.

    A tall matrix (C > D, a vocabulary's class means) is first reduced to the D x D
    triangle R of its Householder QR (A = QR, Q not formed): A and R have the same
    singular values and right singular vectors, and both steps are backward stable, so
    this is as exact as the SVD of A itself (Golub & Van Loan, Matrix Computations, 4th
    ed., 2013, sec. 8.6.3, "R-bidiagonalization") at a fraction of its cost: the SVD's
    C x D left factor is never formed.
    """
    if matrix.shape[0] > matrix.shape[1]:
        matrix = torch.linalg.qr(matrix, mode="r")[1]
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    return singular, vh


def nc1(within_var_along_eigvecs: Tensor, eigvals: Tensor, num_classes: int) -> float:
    """NC1 = Tr(Sigma_W Sigma_B^+) / C (Papyan et al. 2020, Fig. 6).

    With Sigma_B^+ = sum_k v_k v_k^T / lambda_k, the trace is sum_k v_k^T Sigma_W v_k /
    lambda_k, so only Sigma_W's variance along the r <= C - 1 eigenvectors is needed.

    Args:
        within_var_along_eigvecs: (r,) v_k^T Sigma_W v_k.
        eigvals: (r,) lambda_k, the non-zero eigenvalues of Sigma_B.
        num_classes: C.
    """
    if eigvals.numel() == 0:  # Sigma_B = 0: every class mean coincides
        return math.nan
    # A variance is never negative; rounding can make one so along a near-null direction.
    return float((within_var_along_eigvecs.clamp_min(0.0) / eigvals).sum()) / num_classes


def nc1_ratio(within_trace: float, centred_means: Tensor) -> float:
    """Tr(Sigma_W) / Tr(Sigma_B), the trace quotient (no inverse).

    Args:
        within_trace: Tr(Sigma_W).
        centred_means: (C, D) rows mu_c - mu_G; Tr(Sigma_B) = ||M~||_F^2 / C.
    """
    between_trace = float(torch.linalg.vector_norm(centred_means)) ** 2 / centred_means.shape[0]
    return within_trace / between_trace if between_trace > 0 else math.nan


def equinorm(vectors: Tensor) -> float:
    """std_c ||v_c|| / mean_c ||v_c|| (Papyan et al. 2020, Fig. 2), the std over C - 1.

    The std divides by C - 1, as the authors' code computes Fig. 2's coefficient of
    variation (``torch.std``'s default), so the values equal theirs on the same features;
    it is the one std of the metrics that does (README.md, "Metrics"). A population std would
    give sqrt((C - 1) / C) times this. NaN for C < 2, where the std is undefined, and for
    a zero mean norm (``measure`` warns about either).

    Args:
        vectors: (C, D) centred class means or classifier rows.
    """
    if vectors.shape[0] < 2:
        return math.nan
    norms = vectors.norm(dim=1)
    return float(norms.std(correction=1) / norms.mean())


def simplex_geometry(vectors: Tensor) -> dict[str, float]:
    """Equiangularity, max-angle and ETF distance of C vectors, computed in row tiles.

    - equiangular: std over c != c' of cos(v_c, v_c')          (Papyan et al. Fig. 3)
    - maxangle: mean over c != c' of |cos(v_c, v_c') + 1/(C-1)| (Papyan et al. Fig. 4)
    - etf: || V V^T / ||V V^T||_F - (I - 11^T/C) / sqrt(C-1) ||_F   (Zhu et al. 2021)

    The std is merged across tiles with Chan et al.'s pairwise update, so it is as exact
    as a two-pass std; ||V V^T||_F is taken from the D x D (or C x C) Gram of the smaller
    side, and the ETF distance is summed from exact differences, never as 2 - 2<A, B>.

    Args:
        vectors: (C, D) float64.

    Returns:
        dict with keys ``equiangular``, ``maxangle``, ``etf``.
    """
    num_classes, dim = vectors.shape
    norms = vectors.norm(dim=1)
    small = vectors.T @ vectors if dim < num_classes else vectors @ vectors.T
    gram_fro = float(small.norm())
    off_target = -1.0 / (num_classes - 1)
    etf_scale = 1.0 / math.sqrt(num_classes - 1)
    count, mean, m2, abs_sum, etf_sq = 0, 0.0, 0.0, 0.0, 0.0
    step = _tile_rows(num_classes)
    for start in range(0, num_classes, step):
        stop = min(start + step, num_classes)
        gram = vectors[start:stop] @ vectors.T
        target = torch.full_like(gram, -etf_scale / num_classes)
        diagonal = torch.arange(start, stop, device=gram.device)
        target[diagonal - start, diagonal] += etf_scale
        etf_sq += float((gram / gram_fro - target).square().sum())
        cos = gram / (norms[start:stop, None] * norms[None, :])
        off = torch.ones_like(cos, dtype=torch.bool)
        off[diagonal - start, diagonal] = False
        values = cos[off]
        tile_mean = float(values.mean())
        tile_m2 = float((values - tile_mean).square().sum())
        n = values.numel()
        delta = tile_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += tile_m2 + delta * delta * count * n / total
        count = total
        abs_sum += float((values - off_target).abs().sum())
    return {
        "equiangular": math.sqrt(m2 / count),
        "maxangle": abs_sum / count,
        "etf": math.sqrt(etf_sq),
    }


def self_duality(weight: Tensor, centred_means: Tensor) -> float:
    """|| W / ||W||_F - M~ / ||M~||_F ||_F^2 (Papyan et al. 2020, Fig. 5; squared).

    Args:
        weight: (C, D) classifier rows w_c.
        centred_means: (C, D) rows mu_c - mu_G.
    """
    w_norm, m_norm = weight.norm(), centred_means.norm()
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for part in _row_blocks(weight):  # no (C, D) temporaries at a vocabulary's C
        total += (weight[part] / w_norm - centred_means[part] / m_norm).square().sum()
    return float(total)


def _row_blocks(matrix: Tensor) -> list[slice]:
    """Slices of about ``TILE_ELEMENTS`` entries of the rows of a (C, D) matrix."""
    step = max(1, TILE_ELEMENTS // max(1, matrix.shape[1]))
    return [slice(start, start + step) for start in range(0, matrix.shape[0], step)]


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """(C,) a_c.b_c of two (C, D) matrices, in blocks of rows (no (C, D) temporary)."""
    return torch.cat([(a[part] * b[part]).sum(1) for part in _row_blocks(a)])


# --------------------------------------------------------------------------- beyond the paper
def separation_fuzziness(
    within_cov: Tensor, basis: Tensor | None, means: Tensor, counts: Tensor
) -> float:
    """Tr(SS_W SS_B^+), He & Su (2023), "A law of data separation in deep learning".

    SS_B = (1/N) sum_c n_c (mu_c - mu_S)(mu_c - mu_S)^T with mu_S the mean of all samples
    (whatever global mean the other metrics use), SS_W = Sigma_W. SS_B^+ lives in the span
    of the class-mean differences, so only Sigma_W restricted to a basis of that span is
    needed, as for NC1. pinvh's cutoff (max_eig * D * eps) decides which eigenvalues count.

    Args:
        within_cov: (D, D) Sigma_W when ``basis`` is None, else (k, k) B^T Sigma_W B.
        basis: None, or (D, k) orthonormal columns B spanning the class-mean differences.
        means: (C, D) class means mu_c.
        counts: (C,) n_c.

    Returns:
        The fuzziness, NaN when every class mean coincides (SS_B = 0).
    """
    weights = counts / counts.sum()
    mean_s = weights @ means
    scaled = weights.sqrt()[:, None] * (means - mean_s)
    singular, vh = right_singular(scaled)
    del scaled
    eigvals = singular.square()
    if eigvals.numel() == 0 or float(eigvals.max()) == 0.0:
        return math.nan
    keep = eigvals > eigvals.max() * means.shape[1] * EPS64
    eigvals, eigvecs = eigvals[keep], vh[keep].T  # (r,), (D, r)
    coords = eigvecs if basis is None else basis.T @ eigvecs
    along = ((within_cov @ coords) * coords).sum(0).clamp_min(0.0)
    return float((along / eigvals).sum())


def gnc2(vectors: Tensor, dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Generalised NC2 of C vectors: logarithmic energy of their directions on the sphere
    (Liu et al. 2023, "Generalizing and decoupling neural collapse via hyperspherical
    uniformity gap"), for any C, also C > D + 1 where no simplex ETF exists.

    With u_c = v_c / ||v_c|| and k_cc' = log(1 / ||u_c - u_c'||) over the C(C-1)/2
    unordered pairs c < c':

    - energy: mean of k_cc' (lower is more uniform)
    - variance: population variance of k_cc' (0 when all pairwise distances are equal)

    Computed in row tiles of the upper triangle (:func:`pair_statistics`, whose ``dtype``
    this is), the variance merged across tiles exactly.

    Args:
        vectors: (C, D) float64 rows v_c (centred class means or classifier rows).
        dtype: of the tiles: float64, or float32 (see :func:`pair_statistics`).

    Returns:
        dict with keys ``energy`` and ``variance``: inf and NaN when two directions
        coincide (to rounding: ||u_c - u_c'||^2 < ``COINCIDE_DIST2``), NaN when a vector
        is zero.
    """
    pairs = pair_statistics(vectors, dtype=dtype)
    return {"energy": pairs["energy"], "variance": pairs["variance"]}


def pair_statistics(vectors: Tensor, variances: Tensor | None = None, power: int = 1,
                    dtype: torch.dtype = torch.float64,
                    tile_elements: int | None = None) -> dict[str, float]:
    """GNC2 (:func:`gnc2`) of C vectors and, given their classes' variances, CDNV, in one
    pass over the C(C-1)/2 pairs.

    Every pair's squared distance of directions d_cc' = ||u_c - u_c'||^2 = 2 - 2 u_c.u_c'
    comes from a row tile of the Gram matrix of the unit vectors (``tile_elements``
    entries, default ``PAIR_TILE_ELEMENTS``: memory never holds a C x C matrix). Pairs
    closer than ``CLOSE_DIST2`` (float64 tiles) or ``CLOSE_DIST2_32`` (float32 tiles),
    where 2 - 2 cos cancels, take d from the difference of their units in float64. CDNV
    (Galanti et al. 2022; ``power`` 2: Wu & Papyan 2024's code, see
    :func:`nctools.metrics.vocab.cdnv`) reads the class distance from the same d:

        ||v_c - v_c'||^2 = (||v_c|| - ||v_c'||)^2 + ||v_c|| ||v_c'|| d_cc',

    a sum of two non-negative terms, so it is as exact as d itself (no cancellation
    against the vectors' size).

    ``dtype`` float32 forms the tiles and their element-wise work in float32 (on a CPU
    about 3x faster than float64, and half the memory traffic) and adds each tile's row
    sums in float64: a pair's d is then off by about 1e-7 (relative, at most ~1e-5 for
    the closest pairs not recomputed), errors of either sign that the sums over C^2 / 2
    pairs average out; GNC2 and CDNV come out within ~1e-7 (relative) of float64 on
    vocabulary-scale data (C > D + 1: their pairwise distances cannot all be alike, so
    the variance is not small next to that error; docs/language-models.md). A tile with
    more than ``CLOSE_PAIRS_32`` close pairs is recomputed in float64. Use float64 for
    nearly collapsed vectors, whose GNC2 variance may be of the size of float32's rounding.

    Args:
        vectors: (C, D) rows v_c (GNC2 reads their directions, so any scale).
        variances: optional (C,) sigma_c^2, the mean squared distance of class c's
            samples to its mean v_c (any common shift of the v_c; CDNV is translation
            invariant, GNC2 is not).
        power: of the class distance in CDNV, 1 or 2.
        dtype: of the tiles, torch.float64 or torch.float32.
        tile_elements: entries of one tile (default ``PAIR_TILE_ELEMENTS``).

    Returns:
        dict with ``energy`` and ``variance`` (GNC2: inf and NaN when two directions
        coincide, NaN for a zero vector) and, given variances, ``cdnv``: the mean over
        ordered pairs of (sigma_c^2 + sigma_c'^2) / (2 ||v_c - v_c'||^(2 power)), inf for
        coinciding vectors (NaN if both variances are 0).
    """
    num = vectors.shape[0]
    vectors = vectors.to(torch.float64)
    norms = torch.linalg.vector_norm(vectors, dim=1)
    zero = norms == 0
    # a zero vector has no direction (GNC2 NaN); its unit is taken as 0, so that CDNV's
    # distance formula above still gives ||v_c'||^2
    inverse = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, norms))
    units = _Units(vectors, inverse, dtype)
    scale, norms_hi, norms_lo = _split_norms(norms, dtype)
    units_t = units.rounded
    half_var, var_scale = _halved_variances(variances, vectors.device, dtype)
    elements = tile_elements if tile_elements is not None else PAIR_TILE_ELEMENTS
    step = max(1, min(num, elements // max(num, 1)))
    device = vectors.device
    dist = torch.empty(step * num, dtype=dtype, device=device)
    # CDNV's buffers: the class distances and the ratios
    aux = None if variances is None else (torch.empty_like(dist), torch.empty_like(dist))
    # the entries (c, c') of a tile's first block with c' <= c: not pairs of it
    lower = torch.ones(step, step, dtype=torch.bool, device=device).tril_()
    close_below = CLOSE_DIST2 if dtype == torch.float64 else CLOSE_DIST2_32
    count, mean, m2 = 0, 0.0, 0.0
    cdnv_sum = torch.zeros((), dtype=torch.float64, device=device)
    coincide = False
    for start in range(0, num - 1, step):
        stop = min(start + step, num - 1)
        rows, cols = stop - start, num - start
        d = dist[: rows * cols].view(rows, cols)  # (c, c'): start <= c < stop, c' >= start
        torch.addmm(units_t.new_full((1, 1), 2.0), units_t[start:stop], units_t[start:].T,
                    alpha=-2.0, out=d)
        d.clamp_min_(0.0)
        below = lower[:rows, :rows]
        d[:, :rows].masked_fill_(below, 2.0)
        if float(d.amin()) < close_below:
            coincide |= _exact_close(d, units, start, close_below)
        n_pairs = rows * cols - rows * (rows + 1) // 2
        if half_var is not None and aux is not None:
            cdnv_sum += _cdnv_tile(d, aux[0][: rows * cols].view(rows, cols),
                                   aux[1][: rows * cols].view(rows, cols), norms_hi,
                                   norms_lo, half_var, start, stop, power, below)
        # k = -log(d) / 2: the moments of log d here, merged (Chan et al. 1979)
        tile_mean, tile_m2 = _tile_log_moments(d, below, n_pairs, dtype)
        delta, total = tile_mean - mean, count + n_pairs
        mean, m2 = (mean + delta * n_pairs / total,
                    m2 + tile_m2 + delta * delta * count * n_pairs / total)
        count = total
    if bool(zero.any()) or count == 0:
        energy = variance = math.nan
    elif coincide:
        energy, variance = math.inf, math.nan
    else:
        energy, variance = -mean / 2, m2 / count / 4
    result = {"energy": energy, "variance": variance}
    if variances is not None:
        result["cdnv"] = (2.0 * float(cdnv_sum) * var_scale / scale ** (2 * power)
                          / (num * (num - 1)) if num > 1 else math.nan)
    return result


def _split_norms(norms: Tensor, dtype: torch.dtype) -> tuple[float, Tensor, Tensor]:
    """(C,) float64 norms over their largest, as a sum hi + lo of two (C,) tensors of the
    tiles' ``dtype``, and that largest (1 when all are 0). CDNV is scale-free, so the
    tiles see norms of at most 1 (no float32 underflow); close norms then subtract
    exactly (hi_c - hi_c' is exact for hi within a factor 2, Sterbenz's lemma)."""
    largest = float(norms.max()) if norms.numel() else 0.0
    scale = largest if largest > 0 else 1.0
    scaled = norms / scale
    norms_hi = scaled.to(dtype)
    return scale, norms_hi, (scaled - norms_hi.to(torch.float64)).to(dtype)


def _halved_variances(variances: Tensor | None, device: torch.device, dtype: torch.dtype
                      ) -> tuple[Tensor | None, float]:
    """CDNV's (C,) sigma_c^2 / 2 over their largest (no float32 underflow) in the tiles'
    ``dtype``, and that largest (1 when there is none)."""
    if variances is None:
        return None, 1.0
    half_var = variances.to(device=device, dtype=torch.float64) / 2.0
    largest = float(half_var.max()) if half_var.numel() else 0.0
    var_scale = largest if largest > 0 else 1.0
    return (half_var / var_scale).to(dtype), var_scale


def _tile_log_moments(d: Tensor, below: Tensor, n_pairs: int, dtype: torch.dtype
                      ) -> tuple[float, float]:
    """The mean of log d over a tile's ``n_pairs`` pairs and the sum of squared
    deviations from it, summed in float64 (``below`` (r, r): the entries of the tile's
    first block that are not pairs). ``d`` (r, C') is overwritten."""
    rows = below.shape[0]
    d.log_()
    d[:, :rows].masked_fill_(below, 0.0)
    tile_mean = float(d.sum(1, dtype=dtype).sum(dtype=torch.float64)) / n_pairs
    rounded = d.new_tensor(tile_mean)
    d.sub_(rounded)
    d[:, :rows].masked_fill_(below, 0.0)
    shift = tile_mean - float(rounded)  # sum (l - m)^2 = sum (l - m')^2 - n (m - m')^2
    tile_m2 = float(d.square_().sum(1, dtype=dtype).sum(dtype=torch.float64))
    return tile_mean, tile_m2 - n_pairs * shift * shift


class _Units:
    """The unit vectors u_c = v_c / ||v_c|| (0 for a zero v_c) of :func:`pair_statistics`:
    ``rounded`` (C, D) in the tiles' dtype for their products; float64 rows and tiles
    formed from the vectors when asked (a float32 measurement holds no float64 copy)."""

    def __init__(self, vectors: Tensor, inverse: Tensor, dtype: torch.dtype) -> None:
        self.vectors, self.inverse = vectors, inverse
        if dtype == torch.float64:
            self.rounded = vectors * inverse[:, None]
        else:  # in blocks of rows: no float64 (C, D) temporary
            self.rounded = torch.empty(vectors.shape, dtype=dtype, device=vectors.device)
            step = max(1, PAIR_TILE_ELEMENTS // max(1, vectors.shape[1]))
            for start in range(0, vectors.shape[0], step):
                part = slice(start, start + step)
                torch.mul(vectors[part], inverse[part, None], out=self.rounded[part])

    def rows(self, index: Tensor) -> Tensor:
        """(len(index), D) float64 u_c of the classes ``index``."""
        return self.vectors[index] * self.inverse[index, None]

    def dist_tile(self, start: int, stop: int) -> Tensor:
        """(stop - start, C - start) float64 2 - 2 u_c.u_c', clamped at 0."""
        cos = self.vectors[start:stop] @ self.vectors[start:].T
        cos.mul_(self.inverse[start:stop, None]).mul_(self.inverse[None, start:])
        return cos.mul_(-2.0).add_(2.0).clamp_min_(0.0)


def _exact_close(d: Tensor, units: _Units, start: int, close_below: float) -> bool:
    """Re-form the entries of tile ``d`` (rows, C - start) below ``close_below`` from the
    float64 difference of the units (a float32 tile with many of them: the whole tile in
    float64 first); whether any pair coincides (d < ``COINCIDE_DIST2``), the entry then
    kept as its tiny value (CDNV reads it; GNC2 is undefined)."""
    rows = d.shape[0]
    close = torch.nonzero(d < close_below)
    if d.dtype != torch.float64 and close.shape[0] > CLOSE_PAIRS_32:
        exact = units.dist_tile(start, start + rows)
        exact[:, :rows].masked_fill_(
            torch.ones(rows, rows, dtype=torch.bool, device=d.device).tril_(), 2.0)
        close = torch.nonzero(exact < CLOSE_DIST2)
        d.copy_(exact)
        del exact
    coincide = False
    for part in close.split(CLOSE_PAIRS_32):
        i, j = part[:, 0], part[:, 1]
        exact_d = (units.rows(start + i) - units.rows(start + j)).square().sum(1)
        coincide |= bool((exact_d < COINCIDE_DIST2).any())
        d[i, j] = exact_d.to(d.dtype)
    return coincide


def _cdnv_tile(d: Tensor, out: Tensor, tmp: Tensor, norms_hi: Tensor, norms_lo: Tensor,
               half_var: Tensor, start: int, stop: int, power: int, below: Tensor) -> Tensor:
    """The sum (float64 scalar) over the pairs of a tile of (sigma_c^2 + sigma_c'^2) / 2
    over ||v_c - v_c'||^(2 power), from its squared distances of directions ``d`` (rows,
    cols), in ``out`` and ``tmp`` (rows, cols) buffers of the tile's dtype; the norms
    (hi + lo) and half the variances come scaled (the caller undoes it)."""
    rows = d.shape[0]
    n_rows, n_cols = norms_hi[start:stop, None], norms_hi[None, start:]
    torch.sub(n_rows, n_cols, out=out)                     # |v_c| - |v_c'|, exactly
    out.add_(torch.sub(norms_lo[start:stop, None], norms_lo[None, start:], out=tmp))
    out.square_()                                          # (|v_c| - |v_c'|)^2
    out.addcmul_(torch.mul(d, n_rows, out=tmp), n_cols)    # + |v_c| |v_c'| d
    if power == 2:
        out.square_()
    out[:, :rows].masked_fill_(below, math.inf)           # not pairs: a ratio of 0
    torch.add(half_var[start:stop, None], half_var[None, start:], out=tmp)
    return tmp.div_(out).sum(1, dtype=tmp.dtype).sum(dtype=torch.float64)


def duality(weight: Tensor, centred_means: Tensor) -> dict[str, float]:
    """Per-class duality s_c = cos(w_c, mu_c - mu_G) summarised two ways.

    - ``duality_cos``: mean_c s_c (1 when every classifier row points along its mean)
    - ``unc3``: std_c s_c / mean_c s_c, population std (uniform duality; 0 when all s_c
      are equal; Wu & Papyan 2024, "Linguistic collapse")

    Args:
        weight: (C, D) classifier rows.   centred_means: (C, D) rows mu_c - mu_G.
    """
    cos = _row_dots(weight, centred_means) / (weight.norm(dim=1) * centred_means.norm(dim=1))
    mean = float(cos.mean())
    spread = float(cos.std(correction=0))
    return {"duality_cos": mean, "unc3": spread / mean if mean != 0 else math.nan}


def self_duality_etf(weight: Tensor, centred_means: Tensor) -> float:
    """|| W M~^T / ||W M~^T||_F - (I - 11^T/C) / sqrt(C-1) ||_F (Zhu et al., NeurIPS 2021).

    ||W M~^T||_F^2 = <W^T W, M~^T M~> from two D x D Grams when D < C; the difference is
    summed over row tiles of the C x C product, so no C x C matrix exists.

    Args:
        weight: (C, D) classifier rows.   centred_means: (C, D) rows mu_c - mu_G.
    """
    num_classes, dim = weight.shape
    if dim < num_classes:
        fro = math.sqrt(max(float(((weight.T @ weight) * (centred_means.T @ centred_means))
                                  .sum()), 0.0))
    else:
        fro = float((weight @ centred_means.T).norm())
    scale = 1.0 / math.sqrt(num_classes - 1)
    total = 0.0
    step = _tile_rows(num_classes)
    for start in range(0, num_classes, step):
        stop = min(start + step, num_classes)
        product = weight[start:stop] @ centred_means.T / fro
        product += scale / num_classes  # the target's off-diagonal is -scale / C
        diagonal = torch.arange(start, stop, device=product.device)
        product[diagonal - start, diagonal] -= scale
        total += float(product.square().sum())
    return math.sqrt(total)


def nc5(centred_means: Tensor, ood_direction: Tensor) -> float:
    """NC5 = mean_c |cos(mu_c - mu_G, g)|, g = mean(H') - mu_G the direction of the
    out-of-distribution features' mean (Ammar et al., ICLR 2024, "NECO"); 0 = orthogonal.
    Given the raw means mu_c and mean(H') instead, the same formula is ``nc5_uncentred``,
    the uncentred form NECO and the public peer library use (docs/metrics.md, "NC5").

    Args:
        centred_means: (C, D) rows mu_c - mu_G.   ood_direction: (D,) g.
    """
    cos = (centred_means @ ood_direction) / (centred_means.norm(dim=1) * ood_direction.norm())
    return float(cos.abs().mean())


def mse_decomposition(
    weight: Tensor,
    bias: Tensor,
    means: Tensor,
    counts: Tensor,
    within_cov: Tensor,
    weight_decay: float,
) -> dict[str, float]:
    """The MSE loss split along the central path (Han, Papyan & Donoho, ICLR 2022).

    With x = [h; 1], theta = [W b] and lambda = ``weight_decay`` (the coefficient in the
    objective below), the regularised loss

        L(W, b) = (1/2N) sum_i ||W h_i + b - e_{y_i}||^2 + (lambda/2)(||W||_F^2 + ||b||^2)

    is quadratic: L = L(theta_LS) + (1/2) Tr(D A D^T), D = theta - theta_LS, with
    A = (1/N) sum_i x_i x_i^T + lambda I and theta_LS = B A^+, B = (1/N) sum_i e_{y_i} x_i^T
    the least-squares classifier. Sigma_W's cross terms with the class means vanish, so

    - ``mse_nc1`` = (1/2)(Tr(W_LS (Sigma_W + lambda I) W_LS^T) + lambda ||b_LS||^2)
    - ``mse_nc23`` = (1/2N) sum_c n_c ||W_LS mu_c + b_LS - e_c||^2
    - ``mse_perp`` = (1/2) Tr(D A D^T)

    and the three add up to L(W, b) exactly. On balanced classes these are the authors'
    notebook's LNC1, LNC23 and Lperp (their (1/2C)||W_LS M + b_LS 1^T - I||^2 is the
    n_c = N/C case of mse_nc23); with imbalanced classes the notebook is silent and the
    weights n_c / N keep the identity exact. The statistics use the mean of all samples,
    whatever ``global_mean`` the other metrics use, since the loss is a sum over samples.

    Args:
        weight: (C, D), bias: (C,) the classifier.
        means: (C, D) class means.   counts: (C,) n_c.
        within_cov: (D, D) Sigma_W.
        weight_decay: lambda >= 0.

    Returns:
        dict with keys ``mse_nc1``, ``mse_nc23``, ``mse_perp``.
    """
    num_classes, dim = weight.shape
    lam = float(weight_decay)
    frac = counts / counts.sum()  # n_c / N
    mean_s = frac @ means
    eye = torch.eye(dim, dtype=weight.dtype, device=weight.device)
    second = within_cov + means.T @ (frac[:, None] * means)  # (1/N) sum h h^T
    top = torch.cat([second + lam * eye, mean_s[:, None]], 1)
    bottom = torch.cat([mean_s, mean_s.new_tensor([1.0 + lam])])[None, :]
    moment = torch.cat([top, bottom], 0)  # A: (D + 1, D + 1)
    targets = frac[:, None] * torch.cat([means, torch.ones_like(frac)[:, None]], 1)  # B
    theta_ls = targets @ torch.linalg.pinv(moment, hermitian=True)
    w_ls, b_ls = theta_ls[:, :dim], theta_ls[:, dim]
    nc1_part = float(((w_ls @ (within_cov + lam * eye)) * w_ls).sum()) + lam * float(
        b_ls.square().sum()
    )
    nc23_part = 0.0
    step = _tile_rows(num_classes)
    for start in range(0, num_classes, step):  # columns c of W_LS M^T + b_LS 1^T - I
        stop = min(start + step, num_classes)
        residual = means[start:stop] @ w_ls.T + b_ls  # (tile, C): row c is W_LS mu_c + b_LS
        diagonal = torch.arange(start, stop, device=residual.device)
        residual[diagonal - start, diagonal] -= 1.0
        nc23_part += float((residual.square().sum(1) * frac[start:stop]).sum())
    delta = torch.cat([weight, bias[:, None]], 1) - theta_ls
    perp = float(((delta @ moment) * delta).sum())
    return {"mse_nc1": nc1_part / 2, "mse_nc23": nc23_part / 2, "mse_perp": perp / 2}

"""Neural-collapse metrics as pure functions of class statistics (no models, no data).

Every function takes float64 tensors and returns a Python float; the definitions and
key names are those of METRICS.md, after Papyan, Han & Donoho, "Prevalence of neural
collapse during the terminal phase of deep learning training", PNAS 2020 (figure
numbers below refer to that paper).

Pairwise quantities (cosines, class distances, Gram matrices) are computed in row
tiles, so memory is O(tile x C) rather than O(C^2) and thousands of classes fit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS64 = torch.finfo(torch.float64).eps
TILE_ELEMENTS = 1 << 21  # elements of one (tile, C) block: 16 MiB of float64


def _tile_rows(num_classes: int) -> int:
    return max(1, min(num_classes, TILE_ELEMENTS // max(num_classes, 1)))


def between_class_eig(centred_means: Tensor) -> tuple[Tensor, Tensor]:
    """Non-zero eigenpairs of the between-class covariance Sigma_B (Papyan et al. 2020).

    Sigma_B = M~^T M~ / C has rank at most C - 1, so its eigenvectors come from the thin
    SVD of the C x D centred means rather than from a D x D eigendecomposition.
    Eigenvalues below ``max_eig * D * eps`` count as zero (scipy.linalg.pinvh's cutoff).

    Args:
        centred_means: (C, D) rows mu_c - mu_G.

    Returns:
        eigvals: (r,) positive eigenvalues of Sigma_B, descending.
        eigvecs: (D, r) orthonormal eigenvectors, one per column.
    """
    num_classes, dim = centred_means.shape
    _, singular, vh = torch.linalg.svd(centred_means, full_matrices=False)
    eigvals = singular.square() / num_classes
    if eigvals.numel() == 0 or float(eigvals.max()) == 0.0:
        return eigvals[:0], vh[:0].T
    keep = eigvals > eigvals.max() * dim * EPS64
    return eigvals[keep], vh[keep].T


def nc1(within_var_along_eigvecs: Tensor, eigvals: Tensor, num_classes: int) -> float:
    """NC1 = Tr(Sigma_W Sigma_B^+) / C (Papyan et al. 2020, Fig. 6).

    With Sigma_B^+ = sum_k v_k v_k^T / lambda_k, the trace is sum_k v_k^T Sigma_W v_k /
    lambda_k, so only Sigma_W's variance along the r <= C - 1 eigenvectors is needed.

    Args:
        within_var_along_eigvecs: (r,) v_k^T Sigma_W v_k.
        eigvals: (r,) lambda_k, the non-zero eigenvalues of Sigma_B.
        num_classes: C.
    """
    # A variance is never negative; rounding can make one so along a near-null direction.
    return float((within_var_along_eigvecs.clamp_min(0.0) / eigvals).sum()) / num_classes


def nc1_ratio(within_trace: float, centred_means: Tensor) -> float:
    """Tr(Sigma_W) / Tr(Sigma_B), the trace quotient (no inverse).

    Args:
        within_trace: Tr(Sigma_W).
        centred_means: (C, D) rows mu_c - mu_G; Tr(Sigma_B) = ||M~||_F^2 / C.
    """
    between_trace = float(centred_means.square().sum()) / centred_means.shape[0]
    return within_trace / between_trace


def cdnv(centred_means: Tensor, class_variances: Tensor) -> float:
    """Class-distance normalised variance (Galanti, Gyorgy & Hutter, ICLR 2022).

    Mean over ordered pairs c != c' of (sigma_c^2 + sigma_c'^2) / (2 ||mu_c - mu_c'||^2).

    Args:
        centred_means: (C, D) class means (any common shift; centring keeps the squared
            distances free of cancellation against a large offset).
        class_variances: (C,) sigma_c^2 = mean squared distance of class c to its mean.
    """
    num_classes = centred_means.shape[0]
    sq_norms = centred_means.square().sum(1)
    total = 0.0
    step = _tile_rows(num_classes)
    for start in range(0, num_classes, step):
        rows = slice(start, min(start + step, num_classes))
        gram = centred_means[rows] @ centred_means.T
        dist2 = (sq_norms[rows, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)
        ratio = (class_variances[rows, None] + class_variances[None, :]) / (2.0 * dist2)
        diagonal = torch.arange(rows.start, rows.stop, device=ratio.device)
        ratio[diagonal - rows.start, diagonal] = 0.0
        total += float(ratio.sum())
    return total / (num_classes * (num_classes - 1))


def equinorm(vectors: Tensor) -> float:
    """std_c ||v_c|| / mean_c ||v_c|| (Papyan et al. 2020, Fig. 2), population std.

    Args:
        vectors: (C, D) centred class means or classifier rows.
    """
    norms = vectors.norm(dim=1)
    return float(norms.std(correction=0) / norms.mean())


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
    diff = weight / weight.norm() - centred_means / centred_means.norm()
    return float(diff.square().sum())

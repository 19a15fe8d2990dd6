"""Neural-collapse metrics as pure functions of class statistics (no models, no data).

Every function takes float64 tensors and returns a Python float; the definitions and
key names are those of docs/metrics.md, after Papyan, Han & Donoho, "Prevalence of neural
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
CLOSE_DIST2 = 1e-4  # unit vectors this close: their distance from the difference itself
COINCIDE_DIST2 = 64 * EPS64  # unit vectors this close coincide, to rounding (GNC2 undefined)


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
    between_trace = float(centred_means.square().sum()) / centred_means.shape[0]
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
    diff = weight / weight.norm() - centred_means / centred_means.norm()
    return float(diff.square().sum())


# --------------------------------------------------------------------------- beyond the paper
def _merge_moments(
    state: tuple[int, float, float], values: Tensor
) -> tuple[int, float, float]:
    """(count, mean, M2) of a population merged with ``values`` (Chan et al. 1979), so a
    variance over tiles is as exact as a two-pass one."""
    count, mean, m2 = state
    n = values.numel()
    if n == 0:
        return state
    tile_mean = float(values.mean())
    tile_m2 = float((values - tile_mean).square().sum())
    delta = tile_mean - mean
    total = count + n
    return total, mean + delta * n / total, m2 + tile_m2 + delta * delta * count * n / total


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
    _, singular, vh = torch.linalg.svd(scaled, full_matrices=False)
    eigvals = singular.square()
    if eigvals.numel() == 0 or float(eigvals.max()) == 0.0:
        return math.nan
    keep = eigvals > eigvals.max() * means.shape[1] * EPS64
    eigvals, eigvecs = eigvals[keep], vh[keep].T  # (r,), (D, r)
    coords = eigvecs if basis is None else basis.T @ eigvecs
    along = ((within_cov @ coords) * coords).sum(0).clamp_min(0.0)
    return float((along / eigvals).sum())


def gnc2(vectors: Tensor) -> dict[str, float]:
    """Generalised NC2 of C vectors: logarithmic energy of their directions on the sphere
    (Liu et al. 2023, "Generalizing and decoupling neural collapse via hyperspherical
    uniformity gap"), for any C, also C > D + 1 where no simplex ETF exists.

    With u_c = v_c / ||v_c|| and k_cc' = log(1 / ||u_c - u_c'||) over the C(C-1)/2
    unordered pairs c < c':

    - energy: mean of k_cc' (lower is more uniform)
    - variance: population variance of k_cc' (0 when all pairwise distances are equal)

    Computed in row tiles of the upper triangle (``TILE_ELEMENTS`` values at a time), the
    variance merged across tiles exactly; ||u_c - u_c'||^2 = 2 - 2 u_c.u_c'.

    Args:
        vectors: (C, D) float64 rows v_c (centred class means or classifier rows).

    Returns:
        dict with keys ``energy`` and ``variance``: inf / NaN when two directions coincide
        (to rounding: ||u_c - u_c'||^2 < ``COINCIDE_DIST2``), NaN when a vector is zero.
    """
    num_classes = vectors.shape[0]
    units = vectors / vectors.norm(dim=1, keepdim=True)
    state = (0, 0.0, 0.0)
    step = _tile_rows(num_classes)
    for start in range(0, num_classes - 1, step):
        stop = min(start + step, num_classes - 1)
        # the pairs (c, c') with start <= c < stop, c' > c: a triangle then a rectangle
        tri = torch.triu(torch.ones(stop - start, stop - start + 1, dtype=torch.bool,
                                    device=units.device), diagonal=1)
        square = units[start:stop] @ units[start : stop + 1].T
        state = _merge_moments(state, _log_inverse_distance(square[tri], units, start, tri))
        if stop + 1 < num_classes:
            rect = units[start:stop] @ units[stop + 1 :].T
            state = _merge_moments(state, _log_inverse_distance(rect.flatten(), units, start,
                                                                None, stop + 1))
    count, mean, m2 = state
    return {"energy": mean, "variance": m2 / count if count else math.nan}


def _log_inverse_distance(
    cos: Tensor, units: Tensor, start: int, tri: Tensor | None, first_col: int = 0
) -> Tensor:
    """log(1 / ||u_c - u_c'||) from the cosines of one block of pairs, in place.

    ``tri`` is the triangle mask of a (rows, rows + 1) block starting at column ``start``,
    or None for a full (rows, C - first_col) block; pairs whose 2 - 2cos would cancel
    (closer than ``CLOSE_DIST2``) take their distance from the difference of the units.
    """
    dist2 = cos.mul_(-2.0).add_(2.0).clamp_min_(0.0)
    close = torch.nonzero(dist2 < CLOSE_DIST2).flatten()
    if close.numel():
        if tri is None:
            width = units.shape[0] - first_col
            i, j = start + close // width, first_col + close % width
        else:
            where = torch.nonzero(tri)[close]
            i, j = start + where[:, 0], start + where[:, 1]
        exact = (units[i] - units[j]).square().sum(1)
        dist2[close] = torch.where(exact < COINCIDE_DIST2, 0.0, exact)
    return dist2.log_().mul_(-0.5)


def duality(weight: Tensor, centred_means: Tensor) -> dict[str, float]:
    """Per-class duality s_c = cos(w_c, mu_c - mu_G) summarised two ways.

    - ``duality_cos``: mean_c s_c (1 when every classifier row points along its mean)
    - ``unc3``: std_c s_c / mean_c s_c, population std (uniform duality; 0 when all s_c
      are equal; Wu & Papyan 2024, "Linguistic collapse")

    Args:
        weight: (C, D) classifier rows.   centred_means: (C, D) rows mu_c - mu_G.
    """
    cos = (weight * centred_means).sum(1) / (weight.norm(dim=1) * centred_means.norm(dim=1))
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

"""An independent float64 NumPy reference of docs/metrics.md, written plainly from the formulas.

Deliberately naive (explicit per-class loops, full D x D matrices, scipy's pinvh) so that
it shares no code or shortcut with nctools.
"""

import numpy as np
import scipy.linalg


def reference_metrics(H, y, W, b=None, C=None, class_means=None):
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y)
    W = np.asarray(W, dtype=np.float64)
    C = W.shape[0] if C is None else C
    b = np.zeros(C) if b is None else np.asarray(b, dtype=np.float64)
    N = H.shape[0]
    mu = np.stack([H[y == c].mean(0) for c in range(C)])
    mu_G = H.mean(0)
    Mc = mu - mu_G
    Sigma_B = sum(np.outer(Mc[c], Mc[c]) for c in range(C)) / C
    centred = H - mu[y]
    Sigma_W = centred.T @ centred / N
    var_c = np.array([np.mean(np.sum((H[y == c] - mu[c]) ** 2, 1)) for c in range(C)])
    out = {}
    out["nc1"] = np.trace(Sigma_W @ scipy.linalg.pinvh(Sigma_B)) / C
    out["nc1_ratio"] = np.trace(Sigma_W) / np.trace(Sigma_B)
    pairs = [(c, d) for c in range(C) for d in range(C) if c != d]
    out["cdnv"] = np.mean(
        [(var_c[c] + var_c[d]) / (2 * np.sum((mu[c] - mu[d]) ** 2)) for c, d in pairs]
    )
    for suffix, V in (("means", Mc), ("weights", W)):
        norms = np.linalg.norm(V, axis=1)
        # the std over C - 1, as the authors' code (torch.std) computes Fig. 2
        out[f"equinorm_{suffix}"] = np.std(norms, ddof=1) / np.mean(norms)
        cos = np.array([V[c] @ V[d] / (norms[c] * norms[d]) for c, d in pairs])
        out[f"equiangular_{suffix}"] = np.std(cos)
        out[f"maxangle_{suffix}"] = np.mean(np.abs(cos + 1 / (C - 1)))
        G = V @ V.T
        target = (np.eye(C) - np.ones((C, C)) / C) / np.sqrt(C - 1)
        out[f"etf_{suffix}"] = np.linalg.norm(G / np.linalg.norm(G) - target)
    out["self_duality"] = np.linalg.norm(W / np.linalg.norm(W) - Mc / np.linalg.norm(Mc)) ** 2
    ncc_mu = mu if class_means is None else np.asarray(class_means, dtype=np.float64)
    classifier = np.argmax(H @ W.T + b, 1)
    ncc = np.argmin(((H[:, None, :] - ncc_mu[None]) ** 2).sum(-1), 1)
    out["ncc_mismatch"] = np.mean(classifier != ncc)
    out["accuracy"] = np.mean(classifier == y)
    out["ncc_accuracy"] = np.mean(ncc == y)
    return out

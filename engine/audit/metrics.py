"""How far a Gaussian belief q is from a posterior p: vectorised over tokens, host-side numpy.

Every function takes arrays with any leading axes (checkpoints, tokens, problems) and returns
one value per leading index. ``p`` is either the exact posterior (``references.py``) or the
MCMC posterior moment-matched to a Gaussian.

- KL divergences between Gaussians, both ways (1-D and full covariance).
- 2-Wasserstein distance between Gaussians (Dowson & Landau 1982; Givens & Shortt 1984).
- Mean z-error, standard-deviation ratio, and the exact interval coverage of q's central
  interval under a 1-D Gaussian p.
- PSIS Pareto k-hat of q as an importance proposal for p (Yao, Vehtari, Simpson & Gelman 2018,
  "Yes, but did it work?: Evaluating variational inference", ICML; Vehtari et al. 2024, JMLR):
  k-hat < 0.5 good, < 0.7 usable, above that q misses the posterior's tail.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "kl_normal",
    "kl_mvnormal",
    "w2_normal",
    "w2_mvnormal",
    "z_error",
    "std_ratio",
    "coverage_normal",
    "psis_tail_size",
    "pareto_khat",
    "pareto_khat_from_tail",
]


def kl_normal(mu_q, sigma_q, mu_p, sigma_p):
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)), elementwise ``[...]``."""
    mu_q, sigma_q, mu_p, sigma_p = (np.asarray(a, dtype=float) for a in (mu_q, sigma_q, mu_p, sigma_p))
    ratio = np.square(sigma_q / sigma_p)
    return 0.5 * (ratio + np.square((mu_q - mu_p) / sigma_p) - 1.0 - np.log(ratio))


def kl_mvnormal(mu_q, cov_q, mu_p, cov_p):
    """KL(N(mu_q, cov_q) || N(mu_p, cov_p)) for ``mu [..., K]``, ``cov [..., K, K]`` -> ``[...]``.

    ``0.5 (tr(cov_p^-1 cov_q) + d^T cov_p^-1 d - K + log det cov_p - log det cov_q)``, through
    Cholesky factors for stability.
    """
    mu_q, cov_q, mu_p, cov_p = (np.asarray(a, dtype=float) for a in (mu_q, cov_q, mu_p, cov_p))
    K = mu_q.shape[-1]
    chol_p = np.linalg.cholesky(cov_p)
    chol_q = np.linalg.cholesky(cov_q)
    # L_p^-1 L_q and L_p^-1 d
    a = np.linalg.solve(chol_p, chol_q)
    b = np.linalg.solve(chol_p, (mu_p - mu_q)[..., None])[..., 0]
    trace = np.square(a).sum((-2, -1))
    maha = np.square(b).sum(-1)
    logdet_p = 2.0 * np.log(np.diagonal(chol_p, axis1=-2, axis2=-1)).sum(-1)
    logdet_q = 2.0 * np.log(np.diagonal(chol_q, axis1=-2, axis2=-1)).sum(-1)
    return 0.5 * (trace + maha - K + logdet_p - logdet_q)


def w2_normal(mu_q, sigma_q, mu_p, sigma_p):
    """2-Wasserstein distance between 1-D Gaussians: ``sqrt((mu_q-mu_p)^2 + (sigma_q-sigma_p)^2)``."""
    return np.sqrt(np.square(np.subtract(mu_q, mu_p)) + np.square(np.subtract(sigma_q, sigma_p)))


def _sqrtm_psd(cov):
    vals, vecs = np.linalg.eigh(cov)
    vals = np.clip(vals, 0.0, None)
    return (vecs * np.sqrt(vals)[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def w2_mvnormal(mu_q, cov_q, mu_p, cov_p):
    """2-Wasserstein distance between Gaussians ``[..., K]``/``[..., K, K]`` -> ``[...]``.

    ``W2^2 = |mu_q - mu_p|^2 + tr(cov_q + cov_p - 2 (cov_p^1/2 cov_q cov_p^1/2)^1/2)``.
    """
    root_p = _sqrtm_psd(np.asarray(cov_p, dtype=float))
    cross = _sqrtm_psd(root_p @ np.asarray(cov_q, dtype=float) @ root_p)
    trace = np.trace(np.asarray(cov_q) + np.asarray(cov_p) - 2.0 * cross, axis1=-2, axis2=-1)
    sq = np.square(np.subtract(mu_q, mu_p)).sum(-1) + trace
    return np.sqrt(np.clip(sq, 0.0, None))


def z_error(mu_q, mu_p, sigma_p):
    """Mean error of q in posterior standard deviations: ``(mu_q - mu_p) / sigma_p``."""
    return (np.asarray(mu_q) - np.asarray(mu_p)) / np.asarray(sigma_p)


def std_ratio(sigma_q, sigma_p):
    """``sigma_q / sigma_p``: below 1 q is over-confident, above 1 under-confident."""
    return np.asarray(sigma_q) / np.asarray(sigma_p)


def coverage_normal(mu_q, sigma_q, mu_p, sigma_p, level: float = 0.9):
    """Mass that ``N(mu_p, sigma_p)`` puts on q's central ``level`` interval (``level`` if q = p)."""
    from scipy.special import ndtr, ndtri

    z = float(ndtri(0.5 + level / 2.0))
    lo = (np.asarray(mu_q) - z * np.asarray(sigma_q) - mu_p) / sigma_p
    hi = (np.asarray(mu_q) + z * np.asarray(sigma_q) - mu_p) / sigma_p
    return ndtr(hi) - ndtr(lo)


def psis_tail_size(num_samples: int, reff: float = 1.0) -> int:
    """Largest log weights PSIS's k-hat depends on: the tail ``M`` plus the cut-off value.

    ``M = ceil(min(S / 5, 3 sqrt(S / reff)))`` as in ArviZ's ``psislw``; keeping only these
    ``M + 1`` values per problem (``jax.lax.top_k`` on the device) gives the same k-hat as the
    full ``S`` weights, at a fraction of the transfer.
    """
    return int(math.ceil(min(num_samples / 5.0, 3.0 * math.sqrt(num_samples / reff)))) + 1


def pareto_khat(log_weights, reff: float = 1.0):
    """PSIS k-hat of ``log_weights [..., S]`` (``log p~(x_s) - log q(x_s)``, ``x_s ~ q``) -> ``[...]``.

    Uses ``arviz.psislw`` on every leading index. Non-finite weights give ``inf``.
    """
    import arviz as az

    lw = np.asarray(log_weights, dtype=float)
    lead = lw.shape[:-1]
    flat = lw.reshape((-1, lw.shape[-1]))
    out = np.full(flat.shape[0], np.inf)
    finite = np.isfinite(flat).all(-1)
    if finite.any():
        with np.errstate(all="ignore"):
            _, k = az.psislw(flat[finite], reff=reff)
        out[finite] = np.asarray(k, dtype=float)
    return out.reshape(lead)


def _gpd_shape(tails):
    """Zhang & Stephens (2009) empirical-Bayes GPD shape of each row of ``tails [R, n]`` (sorted
    ascending, positive exceedances), with the weak prior toward 0.5 that ArviZ's ``_gpdfit`` adds:
    the same arithmetic, on all rows at once."""
    rows, n = tails.shape
    m_est = 30 + int(n**0.5)
    b = 1.0 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=float) - 0.5))  # [m]
    b = b[None, :] / (3.0 * tails[:, int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)]) + 1.0 / tails[:, -1:]  # [R, m]
    k_b = np.log1p(-b[:, :, None] * tails[:, None, :]).mean(-1)  # [R, m]
    len_scale = n * (np.log(-(b / k_b)) - k_b - 1.0)
    weights = 1.0 / np.exp(len_scale[:, None, :] - len_scale[:, :, None]).sum(-1)  # [R, m]
    weights = np.where(weights >= 10 * np.finfo(float).eps, weights, 0.0)
    weights /= weights.sum(-1, keepdims=True)
    b_post = (b * weights).sum(-1)
    k_post = np.log1p(-b_post[:, None] * tails).mean(-1)
    return (n * k_post + 10 * 0.5) / (n + 10)


def pareto_khat_from_tail(top_log_weights, num_samples: int, reff: float = 1.0):
    """k-hat from the ``psis_tail_size(num_samples)`` largest log weights ``[..., M+1]`` -> ``[...]``.

    PSIS's k-hat depends only on the ``M`` largest weights and the cut-off (the ``M+1``-th), so the
    result equals :func:`pareto_khat` (ArviZ's ``psislw``) on all ``num_samples`` weights. Rows are
    fitted together (:func:`_gpd_shape`, ArviZ's arithmetic vectorised: 200,000 tokens take a
    second, not a minute); rows whose tail is not ``M`` values strictly above the cut-off (ties,
    underflow) or whose fit is not finite go through ArviZ itself. Tails flat to rounding (``q``
    equal to ``p``; the log weights' dtype sets the tolerance) give ``-inf``: bounded weights, the
    best possible k-hat.
    """
    raw = np.asarray(top_log_weights)
    eps = np.finfo(raw.dtype).eps if np.issubdtype(raw.dtype, np.floating) else np.finfo(float).eps
    top = np.sort(raw.astype(float), axis=-1)  # ascending
    keep = top.shape[-1]
    if keep != psis_tail_size(num_samples, reff):
        raise ValueError(f"expected {psis_tail_size(num_samples, reff)} top weights, got {keep}")
    lead = top.shape[:-1]
    flat = top.reshape((-1, keep))
    k = np.full(flat.shape[0], np.nan)
    block = 2048  # rows fitted at a time: bounded memory for 10^6 tokens
    with np.errstate(all="ignore"):
        shifted = flat - flat[:, -1:]  # psislw subtracts the largest log weight
        cutoff = np.maximum(shifted[:, 0], np.log(np.finfo(float).tiny))
        regular = np.isfinite(flat).all(-1) & (shifted[:, 1] > cutoff) & (keep - 1 > 4)
        for start in range(0, flat.shape[0], block):
            idx = start + np.flatnonzero(regular[start : start + block])
            if idx.size:
                tails = np.exp(shifted[idx, 1:]) - np.exp(cutoff[idx, None])
                k[idx] = _gpd_shape(tails)
    rest = np.flatnonzero(~np.isfinite(k))
    for start in range(0, rest.size, block):  # ties, underflow, failed fits: ArviZ on the padded rows
        rows = flat[rest[start : start + block]]
        pad = np.repeat(rows[:, :1], num_samples - keep, axis=-1)
        k[rest[start : start + block]] = pareto_khat(np.concatenate([pad, rows], axis=-1), reff=reff)
    k = k.reshape(lead)
    # constant weights (q equal to p up to rounding): nothing to fit, importance sampling is exact
    with np.errstate(invalid="ignore"):
        spread = top[..., -1] - top[..., 0]
        flat = np.isfinite(spread) & (spread <= 256 * eps * (1.0 + np.abs(top[..., -1])))
    return np.where(flat, -np.inf, k)

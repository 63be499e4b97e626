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
    "build_table",
    "UNIVARIATE_COLUMNS",
    "MULTIVARIATE_COLUMNS",
]

UNIVARIATE_COLUMNS = (
    "checkpoint", "token", "status", "n_obs", "vfe_mean", "vfe_std", "mcmc_mean", "mcmc_std",
    "mcmc_mcse", "mean_diff", "z_error", "std_ratio", "kl_q_mcmc", "kl_mcmc_q", "w2", "coverage",
    "exact_mean", "exact_std", "kl_q_exact", "kl_exact_q", "w2_exact", "coverage_exact",
    "mcmc_exact_z", "pareto_k", "r_hat", "ess_bulk", "ess_tail", "divergences",
    "mean_n_steps", "converged",
)
"""metrics.parquet columns of a univariate audit (contract 4 plus extras), in order."""

MULTIVARIATE_COLUMNS = (
    "checkpoint", "token", "status", "n_obs", "dim", "mean_l2_error", "mahalanobis",
    "std_ratio_min", "std_ratio_max", "kl_q_mcmc", "kl_mcmc_q", "w2", "coverage",
    "exact_l2_error", "kl_q_exact", "kl_exact_q", "w2_exact", "mcmc_exact_l2", "pareto_k",
    "mcmc_mcse", "r_hat", "ess_bulk", "ess_tail", "divergences", "mean_n_steps", "converged",
)
"""metrics.parquet columns of a multivariate audit, in order."""


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


def pareto_khat_from_tail(top_log_weights, num_samples: int, reff: float = 1.0):
    """k-hat from the ``psis_tail_size(num_samples)`` largest log weights ``[..., M+1]`` -> ``[...]``.

    The smaller weights only pad the vector to ``num_samples`` (with the cut-off value, which
    PSIS neither fits nor counts in the tail), so the result equals :func:`pareto_khat` on all
    ``num_samples`` weights. Tails flat to rounding (``q`` equal to ``p``; the log weights'
    dtype sets the tolerance) give ``-inf``: bounded weights, the best possible k-hat.
    """
    raw = np.asarray(top_log_weights)
    eps = np.finfo(raw.dtype).eps if np.issubdtype(raw.dtype, np.floating) else np.finfo(float).eps
    top = np.sort(raw.astype(float), axis=-1)  # ascending
    keep = top.shape[-1]
    if keep != psis_tail_size(num_samples, reff):
        raise ValueError(f"expected {psis_tail_size(num_samples, reff)} top weights, got {keep}")
    lead = top.shape[:-1]
    flat = top.reshape((-1, keep))
    k = np.empty(flat.shape[0])
    block = 4096  # rows padded to num_samples at a time: bounded memory for 10^6 tokens
    for start in range(0, flat.shape[0], block):
        rows = flat[start : start + block]
        pad = np.repeat(rows[:, :1], num_samples - keep, axis=-1)
        k[start : start + block] = pareto_khat(np.concatenate([pad, rows], axis=-1), reff=reff)
    k = k.reshape(lead)
    # constant weights (q equal to p up to rounding): nothing to fit, importance sampling is exact
    with np.errstate(invalid="ignore"):
        spread = top[..., -1] - top[..., 0]
        flat = spread <= 256 * eps * (1.0 + np.abs(top[..., -1]))
    return np.where(flat, -np.inf, k)


def _is_positive_definite(mean, cov):
    """``[P]`` flags: row ``p``'s ``mean [P, K]`` and ``cov [P, K, K]`` are finite and ``cov`` is
    positive definite (smallest eigenvalue above K * eps * the largest, so that a Cholesky
    factorisation succeeds), checked row by row so one bad row raises nothing."""
    ok = np.isfinite(mean).all(-1) & np.isfinite(cov).all((-2, -1))
    if ok.any():
        sym = 0.5 * (cov[ok] + np.swapaxes(cov[ok], -1, -2))
        eig = np.linalg.eigvalsh(sym)
        ok[ok] = eig[..., 0] > cov.shape[-1] * np.finfo(float).eps * np.abs(eig[..., -1])
    return ok


def _converged(r_hat, ess_bulk, ess_tail, divergences):
    from engine.diagnostics import CONVERGENCE_RULES

    return (
        (np.asarray(r_hat) < CONVERGENCE_RULES["r_hat_max"])
        & (np.asarray(ess_bulk) >= CONVERGENCE_RULES["ess_min"])
        & (np.asarray(ess_tail) >= CONVERGENCE_RULES["ess_min"])
        & (np.asarray(divergences) == 0)
    )


def build_table(beliefs, summaries, model_name, exact: bool, interval: float, num_q_draws: int, psis: bool):
    """Per-token metrics table from on-device summaries -> ``(DataFrame, plot arrays)``.

    Parameters
    ----------
    beliefs
        The audited :class:`engine.beliefs.BeliefSet` (C checkpoints x T tokens).
    summaries
        ``audit._summary_fn`` outputs stacked over the ``C*T`` problems (host arrays).
    model_name
        Template name (for messages only).
    exact
        Whether the model is conjugate, so ``references`` gives the exact posterior; else the
        ``*_exact`` columns are NaN.
    interval
        Credible mass of q's interval (``coverage_exact``).
    num_q_draws
        Draws from q behind ``summaries["top_log_weights"]``.
    psis
        Whether k-hat was computed (``theta`` the model's only, untransformed, latent).
    """
    import pandas as pd

    from engine import references

    C, T = beliefs.num_checkpoints, beliefs.num_tokens
    P = C * T
    s = {k: np.asarray(v) for k, v in summaries.items()}
    cols: dict[str, np.ndarray] = {
        "checkpoint": np.repeat(beliefs.checkpoints, T),
        "token": np.tile(beliefs.tokens, C),
        "status": np.full(P, "ok", dtype=object),
        "n_obs": beliefs.num_obs.reshape(-1),
    }
    pk = (pareto_khat_from_tail(s["top_log_weights"], num_q_draws) if psis else np.full(P, np.nan))
    nan = np.full(P, np.nan)
    extras = {}
    if beliefs.kind == "univariate":
        mu_q, sd_q = beliefs.host("mu_q"), beliefs.host("sigma_q")
        mean, sd = s["mean"], s["sd"]
        cols.update(
            vfe_mean=mu_q, vfe_std=sd_q, mcmc_mean=mean, mcmc_std=sd, mcmc_mcse=s["mcse_mean"],
            mean_diff=mu_q - mean, z_error=z_error(mu_q, mean, sd), std_ratio=std_ratio(sd_q, sd),
            kl_q_mcmc=kl_normal(mu_q, sd_q, mean, sd), kl_mcmc_q=kl_normal(mean, sd, mu_q, sd_q),
            w2=w2_normal(mu_q, sd_q, mean, sd), coverage=s["coverage"],
        )
        if exact:
            em, es = references.normal_normal(
                beliefs.host("prior_mu"), beliefs.host("prior_sigma"), beliefs.host("obs_sigma"),
                beliefs.host("observed"), beliefs.num_obs.reshape(-1),
            )
            cols.update(
                exact_mean=em, exact_std=es, kl_q_exact=kl_normal(mu_q, sd_q, em, es),
                kl_exact_q=kl_normal(em, es, mu_q, sd_q), w2_exact=w2_normal(mu_q, sd_q, em, es),
                coverage_exact=coverage_normal(mu_q, sd_q, em, es, interval),
                mcmc_exact_z=(mean - em) / s["mcse_mean"],
            )
        else:
            cols.update({k: nan for k in ("exact_mean", "exact_std", "kl_q_exact", "kl_exact_q",
                                          "w2_exact", "coverage_exact", "mcmc_exact_z")})
        names = UNIVARIATE_COLUMNS
    else:
        mu_q, cov_q = beliefs.host("mu_q"), beliefs.host("cov_q")
        bad_cov = ~_is_positive_definite(s["mean"], s["cov"])
        # a failed token's moments are replaced by q's (always positive definite) so that every
        # batched factorisation below succeeds; its MCMC columns become NaN and its status says why
        mean = np.where(bad_cov[:, None], mu_q, s["mean"])
        cov = np.where(bad_cov[:, None, None], cov_q, s["cov"])
        cols["status"][bad_cov] = "MCMC covariance not finite or not positive definite"
        diff = mu_q - mean
        chol = np.linalg.cholesky(cov)
        white = np.linalg.solve(chol, diff[..., None])[..., 0]
        sd_ratio = np.sqrt(np.diagonal(cov_q, axis1=-2, axis2=-1) / np.diagonal(cov, axis1=-2, axis2=-1))
        cols.update(
            dim=np.full(P, beliefs.dim), mean_l2_error=np.linalg.norm(diff, axis=-1),
            mahalanobis=np.linalg.norm(white, axis=-1), std_ratio_min=sd_ratio.min(-1),
            std_ratio_max=sd_ratio.max(-1), kl_q_mcmc=kl_mvnormal(mu_q, cov_q, mean, cov),
            kl_mcmc_q=kl_mvnormal(mean, cov, mu_q, cov_q), w2=w2_mvnormal(mu_q, cov_q, mean, cov),
            coverage=s["coverage"], mcmc_mcse=s["mcse_mean"],
        )
        em, ec = references.mvnormal_known_cov(
            beliefs.host("prior_mu"), beliefs.host("prior_cov"), beliefs.host("obs_cov"),
            beliefs.host("observed"), beliefs.num_obs.reshape(-1),
        )
        cols.update(
            exact_l2_error=np.linalg.norm(mu_q - em, axis=-1),
            kl_q_exact=kl_mvnormal(mu_q, cov_q, em, ec), kl_exact_q=kl_mvnormal(em, ec, mu_q, cov_q),
            w2_exact=w2_mvnormal(mu_q, cov_q, em, ec), mcmc_exact_l2=np.linalg.norm(mean - em, axis=-1),
        )
        for name in ("mean_l2_error", "mahalanobis", "std_ratio_min", "std_ratio_max", "kl_q_mcmc",
                     "kl_mcmc_q", "w2", "mcmc_exact_l2"):
            cols[name] = np.where(bad_cov, np.nan, cols[name])
        mean, sd_ratio = np.where(bad_cov[:, None], np.nan, mean), np.where(bad_cov[:, None], np.nan, sd_ratio)
        extras = {"vfe_mean": mu_q, "mcmc_mean": mean, "std_ratio": sd_ratio}
        names = MULTIVARIATE_COLUMNS
    cols.update(
        pareto_k=pk, r_hat=s["r_hat"], ess_bulk=s["ess_bulk"], ess_tail=s["ess_tail"],
        divergences=s["divergences"].astype(np.int64), mean_n_steps=s["mean_n_steps"],
    )
    cols["converged"] = _converged(cols["r_hat"], cols["ess_bulk"], cols["ess_tail"], cols["divergences"])
    cols["converged"] &= cols["status"] == "ok"
    table = pd.DataFrame({name: cols[name] for name in names})
    float_cols = [c for c in names if c not in ("checkpoint", "token", "status", "n_obs", "dim",
                                                 "divergences", "converged")]
    table[float_cols] = table[float_cols].astype(np.float64)
    table["status"] = table["status"].astype(str)
    from engine.calibration import z_true_columns

    for name, values in z_true_columns(beliefs, s).items():  # only when beliefs carry z_true
        table[name] = values
    return table, extras

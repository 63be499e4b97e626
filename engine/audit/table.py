"""The audit's per-token table: one row per (checkpoint, token) from the on-device summaries.

Audit work, not a metric: it puts ``engine.audit.metrics``' comparisons (KL, W2, k-hat, ...)
of q with the MCMC and exact posteriors side by side, decides ``converged``, and flags failed
problems in their own rows.
"""

from __future__ import annotations

import numpy as np

from engine.audit.metrics import (
    coverage_normal, kl_mvnormal, kl_normal, pareto_khat_from_tail, std_ratio, w2_mvnormal, w2_normal, z_error,
)

__all__ = ["build_table", "flag_failures", "is_converged", "UNIVARIATE_COLUMNS", "MULTIVARIATE_COLUMNS",
           "MCMC_COLUMNS"]

UNIVARIATE_COLUMNS = (
    "checkpoint", "token", "status", "n_obs", "vfe_mean", "vfe_std", "mcmc_mean", "mcmc_std",
    "mcmc_mcse", "mean_diff", "z_error", "std_ratio", "kl_q_mcmc", "kl_mcmc_q", "w2", "coverage",
    "exact_mean", "exact_std", "kl_q_exact", "kl_exact_q", "w2_exact", "coverage_exact",
    "mcmc_exact_z", "pareto_k", "r_hat", "ess_bulk", "ess_tail", "divergences",
    "mean_n_steps", "num_draws", "num_grads", "converged", "sampler",
)
"""metrics.parquet columns of a univariate audit (contract 4 plus extras), in order."""

MULTIVARIATE_COLUMNS = (
    "checkpoint", "token", "status", "n_obs", "dim", "mean_l2_error", "mahalanobis",
    "std_ratio_min", "std_ratio_max", "kl_q_mcmc", "kl_mcmc_q", "w2", "coverage",
    "exact_l2_error", "kl_q_exact", "kl_exact_q", "w2_exact", "mcmc_exact_l2", "pareto_k",
    "mcmc_mcse", "r_hat", "ess_bulk", "ess_tail", "divergences", "mean_n_steps", "num_draws", "num_grads",
    "converged", "sampler",
)
"""metrics.parquet columns of a multivariate audit, in order."""


MCMC_COLUMNS = ("mcmc_mean", "mcmc_std", "mean_diff", "std_ratio", "kl_q_mcmc", "mean_l2_error",
                "r_hat", "ess_bulk", "ess_tail", "mcmc_mcse", "w2_mcmc")
"""Columns computed from the draws: NaN in the row of a problem that could not start."""


def is_converged(r_hat, ess_bulk, ess_tail, divergences):
    """``converged``: R-hat, bulk and tail ESS within ``CONVERGENCE_RULES``, no divergences."""
    from engine.sampling.diagnostics import CONVERGENCE_RULES

    return (
        (np.asarray(r_hat) < CONVERGENCE_RULES["r_hat_max"])
        & (np.asarray(ess_bulk) >= CONVERGENCE_RULES["ess_min"])
        & (np.asarray(ess_tail) >= CONVERGENCE_RULES["ess_min"])
        & (np.asarray(divergences) == 0)
    )


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


def build_table(beliefs, summaries, model_name, exact: bool, interval: float, num_q_draws: int, psis: bool,
                sampler: str = ""):
    """Per-token metrics table from on-device summaries -> ``(DataFrame, plot arrays)``.

    Parameters
    ----------
    beliefs
        The audited :class:`engine.audit.beliefs.BeliefSet` (C checkpoints x T tokens).
    summaries
        ``engine.audit.summary.problem_summary_fn`` outputs stacked over the ``C*T`` problems (host arrays).
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
    sampler
        The run's sampler name, the ``sampler`` column unless the summaries name each problem's
        kernel (``sampler_code``, the ``auto`` sampler: ChEES or the NUTS fallback per row).
    """
    import pandas as pd

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
    if beliefs.kind == "univariate":
        cols.update(_univariate_columns(beliefs, s, exact, interval))
        extras, names = {}, UNIVARIATE_COLUMNS
    else:
        more, extras, bad_cov = _multivariate_columns(beliefs, s)
        cols.update(more)
        cols["status"][bad_cov] = "MCMC covariance not finite or not positive definite"
        names = MULTIVARIATE_COLUMNS
    cols.update(
        pareto_k=pk, r_hat=s["r_hat"], ess_bulk=s["ess_bulk"], ess_tail=s["ess_tail"],
        divergences=s["divergences"].astype(np.int64), mean_n_steps=s["mean_n_steps"],
        # kept draws per chain (with per-problem stopping: where the gate passed or max_draws),
        # and gradient evaluations of all chains, warmup included (-1: not counted)
        num_draws=np.asarray(s.get("num_draws", np.full(P, -1))).astype(np.int64),
        num_grads=np.asarray(s.get("num_grads", np.full(P, -1))).astype(np.int64),
    )
    cols["converged"] = is_converged(cols["r_hat"], cols["ess_bulk"], cols["ess_tail"], cols["divergences"])
    cols["converged"] &= cols["status"] == "ok"
    if "sampler_code" in s:
        from engine.sampling.auto import sampler_names

        cols["sampler"] = np.asarray(sampler_names(), dtype=object)[s["sampler_code"].astype(int)]
    else:
        cols["sampler"] = np.full(P, sampler, dtype=object)
    table = pd.DataFrame({name: cols[name] for name in names})
    float_cols = [c for c in names if c not in ("checkpoint", "token", "status", "n_obs", "dim",
                                                 "divergences", "num_draws", "num_grads", "converged", "sampler")]
    table[float_cols] = table[float_cols].astype(np.float64)
    table["status"] = table["status"].astype(str)
    table["sampler"] = table["sampler"].astype(str)
    from engine.audit.calibration import z_true_columns

    for name, values in z_true_columns(beliefs, s).items():  # only when beliefs carry z_true
        table[name] = values
    return table, extras


def _univariate_columns(beliefs, s: dict, exact: bool, interval: float) -> dict:
    """q against the MCMC posterior and, for a conjugate model, the exact one (1-D)."""
    from engine.audit import references

    P = beliefs.num_problems
    nan = np.full(P, np.nan)
    mu_q, sd_q = beliefs.host("mu_q"), beliefs.host("sigma_q")
    mean, sd = s["mean"], s["sd"]
    cols = dict(
        vfe_mean=mu_q, vfe_std=sd_q, mcmc_mean=mean, mcmc_std=sd, mcmc_mcse=s["mcse_mean"],
        mean_diff=mu_q - mean, z_error=z_error(mu_q, mean, sd), std_ratio=std_ratio(sd_q, sd),
        kl_q_mcmc=kl_normal(mu_q, sd_q, mean, sd), kl_mcmc_q=kl_normal(mean, sd, mu_q, sd_q),
        w2=w2_normal(mu_q, sd_q, mean, sd), coverage=s["coverage"],
    )
    if not exact:
        cols.update({k: nan for k in ("exact_mean", "exact_std", "kl_q_exact", "kl_exact_q",
                                      "w2_exact", "coverage_exact", "mcmc_exact_z")})
        return cols
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
    return cols


def _multivariate_columns(beliefs, s: dict) -> tuple[dict, dict, np.ndarray]:
    """q against the MCMC and exact posteriors (K-dimensional) -> ``(columns, plot arrays,
    [P] flags of tokens whose MCMC covariance is unusable)``."""
    from engine.audit import references

    P = beliefs.num_problems
    mu_q, cov_q = beliefs.host("mu_q"), beliefs.host("cov_q")
    bad_cov = ~_is_positive_definite(s["mean"], s["cov"])
    # a failed token's moments are replaced by q's (always positive definite) so that every
    # batched factorisation below succeeds; its MCMC columns become NaN and its status says why
    mean = np.where(bad_cov[:, None], mu_q, s["mean"])
    cov = np.where(bad_cov[:, None, None], cov_q, s["cov"])
    diff = mu_q - mean
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, diff[..., None])[..., 0]
    sd_ratio = np.sqrt(np.diagonal(cov_q, axis1=-2, axis2=-1) / np.diagonal(cov, axis1=-2, axis2=-1))
    cols = dict(
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
    return cols, {"vfe_mean": mu_q, "mcmc_mean": mean, "std_ratio": sd_ratio}, bad_cov


def flag_failures(table, init_ok: np.ndarray, num_transitions):
    """Isolate failed problems in their rows: ``status`` says why, ``converged`` is False, and
    the MCMC columns of an unstartable problem are NaN. Other rows are untouched (each problem
    samples in its own lanes and key stream)."""
    table = table.copy()
    bad_init = ~np.asarray(init_ok, bool)
    all_divergent = table["divergences"].to_numpy() >= num_transitions
    table.loc[all_divergent, "status"] = "every transition diverged"
    table.loc[bad_init, "status"] = "no finite log density at any jittered start"
    cols = [c for c in MCMC_COLUMNS if c in table.columns]
    table.loc[bad_init, cols] = np.nan
    table.loc[bad_init | all_divergent, "converged"] = False
    return table

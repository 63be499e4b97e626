"""``audit_vfe`` against closed-form posteriors, with Monte Carlo error bars (small problems)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import audit_vfe
from engine.errors import InputError

SMALL = dict(chains=4, draws=500, tune=500, seed=1, num_q_draws=500)

CONTRACT_UNIVARIATE = [
    "checkpoint", "token", "vfe_mean", "vfe_std", "mcmc_mean", "mcmc_std", "mean_diff",
    "std_ratio", "kl_q_mcmc", "exact_mean", "exact_std", "kl_q_exact", "r_hat", "ess_bulk",
    "ess_tail", "divergences", "converged", "w2", "pareto_k", "mcmc_mcse", "status",
]


def _exact(prior_mu, prior_sigma, obs_sigma, observed, n_obs):
    """Conjugate update written out independently of engine.audit.references."""
    valid = np.arange(observed.shape[-1]) < n_obs[..., None]
    precision = prior_sigma**-2 + n_obs * obs_sigma**-2
    mean = (prior_mu * prior_sigma**-2 + np.where(valid, observed, 0).sum(-1) * obs_sigma**-2) / precision
    return mean, precision**-0.5


def _kl(m1, s1, m2, s2):
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


@pytest.fixture(scope="module", params=["blackjax", "chees"])
def univariate_case(request):
    rng = np.random.default_rng(0)
    T, n = 12, 6
    prior_mu, prior_sigma = rng.normal(size=T), rng.uniform(0.5, 2.0, T)
    obs_sigma = rng.uniform(0.5, 2.0, T)
    observed = rng.normal(size=(T, n)) * obs_sigma[:, None] + prior_mu[:, None]
    n_obs = rng.integers(0, n + 1, T)
    n_obs[:2] = [0, n]
    mean, sd = _exact(prior_mu, prior_sigma, obs_sigma, observed, n_obs)
    arrays = {
        # checkpoint "off": shifted by half a posterior sd and 20 % over-confident; "exact": q = p
        "mu_q": np.stack([mean + 0.5 * sd, mean]),
        "sigma_q": np.stack([0.8 * sd, sd]),
        "observed": observed,
        "n_obs": n_obs,
        "prior_mu": prior_mu,
        "prior_sigma": prior_sigma,
        "obs_sigma": obs_sigma,
        "checkpoint": np.array(["off", "exact"]),
    }
    # JAX arrays (as a CUDA tensor arrives through DLPack) go through the same path as numpy
    with jax.enable_x64(True):
        as_jax = {**arrays, "mu_q": jnp.asarray(arrays["mu_q"]), "observed": jnp.asarray(observed)}
    assert as_jax["mu_q"].dtype == np.float64
    result = audit_vfe(as_jax, sampler=request.param, **SMALL)
    return arrays, mean, sd, result


def test_univariate_columns_and_exact_kl(univariate_case):
    arrays, mean, sd, result = univariate_case
    table = result.table
    assert set(CONTRACT_UNIVARIATE) <= set(table.columns)
    assert len(table) == 24 and (table.status == "ok").all()
    assert table.checkpoint.tolist() == ["off"] * 12 + ["exact"] * 12
    np.testing.assert_allclose(table.exact_mean, np.tile(mean, 2), rtol=1e-12)
    np.testing.assert_allclose(table.exact_std, np.tile(sd, 2), rtol=1e-12)
    want = _kl(arrays["mu_q"].ravel(), arrays["sigma_q"].ravel(), np.tile(mean, 2), np.tile(sd, 2))
    np.testing.assert_allclose(table.kl_q_exact, want, rtol=1e-10, atol=1e-14)
    assert table.kl_q_exact[table.checkpoint == "exact"].abs().max() < 1e-12


def test_univariate_mcmc_matches_exact_within_mc_error(univariate_case):
    _, _, _, result = univariate_case
    t = result.table
    # at 4 x 500 draws about 1-3% of well-mixed posteriors show R-hat >= 1.01 by chance (measured on
    # 400 Normal-Normal problems for both samplers), so demand most, and no real failure
    assert t.converged.mean() >= 0.9 and (t.r_hat < 1.05).all(), t[~t.converged]
    # MCMC mean vs exact mean, in units of its Monte Carlo standard error
    z_mean = (t.mcmc_mean - t.exact_mean) / t.mcmc_mcse
    assert (z_mean.abs() < 4).mean() >= 0.95, z_mean.describe()
    # kl_q_mcmc vs kl_q_exact: delta-method MC error of KL(q || N(m, s)) in (m, s)
    off = t[t.checkpoint == "off"]
    m, s, m1, s1 = off.mcmc_mean, off.mcmc_std, off.vfe_mean, off.vfe_std
    d_m = (m - m1) / s**2
    d_s = 1 / s - (s1**2 + (m1 - m) ** 2) / s**3
    se = np.sqrt((d_m * off.mcmc_mcse) ** 2 + (d_s * s / np.sqrt(2 * off.ess_bulk)) ** 2)
    z_kl = (off.kl_q_mcmc - off.kl_q_exact) / se
    assert (z_kl.abs() < 4).mean() >= 0.9, z_kl.describe()
    # with q = p the moment-matched KL is second order in the MC error
    same = t[t.checkpoint == "exact"]
    assert (same.kl_q_mcmc < 20 / same.ess_bulk).all()


def test_univariate_coverage_and_pareto_k(univariate_case):
    _, _, _, result = univariate_case
    t = result.table
    same, off = t[t.checkpoint == "exact"], t[t.checkpoint == "off"]
    # q = p: MCMC coverage of q's 90 % interval is 0.9 up to MC error; k-hat at its best
    # ess_tail is the ESS of the 5% / 95% quantile indicators, i.e. of the interval's endpoints
    se_coverage = np.sqrt((0.9 * 0.1 / same.ess_tail).sum()) / len(same)
    assert abs(same.coverage.mean() - 0.9) < 4 * se_coverage, (same.coverage.mean(), se_coverage)
    np.testing.assert_allclose(same.coverage_exact, 0.9, atol=1e-12)
    # q = p: the log weights log p - log q are one constant, which k-hat reports as -inf (flat)
    assert np.isneginf(same.pareto_k).all(), same.pareto_k
    assert np.isfinite(off.pareto_k).all() and (off.pareto_k > 0.5).any()
    # over-confident, shifted q: under-covers and is a worse proposal
    assert (off.coverage_exact < 0.9).all() and off.coverage.mean() < 0.85
    assert off.pareto_k.median() > same.pareto_k.clip(lower=-1).median()
    ckpts = {c["checkpoint"]: c for c in result.summary["checkpoints"]}
    assert ckpts["off"]["kl_q_exact_mean"] > ckpts["exact"]["kl_q_exact_mean"]


def test_multivariate_k3_matches_closed_form():
    from engine.audit.references import mvnormal_known_cov

    rng = np.random.default_rng(2)
    T, n, K = 6, 5, 3
    a = rng.normal(size=(K, K))
    prior_cov = a @ a.T + np.eye(K)
    obs_cov = np.array([[1.0, 0.3, 0.0], [0.3, 2.0, -0.4], [0.0, -0.4, 1.5]])
    prior_mu = rng.normal(size=(T, K))
    observed = rng.normal(size=(T, n, K)) + prior_mu[:, None, :]
    n_obs = np.array([5, 1, 3, 0, 4, 2])
    mean, cov = mvnormal_known_cov(prior_mu, prior_cov, obs_cov, observed, n_obs)
    sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    mu_q = mean + 0.3 * sd
    cov_q = np.eye(K) * (0.9 * sd**2)[..., None, :]
    result = audit_vfe(
        {"mu_q": mu_q, "cov_q": cov_q, "observed": observed, "n_obs": n_obs, "prior_mu": prior_mu,
         "prior_cov": prior_cov, "obs_cov": obs_cov},
        **SMALL,
    )
    t = result.table
    assert result.kind == "multivariate" and len(t) == T and set(t.dim) == {3}
    # closed-form KL, written out
    for i in range(T):
        inv = np.linalg.inv(cov[i])
        d = mean[i] - mu_q[i]
        kl = 0.5 * (np.trace(inv @ cov_q[i]) + d @ inv @ d - K + np.linalg.slogdet(cov[i])[1]
                    - np.linalg.slogdet(cov_q[i])[1])
        assert t.kl_q_exact[i] == pytest.approx(kl, rel=1e-10)
    assert t.converged.all()
    assert (t.mcmc_exact_l2 < 4 * np.sqrt(K) * t.mcmc_mcse).all()
    np.testing.assert_allclose(t.kl_q_mcmc, t.kl_q_exact, rtol=0.15, atol=0.02)
    assert result.extras["mcmc_mean"].shape == (T, K)


def test_student_t_custom_model_has_no_exact_columns_but_mcmc_is_right():
    rng = np.random.default_rng(3)
    T, n = 5, 8
    observed = rng.standard_t(4, size=(T, n)) + 1.0
    observed[0, 0] = 9.0  # an outlier a Normal model would chase
    arrays = {"mu_q": np.full(T, 1.0), "sigma_q": np.full(T, 0.4), "observed": observed,
              "prior_mu": 0.0, "prior_sigma": 3.0, "obs_sigma": 1.0}
    result = audit_vfe(arrays, model="student_t", **SMALL)
    t = result.table
    assert t.kl_q_exact.isna().all() and t.exact_mean.isna().all()
    assert any("no closed-form" in note for note in result.summary["notes"])
    assert np.isfinite(t.pareto_k).all() and np.isfinite(t.kl_q_mcmc).all()
    assert t.converged.all()
    # posterior mean by quadrature on a grid
    grid = np.linspace(-15, 15, 60_001)
    for i in range(T):
        logp = -0.5 * (grid / 3.0) ** 2 - 2.5 * np.log1p((observed[i][:, None] - grid) ** 2 / 4).sum(0)
        w = np.exp(logp - logp.max())
        exact_mean = (w * grid).sum() / w.sum()
        assert abs(t.mcmc_mean[i] - exact_mean) < 4 * t.mcmc_mcse[i]


def test_model_with_no_finite_density_is_input_error():
    arrays = {"mu_q": np.zeros(3), "sigma_q": np.ones(3),
              "observed": np.array([[0.0, 1.0], [1.0, 2.0], [1.0, 1.0]]),  # 2 is no Bernoulli outcome
              "prior_mu": 0.0, "prior_sigma": 1.0}
    with pytest.raises(InputError, match=r"field 'observed'.*first bad index \[0, 1\]"):
        audit_vfe(arrays, model="bernoulli_logit", chains=2, draws=50, tune=50)

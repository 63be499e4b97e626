"""SBC with every sampler: a calibrated fit passes and a miscalibrated one is flagged (slow tier;
blackjax runs in the default tier, tests/test_sbc.py). Also: ranks are taken in the constrained
space (a positive scale parameter) and a wrong likelihood scale is caught."""

from __future__ import annotations

import pytest

from engine.calibration import sbc as sbc_core
from engine.calibration.models import normal_normal
from tests.test_sbc import TEST_ALPHA, check_pair, run_pair

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sampler", ["numpyro", "stepwise", "chees"])
def test_each_batched_sampler_flags_miscalibration(sampler):
    good, bad = run_pair(sampler, 200, chains=2, draws=200)
    check_pair(good, bad)


def test_pymc_loop_flags_miscalibration():
    """The pm.sample loop, at a size it can afford (100 simulations x 2 chains x 100 draws)."""
    good, bad = run_pair("pymc", 100, chains=2, draws=100)
    check_pair(good, bad)


def test_wrong_likelihood_scale_is_flagged():
    """Data simulated with noise sd 2, fitted with noise sd 1: posteriors too narrow."""
    model = normal_normal(obs_sd=1.0, num_obs=2)
    kw = dict(chains=2, draws=200, tune=200, seed=5, alpha=TEST_ALPHA)
    good = sbc_core.sbc(model, 200, **kw)
    bad = sbc_core.sbc(model, 200, simulator=normal_normal(obs_sd=2.0, num_obs=2), **kw)
    assert good.summary["all_pass"] and not bad.summary["all_pass"]


def test_positive_parameter_ranked_in_the_constrained_space():
    """sigma ~ HalfNormal(1), y ~ N(0, sigma): ranks of the true sigma among the constrained
    draws are uniform (against log-scale draws they would pile up at the top)."""
    import numpy as np
    import pymc as pm

    with pm.Model() as model:
        y = pm.Data("y", np.zeros(5))
        sigma = pm.HalfNormal("sigma", 1.0)
        pm.Normal("obs", 0.0, sigma, observed=y)
    result = sbc_core.sbc(model, 200, chains=2, draws=200, tune=200, seed=2, alpha=TEST_ALPHA)
    info = result.summary["parameters"]["sigma"]
    assert info["pass"], info
    assert abs(info["mean_rank"] - 0.5) < 0.1


def test_multivariate_audit_reports_z_true_calibration(tmp_path):
    """K=2 beliefs equal to the exact posterior, z_true from the prior: MCMC and q coverages
    near 50% / 90% of the 2 x 150 marginal intervals."""
    import numpy as np

    from engine import audit_vfe

    rng = np.random.default_rng(0)
    T, n, K = 150, 3, 2
    z = rng.standard_normal((T, K))
    observed = z[:, None, :] + rng.standard_normal((T, n, K))
    post_cov = np.eye(K) / (1.0 + n)
    beliefs = {"mu_q": observed.sum(1) / (1.0 + n), "cov_q": np.broadcast_to(post_cov, (T, K, K)),
               "observed": observed, "prior_mu": np.zeros(K), "prior_cov": np.eye(K), "z_true": z}
    result = audit_vfe(beliefs, chains=2, draws=200, tune=200, num_q_draws=100, out_dir=tmp_path)
    cal = next(iter(result.summary["z_true_calibration"].values()))
    tol = 4 * np.sqrt(0.09 / (T * K))
    for who in ("q", "mcmc"):
        assert abs(cal[who]["coverage_90"] - 0.9) < tol, cal
    assert {"z_pit_q_0", "z_pit_mcmc_1", "z_in90_mcmc"} <= set(result.table.columns)
    assert (tmp_path / "z_true_pit.png").exists()

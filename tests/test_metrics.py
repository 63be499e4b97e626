"""Metrics and closed-form references against independent computations (no MCMC, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.audit import metrics
from engine.audit import references


def _spd(rng, k):
    a = rng.normal(size=(k, k))
    return a @ a.T + k * np.eye(k) * 0.5


def test_kl_normal_matches_numerical_integral():
    mu_q, s_q, mu_p, s_p = 0.3, 0.7, -0.2, 1.3
    x = np.linspace(-15, 15, 200_001)
    lq = -0.5 * ((x - mu_q) / s_q) ** 2 - np.log(s_q) - 0.5 * np.log(2 * np.pi)
    lp = -0.5 * ((x - mu_p) / s_p) ** 2 - np.log(s_p) - 0.5 * np.log(2 * np.pi)
    numeric = np.trapezoid(np.exp(lq) * (lq - lp), x)
    assert metrics.kl_normal(mu_q, s_q, mu_p, s_p) == pytest.approx(numeric, rel=1e-8)
    assert metrics.kl_normal(1.0, 2.0, 1.0, 2.0) == 0.0


def test_kl_mvnormal_diagonal_is_sum_and_general_matches_formula():
    rng = np.random.default_rng(0)
    mq, mp = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    sq, sp = rng.uniform(0.5, 2, (5, 3)), rng.uniform(0.5, 2, (5, 3))
    diag = metrics.kl_mvnormal(mq, np.eye(3) * sq[..., None, :] ** 2, mp, np.eye(3) * sp[..., None, :] ** 2)
    np.testing.assert_allclose(diag, metrics.kl_normal(mq, sq, mp, sp).sum(-1), rtol=1e-12)
    cq = np.stack([_spd(rng, 3) for _ in range(5)])
    cp = np.stack([_spd(rng, 3) for _ in range(5)])
    want = []
    for i in range(5):
        inv = np.linalg.inv(cp[i])
        d = mp[i] - mq[i]
        want.append(0.5 * (np.trace(inv @ cq[i]) + d @ inv @ d - 3
                           + np.linalg.slogdet(cp[i])[1] - np.linalg.slogdet(cq[i])[1]))
    np.testing.assert_allclose(metrics.kl_mvnormal(mq, cq, mp, cp), want, rtol=1e-10)


def test_w2_one_dim_and_commuting_covariances():
    assert metrics.w2_normal(1.0, 2.0, 4.0, 6.0) == pytest.approx(5.0)
    rng = np.random.default_rng(1)
    mq, mp = rng.normal(size=3), rng.normal(size=3)
    sq, sp = rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)
    got = metrics.w2_mvnormal(mq, np.diag(sq**2), mp, np.diag(sp**2))
    assert got == pytest.approx(np.sqrt(((mq - mp) ** 2).sum() + ((sq - sp) ** 2).sum()), rel=1e-10)
    c = _spd(rng, 3)
    assert metrics.w2_mvnormal(mq, c, mq, c) == pytest.approx(0.0, abs=1e-6)


def test_coverage_z_error_std_ratio():
    assert metrics.coverage_normal(0.5, 2.0, 0.5, 2.0, 0.9) == pytest.approx(0.9, abs=1e-12)
    # q twice as wide covers more than 0.9 of p
    assert metrics.coverage_normal(0.0, 2.0, 0.0, 1.0, 0.9) > 0.99
    assert metrics.z_error(3.0, 1.0, 2.0) == 1.0
    assert metrics.std_ratio(1.0, 4.0) == 0.25


def test_pareto_khat_from_tail_equals_full_psis():
    rng = np.random.default_rng(2)
    S = 1000
    # log weights of q = N(0, 1) proposing for p = N(0, s): heavy tail when s > 1
    x = rng.normal(size=(4, S))
    scales = np.array([0.7, 1.0 + 1e-3, 1.5, 3.0])[:, None]
    lw = -0.5 * (x / scales) ** 2 - np.log(scales) + 0.5 * x**2
    full = metrics.pareto_khat(lw)
    top = np.sort(lw, axis=-1)[:, -metrics.psis_tail_size(S):]
    np.testing.assert_allclose(metrics.pareto_khat_from_tail(top, S), full, rtol=1e-12)
    # narrower q for a wider posterior: heavier weight tail (true k = 1 - 1/s^2); wide q: k < 0.5
    assert full[0] < 0.5 < full[3]


@pytest.mark.parametrize("num_samples", [25, 100, 1000])
def test_batched_khat_equals_arviz_row_by_row(num_samples):
    """The vectorised GPD fit against ``arviz.psislw`` one row at a time, on 300 rows: light and
    heavy tails, weights spread over 1,000 nats (underflow past the cut-off), ties at the cut-off
    and in the tail (float32-rounded weights), and a non-finite row."""
    import arviz as az

    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, num_samples))
    scales = rng.uniform(0.5, 4.0, size=(300, 1))
    lw = -0.5 * (x / scales) ** 2 - np.log(scales) + 0.5 * x**2
    lw[:20] *= 2000.0 / np.ptp(lw[:20], axis=-1, keepdims=True)  # cut-off below log(tiny)
    lw[20:40] = np.round(lw[20:40], 1)  # ties
    lw[40:60] = lw[40:60].astype(np.float32)
    lw[60, 3] = np.inf
    with np.errstate(all="ignore"):
        expected = np.array([az.psislw(row[None], reff=1.0)[1][0] if np.isfinite(row).all() else np.inf
                             for row in lw])
    top = np.sort(lw, axis=-1)[:, -metrics.psis_tail_size(num_samples):]
    got = metrics.pareto_khat_from_tail(top, num_samples)
    flat = top[:, -1] - top[:, 0] <= 1e-12  # a flat tail is -inf by design (bounded weights)
    np.testing.assert_allclose(got, np.where(flat, -np.inf, expected), rtol=1e-10, atol=1e-12)
    assert np.isfinite(got[61:]).all() and (got[61:] > 0.5).sum() > 20  # the heavy tails are seen


def test_pareto_khat_constant_weights_is_minus_inf():
    top = np.full((2, metrics.psis_tail_size(1000)), -3.2)
    assert np.all(metrics.pareto_khat_from_tail(top, 1000) == -np.inf)


def test_normal_normal_reference_matches_grid_posterior_with_ragged_counts():
    rng = np.random.default_rng(3)
    obs = rng.normal(1.0, 1.5, size=(3, 6))
    n_obs = np.array([6, 2, 0])
    mean, sd = references.normal_normal(np.array([0.5, -1.0, 2.0]), np.array([2.0, 0.5, 1.0]), 1.5, obs, n_obs)
    grid = np.linspace(-20, 20, 400_001)
    for i, (pm_, ps) in enumerate([(0.5, 2.0), (-1.0, 0.5), (2.0, 1.0)]):
        logp = -0.5 * ((grid - pm_) / ps) ** 2
        logp = logp + (-0.5 * ((obs[i, : n_obs[i], None] - grid) / 1.5) ** 2).sum(0)
        w = np.exp(logp - logp.max())
        w /= w.sum()
        m = (w * grid).sum()
        assert mean[i] == pytest.approx(m, abs=1e-8)
        assert sd[i] == pytest.approx(np.sqrt((w * (grid - m) ** 2).sum()), rel=1e-6)
    assert mean[2] == 2.0 and sd[2] == 1.0  # no data: the prior


def test_mvnormal_reference_reduces_to_independent_normals():
    rng = np.random.default_rng(4)
    obs = rng.normal(size=(4, 5, 2))
    n_obs = np.array([5, 3, 1, 0])
    pm_ = rng.normal(size=(4, 2))
    mean, cov = references.mvnormal_known_cov(pm_, np.diag([4.0, 0.25]), np.diag([1.0, 9.0]), obs, n_obs)
    for k, (ps, os_) in enumerate([(2.0, 1.0), (0.5, 3.0)]):
        m1, s1 = references.normal_normal(pm_[:, k], ps, os_, obs[..., k], n_obs)
        np.testing.assert_allclose(mean[:, k], m1, rtol=1e-12)
        np.testing.assert_allclose(np.sqrt(cov[:, k, k]), s1, rtol=1e-12)
    np.testing.assert_allclose(cov[:, 0, 1], 0.0, atol=1e-15)

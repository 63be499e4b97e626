"""``pool_step_size``: after window adaptation every chain of a problem samples with the smallest
of its chains' adapted step sizes (blackjax NUTS, fixed draws and per-problem stopping)."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

import engine
from engine.errors import InputError
from tests.models import normal_normal_data, normal_normal_model, normal_normal_posterior


def _steps(idata):
    """Adapted step size per (chain, problem), checked constant over the kept draws."""
    step = idata.sample_stats.step_size.values  # [chain, draw, problem]
    kept = idata.sample_stats.num_draws.values if "num_draws" in idata.sample_stats else None
    out = step[:, 0, :]
    for p in range(step.shape[-1]):
        n = step.shape[1] if kept is None else int(kept[p])
        assert np.all(step[:, :n, p] == out[:, None, p])
    return out


# fixed draws (27 s) in the slow tier: test_pooled_step_samples_the_closed_form_posterior keeps it fast
@pytest.mark.parametrize("stopping", [pytest.param({}, marks=pytest.mark.slow),
                                      {"target_ess": 50, "max_draws": 200, "block_draws": 50}])
def test_chains_of_a_problem_share_the_smallest_adapted_step(stopping):
    """Same seed with and without pooling: the warmup is the same, so the pooled run's step of
    every chain is the smallest of the unpooled run's chains' steps, problem by problem."""
    data = normal_normal_data(3, seed=4)
    kw = dict(sampler="blackjax", chains=4, draws=50, tune=150, seed=2, progress=False, **stopping)
    own = _steps(engine.sample_batched(normal_normal_model(), data, **kw))
    pooled = _steps(engine.sample_batched(normal_normal_model(), data, pool_step_size=True, **kw))
    assert np.all(np.ptp(own, axis=0) > 0), own  # the chains adapted different steps
    np.testing.assert_allclose(pooled, np.broadcast_to(own.min(axis=0), own.shape), rtol=1e-6)


def test_pooled_step_samples_the_closed_form_posterior():
    """Pooled-step NUTS on the conjugate normal model: posterior means and sds within Monte
    Carlo error of the closed form (fixed seed)."""
    data = normal_normal_data(6, seed=7)
    idata = engine.sample_batched(normal_normal_model(), data, sampler="blackjax", chains=4, draws=1000, tune=500,
                                  seed=3, pool_step_size=True, precision="float64", progress=False)
    assert int(idata.sample_stats.diverging.sum()) == 0
    mean, sd = normal_normal_posterior(data)
    theta = idata.posterior.theta  # [chain, draw, problem]
    for p in range(mean.size):
        one = theta.isel(problem=p)
        ess = float(az.ess(one.values))
        assert float(az.rhat(one.values)) < 1.01
        z_mean = (float(one.mean()) - mean[p]) / (sd[p] / np.sqrt(ess))
        z_sd = (float(one.std()) - sd[p]) / (sd[p] / np.sqrt(2 * ess))
        assert abs(z_mean) < 4.5 and abs(z_sd) < 4.5, (p, z_mean, z_sd, ess)


def test_pool_step_size_is_refused_by_a_leapfrog_loop_kernel():
    with pytest.raises(InputError, match="pool_step_size"):
        engine.sample_batched(normal_normal_model(), normal_normal_data(2), sampler="stepwise", chains=2, draws=10,
                              tune=10, pool_step_size=True, progress=False)


def test_pool_step_size_is_refused_by_a_kernel_without_a_per_chain_step():
    """numpyro's NUTS keeps its step inside its adaptation state: a one-line InputError."""
    with pytest.raises(InputError, match="pool_step_size: .*no per-chain step_size"):
        engine.sample_batched(normal_normal_model(), normal_normal_data(2), sampler="numpyro", pool_step_size=True,
                              draws=20, tune=20, progress=False)

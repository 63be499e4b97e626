"""Per-problem stopping at a target ESS: the masked gate against ArviZ, retirement, max_draws,
no bias against a closed-form posterior, rank calibration, compaction, and bad settings."""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pymc as pm
import pytest
from scipy import stats

import engine
from engine.errors import InputError
from engine.sampling import stopping
from engine.sampling.gate import gate, masked_summary

NUM_OBS = 5


def _model():
    """theta ~ N(0, 1), y_j ~ N(theta, 1): posterior N(sum(y) / (n + 1), 1 / sqrt(n + 1))."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(NUM_OBS))
        theta = pm.Normal("theta", 0.0, 1.0)
        pm.Normal("obs", theta, 1.0, observed=y)
    return model


MODEL = _model()


def _data(num_problems, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=num_problems)
    return truth, {"y": truth[:, None] + rng.normal(size=(num_problems, NUM_OBS))}


def _exact(y):
    return y.sum(-1) / (NUM_OBS + 1), np.full(y.shape[0], 1.0 / np.sqrt(NUM_OBS + 1))


def _kept(idata, p):
    n = int(idata.sample_stats["num_draws"].values[p])
    return idata.posterior["theta"].values[:, :n, p], n


def _ar_draws(rng, chains, length, rho):
    x = np.zeros((chains, length))
    for t in range(1, length):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho**2) * rng.normal(size=chains)
    return x


@pytest.mark.parametrize("num_draws,length", [(40, 300), (173, 300), (300, 300), (301, 1100), (600, 1100),
                                              (1100, 1100)])
def test_gate_matches_arviz_on_kept_draws(num_draws, length):
    """Every window of the gate (256, 512, 1024 draws, the whole buffer), odd and even counts."""
    rng = np.random.default_rng(num_draws)
    draws = np.stack([_ar_draws(rng, 4, length, 0.6), np.round(_ar_draws(rng, 4, length, 0.3), 1)], -1)
    padded = draws.copy()
    padded[:, num_draws:] = 1e6  # garbage past the kept draws must not matter
    diverging = np.zeros((4, length), bool)
    diverging[:, num_draws:] = True
    passed, diag = jax.jit(gate, static_argnums=3)(jnp.asarray(padded), jnp.asarray(diverging),
                                                   jnp.asarray(num_draws), 50.0)
    kept = az.convert_to_dataset({"a": draws[:, :num_draws, 0], "b": draws[:, :num_draws, 1]})
    rhat = max(float(v) for v in az.rhat(kept).values())
    bulk = min(float(v) for v in az.ess(kept, method="bulk").values())
    tail = min(float(v) for v in az.ess(kept, method="tail").values())
    np.testing.assert_allclose([diag["r_hat"], diag["ess_bulk"], diag["ess_tail"]], [rhat, bulk, tail], rtol=1e-9)
    assert int(diag["divergences"]) == 0
    assert bool(passed) == (rhat < 1.01 and bulk >= 50 and tail >= 50)
    summary = masked_summary(jnp.asarray(padded[..., 1]), jnp.asarray(num_draws))
    np.testing.assert_allclose(float(summary["mean"]), draws[:, :num_draws, 1].mean(), rtol=1e-12)
    np.testing.assert_allclose(float(summary["sd"]), draws[:, :num_draws, 1].std(ddof=1), rtol=1e-12)


@pytest.fixture(scope="module")
def blackjax_run():
    """One small blackjax run with stopping, shared by the default-tier tests (one compile)."""
    _, data = _data(8, seed=11)
    idata = engine.sample_batched(MODEL, data, tune=200, target_ess=200, block_draws=50, max_draws=1000, seed=5)
    return data, idata


def test_retired_problems_meet_the_gate_and_arviz_reads_the_layout(blackjax_run):
    _, idata = blackjax_run
    target = 200
    num_draws = idata.sample_stats["num_draws"].values
    assert idata.sample_stats["num_draws"].dims == ("problem",)
    assert idata.posterior.sizes["draw"] == 1000
    assert np.all(num_draws % 50 == 0) and np.all(num_draws < 1000)
    for p in range(8):
        kept, n = _kept(idata, p)
        assert np.all(np.isnan(idata.posterior["theta"].values[:, n:, p]))
        one = idata.isel(problem=p, draw=slice(0, n))
        assert float(az.rhat(one)["theta"]) < 1.01
        assert float(az.ess(one, method="bulk")["theta"]) >= target
        assert float(az.ess(one, method="tail")["theta"]) >= target
        assert float(az.ess(one)["theta"]) == pytest.approx(float(az.ess(az.convert_to_dataset({"t": kept}))["t"]))
        assert int(one.sample_stats["diverging"].sum()) == 0
    assert np.all(idata.sample_stats["num_grads"].values > 0)


def test_max_draws_reached_is_not_converged():
    from engine.model.compile import prepare_data
    from engine.sampling.api import compile_for
    from engine.sampling.batch import BatchConfig, run_batched
    from engine.settings import SamplerConfig

    _, data = _data(3)
    problem_data = prepare_data(MODEL, data)
    # NUTS alone: auto would rerun every problem in its fallback, which is not the point here
    config = BatchConfig(sampler=SamplerConfig(name="blackjax", tune=100, draws=100, target_ess=10**6, max_draws=100,
                                               block_draws=50))
    result = run_batched(compile_for(MODEL, problem_data), problem_data, config)
    assert not result.converged.any()
    np.testing.assert_array_equal(result.num_draws, [100, 100, 100])


def test_stopping_is_unbiased_quick(blackjax_run):
    data, idata = blackjax_run
    _check_unbiased_idata(idata, data)


@pytest.mark.slow
def test_stopping_is_unbiased_quick_chees():
    _check_unbiased("chees", num_problems=8, tune=200, target=200)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["blackjax", "numpyro", "chees"])
def test_stopping_is_unbiased_full(sampler):
    _check_unbiased(sampler, num_problems=64, tune=300, target=400)


def _check_unbiased(sampler, num_problems, tune, target):
    """MCSE z-scores of each problem's mean and sd against the exact posterior, with stopping on:
    none beyond 4.5, and their averages over problems within 4 standard errors of 0."""
    _, data = _data(num_problems, seed=11)
    kw = {"target_accept": 0.651} if sampler == "chees" else {}
    idata = engine.sample_batched(MODEL, data, sampler=sampler, tune=tune, target_ess=target, seed=5, **kw)
    _check_unbiased_idata(idata, data)


def _check_unbiased_idata(idata, data):
    num_problems = data["y"].shape[0]
    mean, sd = _exact(data["y"])
    z_mean, z_sd = [], []
    for p in range(num_problems):
        kept, n = _kept(idata, p)
        assert n < idata.posterior.sizes["draw"], "problem did not certify"
        one = az.convert_to_dataset({"t": kept})
        ess_mean = float(az.ess(one, method="mean")["t"])
        ess_sd = float(az.ess(one, method="sd")["t"])
        z_mean.append((kept.mean() - mean[p]) / (sd[p] / np.sqrt(ess_mean)))
        z_sd.append((kept.std(ddof=1) - sd[p]) / (sd[p] / np.sqrt(2 * ess_sd)))
    for z in (np.asarray(z_mean), np.asarray(z_sd)):
        assert np.abs(z).max() < 4.5, z
        assert abs(z.mean()) * np.sqrt(num_problems) < 4.0, z


@pytest.mark.slow
def test_rank_calibration_with_stopping():
    """SBC-style: the truth drawn from the prior falls at a uniform quantile of each problem's
    kept draws (chi-square over 10 bins; 200 simulations; truth-to-posterior quantiles)."""
    truth, data = _data(200, seed=21)
    idata = engine.sample_batched(MODEL, data, tune=300, target_ess=400, seed=8)
    u = []
    for p in range(200):
        kept, n = _kept(idata, p)
        assert n < idata.posterior.sizes["draw"]
        u.append((kept < truth[p]).mean())
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 0.001, counts


@pytest.mark.slow
def test_compaction_keeps_results(monkeypatch):
    """Lanes compacted to small buckets give the same first-block draws (same program) and
    satisfy the gate with consistent counts; a run without compaction agrees on both."""
    _, data = _data(8)
    runs = {}
    for min_bucket in (2, 1000):
        monkeypatch.setattr(stopping, "MIN_BUCKET", min_bucket)
        runs[min_bucket] = engine.sample_batched(MODEL, data, tune=150, draws=400, target_ess=150, block_draws=40,
                                                 max_draws=800, seed=4)
    small, full = runs[2], runs[1000]
    first = slice(0, 40)
    np.testing.assert_array_equal(small.posterior["theta"].values[:, first], full.posterior["theta"].values[:, first])
    for idata in (small, full):
        for p in range(8):
            kept, n = _kept(idata, p)
            one = az.convert_to_dataset({"t": kept})
            assert float(az.rhat(one)["t"]) < 1.01 and float(az.ess(one, method="bulk")["t"]) >= 150
    grads_per_draw = small.sample_stats["num_grads"].values / small.sample_stats["num_draws"].values
    assert np.all(grads_per_draw > 0)


def test_bad_stopping_settings_are_refused():
    _, data = _data(2)
    with pytest.raises(InputError, match="max_draws"):
        engine.sample_batched(MODEL, data, draws=500, target_ess=100, max_draws=200)
    with pytest.raises(InputError, match="block_draws"):
        engine.sample_batched(MODEL, data, target_ess=100, block_draws=2)
    with pytest.raises(InputError, match="leapfrog loop"):
        engine.sample_batched(MODEL, data, sampler="stepwise", target_ess=100)
    with pytest.raises(InputError, match="pm.sample"):
        engine.sample_batched(MODEL, data, sampler="pymc", target_ess=100)
    from engine.calibration.sbc import sbc

    with pytest.raises(InputError, match="SBC"):
        sbc(MODEL, 4, target_ess=100)


def test_bucket_sizes_are_few():
    sizes = {stopping.bucket_size(a, 1000) for a in range(1, 1001)}
    assert sizes == {1000, 256, 64}
    assert stopping.bucket_size(5, 10) == 10


def test_gate_shape_rent_or_buy():
    """The gate runs on the smallest compiled shape holding it until the run time wasted on it
    reaches a compile's cost; then, or when none holds it, on its own (ideal) shape."""
    family = stopping.GatePrograms(gate_fn=None)
    family.compile_seconds = 1.0
    dev = (0,)
    assert family.choose(dev, 16, 256) == (16, 256)  # nothing compiled: the ideal
    family._run_seconds[(dev, 96, 256)] = None  # compiled ahead, never run: free to use
    assert family.choose(dev, 16, 256) == (96, 256)
    family._run_seconds[(dev, 96, 256)] = 0.24  # each call wastes 0.24 * (1 - 16/96) = 0.2 s
    chosen = [family.choose(dev, 16, 256) for _ in range(6)]
    assert chosen[:4] == [(96, 256)] * 4 and chosen[4] == (16, 256)
    assert family.choose(dev, 16, 512) == (16, 512)  # no compiled window holds 512 draws
    assert family.choose((1,), 16, 256) == (16, 256)  # another device compiles its own
    family._run_seconds[(dev, 4, 1024)] = 0.01
    family._run_seconds[(dev, 96, 1024)] = 0.3
    assert family.choose(dev, 4, 512) == (4, 1024)  # the smallest holding shape


@pytest.mark.slow
def test_gate_shape_does_not_change_the_run(monkeypatch):
    """Gates run on the whole chunk (no lane buckets) and on rent-or-buy shapes retire the same
    problems after the same draws: a gate's shape decides its cost, never its result."""
    _, data = _data(12)
    runs = []
    for min_bucket in (1000, stopping.GATE_MIN_BUCKET):
        monkeypatch.setattr(stopping, "GATE_MIN_BUCKET", min_bucket)
        runs.append(engine.sample_batched(MODEL, data, tune=150, draws=400, target_ess=150, block_draws=40, max_draws=800,
                                          seed=5))
    for key in ("num_draws", "gate_passed"):
        np.testing.assert_array_equal(runs[0].sample_stats[key].values, runs[1].sample_stats[key].values)
    np.testing.assert_array_equal(runs[0].posterior["theta"].values, runs[1].posterior["theta"].values)


def _funnel():
    """Neal's funnel, centred: v ~ N(0, 3), x_k ~ N(0, exp(v / 2)), weak data y_k ~ N(x_k, 10).
    NUTS diverges in its neck."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(4))
        v = pm.Normal("v", 0.0, 3.0)
        x = pm.Normal("x", 0.0, pm.math.exp(v / 2), shape=4)
        pm.Normal("obs", x, 10.0, observed=y)
    return model


def test_a_divergent_problem_retires_at_once():
    """Once its kept draws hold a divergence the gate can never pass, so the problem stops at the
    block where the first divergence shows (not at ``max_draws``), unconverged."""
    from engine.model.compile import prepare_data
    from engine.sampling.api import compile_for
    from engine.sampling.batch import BatchConfig, run_batched
    from engine.settings import RuntimeConfig, SamplerConfig

    model, block, max_draws = _funnel(), 50, 2000
    problem_data = prepare_data(model, {"y": np.zeros((4, 4))})
    config = BatchConfig(sampler=SamplerConfig(name="blackjax", tune=100, draws=100, target_ess=400, max_draws=max_draws,
                                               block_draws=block), runtime=RuntimeConfig(seed=3))
    result = run_batched(compile_for(model, problem_data), problem_data, config)
    diverging = np.asarray(result.stats.diverging)  # [problem, chain, draw]
    seen = 0
    for p, n in enumerate(result.num_draws):
        first = np.flatnonzero(diverging[p, :, :n].any(0))
        if first.size:
            seen += 1
            assert n - block <= first[0] < n < max_draws  # it stopped with the block that diverged
            assert not result.converged[p]
    assert seen >= 1  # the funnel did diverge: the check above ran

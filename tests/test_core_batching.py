"""Batching contracts: ragged problems, keys, chunking, determinism, compile-once, bad input."""

from __future__ import annotations

import dataclasses

import chex
import numpy as np
import pymc as pm
import pytest
from scipy import stats

import engine
from engine.sampling.api import compile_for
from engine.sampling.batch import BatchConfig, run_batched
from engine.settings import RuntimeConfig, SamplerConfig
from engine.model.compile import prepare_data
from engine.sampling.diagnostics import summarize_draws
from tests.models import normal_normal_data, normal_normal_model, normal_normal_posterior


def _summary(idata, name):
    x = idata.posterior[name].transpose("problem", ..., "chain", "draw").values
    return {k: np.asarray(v) for k, v in summarize_draws(x).items()}


def _regression_model():
    with pm.Model() as model:
        x = pm.Data("x", np.zeros(5))
        y = pm.Data("y", np.zeros(5))
        a = pm.Normal("a", 0, 5)
        b = pm.Normal("b", 0, 5)
        sigma = pm.HalfNormal("sigma", 2)
        pm.Normal("obs", a + b * x, sigma, observed=y)
    return model


def _known_noise_regression(sigma: float = 0.7):
    with pm.Model() as model:
        x = pm.Data("x", np.zeros(5))
        y = pm.Data("y", np.zeros(5))
        a = pm.Normal("a", 0, 5)
        b = pm.Normal("b", 0, 5)
        pm.Normal("obs", a + b * x, sigma, observed=y)
    return model


def _regression_posterior(x, y, sigma=0.7, prior_sd=5.0):
    """Closed-form posterior mean and sd of (a, b) for the known-noise regression."""
    X = np.column_stack([np.ones_like(x), x])
    precision = X.T @ X / sigma**2 + np.eye(2) / prior_sd**2
    cov = np.linalg.inv(precision)
    return cov @ X.T @ y / sigma**2, np.sqrt(np.diag(cov))


def test_ragged_problems_match_each_problem_alone():
    """8 problems of 5..300 rows in one padded batch: each equals its exact posterior, and the
    smallest (the most padded) equals the same problem sampled alone (unpadded), within MCSE."""
    rng = np.random.default_rng(0)
    sizes = [5, 12, 30, 61, 100, 150, 220, 300]
    xs = [rng.normal(size=n) for n in sizes]
    ys = [1.0 - 0.5 * x + rng.normal(0, 0.7, size=x.shape) for x in xs]
    model = _known_noise_regression()
    run = dict(sampler="chees", progress=False)  # the masking is the template's, whatever the kernel
    batched = engine.sample_batched(model, {"x": xs, "y": ys}, seed=0, **run)
    z_max = stats.norm.ppf(1 - 0.01 / (2 * 2 * len(sizes) + 8))
    summaries = {name: _summary(batched, name) for name in ("a", "b")}
    for i, (x, y) in enumerate(zip(xs, ys)):
        mean, _ = _regression_posterior(x, y)
        for j, name in enumerate(("a", "b")):
            s = summaries[name]
            assert abs(s["mean"][i] - mean[j]) / s["mcse_mean"][i] < z_max, (i, name)
    for i in (0,):
        alone = engine.sample_batched(
            model, {"x": xs[i][None], "y": ys[i][None]}, seed=100 + i, **run
        )
        for name in ("a", "b"):
            a, b = summaries[name], _summary(alone, name)
            z = (a["mean"][i] - b["mean"][0]) / np.hypot(a["mcse_mean"][i], b["mcse_mean"][0])
            assert abs(z) < z_max, (i, name, z)


def test_ragged_loglik_masks_padded_rows():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=n) for n in (3, 7)]
    ys = [rng.normal(size=n) for n in (3, 7)]
    idata = engine.sample_batched(  # chees: no gate, so no NUTS rerun of 50-draw chains
        _regression_model(), {"x": xs, "y": ys}, sampler="chees", draws=50, tune=50, chains=2,
        log_likelihood=True, progress=False,
    )
    ll = idata.log_likelihood.obs.values  # chain, draw, problem, row
    assert ll.shape == (2, 50, 2, 7)
    assert np.isnan(ll[:, :, 0, 3:]).all() and np.isfinite(ll[:, :, 0, :3]).all()
    assert np.isfinite(ll[:, :, 1]).all()


def _run(data, batch_size, seed=0, **kw):
    """The driver's chunking with one kernel (ChEES): ``auto``'s gate and reruns are tests/test_auto.py's."""
    model = normal_normal_model()
    kw.setdefault("sampler", "chees")
    return engine.sample_batched(
        model, data, seed=seed, batch_size=batch_size, draws=300, tune=300, progress=False, **kw
    )


def test_same_seed_and_chunking_is_bitwise_identical():
    data = normal_normal_data(10, seed=2)
    a = _run(data, batch_size=3).posterior.theta.values  # chunk shapes 1, 3 and 40 serve the file
    b = _run(data, batch_size=3).posterior.theta.values
    assert np.array_equal(a, b)
    c = _run(data, batch_size=3, seed=1).posterior.theta.values
    assert not np.array_equal(a, c)


def test_chunk_sizes_are_statistically_equivalent_and_keys_distinct():
    data = normal_normal_data(40, seed=3)
    data["y"] = np.repeat(data["y"][:1], 40, axis=0)  # identical problems: streams must differ
    for k in ("prior_mu", "prior_sigma", "obs_sigma"):
        data[k] = np.repeat(data[k][:1], 40)
    mean, _ = normal_normal_posterior({k: v[:1] for k, v in data.items()})
    runs = {bs: _run(data, batch_size=bs) for bs in (1, 3, None)}  # 3: the last chunk is padded
    z_max = stats.norm.ppf(1 - 0.01 / (2 * 40 * 3))
    for bs, idata in runs.items():
        theta = idata.posterior.theta.values  # chain, draw, problem
        # no two chains, and no two problems, share a stream
        first = theta[:, :5, :].transpose(2, 0, 1).reshape(-1, 5)
        assert len({row.tobytes() for row in first}) == first.shape[0], bs
        s = _summary(idata, "theta")
        z = (s["mean"] - mean[0]) / s["mcse_mean"]
        assert np.all(np.abs(z) < z_max), (bs, np.abs(z).max())


def test_problem_keeps_its_stream_across_chunking():
    """Problem i's first draws depend only on (seed, i): equal whatever the chunk grid."""
    import jax

    from engine.sampling.batch import problem_starts

    data = normal_normal_data(6, seed=4)
    model = normal_normal_model()
    problem_data = prepare_data(model, data)
    compiled = compile_for(model, problem_data)
    config = BatchConfig(sampler=SamplerConfig(chains=4))
    arrays = problem_data.device_arrays()
    starts = jax.jit(jax.vmap(lambda i, d: problem_starts(compiled, config, jax.random.PRNGKey(0), i, d)[0]))
    with jax.enable_x64(True):
        def chunked(size):  # problem i's jittered starts [chains, dim] when run in chunks of `size`
            return np.concatenate([
                np.asarray(starts(np.arange(a, b), {k: v[a:b] for k, v in arrays.items()}))
                for a, b in ((a, min(a + size, 6)) for a in range(0, 6, size))
            ])
        by_two, by_three = chunked(2), chunked(3)
    assert len(np.unique(by_two.reshape(-1))) == by_two.size  # distinct per problem and chain
    np.testing.assert_array_equal(by_two, by_three)
    # XLA compiles each chunk shape apart, so only statistical equality is promised for the
    # draws: per problem, the posterior means agree within their Monte Carlo standard errors
    a = _summary(_run(data, batch_size=1), "theta")
    b = _summary(_run(data, batch_size=3), "theta")
    z = (a["mean"] - b["mean"]) / np.hypot(a["mcse_mean"], b["mcse_mean"])
    assert np.all(np.abs(z) < stats.norm.ppf(1 - 0.01 / (2 * 6))), z


def test_log_density_traced_a_bounded_number_of_times():
    """One program serves all ten chunks, and a second run (another seed) reuses it."""
    model = normal_normal_model()
    data = normal_normal_data(1000, seed=5)
    problem_data = prepare_data(model, data)
    compiled = dataclasses.replace(compile_for(model, problem_data))  # a fresh entry in the caches
    # once per program and kernel phase (starts, init, warmup, step: under 10 today), never per
    # problem or per chunk (20 chunks, then 22 more with another seed)
    compiled.logdensity_fn = chex.assert_max_traces(compiled.logdensity_fn, n=10)
    config = BatchConfig(sampler=SamplerConfig(name="blackjax", draws=20, tune=20, chains=2), runtime=RuntimeConfig(batch_size=50))
    result = run_batched(compiled, problem_data, config, progress=False)
    assert result.draws["theta"].shape == (1000, 2, 20)
    more = prepare_data(model, normal_normal_data(1100, seed=6))  # 22 chunks of the same shape
    again = dataclasses.replace(config, runtime=RuntimeConfig(batch_size=50, seed=1))  # another seed
    run_batched(compiled, more, again, progress=False)  # would raise past 10 traces


def test_float32_precision_runs_in_float32_and_agrees():
    data = normal_normal_data(30, seed=6)
    idata = _run(data, batch_size=None, precision="float32")
    assert idata.posterior.theta.dtype == np.float32
    mean, _ = normal_normal_posterior(data)
    s = _summary(idata, "theta")
    z = (s["mean"] - mean) / s["mcse_mean"]
    assert np.all(np.abs(z) < stats.norm.ppf(1 - 0.01 / 60))


@pytest.mark.parametrize(
    "data, match",
    [
        ({"nope": np.zeros((2, 3))}, "'nope' is not in the model"),
        ({"y": np.zeros((3, 20)), "prior_mu": np.zeros(4)}, "'prior_mu' has 4 problems but 'y' has 3"),
        ({"y": [np.zeros(3), np.zeros((4, 2))]}, "'y': problem 1 has shape"),
        ({"y": np.array([[0.0, np.nan], [1.0, 2.0]])}, "'y': non-finite value in problem 0"),
        ({}, "data is empty"),
    ],
)
def test_bad_data_raises_named_value_error(data, match):
    with pytest.raises(ValueError, match=match):
        engine.sample_batched(normal_normal_model(), data, draws=10, tune=10, progress=False)


def test_ragged_container_not_observed_row_by_row_is_refused():
    with pm.Model() as model:
        x = pm.Data("x", np.zeros(4))
        y = pm.Data("y", np.zeros(4))
        b = pm.Normal("b")
        pm.Normal("obs", b * x.sum(), 1, observed=y.sum())
    with pytest.raises(ValueError, match="observed variable 'obs' reads ragged container"):
        engine.sample_batched(
            model, {"x": [np.ones(3), np.ones(5)], "y": [np.ones(3), np.ones(5)]}, progress=False
        )


def test_bad_sampler_settings_rejected():
    with pytest.raises(ValueError, match="unknown sampler 'stan'; choose one of 'auto', 'blackjax'"):
        engine.sample_batched(normal_normal_model(), normal_normal_data(2), sampler="stan")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        engine.sample_batched(normal_normal_model(), normal_normal_data(2), bogus=1)

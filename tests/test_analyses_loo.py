"""LOO/WAIC: the engine's pointwise log-likelihood, and values equal to ArviZ's own."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from engine.analyses import hierarchical_attention as ha
from engine.analyses import _common as C
from engine.analyses import loo
from engine.errors import InputError


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(3)
    entropies = 1.5 + 0.3 * rng.standard_normal((2, 2, 3, 1)) + 0.5 * rng.standard_normal((2, 2, 3, 4))
    # float64: the loglik is checked against scipy to 1e-8 (the default precision picks float32)
    idata, draws, loglik = ha.fit(entropies, dict(chains=2, draws=200, tune=200, seed=3, precision="float64"),
                                  variant="hierarchical", log_likelihood=True)
    return entropies, idata, draws, loglik


@pytest.mark.slow
def test_engine_loglik_is_the_raw_scale_normal_density(fitted):
    """The engine's log-likelihood (sampled on the standardised scale) mapped back to the
    input's units equals scipy's Normal log density of the raw data under the raw draws."""
    entropies, idata, draws, loglik = fitted
    # the default sampler's fallback may stop per checkpoint: at least 200 draws, NaN past num_draws
    assert loglik.shape[:2] + loglik.shape[3:] == (2, 2, 2, 3, 4) and loglik.shape[2] >= 200
    theta = np.moveaxis(draws["theta"], (-2, -1), (1, 2))[..., None]       # [C, chain, draw, L, H, 1]
    sigma = draws["sigma"][..., None, None, None]
    expected = stats.norm.logpdf(entropies[:, None, None], theta, sigma)
    np.testing.assert_allclose(loglik, expected, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ha.pointwise_loglik(entropies, draws), expected, rtol=1e-10)


@pytest.mark.slow
def test_loo_and_waic_equal_arviz(fitted):
    entropies, idata, draws, loglik = fitted
    for p in range(2):
        one = loo.per_problem_idata(idata, loglik, p)
        rows, _, loos = loo.information_criteria({"m": one})
        # ArviZ on an InferenceData built independently from the same (kept) draws
        kept = int(C.kept_counts(idata)[p])
        post = idata.isel(problem=p, draw=slice(0, kept)).posterior
        ref = az.from_dict(posterior={k: v.values for k, v in post.data_vars.items()},
                           log_likelihood={"y": loglik[p][:, :kept]})
        ref_loo, ref_waic = az.loo(ref), az.waic(ref)
        assert rows[0]["elpd_loo"] == pytest.approx(ref_loo.elpd_loo, rel=1e-12)
        assert rows[0]["se"] == pytest.approx(ref_loo.se, rel=1e-12)
        assert rows[0]["p_loo"] == pytest.approx(ref_loo.p_loo, rel=1e-12)
        assert rows[0]["elpd_waic"] == pytest.approx(ref_waic.elpd_waic, rel=1e-12)
        assert rows[0]["max_pareto_k"] == pytest.approx(float(ref_loo.pareto_k.max()), rel=1e-12)
        # and the engine's own log_likelihood group, shifted by the standardisation, gives the same
        shift = float(np.log(entropies[p].std(ddof=1))) * entropies[p].size
        engine_loo = az.loo(idata.isel(problem=p, draw=slice(0, kept)))
        assert engine_loo.elpd_loo - shift == pytest.approx(ref_loo.elpd_loo, rel=1e-6)


def synthetic_trace(seed: int = 0, num_problems: int = 2, num_obs: int = 12):
    """An engine-shaped trace (problem dim) of a Normal-mean model with its exact log-likelihood."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((num_problems, num_obs))
    mu = y.mean(-1)[None, None, :] + rng.standard_normal((2, 300, num_problems)) / np.sqrt(num_obs)
    ll = stats.norm.logpdf(y[None, None], mu[..., None], 1.0)                # [chain, draw, problem, obs]
    return az.from_dict(posterior={"mu": mu}, log_likelihood={"obs": ll},
                        coords={"problem": np.arange(num_problems)},
                        dims={"mu": ["problem"], "obs": ["problem", "obs_dim_0"]}), ll


def test_information_criteria_equal_arviz_without_sampling():
    idata, ll = synthetic_trace()
    for p in range(2):
        rows, _, _ = loo.information_criteria({"m": loo.per_problem_idata(idata, None, p)})
        ref = az.from_dict(posterior={"mu": idata.posterior["mu"].values[:, :, p]},
                           log_likelihood={"obs": ll[:, :, p]})
        assert rows[0]["elpd_loo"] == pytest.approx(az.loo(ref).elpd_loo, rel=1e-12)
        assert rows[0]["elpd_waic"] == pytest.approx(az.waic(ref).elpd_waic, rel=1e-12)


def test_compare_and_errors(tmp_path):
    idata, ll = synthetic_trace()
    shifted = np.moveaxis(ll, 2, 0)                                           # [problem, chain, draw, obs]
    models = {"a": loo.per_problem_idata(idata, shifted, 0),
              "b": loo.per_problem_idata(idata, shifted - 0.1, 0)}
    rows, compare, _ = loo.information_criteria(models)
    assert list(compare.index) == ["a", "b"]
    assert compare.loc["b", "elpd_diff"] == pytest.approx(0.1 * ll.shape[-1], rel=1e-9)
    (tmp_path / "traces").mkdir()
    for name in ("a", "b"):
        idata.to_netcdf(str(tmp_path / "traces" / f"{name}.nc"))
    cfg = OmegaConf.create({"analysis": {"name": "loo", "traces": {n: str(tmp_path / "traces" / f"{n}.nc")
                                                                      for n in ("a", "b")}}})
    result = loo.run(cfg, tmp_path / "out")
    assert len(result.data["rows"]) == 4
    for name in ("summary.json", "report.md", "loo_compare.png", "loo_khat.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| max_r_hat | divergences |" in report and "## WAIC and LOO warnings (ArviZ)" in report
    assert all(r["max_r_hat"] < 1.01 and r["divergences"] == 0 for r in result.data["rows"])
    cfg.analysis.scale = "deviance"                       # -2 elpd: lower is better
    result = loo.run(cfg, tmp_path / "dev")
    assert "deviance is better" not in result.summary and "(lower is better)" in result.summary
    first = result.summary.splitlines()[1]
    assert first.index("a elpd_loo") < first.index("b elpd_loo"), first     # a is the better model
    assert loo.compare_title(0, "deviance").endswith("(lower is better)")
    assert loo.compare_title(0, "log").endswith("(higher is better)")
    path = tmp_path / "no_ll.nc"
    az.from_dict(posterior={"x": np.zeros((2, 10))}).to_netcdf(str(path))
    with pytest.raises(InputError, match="no log_likelihood group"):
        loo.load_traces({"x": str(path)})
    cfg = OmegaConf.create({"analysis": {"name": "loo", "variants": ["pooled"]}})
    with pytest.raises(InputError, match="at least two different variants"):
        loo.run(cfg, tmp_path)
    assert loo.pareto_k_threshold(400) == pytest.approx(min(1 - 1 / np.log10(400), 0.7))
    path = tmp_path / "no_ll.nc"
    az.from_dict(posterior={"x": np.zeros((2, 10))}).to_netcdf(str(path))
    with pytest.raises(InputError, match="no log_likelihood group"):
        loo.load_traces({"x": str(path)})
    cfg = OmegaConf.create({"analysis": {"name": "loo", "variants": ["pooled"]}})
    with pytest.raises(InputError, match="at least two different variants"):
        loo.run(cfg, tmp_path)


def test_waic_warning_is_reported_whole_and_the_fit_uses_the_analysis_target_accept(tmp_path):
    """ArviZ's WAIC variance warning reaches the report in full, per variant; the variants are
    fitted with analysis.target_accept (0.9), not sampler.target_accept."""
    idata, ll = synthetic_trace()
    wild = np.moveaxis(ll, 2, 0).copy()
    wild[0, :, :5, 0] = -60.0                               # a few draws that fit obs 0 very badly
    rows, _, _ = loo.information_criteria({"m": loo.per_problem_idata(idata, wild, 0)})
    assert "exceeds 0.4" in rows[0]["warnings"] and "1507.04544" in rows[0]["warnings"]   # whole
    cfg = OmegaConf.create({"analysis": OmegaConf.load("conf/analysis/loo.yaml"),
                            "sampler": OmegaConf.load("conf/sampler/blackjax_nuts.yaml"),
                            "runtime": OmegaConf.load("conf/runtime/cpu.yaml")})
    assert cfg.sampler.target_accept == 0.8
    assert loo.sample_kwargs(cfg)["target_accept"] == 0.9


def test_padded_rows_of_ragged_traces_are_dropped():
    """The engine marks padded rows of ragged problems NaN; LOO uses only the real rows."""
    idata, ll = synthetic_trace(num_obs=5)
    ll = ll.copy()
    ll[:, :, 1, 3:] = np.nan
    idata.log_likelihood["obs"].values[:] = ll
    one = loo.per_problem_idata(idata, None, 1)
    assert one.log_likelihood["obs"].shape == (2, 300, 3)
    ref = az.from_dict(posterior={"mu": idata.posterior["mu"].values[:, :, 1]},
                       log_likelihood={"obs": ll[:, :, 1, :3]})
    assert float(az.loo(one).elpd_loo) == pytest.approx(float(az.loo(ref).elpd_loo), rel=1e-12)

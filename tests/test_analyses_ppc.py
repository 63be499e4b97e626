"""Posterior predictive checks: Bayesian p-values and forward sampling."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from engine.analyses import hierarchical_attention as ha
from engine.analyses import ppc
from engine.errors import InputError


def test_bayesian_p_values():
    rng = np.random.default_rng(0)
    y_rep = rng.standard_normal((4000, 50))
    assert ppc.bayesian_p_value(np.zeros(50), y_rep, "mean") == pytest.approx(0.5, abs=0.03)
    assert ppc.bayesian_p_value(np.full(50, 1.0), y_rep, "mean") == 0.0       # observed mean far above
    assert ppc.bayesian_p_value(3.0 * rng.standard_normal(50), y_rep, "sd") == 0.0
    wide = 3.0 * rng.standard_normal(50)
    rows = ppc.p_value_table("m", [("s", wide - wide.mean(), y_rep)], ["mean", "sd"])
    assert [r["extreme"] for r in rows] == [False, True]


def test_forward_sampling_matches_the_posterior():
    """Replications from known draws have the draws' mean and noise SD."""
    rng = np.random.default_rng(1)
    entropies = rng.standard_normal((1, 2, 3, 4))
    theta = np.broadcast_to(np.arange(6.0).reshape(1, 2, 3, 1, 1), (1, 2, 3, 2, 500))
    draws = {"theta": theta, "sigma": np.full((1, 2, 500), 0.5)}
    ((label, y_obs, y_rep),) = ha.posterior_predictive(entropies, draws, [0], rng, max_draws=1000)
    assert y_rep.shape == (1000, 24) and y_obs.shape == (24,)
    np.testing.assert_allclose(y_rep.mean(0), np.repeat(np.arange(6.0), 4), atol=0.1)
    assert (y_rep - np.repeat(np.arange(6.0), 4)).std() == pytest.approx(0.5, rel=0.05)


def test_bad_options(tmp_path):
    cfg = OmegaConf.create({"analysis": {"name": "ppc", "models": ["nope"]}})
    with pytest.raises(InputError, match="unknown model 'nope'"):
        ppc.run(cfg, tmp_path)
    cfg = OmegaConf.create({"analysis": {"name": "ppc", "models": ["sensitivity"], "statistics": ["median"]}})
    with pytest.raises(InputError, match="unknown statistic 'median'"):
        ppc.run(cfg, tmp_path)
    cfg = OmegaConf.create({"analysis": {"name": "ppc", "input": "x.csv"}})
    with pytest.raises(InputError, match="exactly one model"):
        ppc.run(cfg, tmp_path)


@pytest.mark.slow
def test_ppc_detects_a_wrong_scale(tmp_path):
    """A fitted hierarchical model reproduces its own data's mean and SD (p-values away from 0 and
    1) but not data three times as spread out (sd p-value 0)."""
    rng = np.random.default_rng(2)
    entropies = 2.0 + 0.3 * rng.standard_normal((2, 2, 3, 1)) + 0.4 * rng.standard_normal((2, 2, 3, 6))
    _, draws, _ = ha.fit(entropies, dict(chains=2, draws=300, tune=300, seed=2))
    series = ha.posterior_predictive(entropies, draws, [0, 1], rng)
    for _, y_obs, y_rep in series:
        for stat in ("mean", "sd"):
            assert 0.05 < ppc.bayesian_p_value(y_obs, y_rep, stat) < 0.95
        wide = y_obs.mean() + 3.0 * (y_obs - y_obs.mean())
        assert ppc.bayesian_p_value(wide, y_rep, "sd") == 0.0


def test_default_statistics_are_not_only_the_fitted_mean_and_heads_get_a_spread_statistic():
    from pathlib import Path

    defaults = OmegaConf.load(Path(__file__).parents[1] / "conf/analysis/ppc.yaml").statistics
    assert {"min", "max", "skewness"} <= set(defaults) and "mean" in ppc.FITTED_DIRECTLY
    assert ppc.statistics_for(["mean", "sd"], 4) == ["mean", "sd", "between_head_sd"]
    assert ppc.statistics_for(["mean", "between_head_sd"], None) == ["mean"]
    rng = np.random.default_rng(3)
    y = rng.standard_normal(4000) ** 2
    assert ppc.statistic("skewness", y) == pytest.approx(2 * np.sqrt(2), rel=0.15)      # chi2(1)
    heads = np.repeat([0.0, 1.0, 2.0], 4) + 0.01 * rng.standard_normal(12)            # 3 heads x 4
    assert ppc.statistic("between_head_sd", heads, 4) == pytest.approx(1.0, abs=0.02)
    # pooled heads with the right overall spread but no between-head structure: flagged
    y_rep = rng.permuted(np.broadcast_to(heads, (500, 12)), axis=1)
    assert ppc.bayesian_p_value(heads, y_rep, "between_head_sd", 4) < 0.025


def test_an_outlying_series_is_never_the_one_left_out(tmp_path):
    rng = np.random.default_rng(4)
    series = [(f"s{i}", rng.standard_normal(10), rng.standard_normal((200, 10))) for i in range(6)]
    series[5] = ("outlier", np.append(rng.standard_normal(9), 8.0), series[5][2])
    rows = ppc.p_value_table("m", series, ["mean", "max"])
    shown, left_out = ppc.shown_series(series, rows, 4)
    assert "outlier" in [s[0] for s in shown] and len(left_out) == 2
    path, left = ppc.plot_ppc("m", series, ["mean", "max"], tmp_path / "p.png", rows=rows, max_series=4)
    assert left == left_out and path.stat().st_size > 0
    assert ppc.shown_series(series, rows, 8) == (series, [])

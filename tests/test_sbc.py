"""Simulation-based calibration: the rank and test machinery against exact posteriors, a batched
SBC that flags a miscalibrated fit and passes a calibrated one, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from engine.calibration import sbc as sbc_core
from engine.calibration.models import normal_normal

ROOT = Path(__file__).resolve().parents[1]
TEST_ALPHA = 0.01
"""Family-wise error of the SBC verdicts in these tests (false alarm 1% for a correct fit)."""


def exact_ranks(rng, num_sims, num_draws, prior_sd_sim, prior_sd_fit, obs_sd_sim=1.0, obs_sd_fit=1.0):
    """Ranks of theta among independent draws of the exact Normal-Normal posterior (one
    observation), the truth simulated with possibly other prior / noise scales."""
    theta = rng.normal(0.0, prior_sd_sim, num_sims)
    y = theta + rng.normal(0.0, obs_sd_sim, num_sims)
    var = 1.0 / (1.0 / prior_sd_fit**2 + 1.0 / obs_sd_fit**2)
    draws = var * y[:, None] / obs_sd_fit**2 + np.sqrt(var) * rng.standard_normal((num_sims, num_draws))
    return sbc_core.rank_statistics(draws[:, None, :], theta, stride=1)


def test_uniformity_test_false_alarm_rate_and_power():
    """Calibrated ranks reject at the nominal rate (binomial 4-sigma band); a too-narrow and a
    too-wide posterior are rejected nearly always."""
    rng = np.random.default_rng(0)
    num_sims, num_draws, reps = 200, 99, 300
    edges = sbc_core.rank_bins(num_draws, num_sims)
    assert len(edges) - 1 == 20 and edges[0] == 0 and edges[-1] == num_draws + 1

    def reject_rate(*scales):
        p = [sbc_core.uniformity_p_value(exact_ranks(rng, num_sims, num_draws, *scales), num_draws, edges)[1]
             for _ in range(reps)]
        return np.mean(np.array(p) < 0.05)

    rate = reject_rate(1.0, 1.0)
    assert abs(rate - 0.05) < 4 * np.sqrt(0.05 * 0.95 / reps)
    assert reject_rate(3.0, 1.0) > 0.95              # truth from a wider prior than fitted
    assert reject_rate(1.0, 1.0, 2.0, 1.0) > 0.95    # data noisier than the fitted likelihood


def test_rank_statistics_thinning_and_names():
    draws = np.arange(24.0).reshape(1, 2, 12)        # chain 0: 0..11, chain 1: 12..23
    assert sbc_core.rank_statistics(draws, np.array([5.5]), stride=3).tolist() == [2]  # kept 2,5,8,11,14,...
    assert sbc_core.rank_statistics(draws, np.array([100.0]), stride=3).tolist() == [8]
    assert sbc_core.thinning_stride(np.array([400.0, 100.0, 800.0]), chains=4, draws=400) == 4
    assert sbc_core.thinning_stride(np.array([5000.0]), chains=4, draws=400) == 1
    elements = sbc_core.element_draws({"mu": np.zeros(3), "theta": np.arange(12.0).reshape(3, 2, 2)}, 1)
    assert list(elements) == ["mu", "theta[0, 0]", "theta[0, 1]", "theta[1, 0]", "theta[1, 1]"]
    np.testing.assert_array_equal(elements["theta[1, 0]"], [2.0, 6.0, 10.0])


def test_holm_adjustment():
    """Against the step-down definition: sorted p_(i) times (m - i + 1), running max, capped at 1."""
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 -> 0.025, 0.04, 0.09, 0.09 (max), 0.5
    np.testing.assert_allclose(sbc_core.holm_adjust(p), [0.04, 0.09, 0.09, 0.025, 0.5])
    assert sbc_core.holm_adjust(np.array([0.9, 0.8])).max() == 1.0


def test_ecdf_band_is_simultaneous():
    """ArviZ's optimised band holds all of a uniform rank ECDF about 95% of the time (a
    pointwise band of the same level would hold it far less often)."""
    num_sims, num_draws, reps = 100, 49, 400
    cdf, lower, upper = sbc_core.ecdf_band(num_sims, num_draws, 0.95)
    rng = np.random.default_rng(1)
    ranks = rng.integers(0, num_draws + 1, (reps, num_sims))
    ecdf = (ranks[:, :, None] <= np.arange(num_draws + 1)).mean(1)
    inside = np.all((ecdf >= lower - 1e-12) & (ecdf <= upper + 1e-12), axis=1).mean()
    assert abs(inside - 0.95) < 4 * np.sqrt(0.05 * 0.95 / reps)
    low_pw, high_pw = stats.binom.interval(0.95, num_sims, cdf)
    assert np.all(lower <= low_pw / num_sims + 1e-12) and np.all(upper >= high_pw / num_sims - 1e-12)


def run_pair(sampler, num_sims, chains, draws, seed=3, **kw):
    """SBC of N(0, 1) prior / N(theta, 1) likelihood: data simulated by the same template
    (calibrated) and by a prior three times wider (miscalibrated). One compiled model serves both."""
    model = normal_normal(prior_sd=1.0)
    common = dict(sampler=sampler, chains=chains, draws=draws, tune=draws, seed=seed, alpha=TEST_ALPHA, **kw)
    good = sbc_core.sbc(model, num_sims, **common)
    bad = sbc_core.sbc(model, num_sims, simulator=normal_normal(prior_sd=3.0), **common)
    return good, bad


def check_pair(good, bad):
    assert good.summary["parameters"]["theta"]["pass"], good.summary["parameters"]
    assert not bad.summary["parameters"]["theta"]["pass"], bad.summary["parameters"]
    assert bad.summary["parameters"]["theta"]["sd_rank"] > 0.35     # U shape: fit too narrow
    assert good.summary["divergent_share"] == 0.0


def test_blackjax_flags_miscalibration_and_passes_a_calibrated_fit(tmp_path):
    good, bad = run_pair("blackjax", 200, chains=2, draws=200)
    check_pair(good, bad)
    assert good.summary["num_simulations"] == 200 and good.ranks["theta"].shape == (200,)
    assert 0 <= good.ranks["theta"].min() and good.ranks["theta"].max() <= good.num_rank_draws
    out = sbc_core.SBCResult(good.summary, good.ranks, good.truth)
    from engine.calibration.report import write_outputs

    files = write_outputs(out, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["parameters"]["theta"]["pass"] is True
    assert {p.name for p in files.values()} >= {"summary.json", "report.md", "ranks.parquet",
                                                  "sbc_ranks.png", "sbc_ecdf.png"}


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "engine", "analysis=sbc", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_runs_a_template_and_writes_the_outputs(tmp_path):
    """End to end through Hydra (slow tier: a fresh process imports and compiles, ~45 s)."""
    proc = cli("analysis.model={_target_: engine.calibration.models.normal_normal, num_obs: 3}",
               "analysis.num_simulations=40", "analysis.chains=2", "analysis.draws=60",
               "analysis.tune=60", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sbc: 40 simulations x 1 parameters" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["parameters"]) == {"theta"}
    assert {"divergent_share", "converged_share", "num_rank_draws", "config"} <= set(summary)
    for name in ("report.md", "sbc_ranks.png", "sbc_ecdf.png", "ranks.parquet"):
        assert (tmp_path / name).exists(), name


def test_cli_bad_builder_is_one_line_and_exit_2(tmp_path):
    proc = cli("analysis.model=engine.calibration.models.no_such_builder", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "analysis.model: could not build" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "summary.json").exists()


def test_bad_settings_raise_input_errors(tmp_path):
    from omegaconf import OmegaConf

    from engine.analyses import sbc as sbc_analysis
    from engine.errors import InputError

    cfg = OmegaConf.create({"analysis": {"name": "sbc", "num_simulations": 1,
                                         "model": "engine.calibration.models.normal_normal"}})
    with pytest.raises(InputError, match="analysis.num_simulations: must be >= 2"):
        sbc_analysis.run(cfg, tmp_path)
    cfg.analysis.num_simulations = 10
    cfg.analysis.model = "numpy.zeros"
    with pytest.raises(InputError, match="analysis.model: could not build|not a pm.Model"):
        sbc_analysis.run(cfg, tmp_path)
    import pymc as pm

    with pm.Model() as constant_data:
        theta = pm.Normal("theta")
        pm.Normal("obs", theta, 1.0, observed=np.zeros(3))
    with pytest.raises(ValueError, match="observed variable 'obs': its data must be a pm.Data"):
        sbc_core.sbc(constant_data, 10)


def test_engine_sbc_is_the_function_after_importing_the_modules():
    """``engine.sbc`` stays the function once the SBC modules are imported (a submodule named
    ``engine/sbc.py`` would replace it with itself)."""
    import engine
    import engine.analyses.sbc  # noqa: F401
    import engine.calibration.report  # noqa: F401

    assert engine.sbc is sbc_core.sbc

"""Variational calibration in audits: beliefs with ``z_true`` get PIT and coverage columns, a
summary entry and a plot; an exact q is calibrated, an overconfident q is caught."""

from __future__ import annotations

import numpy as np
import pytest

from engine import audit_vfe
from engine.audit.beliefs import beliefs_from_arrays
from engine.errors import InputError


def calibration_beliefs(num_tokens=300, n=4, seed=0):
    """Checkpoint 0: q is the exact posterior; checkpoint 1: q has a third of its sd."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, num_tokens)                     # prior N(0, 1)
    observed = z[:, None] + rng.normal(0.0, 1.0, (num_tokens, n))
    sd = (1.0 + n) ** -0.5
    mu = observed.sum(1) * sd**2
    return {"mu_q": np.stack([mu, mu]), "sigma_q": np.stack([np.full(num_tokens, sd), np.full(num_tokens, sd / 3)]),
            "observed": observed, "prior_mu": 0.0, "prior_sigma": 1.0, "z_true": z,
            "checkpoint": ["exact", "overconfident"]}


@pytest.mark.slow  # 29 s: a coverage statistic; tests/test_sbc.py keeps SBC's own calibration check fast
def test_z_true_coverage_and_pits(tmp_path):
    beliefs = calibration_beliefs()
    result = audit_vfe(beliefs, chains=2, draws=200, tune=200, seed=0, num_q_draws=100, out_dir=tmp_path)
    table = result.table
    for col in ("z_true", "z_pit_q", "z_pit_mcmc", "z_in50_q", "z_in90_q", "z_in50_mcmc", "z_in90_mcmc"):
        assert col in table.columns, col
    exact, over = table[table.checkpoint == "exact"], table[table.checkpoint == "overconfident"]
    tol = 4 * np.sqrt(0.9 * 0.1 / len(exact))                # binomial 4-sigma
    assert abs(exact.z_in90_q.mean() - 0.9) < tol
    assert abs(exact.z_in90_mcmc.mean() - 0.9) < tol
    assert over.z_in90_q.mean() < 0.5                          # true 90% interval of sd/3: ~0.39
    # the MCMC PIT estimates the exact posterior's PIT (q exact at checkpoint 0)
    assert np.max(np.abs(exact.z_pit_mcmc - exact.z_pit_q)) < 0.15
    cal = result.summary["z_true_calibration"]
    assert abs(cal["exact"]["q"]["coverage_90"] - 0.9) < tol and cal["overconfident"]["q"]["coverage_90"] < 0.5
    assert all(abs(cal[c]["mcmc"]["coverage_90"] - 0.9) < tol for c in cal)  # same data: calibrated
    assert cal["exact"]["q"]["pit_uniformity_p_value"] > 0.001 > cal["overconfident"]["q"]["pit_uniformity_p_value"]
    assert (tmp_path / "z_true_pit.png").exists()
    assert "Calibration against z_true" in (tmp_path / "report.md").read_text()


def test_z_true_shape_and_values_are_checked():
    beliefs = calibration_beliefs(num_tokens=5)
    beliefs["z_true"] = np.zeros(4)
    with pytest.raises(InputError, match="z_true"):
        beliefs_from_arrays(beliefs)
    beliefs["z_true"] = np.array([0.0, 1.0, np.nan, 0.0, 0.0])
    with pytest.raises(InputError, match="field 'z_true': non-finite"):
        beliefs_from_arrays(beliefs)


def test_multivariate_z_true_columns():
    """K=2: per-dimension PITs under q from its marginal sds; coverage as the share of dims."""
    from engine.audit.calibration import calibration_summary, z_true_columns

    cov = np.array([[4.0, 1.0], [1.0, 1.0]])
    beliefs = beliefs_from_arrays({
        "mu_q": np.zeros((1, 3, 2)), "cov_q": cov, "observed": np.zeros((1, 3, 2, 2)),
        "prior_mu": np.zeros(2), "prior_cov": np.eye(2),
        "z_true": np.array([[[0.0, 0.0], [2.0, 0.0], [4.0, 3.0]]]),
    })
    pit_mcmc = np.array([[0.5, 0.5], [0.8, 0.5], [0.99, 0.999]])
    cols = z_true_columns(beliefs, {"z_pit_mcmc": pit_mcmc})
    np.testing.assert_allclose(cols["z_pit_q_0"], [0.5, 0.8413447, 0.9772499], rtol=1e-6)  # sd 2
    np.testing.assert_allclose(cols["z_pit_q_1"], [0.5, 0.5, 0.9986501], rtol=1e-6)        # sd 1
    np.testing.assert_allclose(cols["z_in50_q"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(cols["z_in90_mcmc"], [1.0, 1.0, 0.0])
    import pandas as pd

    table = pd.DataFrame({"checkpoint": [0, 0, 0], **cols})
    assert calibration_summary(table)["0"]["q"]["num_values"] == 6

"""Sensitivity regression: design matrix, a real Hydra multirun directory, truth recovery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from engine.analyses import sensitivity as se
from engine.analyses import sensitivity_report as ser
from engine.errors import InputError

APP = Path(__file__).parent / "hydra_app" / "sweep_app.py"
SMALL = dict(chains=2, draws=300, tune=300)


def binomial_bounds(n: int, p: float, z: float = 3.0) -> tuple[float, float]:
    sd = np.sqrt(n * p * (1 - p))
    return n * p - z * sd, n * p + z * sd


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real multirun directory: the tiny Hydra app run with -m over 24 jobs."""
    out = tmp_path_factory.mktemp("multirun")
    cmd = [sys.executable, str(APP), "-m", "lr=0.0001,0.001,0.01", "layers=2,4",
           "optimizer=adam,sgd", "seed=0,1", f"hydra.sweep.dir={out}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    return out


def test_reads_real_multirun_directory(sweep_dir):
    frame = se.table_from_multirun(sweep_dir)
    assert len(frame) == 24
    assert {"lr", "layers", "optimizer", "seed", "perplexity", "loss", "train.steps"} <= set(frame.columns)
    assert sorted(frame["optimizer"].unique()) == ["adam", "sgd"]
    design = se.build_design(frame, ["perplexity"], log10=["lr"], interactions=["lr:layers"])
    assert design.terms == ["log10(lr)", "layers", "optimizer[sgd]", "log10(lr):layers"]
    assert design.kinds == ["numeric", "numeric", "one-hot", "interaction"]
    assert design.references[2] == "optimizer[adam]"
    np.testing.assert_allclose(design.x[:, :3].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(design.x[:, :3].std(0, ddof=1), 1, atol=1e-12)
    np.testing.assert_allclose(design.scale[0], np.log10(frame["lr"]).std(ddof=1))


def test_multirun_predictors_are_the_swept_hyperparameters(sweep_dir):
    """Metric-file keys (``loss`` = log perplexity, ``train.steps``) and ``seed`` are not
    predictors unless named: ``loss`` would condition every real effect away."""
    frame = se.table_from_multirun(sweep_dir)
    design = se.build_design(frame, ["perplexity"])
    assert design.terms == ["lr", "layers", "optimizer[sgd]"]
    assert design.dropped == []
    assert any("'loss'" in s and "'train.steps'" in s for s in design.left_out), design.left_out
    assert any("'seed'" in s for s in design.left_out), design.left_out
    named = se.build_design(frame, ["perplexity"], predictors=["lr", "seed", "loss"])
    assert named.terms == ["lr", "seed", "loss"] and named.left_out == []
    text = ser.design_text(design, "multirun x")
    assert "| optimizer[sgd] | one-hot |" in text and "level vs `optimizer[adam]`" in text
    assert "Not predictors" in text and "random seeds" in text


def test_fit_table_r2_and_plotted_scales():
    """Intercept and sigma in metric units and Bayesian R^2 (Gelman et al. 2019) from known draws;
    one-hot effects are shown per unit (vs the reference), numeric ones per SD, labelled."""
    import arviz as az

    rng = np.random.default_rng(0)
    n, draws = 40, 50
    x = rng.standard_normal((n, 2))
    x = (x - x.mean(0)) / x.std(0, ddof=1)
    beta = np.broadcast_to([0.6, -0.3], (1, draws, 1, 2))              # [chain, draw, problem, p]
    alpha = np.full((1, draws), 0.1)
    sigma = np.full((1, draws), 0.5)
    idata = az.from_dict(posterior={"alpha": alpha[..., None], "beta": beta,
                                    "sigma": sigma[..., None]},
                         dims={"alpha": ["problem"], "beta": ["problem", "term"], "sigma": ["problem"]})
    y = 10.0 + 2.0 * rng.standard_normal((1, n))
    rows = {r["quantity"]: r for r in ser.model_table(idata, y, x, ["ppl"], 0.94)}
    fitted = x @ np.array([0.6, -0.3])
    r2 = fitted.var(ddof=1) / (fitted.var(ddof=1) + 0.25)
    assert rows["R^2"]["mean"] == pytest.approx(r2)
    assert rows["sigma"]["mean"] == pytest.approx(0.5 * y.std(ddof=1))
    assert rows["intercept"]["mean"] == pytest.approx(y.mean() + 0.1 * y.std(ddof=1))
    row = {"term": "opt[sgd]", "kind": "one-hot", "reference": "opt[adam]", "predictor_sd": 0.5,
           "per_unit_mean": 1.5, "per_unit_hdi_low": 1.0, "per_unit_hdi_high": 2.0,
           "per_sd_mean": 0.75, "per_sd_hdi_low": 0.5, "per_sd_hdi_high": 1.0}
    assert ser.shown_effect(row) == (1.5, 1.0, 2.0, "opt[sgd] vs opt[adam]")
    assert ser.truth_on_shown_scale(row, {"opt[sgd]": 1.5}) == 1.5
    row.update(term="layers", kind="numeric", reference=None, predictor_sd=2.0)
    assert ser.shown_effect(row)[::3] == (0.75, "layers (per SD = 2.000)")
    assert ser.truth_on_shown_scale(row, {"layers": -0.6}) == pytest.approx(-1.2)


def test_bad_inputs(tmp_path, sweep_dir):
    with pytest.raises(InputError, match="no Hydra job directories"):
        se.table_from_multirun(tmp_path)
    with pytest.raises(InputError, match="no metrics file 'loss.json'"):
        se.table_from_multirun(sweep_dir, "loss.json")
    frame = pd.DataFrame({"lr": [0.1, 0.2, 0.3, 0.4], "ppl": [1.0, "x", 2.0, 3.0]})
    path = tmp_path / "runs.csv"
    frame.to_csv(path, index=False)
    cfg = OmegaConf.create({"analysis": {"name": "sensitivity", "input": str(path), "metric": "ppl"}})
    with pytest.raises(InputError, match="column 'ppl' must be numeric and finite; row 1 is 'x'"):
        se.prepare(cfg)
    cfg.analysis.metric = "perplexity"
    with pytest.raises(InputError, match="missing column 'perplexity'"):
        se.prepare(cfg)
    with pytest.raises(InputError, match="'a:b:c' is not of the form"):
        se.build_design(se.demo_table(), ["perplexity"], interactions=["a:b:c"])
    with pytest.raises(InputError, match="must be positive for log10"):
        se.build_design(pd.DataFrame({"lr": [0.1, -1.0, 1.0], "y": [1.0, 2.0, 3.0]}), ["y"], log10=["lr"])


@pytest.mark.slow
def test_recovers_true_effects_at_nominal_rate():
    """20 simulated sweeps (problems of ONE batched run): true per-unit effects lie in the 94%
    HDIs at about the nominal rate (binomial 3-sigma band over 60 intervals)."""
    rng = np.random.default_rng(0)
    n, repeats = 30, 20
    frame = pd.DataFrame({"a": rng.uniform(0, 10, n), "b": rng.normal(5, 0.1, n),
                          "opt": np.array(["x", "y"])[np.arange(n) % 2]})
    design = se.build_design(frame, [])
    truth = np.array([0.3, -20.0, 1.0])                                # per unit: a, b, opt[y]
    raw = np.stack([frame["a"], frame["b"], (frame["opt"] == "y").astype(float)], axis=1)
    y = 5.0 + raw @ truth + 0.8 * rng.standard_normal((repeats, n))
    _, per_sd, per_unit = se.fit(design, y, SMALL)
    rows = se.effect_table(design, [f"r{i}" for i in range(repeats)], per_sd, per_unit, 0.94)
    low = np.array([r["per_unit_hdi_low"] for r in rows]).reshape(repeats, 3)
    high = np.array([r["per_unit_hdi_high"] for r in rows]).reshape(repeats, 3)
    covered = int(((low <= truth) & (truth <= high)).sum())
    lo, hi = binomial_bounds(repeats * 3, 0.94)
    assert lo <= covered <= min(hi, repeats * 3), covered
    assert max(r["r_hat"] for r in rows) < 1.05


@pytest.mark.slow
def test_run_on_multirun_directory(sweep_dir, tmp_path):
    cfg = OmegaConf.create({
        "analysis": {"name": "sensitivity", "input": str(sweep_dir), "log10": ["lr"]},
        "sampler": {"name": "blackjax", "target_accept": 0.8, "max_tree_depth": 10, "dense_mass": False, **SMALL},
        "runtime": {"seed": 0, "batch_size": None, "precision": "float64"},
    })
    result = se.run(cfg, tmp_path)
    rows = {r["term"]: r for r in result.data["rows"]}
    truth = {"log10(lr)": -2.0, "layers": -0.5, "optimizer[sgd]": 1.5}
    for term, value in truth.items():
        assert rows[term]["per_unit_hdi_low"] <= value <= rows[term]["per_unit_hdi_high"], rows[term]
    assert list(rows) == list(truth)
    for name in ("summary.json", "report.md", "sensitivity_forest.png", "effects.csv"):
        assert (tmp_path / name).stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "## Design" in report and "| R^2 |" in report and "| intercept |" in report

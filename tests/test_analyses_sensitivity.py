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
    assert {"lr", "layers", "optimizer", "seed", "perplexity", "train.steps"} <= set(frame.columns)
    assert sorted(frame["optimizer"].unique()) == ["adam", "sgd"]
    design = se.build_design(frame, ["perplexity"], log10=["lr"], exclude=["seed"],
                             interactions=["lr:layers"])
    assert design.terms == ["log10(lr)", "layers", "optimizer[sgd]", "log10(lr):layers"]
    assert design.kinds == ["numeric", "numeric", "one-hot", "interaction"]
    assert design.dropped == ["train.steps (constant)"]
    np.testing.assert_allclose(design.x[:, :3].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(design.x[:, :3].std(0, ddof=1), 1, atol=1e-12)
    np.testing.assert_allclose(design.scale[0], np.log10(frame["lr"]).std(ddof=1))


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
        "analysis": {"name": "sensitivity", "input": str(sweep_dir), "log10": ["lr"], "exclude": ["seed"]},
        "sampler": {"name": "blackjax", "target_accept": 0.8, "max_tree_depth": 10, "dense_mass": False, **SMALL},
        "runtime": {"seed": 0, "batch_size": None, "precision": "float64"},
    })
    result = se.run(cfg, tmp_path)
    rows = {r["term"]: r for r in result.data["rows"]}
    truth = {"log10(lr)": -2.0, "layers": -0.5, "optimizer[sgd]": 1.5}
    for term, value in truth.items():
        assert rows[term]["per_unit_hdi_low"] <= value <= rows[term]["per_unit_hdi_high"], rows[term]
    for name in ("summary.json", "report.md", "sensitivity_forest.png", "effects.csv"):
        assert (tmp_path / name).stat().st_size > 0

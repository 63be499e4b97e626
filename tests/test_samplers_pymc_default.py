"""The pm.sample baseline receives the engine's NUTS settings (not only target_accept)."""

from __future__ import annotations

import numpy as np
import pymc as pm

import engine
from engine.sampling.kernels.base import KernelSettings
from engine.sampling.kernels.pymc_default import pm_sample_settings


def test_settings_map_to_pm_sample_arguments():
    kw = pm_sample_settings(KernelSettings(target_accept=0.9, max_tree_depth=4, dense_mass=True))
    assert kw == {"target_accept": 0.9, "max_treedepth": 4, "init": "jitter+adapt_full"}
    assert pm_sample_settings(KernelSettings())["init"] == "jitter+adapt_diag"


def test_max_tree_depth_and_dense_mass_reach_pm_sample():
    """A posterior with correlation 0.999: with a diagonal mass matrix NUTS needs small steps and
    deep trees, so ``max_tree_depth=3`` caps them (PyMC's default 10 would not); a dense mass
    matrix takes the correlation out, and the adapted step is many times longer."""
    cov = np.array([[1.0, 0.999], [0.999, 1.0]])
    with pm.Model() as model:
        mu = pm.Data("mu", np.zeros(2))
        pm.MvNormal("x", mu, cov=cov)
    data = {"mu": np.zeros((1, 2))}
    kw = dict(sampler="pymc", chains=1, draws=200, tune=300, seed=1)
    capped = engine.sample_batched(model, data, max_tree_depth=3, **kw)
    dense = engine.sample_batched(model, data, dense_mass=True, **kw)
    depth_capped = capped.sample_stats["tree_depth"].values
    assert depth_capped.max() <= 3
    assert (depth_capped == 3).mean() > 0.5
    step_capped = float(capped.sample_stats["step_size"].values.mean())
    step_dense = float(dense.sample_stats["step_size"].values.mean())
    assert step_dense > 5 * step_capped, (step_dense, step_capped)

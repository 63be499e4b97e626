"""The engine's batched diagnostics against ArviZ on edge cases: an odd number of draws, one
chain, constant draws, and the MCSE of the mean against ``az.mcse``."""

from __future__ import annotations

import arviz as az
import jax
import numpy as np
import pytest

from engine.sampling.diagnostics import summarize_draws


def _cases():
    rng = np.random.default_rng(0)
    walk = rng.normal(size=(4, 101)).cumsum(-1) * 0.1 + rng.normal(size=(4, 101))
    return {
        "odd_draws": walk,  # 101 draws: the split drops the middle draw of each chain
        "one_chain": rng.normal(size=(1, 200)),
        "constant": np.full((4, 100), 2.5),
        "two_chains_seven_draws": rng.normal(size=(2, 7)),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_diagnostics_equal_arviz_on_edge_cases(case):
    x = _cases()[case]
    with jax.enable_x64(True):
        ours = {k: float(np.asarray(v)) for k, v in summarize_draws(jax.numpy.asarray(x)).items()}
    theirs = {
        "r_hat": az.rhat(x), "ess_bulk": az.ess(x, method="bulk"),
        "ess_tail": az.ess(x, method="tail"), "mcse_mean": az.mcse(x, method="mean"),
    }
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], float(np.asarray(value).reshape(-1)[0]), rtol=1e-8,
                                   equal_nan=True, err_msg=f"{case}: {key}")
    np.testing.assert_allclose(ours["mean"], x.mean(), rtol=1e-12)

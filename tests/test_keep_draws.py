"""``keep_draws``: full draws of chosen tokens from a summary-only audit, as InferenceData."""

from __future__ import annotations

import arviz as az
import numpy as np
import pandas as pd
import pytest

from engine import audit_vfe
from engine.errors import InputError

RUN = dict(chains=2, draws=400, tune=400, seed=3, num_q_draws=200, batch_size=5, precision="float64")  # 1e-8 identities


def _beliefs(C=2, T=12, n=6, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(C, T))
    observed = theta[..., None] + rng.normal(size=(C, T, n))
    return {
        "mu_q": observed.mean(-1), "sigma_q": np.full((C, T), 0.35), "observed": observed,
        "prior_mu": np.zeros((C, T)), "prior_sigma": np.ones((C, T)),
        "token": np.array([f"tok{i}" for i in range(T)]), "checkpoint": np.array(["a", "b"][:C]),
    }


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    beliefs = _beliefs()
    # problems 3, 10, 15, 22 (checkpoint * 12 + token) sit in 4 of the 5-problem chunks
    audit = audit_vfe(beliefs, keep_draws=["tok3", "tok10"], store_dir=store, **RUN)
    return beliefs, store, audit


def test_kept_draws_are_the_draws_behind_the_table(kept_run):
    beliefs, _, audit = kept_run
    post = audit.draws.posterior
    assert post.theta.dims == ("chain", "draw", "checkpoint", "token")
    assert post.theta.shape == (2, 400, 2, 2)
    assert post.token.values.tolist() == ["tok3", "tok10"] and post.checkpoint.values.tolist() == ["a", "b"]
    assert audit.draws.sample_stats.diverging.dtype == bool
    table = audit.table.set_index(["checkpoint", "token"])
    for c in ("a", "b"):
        for t in ("tok3", "tok10"):
            theta = post.theta.sel(checkpoint=c, token=t)
            row = table.loc[(c, t)]
            np.testing.assert_allclose(float(theta.mean()), row.mcmc_mean, rtol=1e-10)
            np.testing.assert_allclose(float(theta.std(ddof=1)), row.mcmc_std, rtol=1e-8)
            # ArviZ on the kept draws agrees with the engine's on-device diagnostics
            np.testing.assert_allclose(float(az.rhat(theta.to_dataset(name="x")).x), row.r_hat, rtol=1e-8)
            np.testing.assert_allclose(float(az.ess(theta.to_dataset(name="x")).x), row.ess_bulk, rtol=1e-8)


def test_keeping_draws_leaves_the_table_as_it_was(kept_run):
    beliefs, _, audit = kept_run
    plain = audit_vfe(beliefs, **RUN)
    assert plain.draws is None
    pd.testing.assert_frame_equal(audit.table, plain.table, rtol=1e-12)


def test_kept_draws_survive_a_resume_and_a_changed_subset_is_refused(kept_run, tmp_path):
    beliefs, store, audit = kept_run
    # draws files sit beside their chunk files, written first
    names = sorted(p.name[:5] for p in (store / "chunks").glob("draws_*.npz"))
    assert names == ["draws"] * 4
    again = audit_vfe(beliefs, keep_draws=["tok10", "tok3"], store_dir=store, **RUN)  # same set
    assert again.summary["timings_s"]["sampling"] < audit.summary["timings_s"]["sampling"]
    np.testing.assert_array_equal(again.draws.posterior.theta.values, audit.draws.posterior.theta.values)
    with pytest.raises(InputError, match="different configuration"):
        audit_vfe(beliefs, keep_draws=["tok4"], store_dir=store, **RUN)
    # written next to the table, and read back by ArviZ
    paths = again.write(tmp_path, plots=False)
    back = az.from_netcdf(paths["draws"])
    np.testing.assert_array_equal(back.posterior.theta.values, audit.draws.posterior.theta.values)
    assert back.posterior.attrs["model"] == "normal_normal"


def test_unknown_token_and_all():
    beliefs = _beliefs(C=1, T=5)  # one chunk of 5, as kept_run's: its programs serve
    with pytest.raises(InputError, match="keep_draws.*'tok9' is not in the beliefs"):
        audit_vfe(beliefs, keep_draws=["tok9"], **RUN)
    every = audit_vfe(beliefs, keep_draws="all", **RUN)
    assert every.draws.posterior.theta.shape == (2, 400, 1, 5)


@pytest.mark.slow
def test_multivariate_kept_draws_have_a_component_axis():
    rng = np.random.default_rng(1)
    C, T, K, n = 1, 4, 2, 5
    observed = rng.normal(size=(C, T, n, K))
    eye = np.broadcast_to(np.eye(K), (C, T, K, K))
    beliefs = {"mu_q": observed.mean(2), "cov_q": 0.2 * eye, "observed": observed,
               "prior_mu": np.zeros((C, T, K)), "prior_cov": eye, "obs_cov": eye}
    audit = audit_vfe(beliefs, keep_draws=[2], **{**RUN, "draws": 200, "tune": 200})
    theta = audit.draws.posterior.theta
    assert theta.dims == ("chain", "draw", "checkpoint", "token", "theta_dim_0") and theta.shape == (2, 200, 1, 1, K)
    np.testing.assert_allclose(theta.mean(("chain", "draw")).values[0, 0], audit.extras["mcmc_mean"][2], rtol=1e-10)

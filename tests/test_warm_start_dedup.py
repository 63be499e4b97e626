"""Warm starts from q and sampling each distinct target once, against closed forms and exact
bookkeeping (small problems)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import audit_vfe
from engine.audit import dedup
from engine.errors import InputError

SMALL = dict(sampler="blackjax", chains=4, draws=400, seed=3, num_q_draws=200, progress=False)
Z = 4.0  # |z| bound of the MCSE tests (fixed seeds; about 1 in 16,000 per value by chance)


def _conjugate(rng, T, n=5):
    prior_mu, prior_sigma = rng.normal(size=T) * 3.0, rng.uniform(0.5, 2.0, T)
    obs_sigma = rng.uniform(0.5, 2.0, T)
    observed = rng.normal(size=(T, n)) * obs_sigma[:, None] + prior_mu[:, None]
    n_obs = rng.integers(1, n + 1, T)
    valid = np.arange(n) < n_obs[:, None]
    precision = prior_sigma**-2 + n_obs * obs_sigma**-2
    mean = (prior_mu * prior_sigma**-2 + np.where(valid, observed, 0).sum(-1) * obs_sigma**-2) / precision
    return dict(prior_mu=prior_mu, prior_sigma=prior_sigma, obs_sigma=obs_sigma, observed=observed,
                n_obs=n_obs), mean, precision**-0.5


# --------------------------------------------------------------------------- grouping


def test_group_targets_merges_exactly_the_identical_inputs():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 6))
    base[3] = base[0]  # tokens 0 and 3: the same observations, different priors
    observed = np.concatenate([base, base, base])  # 3 "checkpoints" x 4 tokens
    observed[4 + 1, 2] = np.nextafter(observed[4 + 1, 2], np.inf)  # one bit, token 1 at checkpoint 1
    prior = np.tile([0.0, 1.0, 1.0, 2.0], 3)
    prior[8 + 0] = -0.0  # token 0 at checkpoint 2: -0.0 differs from 0.0 in one bit
    num_rows = np.tile([6, 6, 3, 6], 3)
    num_rows[4 + 3] = 5  # token 3 at checkpoint 1: another row count
    g = dedup.group_targets({"observed": observed, "prior_mu": prior}, num_rows)
    groups = {tuple(int(p) for p in row[mask]) for row, mask in zip(g.members, g.member_mask)}
    assert groups == {(0, 4), (8,), (1, 9), (5,), (2, 6, 10), (3, 11), (7,)}
    assert g.num_problems == 12 and g.num_targets == 7
    np.testing.assert_array_equal(g.members[g.target_of, g.slot_of], np.arange(12))
    np.testing.assert_array_equal(g.latest[g.target_of[[2, 6, 10]]], [10, 10, 10])
    assert g.target_of[0] != g.target_of[3]  # equal observations, different prior: not merged


def test_group_targets_checks_bytes_when_digests_collide(monkeypatch):
    """Every digest forced equal: the groups must still be exactly the identical rows."""
    monkeypatch.setattr(dedup, "_digests", lambda matrix, header: [b"same"] * matrix.shape[0])
    a = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5], [1.0, 2.5], [3.0, 2.0]])
    g = dedup.group_targets({"observed": a})
    np.testing.assert_array_equal(g.target_of, [0, 0, 1, 1, 2])


def test_group_targets_splits_large_groups_and_identity():
    g = dedup.group_targets({"observed": np.zeros((5, 2))}, max_members=2)
    assert g.num_targets == 3 and g.max_members == 2
    assert g.member_mask.sum() == 5
    np.testing.assert_array_equal(g.members[g.target_of, g.slot_of], np.arange(5))
    i = dedup.identity_groups(4)
    np.testing.assert_array_equal(i.target_of, np.arange(4))
    np.testing.assert_array_equal(i.latest, np.arange(4))


# --------------------------------------------------------------------------- warm starts


def test_problem_starts_draw_half_the_chains_from_the_start_data():
    import engine.sampling.batch as batch
    from engine.sampling.api import compile_for
    from engine.audit import vfe_models
    from engine.audit.inputs import make_problem_data

    model = vfe_models.normal_normal()
    data = make_problem_data({"observed": np.zeros((1, 3)), "prior_mu": np.zeros(1), "prior_sigma": np.ones(1),
                              "obs_sigma": np.ones(1)}, np.array([3]))
    compiled = compile_for(model, data)
    config = batch.BatchConfig(keep_draws=False)
    arrays = {k: jnp.asarray(v[0]) for k, v in data.device_arrays().items()}
    arrays[batch.START_MEAN] = jnp.array([50.0])
    arrays[batch.START_SCALE] = jnp.array([1e-3])
    starts = jax.jit(lambda a: batch.problem_starts(compiled, config, jax.random.PRNGKey(0), 0, a))
    positions, ok, _ = starts(arrays)
    positions = np.asarray(positions)[:, 0]
    assert np.asarray(ok).all()
    assert np.all(np.abs(positions[:2] - 50.0) < 0.01)  # chains // 2 from the start data
    assert np.all(np.abs(positions[2:]) <= 1.0)  # the others: the usual jitter around 0
    cold, _, _ = starts({k: v for k, v in arrays.items() if not k.startswith("__start")})
    np.testing.assert_array_equal(np.asarray(cold)[2:, 0], positions[2:])  # their streams unchanged


@pytest.mark.parametrize("name", ["blackjax", "numpyro", "stepwise", "chees"])
def test_kernels_start_from_the_given_inverse_mass_matrix(name):
    from engine.sampling.kernels import KernelSettings, get_kernel
    from engine.sampling.kernels.base import Schedule

    kernel = get_kernel(name)
    alg = kernel.build(lambda x: -0.5 * jnp.sum(x**2 / 0.01), KernelSettings(), Schedule(0 if name != "chees" else 50, 10))
    imm = jnp.array([0.01, 0.04])
    if kernel.chains_inside:
        state = alg.init(jax.random.split(jax.random.PRNGKey(0), 2), jnp.zeros((2, 2)), inverse_mass_matrix=imm)
        np.testing.assert_allclose(state.inverse_mass_matrix, imm)
        np.testing.assert_allclose(state.step_size, 0.1)  # initial step x smallest scale
        return
    state = alg.init(jax.random.PRNGKey(0), jnp.zeros(2), inverse_mass_matrix=imm)
    found = {"blackjax": lambda s: s.inverse_mass_matrix, "numpyro": lambda s: s.adapt_state.inverse_mass_matrix,
             "stepwise": lambda s: s.adaptation.inverse_mass_matrix}[name](state)
    np.testing.assert_allclose(found, imm)
    dense = kernel.build(lambda x: -0.5 * jnp.sum(x**2), KernelSettings(dense_mass=True), Schedule(0, 10))
    state = dense.init(jax.random.PRNGKey(0), jnp.zeros(2), inverse_mass_matrix=imm)  # diagonal -> dense
    found = {"blackjax": lambda s: s.inverse_mass_matrix, "numpyro": lambda s: s.adapt_state.inverse_mass_matrix,
             "stepwise": lambda s: s.adaptation.inverse_mass_matrix}[name](state)
    np.testing.assert_allclose(found, jnp.diag(imm))


@pytest.fixture(scope="module")
def conjugate_beliefs():
    """3 checkpoints x 6 tokens of one conjugate-normal target set; q improves with the
    checkpoint. Token 5's observations differ at checkpoint 2 by one bit (a distinct target)."""
    rng = np.random.default_rng(7)
    T = 6
    fields, mean, sd = _conjugate(rng, T)
    observed = np.stack([fields["observed"]] * 3)
    observed[2, 5, 0] = np.nextafter(observed[2, 5, 0], np.inf)
    shift = np.array([1.5, 0.5, 0.0])[:, None]
    arrays = {**fields, "observed": observed, "n_obs": np.stack([fields["n_obs"]] * 3),
              "mu_q": mean[None, :] + shift * sd[None, :], "sigma_q": sd[None, :] * np.array([0.5, 0.8, 1.0])[:, None],
              "checkpoint": np.array(["early", "mid", "late"])}
    return arrays, mean, sd


@pytest.fixture(scope="module")
def audits(conjugate_beliefs):
    arrays = conjugate_beliefs[0]
    deduped = audit_vfe(arrays, keep_draws="all", **SMALL)
    plain = audit_vfe(arrays, dedup=False, warm_start=False, tune=200, **SMALL)
    return deduped, plain


def test_warm_started_audit_matches_the_closed_form(conjugate_beliefs, audits):
    _, mean, sd = conjugate_beliefs
    deduped, _ = audits
    t = deduped.table
    assert deduped.summary["settings"]["warm_start"] and deduped.summary["settings"]["tune"] == 200
    z_mean = (t.mcmc_mean - np.tile(mean, 3)) / t.mcmc_mcse
    mcse_sd = t.mcmc_std / np.sqrt(2 * t.ess_bulk)  # Gaussian draws
    z_sd = (t.mcmc_std - np.tile(sd, 3)) / mcse_sd
    assert np.abs(z_mean).max() < Z and np.abs(z_sd).max() < Z
    # 4 x 400 draws of a 1-D normal: R-hat's sampling sd is ~0.003, so 1.01 is crossed by chance
    # (one target of seven here, in float32); 1.02 is ~6 sd, a real mixing failure
    assert (t.r_hat < 1.02).all() and (t.divergences == 0).all()


def test_dedup_samples_each_distinct_target_once(audits):
    deduped, plain = audits
    assert deduped.summary["targets"] == {"problems": 18, "distinct_sampled": 7}
    assert plain.summary["targets"] == {"problems": 18, "distinct_sampled": 18}
    t = deduped.table
    by_ckpt = {c: g.reset_index(drop=True) for c, g in t.groupby("checkpoint", sort=False)}
    for col in ("mcmc_mean", "mcmc_std", "r_hat", "ess_bulk"):  # the target's columns: shared
        np.testing.assert_array_equal(by_ckpt["early"][col], by_ckpt["mid"][col])
        np.testing.assert_array_equal(by_ckpt["early"][col][:5], by_ckpt["late"][col][:5])
        assert by_ckpt["early"][col][5] != by_ckpt["late"][col][5]  # the one-bit target: its own run
    for col in ("kl_q_mcmc", "coverage", "pareto_k"):  # q's columns: per checkpoint
        assert np.all(by_ckpt["early"][col] != by_ckpt["late"][col])
    from engine.audit.report import summary_text

    assert "7 distinct targets sampled for 18" in summary_text(deduped.summary)


def test_dedup_q_columns_equal_a_per_problem_computation(audits):
    deduped, plain = audits
    t = deduped.table
    # PSIS k-hat of q: q's draws are keyed by the problem, the target is the same -> equal
    np.testing.assert_allclose(t.pareto_k, plain.table.pareto_k, rtol=1e-9, atol=1e-9)
    # coverage of q's 90% interval, recomputed on the host from each problem's kept draws
    theta = deduped.draws.posterior["theta"].values  # [chain, draw, checkpoint, token]
    mu = t.vfe_mean.to_numpy().reshape(3, 6)
    sdq = t.vfe_std.to_numpy().reshape(3, 6)
    inside = np.abs(theta - mu) <= 1.6448536269514722 * sdq
    np.testing.assert_allclose(inside.mean((0, 1)).ravel(), t.coverage, atol=1e-12)


def test_dedup_target_columns_agree_with_per_problem_sampling(conjugate_beliefs, audits):
    _, mean, _ = conjugate_beliefs
    deduped, plain = audits
    a, b = deduped.table, plain.table
    z = (a.mcmc_mean - b.mcmc_mean) / np.sqrt(a.mcmc_mcse**2 + b.mcmc_mcse**2)
    assert np.abs(z).max() < Z
    np.testing.assert_allclose(a.kl_q_exact, b.kl_q_exact, rtol=1e-12)


def test_dedup_audit_resumes_from_its_store(conjugate_beliefs, tmp_path):
    arrays = conjugate_beliefs[0]
    kw = dict(SMALL, keep_draws="all", store_dir=tmp_path / "store")  # the fixture's program: no compile
    first = audit_vfe(arrays, **kw)
    again = audit_vfe(arrays, **kw)  # everything from the store
    cols = ["mcmc_mean", "kl_q_mcmc", "coverage", "pareto_k", "r_hat"]
    np.testing.assert_array_equal(first.table[cols].to_numpy(), again.table[cols].to_numpy())
    np.testing.assert_array_equal(first.draws.posterior.theta.values, again.draws.posterior.theta.values)
    assert again.summary["targets"]["distinct_sampled"] == 7


def test_bad_options_name_the_field(conjugate_beliefs):
    arrays = conjugate_beliefs[0]
    with pytest.raises(InputError, match="analysis.warm_start"):
        audit_vfe(arrays, warm_start="yes")
    with pytest.raises(InputError, match="analysis.dedup"):
        audit_vfe(arrays, dedup=1)
    from omegaconf import OmegaConf

    from engine.analyses import vfe_audit

    with pytest.raises(InputError, match="analysis.warm_start_tune"):
        vfe_audit._warm_start_tune(OmegaConf.create({"warm_start_tune": -5}))
    with pytest.raises(InputError, match="analysis.dedup"):
        vfe_audit._flag(OmegaConf.create({"dedup": "no"}), "dedup", True)
    assert vfe_audit._warm_start_tune(OmegaConf.create({"warm_start_tune": None})) is None


def test_warm_start_falls_back_for_a_transformed_latent():
    import pymc as pm

    from engine.audit.warm_start import warm_start_supported
    from engine.sampling.api import compile_for
    from engine.audit.inputs import make_problem_data
    from engine.sampling.kernels import get_kernel

    with pm.Model() as model:
        observed = pm.Data("observed", np.zeros(2))
        theta = pm.HalfNormal("theta", 1.0)
        pm.Normal("y", theta, 1.0, observed=observed)
    compiled = compile_for(model, make_problem_data({"observed": np.ones((2, 3))}, np.array([3, 3])))
    warm = warm_start_supported(compiled, get_kernel("blackjax"))
    assert not warm.applied and "theta_log__" in warm.reason
    assert not warm_start_supported(compiled, get_kernel("pymc")).applied

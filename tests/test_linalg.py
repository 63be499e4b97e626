"""``engine.model.linalg.solve_triangular`` against SciPy, and the PyTensor dispatch that uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from engine.model.linalg import MAX_UNROLLED, cholesky, solve_triangular


@pytest.mark.parametrize("size", [1, 3, 8, MAX_UNROLLED, MAX_UNROLLED + 1])
@pytest.mark.parametrize("lower, trans, unit", [(True, False, False), (False, False, False),
                                                (True, True, False), (False, True, True)])
@pytest.mark.parametrize("rhs", [(), (5,)])
def test_matches_scipy(size, lower, trans, unit, rhs):
    rng = np.random.default_rng(size)
    a = rng.normal(size=(size, size)) + 3 * np.eye(size)
    a = np.tril(a) if lower else np.triu(a)
    b = rng.normal(size=(size,) + rhs)
    want = scipy.linalg.solve_triangular(a, b, lower=lower, trans=1 if trans else 0, unit_diagonal=unit)
    got = solve_triangular(a, b, lower=lower, trans=trans, unit_diagonal=unit)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 5, MAX_UNROLLED, MAX_UNROLLED + 1])
def test_cholesky_matches_numpy_and_flags_non_pd(size):
    rng = np.random.default_rng(size)
    m = rng.normal(size=(size, size))
    a = m @ m.T + size * np.eye(size)
    np.testing.assert_allclose(np.asarray(cholesky(a)), np.linalg.cholesky(a), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(cholesky(a, lower=False)), np.linalg.cholesky(a).T, rtol=1e-10, atol=1e-12)
    if size > 1:
        bad = a.copy()
        bad[-1, -1] = -1.0
        assert np.isnan(np.asarray(cholesky(bad))).any()


def test_vmaps_differentiates_and_uses_no_lapack_call():
    rng = np.random.default_rng(0)
    a = np.tril(rng.normal(size=(50, 4, 4))) + 3 * np.eye(4)
    b = rng.normal(size=(50, 4, 7))
    fn = jax.vmap(lambda x, y: solve_triangular(x, y, lower=True))
    np.testing.assert_allclose(np.asarray(fn(a, b)), np.linalg.solve(a, b), rtol=1e-10, atol=1e-12)
    assert "lapack" not in jax.jit(fn).lower(a, b).as_text()
    grad = jax.grad(lambda y: solve_triangular(a[0], y, lower=True).sum())(b[0])
    np.testing.assert_allclose(np.asarray(grad), np.linalg.solve(a[0].T, np.ones((4, 7))), rtol=1e-10)


def test_mvnormal_template_compiles_without_lapack_trsm():
    """pm.MvNormal with a Cholesky factor: the engine's log density has no LAPACK custom call and
    equals PyMC's own logp."""
    import pymc as pm

    from engine.model.compile import compile_model, prepare_data

    K = 3
    with pm.Model() as model:
        y = pm.Data("y", np.zeros((5, K)))
        chol = pm.Data("chol", np.eye(K))
        theta = pm.MvNormal("theta", mu=np.zeros(K), chol=2 * np.eye(K))
        pm.MvNormal("obs", mu=theta, chol=chol, observed=y)
    rng = np.random.default_rng(1)
    L = np.tril(rng.normal(size=(2, K, K))) + 2 * np.eye(K)
    data = {"y": rng.normal(size=(2, 5, K)), "chol": L}
    pdata = prepare_data(model, data)
    compiled = compile_model(model, pdata)
    arrays = {k: jnp.asarray(v) for k, v in pdata.device_arrays().items()}
    x = jnp.asarray(rng.normal(size=K))
    fn = jax.jit(jax.vmap(compiled.logdensity_fn, in_axes=(None, 0)))
    assert "lapack" not in fn.lower(x, arrays).as_text()
    got = np.asarray(fn(x, arrays))
    for p in range(2):
        pm.set_data({"y": data["y"][p], "chol": L[p]}, model=model)
        want = model.compile_logp()({"theta": np.asarray(x)})
        np.testing.assert_allclose(got[p], want, rtol=1e-10)


@pytest.mark.parametrize("is_inv", [True, False])
def test_blackjax_dense_metric_factors_without_lapack(is_inv):
    """BlackJAX's dense Euclidean metric, as the engine registers it, gives the factors of its own
    (LAPACK) version and lowers with no LAPACK call, vmapped as the kernels run it."""
    from blackjax.mcmc import metrics

    from engine.model import linalg

    linalg.register_blackjax()
    original = linalg._BLACKJAX_FORMAT_COVARIANCE[0]
    assert metrics._format_covariance is linalg._format_covariance
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        m = rng.normal(size=(6, 5, 5))
        cov = jnp.asarray(m @ np.swapaxes(m, 1, 2) + 5 * np.eye(5))
        ours = jax.vmap(lambda c: linalg._format_covariance(c, is_inv)[:2])(cov)
        ref = jax.vmap(lambda c: original(c, is_inv)[:2])(cov)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        metric = jax.vmap(lambda c, p: metrics.gaussian_euclidean(c).kinetic_energy(p))
        text = jax.jit(metric).lower(cov, jnp.ones((6, 5))).as_text()
        assert "lapack" not in text
        diagonal = jnp.ones((6, 5)) * 4.0  # a diagonal metric: BlackJAX's own code
        np.testing.assert_array_equal(np.asarray(jax.vmap(lambda c: linalg._format_covariance(c, True)[0])(diagonal)),
                                      np.asarray(jax.vmap(lambda c: original(c, True)[0])(diagonal)))

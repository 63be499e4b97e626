"""Triangular solves and Cholesky factors of small matrices in plain XLA ops (no LAPACK call).

On CPU, jaxlib 0.10.2 lowers a batched (vmapped) ``solve_triangular`` to ``lapack_?trsm_ffi``,
which splits its batch over XLA's intra-op thread pool (``ParallelBatchMap``) and blocks its own
pool thread until the pieces finish. When every pool thread (one per core) sits in such a call,
no thread is left to run the pieces and the program never finishes: seen on this 2-core machine
in the multivariate audit (the MvNormal template's log density and the coverage summary), with
two threads both waiting in ``lapack_dtrsm_ffi``. A bigger pool (``NPROC``) avoids it but costs
about a quarter of NUTS's throughput on w1.

For the engine's matrices (K <= ``MAX_UNROLLED``: belief dimensions, mass matrices) forward or
back substitution written out over the K rows is as fast and cannot deadlock: it is K(K+1)/2
fused multiply-adds on the right-hand side, vectorised by ``vmap`` like any other op; the same
holds for the Cholesky factor (``lapack_?potrf_ffi``, K^3/6 operations). Larger matrices keep
``jax.scipy.linalg``.

:func:`register_pytensor` makes PyTensor's JAX backend use them for ``SolveTriangular`` and
``Cholesky`` (what ``pm.MvNormal``'s logp compiles to); ``engine.model.compile`` calls it
before converting a template. :func:`register_blackjax` does the same for BlackJAX's dense
Euclidean metric (a dense mass matrix's factors), which the kernels import it for; the
engine's own dense kernels call these functions directly. It is the same mathematics, so other PyTensor-to-JAX users in the
process are unaffected in their results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["solve_triangular", "cholesky", "register_pytensor", "register_blackjax", "MAX_UNROLLED"]

MAX_UNROLLED = 16
"""Largest matrix side solved by written-out substitution."""


def solve_triangular(a, b, *, lower: bool, trans: bool = False, unit_diagonal: bool = False):
    """Solve ``a x = b`` (or ``a^T x = b`` with ``trans``) for triangular ``a [K, K]``.

    ``b`` is ``[K]`` or ``[K, m]``. Matrices larger than ``MAX_UNROLLED`` or with batch axes go
    to ``jax.scipy.linalg.solve_triangular``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    size = a.shape[-1]
    if a.ndim != 2 or b.ndim not in (1, 2) or size > MAX_UNROLLED or b.shape[0] != size:
        return jax.scipy.linalg.solve_triangular(
            a, b, lower=lower, trans=1 if trans else 0, unit_diagonal=unit_diagonal
        )
    if trans:  # a^T is triangular the other way round
        a, lower = a.T, not lower
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    order = range(size) if lower else range(size - 1, -1, -1)
    x = [None] * size
    for i in order:
        acc = b[i]
        for j in (range(i) if lower else range(i + 1, size)):
            acc = acc - a[i, j] * x[j]
        x[i] = acc if unit_diagonal else acc / a[i, i]
    return jnp.stack(x)


def cholesky(a, *, lower: bool = True):
    """Cholesky factor of a symmetric positive definite ``a [K, K]`` (of its symmetrised
    ``(a + a^T) / 2``, as ``jax.scipy.linalg.cholesky``); NaN where ``a`` is not positive definite.
    Matrices larger than ``MAX_UNROLLED`` or with batch axes go to ``jax.scipy.linalg.cholesky``."""
    a = jnp.asarray(a)
    size = a.shape[-1]
    if a.ndim != 2 or size > MAX_UNROLLED:
        return jax.scipy.linalg.cholesky(a, lower=lower)
    a = (a + a.T) / 2
    factor = [[None] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1):
            acc = a[i, j]
            for k in range(j):
                acc = acc - factor[i][k] * factor[j][k]
            factor[i][j] = jnp.sqrt(acc) if i == j else acc / factor[j][j]
    zero = jnp.zeros((), a.dtype)
    rows = [jnp.stack([factor[i][j] if j <= i else zero for j in range(size)]) for i in range(size)]
    out = jnp.stack(rows)
    return out if lower else out.T


def register_pytensor() -> None:
    """Make PyTensor's JAX backend convert ``SolveTriangular`` to :func:`solve_triangular` and
    ``Cholesky`` to :func:`cholesky`."""
    from pytensor.link.jax.dispatch import jax_funcify
    from pytensor.tensor.slinalg import Cholesky, SolveTriangular

    if getattr(register_pytensor, "done", False):
        return

    @jax_funcify.register(Cholesky)
    def _funcify_cholesky(op, **kwargs):
        lower = op.lower

        def chol(a):
            return cholesky(a, lower=lower).astype(a.dtype)

        return chol

    @jax_funcify.register(SolveTriangular)
    def _funcify(op, **kwargs):
        lower, unit_diagonal = op.lower, op.unit_diagonal

        def solve(a, b):
            return solve_triangular(a, b, lower=lower, unit_diagonal=unit_diagonal)

        return solve

    register_pytensor.done = True


def _format_covariance(cov, is_inv):
    """``blackjax.mcmc.metrics._format_covariance`` with :func:`cholesky` and
    :func:`solve_triangular` (the same factors; no LAPACK call for the engine's sizes)."""
    if jnp.ndim(cov) != 2:
        return _BLACKJAX_FORMAT_COVARIANCE[0](cov, is_inv)
    identity = jnp.identity(cov.shape[0], dtype=cov.dtype)
    if is_inv:
        inv_cov_sqrt = cholesky(cov, lower=True)
        cov_sqrt = solve_triangular(inv_cov_sqrt, identity, lower=True, trans=True)
    else:
        cov_sqrt = cholesky(cov, lower=False).T
        inv_cov_sqrt = solve_triangular(cov_sqrt, identity, lower=True, trans=True)
    return cov_sqrt, inv_cov_sqrt, jnp.diag


_BLACKJAX_FORMAT_COVARIANCE: list = []


def register_blackjax() -> None:
    """Make BlackJAX's dense Euclidean metric factor the mass matrix with :func:`cholesky` and
    :func:`solve_triangular` (see the module docstring: a dense mass matrix's batched LAPACK
    calls deadlocked XLA:CPU's pool with two devices running at once). Idempotent."""
    from blackjax.mcmc import metrics

    if not _BLACKJAX_FORMAT_COVARIANCE:
        _BLACKJAX_FORMAT_COVARIANCE.append(metrics._format_covariance)
        metrics._format_covariance = _format_covariance

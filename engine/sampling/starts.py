"""Where each chain starts: jittered points with a finite log density, or warm starts drawn
around a per-problem centre (``START_MEAN``/``START_SCALE`` in the problem's data), and the key
streams each problem and chain draw from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from engine.model.compile import CompiledModel
    from engine.sampling.batch import BatchConfig

__all__ = ["START_MEAN", "START_SCALE", "START_INVERSE_MASS", "WARM_START_STREAM", "init_positions",
           "problem_starts", "warm_positions"]

START_MEAN = "__start_mean__"
"""Optional per-problem data ``[dim]`` (unconstrained space): centre of the warm starts."""

START_SCALE = "__start_scale__"
"""Optional per-problem data: the warm starts' scale, ``[dim]`` (independent normals) or a lower
Cholesky factor ``[dim, dim]``; the caller inflates it (starts must be overdispersed)."""

START_INVERSE_MASS = "__start_inverse_mass__"
"""Optional per-problem data ``[dim]`` or ``[dim, dim]``: the inverse mass matrix every chain's
kernel starts (and its adaptation starts) from."""

WARM_START_STREAM = 0x57
"""Extra ``fold_in`` tag of a chain's init key for its warm-start draws, so the jittered-start
chains keep exactly the stream they have without warm starts."""


def _problem_key(root_key, index):
    return jax.random.fold_in(root_key, index)


def init_positions(rng_key, logdensity_fn: Callable, initial_position, num_tries: int, jitter: float):
    """One chain's start: the first of ``num_tries`` jittered points with a finite log density.

    Returns ``(position [dim], is_finite)``; when no try is finite the unjittered point is
    returned with ``is_finite=False``.
    """
    dim = initial_position.shape[-1]
    noise = jax.random.uniform(rng_key, (num_tries, dim), minval=-jitter, maxval=jitter)
    candidates = initial_position[None, :] + noise.astype(initial_position.dtype)
    lps = jax.vmap(logdensity_fn)(candidates)
    finite = jnp.isfinite(lps)
    first = jnp.argmax(finite)
    ok = jnp.any(finite)
    position = jnp.where(ok, candidates[first], initial_position)
    return position, ok


def _chain_keys(root_key, index, chains):
    keys = jax.random.split(_problem_key(root_key, index), chains)
    return jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [chains, 2]: (init, run)


def problem_starts(compiled: CompiledModel, config: BatchConfig, root_key, index, data):
    """ONE problem: starts ``[chains, dim]``, their finiteness, and the run keys.

    Jittered starts, except that with ``START_MEAN``/``START_SCALE`` in ``data`` the first
    ``chains // 2`` chains start from :func:`warm_positions` (see the module docstring).
    """
    logdensity_fn = lambda x: compiled.logdensity_fn(x, data)  # noqa: E731
    keys = _chain_keys(root_key, index, config.sampler.chains)
    start = jnp.asarray(compiled.initial_position, dtype=jnp.result_type(float))
    positions, ok = jax.vmap(
        lambda k: init_positions(k, logdensity_fn, start, config.sampler.init_tries, config.sampler.jitter)
    )(keys[:, 0])
    num_warm = int(config.sampler.chains) // 2
    if START_MEAN in data and num_warm > 0:
        warm, warm_ok = jax.vmap(
            lambda k, x: warm_positions(jax.random.fold_in(k, WARM_START_STREAM), logdensity_fn, data[START_MEAN],
                                        data[START_SCALE], x, config.sampler.init_tries)
        )(keys[:num_warm, 0], positions[:num_warm])
        positions = jnp.concatenate([warm, positions[num_warm:]])
        ok = jnp.concatenate([warm_ok | ok[:num_warm], ok[num_warm:]])
    return positions, ok, keys[:, 1]


def warm_positions(rng_key, logdensity_fn: Callable, mean, scale, fallback, num_tries: int):
    """One chain's warm start: the first of ``num_tries`` draws ``mean + scale * N(0, I)``
    (``scale`` ``[dim]``, or a lower Cholesky factor ``[dim, dim]``) with a finite log density.

    Returns ``(position [dim], is_finite)``; when no draw is finite, ``fallback`` (the chain's
    jittered start) is returned with ``is_finite=False``.
    """
    dtype = fallback.dtype
    mean, scale = jnp.asarray(mean, dtype), jnp.asarray(scale, dtype)
    eps = jax.random.normal(rng_key, (num_tries,) + mean.shape, dtype)
    candidates = mean[None, :] + (eps @ scale.T if scale.ndim == 2 else eps * scale[None, :])
    finite = jnp.isfinite(jax.vmap(logdensity_fn)(candidates)) & jnp.all(jnp.isfinite(candidates), axis=-1)
    ok = jnp.any(finite)
    return jnp.where(ok, candidates[jnp.argmax(finite)], fallback), ok

"""ChEES-adapted jittered HMC with a dense mass matrix, for correlated posteriors.

A dense inverse mass matrix ``Sigma`` is the same as running HMC with a unit mass matrix on the
linearly whitened coordinates ``y = C^{-1} (x - m)``, ``Sigma = C C^T``. BlackJAX's ChEES
adaptation estimates a diagonal matrix only, so this kernel whitens:

1. the first half of warmup is ``blackjax.chees_adaptation`` (diagonal) on ``x``; the chains'
   pooled draws of its second half (every chain, every step) give the mean ``m`` and covariance
   ``Sigma``, regularised towards the identity as Stan regularises its dense metric
   (``n / (n + 5) Sigma + 1e-3 * 5 / (n + 5) I``);
2. the second half is ChEES adaptation again (diagonal, to absorb what ``C`` missed) on the
   density of ``y``, ``logp(m + C y)`` (the Jacobian is a constant);
3. sampling runs ``blackjax.dynamic_hmc`` on ``y`` and reports ``x = m + C y``.

Everything else is :mod:`engine.sampling.kernels.chees_hmc`: all of a problem's chains at once
(``chains_inside``), the Halton jitter shared by every lane, ``max_tree_depth`` capping a
trajectory. Needs chains >= 2 and ``num_tune >= 100`` (two ChEES warmups of at least 50).
The energy and step size reported are those of the whitened coordinates.
"""

from __future__ import annotations

from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from blackjax.adaptation.base import get_filter_adapt_info_fn
from blackjax.mcmc.dynamic_hmc import DynamicHMCState, halton_sequence

from engine.model import linalg
from engine.errors import InputError
from engine.sampling.kernels.base import (
    OPTIMAL_HMC_TARGET_ACCEPT, Kernel, KernelSettings, LogDensityFn, SampleStats, SamplingAlgorithm, Schedule, Transition,
)
from engine.sampling.kernels.chees_hmc import LEARNING_RATE, MIN_CHAINS, chains_step, warmup_start
from engine.sampling.kernels.chees_hmc import MIN_TUNE as MIN_TUNE_PER_STAGE

MIN_TUNE = 2 * MIN_TUNE_PER_STAGE
"""Fewest warmup steps: two ChEES adaptations (diagonal, then on whitened coordinates)."""

REGULARISATION = 5.0
"""Stan's shrinkage of the estimated covariance towards ``1e-3 * I``: weight ``n / (n + 5)``."""


class DenseChEESState(NamedTuple):
    """All chains of one problem between transitions.

    hmc
        BlackJAX's ``DynamicHMCState`` of every chain, in whitened coordinates ``y``.
    step_size, inverse_mass_matrix, mean_num_steps, rng_key, num_done
        As :class:`~engine.sampling.kernels.chees_hmc.ChEESState` (the matrix is the residual
        diagonal ``[dim]`` on ``y``).
    shift, chol
        ``m [dim]`` and the Cholesky factor ``C [dim, dim]`` of the estimated covariance:
        ``x = m + C y`` (zero and the identity before warmup).
    """

    hmc: DynamicHMCState
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    mean_num_steps: jax.Array
    rng_key: jax.Array
    num_done: jax.Array
    shift: jax.Array
    chol: jax.Array


def check(chains: int, tune: int, settings: KernelSettings) -> None:
    """Dense ChEES adapts across chains and needs two warmup stages."""
    if int(chains) < MIN_CHAINS:
        raise InputError(f"sampler 'chees_dense' adapts across chains: needs chains >= {MIN_CHAINS}, got {chains}")
    if int(tune) < MIN_TUNE:
        raise InputError(f"sampler 'chees_dense' needs tune >= {MIN_TUNE} warmup steps (two stages), got {tune}")


def _whitened(logdensity_fn, shift, chol):
    return lambda y: logdensity_fn(shift + chol @ y)


def pooled_covariance(draws):
    """``draws [steps, chains, dim]`` -> (mean ``[dim]``, regularised covariance ``[dim, dim]``)."""
    flat = draws.reshape(-1, draws.shape[-1])
    n = flat.shape[0]
    mean = jnp.mean(flat, axis=0)
    centred = flat - mean[None, :]
    cov = centred.T @ centred / (n - 1)
    eye = jnp.eye(flat.shape[-1], dtype=flat.dtype)
    return mean, (n / (n + REGULARISATION)) * cov + 1e-3 * (REGULARISATION / (n + REGULARISATION)) * eye


def build(logdensity_fn: LogDensityFn, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm:
    """Dense-mass ChEES HMC bound to one problem (see :class:`~engine.sampling.kernels.base.Kernel`)."""
    max_steps = 2**settings.max_tree_depth - 1
    tune1 = schedule.num_tune // 2
    tune2 = schedule.num_tune - tune1
    max_bits = np.ceil(np.log2(tune2 + schedule.num_draws))

    def integration_steps_fn(random_generator_arg, num_leapfrog_steps):
        jitter = halton_sequence(random_generator_arg, max_bits)
        return jnp.asarray(jnp.ceil(jitter * num_leapfrog_steps), dtype=int)

    def adapt(key, logdensity, positions, step_size, num_steps, keep_positions):
        adaptation = blackjax.chees_adaptation(
            logdensity,
            positions.shape[0],
            target_acceptance_rate=settings.target_accept,
            max_leapfrog_steps=max_steps,
            adaptation_info_fn=get_filter_adapt_info_fn(state_keys={"position"} if keep_positions else set()),
            mass_matrix_estimation="diagonal",
        )
        with jax.numpy_rank_promotion("allow"):
            return adaptation.run(key, positions, step_size=step_size, optim=optax.adam(LEARNING_RATE),
                                  num_steps=num_steps, max_sampling_steps=schedule.num_draws)

    def init(rng_keys, positions, inverse_mass_matrix=None) -> DenseChEESState:
        del inverse_mass_matrix  # a warm start's metric is not used: this warmup learns its own from scratch
        num_chains, dim = positions.shape
        hmc = jax.vmap(lambda x: blackjax.dynamic_hmc.init(x, logdensity_fn, jnp.zeros((), int)))(positions)
        return DenseChEESState(
            hmc=hmc,
            step_size=jnp.asarray(settings.initial_step_size, positions.dtype),
            inverse_mass_matrix=jnp.ones(dim, positions.dtype),
            mean_num_steps=jnp.ones((), positions.dtype),
            rng_key=rng_keys[0],
            num_done=jnp.zeros((), jnp.int32),
            shift=jnp.zeros(dim, positions.dtype),
            chol=jnp.eye(dim, dtype=positions.dtype),
        )

    def warmup(state: DenseChEESState) -> DenseChEESState:
        key1, key2, sample_key = jax.random.split(state.rng_key, 3)
        x = state.hmc.position
        # the first stage starts as chees_hmc's warmup does
        step_size, _ = warmup_start(logdensity_fn, jax.random.fold_in(key1, 1), state.hmc, state.step_size,
                                    settings.target_accept)
        (first, parameters), info = adapt(key1, logdensity_fn, x, step_size, tune1, True)
        draws = info.state.position[tune1 // 2:]  # [steps, chains, dim], the second half
        shift, cov = pooled_covariance(draws)
        chol = linalg.cholesky(cov)
        y = linalg.solve_triangular(chol, (first.position - shift[None, :]).T, lower=True).T
        # the first stage's step size is already in (diagonally) whitened units
        (hmc, parameters), _ = adapt(key2, _whitened(logdensity_fn, shift, chol), y,
                                     parameters["step_size"], tune2, False)
        (mean_steps,) = parameters["integration_steps_params"]
        return state._replace(
            hmc=hmc,
            step_size=parameters["step_size"],
            inverse_mass_matrix=parameters["inverse_mass_matrix"],
            mean_num_steps=jnp.minimum(mean_steps, max_steps),
            rng_key=sample_key,
            shift=shift,
            chol=chol,
        )

    def step(state: DenseChEESState) -> tuple[DenseChEESState, Transition]:
        hmc, _, stats = chains_step(_whitened(logdensity_fn, state.shift, state.chol), integration_steps_fn, state)
        x = state.shift[None, :] + hmc.position @ state.chol.T
        return state._replace(hmc=hmc, num_done=state.num_done + 1), Transition(x, stats)

    return SamplingAlgorithm(init=init, warmup=warmup, step=step)


KERNEL = Kernel(
    name="chees_dense", description="ChEES jittered HMC, dense mass", build=build, chains_inside=True, check=check,
    target_accept=OPTIMAL_HMC_TARGET_ACCEPT,
)

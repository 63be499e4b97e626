"""BlackJAX NUTS for one posterior: Stan-style window adaptation, then sampling.

Hoffman & Gelman (2014) NUTS with multinomial sampling; warmup follows Stan's windowed
adaptation of step size (dual averaging) and inverse mass matrix (Welford), as implemented in
``blackjax.window_adaptation``.
"""

from __future__ import annotations

from typing import Callable

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.base import get_filter_adapt_info_fn

from engine.samplers import NUTSSettings, SampleStats


def warmup(rng_key, logdensity_fn: Callable, position, num_steps: int, settings: NUTSSettings):
    """Adapt step size and inverse mass matrix; returns ``(HMCState, parameters)``.

    ``parameters`` holds ``step_size`` (scalar) and ``inverse_mass_matrix`` (``[dim]`` or
    ``[dim, dim]``). With ``num_steps == 0`` the initial step size and an identity mass matrix
    are returned unchanged.
    """
    dim = position.shape[-1]
    if num_steps == 0:
        imm = jnp.eye(dim) if settings.dense_mass else jnp.ones(dim)
        state = blackjax.nuts.init(position, logdensity_fn)
        return state, {"step_size": jnp.asarray(settings.initial_step_size), "inverse_mass_matrix": imm}
    adaptation = blackjax.window_adaptation(
        blackjax.nuts,
        logdensity_fn,
        is_mass_matrix_diagonal=not settings.dense_mass,
        initial_step_size=settings.initial_step_size,
        target_acceptance_rate=settings.target_accept,
        adaptation_info_fn=get_filter_adapt_info_fn(),
        max_num_doublings=settings.max_tree_depth,
    )
    (state, parameters), _ = adaptation.run(rng_key, position, num_steps)
    return state, parameters


def sample(rng_key, logdensity_fn: Callable, state, parameters, num_draws: int, settings: NUTSSettings):
    """Draw ``num_draws`` NUTS transitions; returns ``(positions [num_draws, dim], SampleStats)``."""
    kernel = blackjax.nuts(
        logdensity_fn,
        step_size=parameters["step_size"],
        inverse_mass_matrix=parameters["inverse_mass_matrix"],
        max_num_doublings=settings.max_tree_depth,
    )

    def one_step(state, key):
        state, info = kernel.step(key, state)
        stats = SampleStats(
            diverging=info.is_divergent,
            tree_depth=info.num_trajectory_expansions,
            n_steps=info.num_integration_steps,
            energy=info.energy,
            lp=state.logdensity,
            acceptance_rate=info.acceptance_rate,
            step_size=jnp.asarray(parameters["step_size"]),
        )
        return state, (state.position, stats)

    keys = jax.random.split(rng_key, num_draws)
    _, (positions, stats) = jax.lax.scan(one_step, state, keys)
    return positions, stats


def run_chain(rng_key, logdensity_fn, position, *, num_tune: int, num_draws: int, settings: NUTSSettings):
    """Warmup then sample one chain; returns ``(positions [num_draws, dim], SampleStats)``."""
    warmup_key, sample_key = jax.random.split(rng_key)
    state, parameters = warmup(warmup_key, logdensity_fn, position, num_tune, settings)
    return sample(sample_key, logdensity_fn, state, parameters, num_draws, settings)

"""NumPyro NUTS for one posterior through its functional interface (``numpyro.infer.hmc.hmc``).

Warmup (Stan-style windowed adaptation) happens inside NumPyro's ``sample_kernel`` during the
first ``num_warmup`` steps; we run ``num_tune + num_draws`` steps in one ``scan`` and keep the
last ``num_draws``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from numpyro.infer.hmc import hmc

from engine.samplers import NUTSSettings, SampleStats


def run_chain(rng_key, logdensity_fn: Callable, position, *, num_tune: int, num_draws: int, settings: NUTSSettings):
    """Warmup then sample one chain; returns ``(positions [num_draws, dim], SampleStats)``."""
    init_kernel, sample_kernel = hmc(potential_fn=lambda x: -logdensity_fn(x), algo="NUTS")
    state = init_kernel(
        position,
        num_warmup=num_tune,
        step_size=settings.initial_step_size,
        adapt_step_size=num_tune > 0,
        adapt_mass_matrix=num_tune > 0,
        dense_mass=settings.dense_mass,
        target_accept_prob=settings.target_accept,
        max_tree_depth=settings.max_tree_depth,
        rng_key=rng_key,
    )

    def one_step(state, _):
        state = sample_kernel(state)
        n_steps = state.num_steps
        stats = SampleStats(
            diverging=state.diverging,
            tree_depth=(jnp.floor(jnp.log2(jnp.maximum(n_steps, 1).astype(jnp.float32))) + 1).astype(jnp.int32),
            n_steps=n_steps,
            energy=state.energy,
            lp=-state.potential_energy,
            acceptance_rate=state.accept_prob,
            step_size=state.adapt_state.step_size,
        )
        return state, (state.z, stats)

    state, _ = jax.lax.scan(lambda s, x: (sample_kernel(s), None), state, None, length=num_tune)
    _, (positions, stats) = jax.lax.scan(one_step, state, None, length=num_draws)
    return positions, stats

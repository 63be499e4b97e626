"""ChEES-adapted jittered HMC for one posterior (all its chains together).

Hoffman, Radul & Sountsov (2021): plain HMC whose trajectory length is jittered by a Halton
sequence and tuned during warmup by maximising the Change in the Estimator of the Expected
Square (ChEES) across the problem's chains, with the step size by dual averaging and a diagonal
inverse mass matrix estimated from the chains' pooled late-warmup draws
(``blackjax.chees_adaptation`` with ``mass_matrix_estimation="diagonal"``). Sampling then runs
``blackjax.dynamic_hmc`` with the adapted parameters.

Why it is here: under ``vmap`` every NUTS transition waits for the deepest tree of the batch and
pays for NUTS's tree bookkeeping; HMC with one trajectory length per problem and a jitter that is
the same for every problem at a given iteration keeps the lanes in step and costs little more
than its gradients. Cross-chain adaptation is why this kernel takes all of a problem's chains at
once (``MULTI_CHAIN``); ``engine.batch`` still adds the problem axis.

Needs at least 2 chains (the criterion is a cross-chain statistic; 4 or more is better) and a
warmup (``num_tune >= 50``). ``settings.max_tree_depth`` caps a trajectory at
``2**max_tree_depth - 1`` leapfrog steps, as it caps NUTS; ``dense_mass`` is not available.
"""

from __future__ import annotations

from typing import Callable

import blackjax
import jax
import jax.numpy as jnp
import optax
from blackjax.adaptation.base import get_filter_adapt_info_fn

from engine.samplers import NUTSSettings, SampleStats

MULTI_CHAIN = True
"""``run_chains`` takes all of a problem's chains (``[chains, dim]``) at once."""

LEARNING_RATE = 0.025
"""Adam's learning rate for the log trajectory length (TFP's default for ChEES)."""

MIN_TUNE = 50
MIN_CHAINS = 2


def warmup(rng_key, logdensity_fn: Callable, positions, num_steps: int, num_draws: int, settings: NUTSSettings):
    """ChEES warmup of ``positions [chains, dim]`` -> ``(DynamicHMCState of every chain, parameters)``."""
    adaptation = blackjax.chees_adaptation(
        logdensity_fn,
        positions.shape[0],
        target_acceptance_rate=settings.target_accept,
        max_leapfrog_steps=2**settings.max_tree_depth - 1,
        adaptation_info_fn=get_filter_adapt_info_fn(),
        mass_matrix_estimation="diagonal",
    )
    (states, parameters), _ = adaptation.run(
        rng_key,
        positions,
        step_size=settings.initial_step_size,
        optim=optax.adam(LEARNING_RATE),
        num_steps=num_steps,
        max_sampling_steps=num_draws,
    )
    return states, parameters


def sample(rng_key, logdensity_fn: Callable, states, parameters, num_draws: int, settings: NUTSSettings):
    """``num_draws`` jittered-HMC transitions of every chain -> ``(positions [chains, draws, dim], SampleStats)``."""
    max_steps = 2**settings.max_tree_depth - 1
    (mean_steps,) = parameters["integration_steps_params"]
    params = dict(parameters, integration_steps_params=(jnp.minimum(mean_steps, max_steps),))
    kernel = blackjax.dynamic_hmc(logdensity_fn, **params)
    imm = parameters["inverse_mass_matrix"]
    num_chains = jax.tree.leaves(states.position)[0].shape[0]

    def one_step(states, key):
        previous_lp = states.logdensity
        states, info = jax.vmap(kernel.step)(jax.random.split(key, num_chains), states)
        # the Hamiltonian at the state kept (Stan's energy__), for E-BFMI
        start_energy = -previous_lp + 0.5 * jnp.sum(imm * info.momentum**2, axis=-1)
        stats = SampleStats(
            diverging=info.is_divergent,
            tree_depth=jnp.zeros_like(info.num_integration_steps),  # no tree: HMC
            n_steps=info.num_integration_steps,
            energy=jnp.where(info.is_accepted, info.energy, start_energy),
            lp=states.logdensity,
            acceptance_rate=info.acceptance_rate,
            step_size=jnp.broadcast_to(jnp.asarray(parameters["step_size"]), previous_lp.shape),
        )
        return states, (states.position, stats)

    keys = jax.random.split(rng_key, num_draws)
    _, (positions, stats) = jax.lax.scan(one_step, states, keys)
    swap = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  [draw, chain] -> [chain, draw]
    return swap(positions), jax.tree.map(swap, stats)


def run_chains(rng_keys, logdensity_fn, positions, *, num_tune: int, num_draws: int, settings: NUTSSettings):
    """Warmup then sample all chains of one problem.

    ``rng_keys [chains]`` are the problem's per-chain keys (the first drives the shared
    adaptation); ``positions [chains, dim]``. Returns ``(positions [chains, draws, dim], SampleStats)``.
    """
    warmup_key, sample_key = jax.random.split(rng_keys[0])
    # blackjax's ChEES code broadcasts [chains, 1] against [dim] implicitly; allow it while tracing
    # it even where the caller asks JAX to raise on rank promotion (the engine's tests do)
    with jax.numpy_rank_promotion("allow"):
        states, parameters = warmup(warmup_key, logdensity_fn, positions, num_tune, num_draws, settings)
        return sample(sample_key, logdensity_fn, states, parameters, num_draws, settings)

"""Single-problem MCMC kernels.

Each module knows ONE posterior: ``run_chain(rng_key, logdensity_fn, position, *, num_tune,
num_draws, settings) -> (positions [num_draws, dim], SampleStats)``. ``engine.batch`` is the only
place that adds the chain and problem axes (``vmap``). ``pymc_default`` is the baseline that
loops ``pm.sample`` and is not a JAX kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from engine.errors import InputError


class NUTSSettings(NamedTuple):
    """Settings shared by the NUTS kernels.

    target_accept
        Target mean acceptance probability of the step-size adaptation (PyMC's default 0.8).
    max_tree_depth
        Maximum number of trajectory doublings (``2**max_tree_depth - 1`` leapfrog steps).
    dense_mass
        Adapt a dense inverse mass matrix (correlated posteriors) instead of a diagonal one.
    initial_step_size
        Step size at the start of warmup.
    """

    target_accept: float = 0.8
    max_tree_depth: int = 10
    dense_mass: bool = False
    initial_step_size: float = 1.0


class SampleStats(NamedTuple):
    """Per-draw statistics of one chain, each ``[num_draws]``.

    diverging
        Whether the transition hit a divergence.
    tree_depth
        Number of trajectory doublings.
    n_steps
        Number of leapfrog steps (gradient evaluations).
    energy
        Hamiltonian at the accepted state.
    lp
        Log density (unconstrained space) at the accepted state.
    acceptance_rate
        Mean Metropolis acceptance probability over the trajectory.
    step_size
        Adapted step size (constant over draws).
    """

    diverging: jax.Array
    tree_depth: jax.Array
    n_steps: jax.Array
    energy: jax.Array
    lp: jax.Array
    acceptance_rate: jax.Array
    step_size: jax.Array


SAMPLERS = ("blackjax", "numpyro", "stepwise", "chees", "pymc")


def get_kernel(name: str):
    """The kernel of JAX sampler ``name``: ``run_chain`` of one chain, or for a kernel with
    ``MULTI_CHAIN`` (``"chees"``, cross-chain adaptation) ``run_chains`` of all a problem's chains."""
    if name == "stepwise":
        from engine.samplers.stepwise_nuts import run_chain
    elif name == "blackjax":
        from engine.samplers.blackjax_nuts import run_chain
    elif name == "numpyro":
        from engine.samplers.numpyro_nuts import run_chain
    elif name == "chees":
        from engine.samplers.chees_hmc import run_chains

        return run_chains
    else:
        raise InputError(
            f"unknown JAX sampler {name!r}; choose one of 'blackjax', 'numpyro', 'stepwise', 'chees'"
        )
    return run_chain


def describe(name: str) -> str:
    """How reports name sampler ``name``: "blackjax NUTS", "chees HMC", ..."""
    return {"chees": "ChEES jittered HMC", "pymc": "pymc NUTS (pm.sample loop)"}.get(name, f"{name} NUTS")


def is_multi_chain(name: str) -> bool:
    """Whether sampler ``name``'s kernel takes all chains of a problem at once."""
    return name == "chees"

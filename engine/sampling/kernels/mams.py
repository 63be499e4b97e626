"""Metropolis-adjusted microcanonical HMC (MAMS) for one problem (all its chains together).

Robnik, Cohn-Gordon & Seljak (2025), "Metropolis Adjusted Microcanonical Hamiltonian Monte
Carlo": isokinetic (unit-speed) Hamiltonian dynamics integrated by the McLachlan scheme, with a
Metropolis-Hastings correction after each trajectory, so the chain targets the posterior exactly.
Sampling runs ``blackjax.adjusted_mclmc_dynamic``; warmup is
``blackjax.adjusted_mclmc_find_L_and_step_size`` (dual-averaged step size at a fixed mean number
of integration steps per trajectory, then a diagonal inverse mass matrix from the chain's draws,
then the step size again).

Per-problem tuning across chains: every chain of the problem runs the warmup on its own, then the
chains share ONE step size, trajectory length ``L`` (the median over chains, robust to a chain
stuck in a bad region) and diagonal inverse mass matrix (the median over chains, per
coordinate). That is why this kernel takes all of a problem's chains at once (``chains_inside``).

The number of integration steps of a transition is drawn from a Halton sequence indexed by the
transition number, the same for every chain and problem at a given transition, so vmapped lanes
stay in step (as ChEES's jitter does). ``n_steps`` counts gradient evaluations: the McLachlan
integrator evaluates two gradients per integration step. ``energy`` is the potential energy
``-lp`` of the kept state (the momentum of isokinetic dynamics has no quadratic kinetic energy).

Needs a warmup (``num_tune >= 50``); adapts a diagonal mass matrix (``dense_mass`` is refused);
``settings.max_tree_depth`` is not used (the trajectory is a fixed mean number of steps).
"""

from __future__ import annotations

from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.mcmc import adjusted_mclmc_dynamic as amd
from blackjax.mcmc.adjusted_mclmc import rescale
from blackjax.mcmc.dynamic_hmc import DynamicHMCState, halton_sequence

from engine.model import linalg
from engine.errors import InputError
from engine.sampling.kernels.base import (
    Kernel, KernelSettings, LogDensityFn, SampleStats, SamplingAlgorithm, Schedule, Transition,
)

linalg.register_blackjax()  # dense metrics factor without LAPACK (engine.model.linalg)

MAMS_TARGET_ACCEPT = 0.9
"""Target acceptance of MAMS's step-size adaptation (Robnik et al. 2025 use 0.9)."""

MEAN_INTEGRATION_STEPS = 2.0
"""Mean number of integration steps per trajectory (``L / step_size``): BlackJAX's
``target_num_integration_steps`` default, which its adaptation pins."""

GRADIENTS_PER_STEP = 2
"""Gradient evaluations per McLachlan integration step (first-same-as-last reused)."""

MIN_TUNE = 50
"""Fewest warmup steps: the adaptation's three windows need a few dozen steps each way."""

FRAC_TUNE1 = 0.3
"""Share of ``num_tune`` in each of the two step-size windows (before and after the mass matrix)."""

FRAC_TUNE2 = 0.4
"""Share of ``num_tune`` whose draws estimate the diagonal mass matrix: 2 * 0.3 + 0.4 = 1."""


class MAMSState(NamedTuple):
    """All chains of one problem between transitions.

    hmc
        BlackJAX's ``DynamicHMCState`` of every chain: ``position [chains, dim]``,
        ``logdensity [chains]``, ``logdensity_grad [chains, dim]``, ``random_generator_arg
        [chains]`` (the Halton index of the trajectory length; equal across chains).
    step_size, L
        ``[]`` shared by the chains (initial before warmup, pooled after).
    inverse_mass_matrix
        ``[dim]`` diagonal, shared by the chains.
    rng_key
        ``[2]``: before warmup the first chain's key; after it, the sampling key whose
        ``fold_in(rng_key, i)`` drives transition ``i``.
    num_done
        ``[]`` int: sampling transitions made since warmup.
    """

    hmc: DynamicHMCState
    step_size: jax.Array
    L: jax.Array
    inverse_mass_matrix: jax.Array
    rng_key: jax.Array
    num_done: jax.Array


def check(chains: int, tune: int, settings: KernelSettings) -> None:
    """MAMS needs a warmup and adapts a diagonal mass matrix."""
    if int(chains) < 1:
        raise InputError(f"sampler 'mams' needs chains >= 1, got {chains}")
    if int(tune) < MIN_TUNE:
        raise InputError(f"sampler 'mams' needs tune >= {MIN_TUNE} warmup steps, got {tune}")
    if settings.dense_mass:
        raise InputError("sampler 'mams' adapts a diagonal mass matrix; dense_mass is not available")


def _integration_steps(index, mean_steps, max_bits):
    """Steps of transition ``index``: ``round(0.5 + u * rescale(mean))`` with ``u`` the Halton
    point of ``index`` (mean ``mean_steps``), at least one."""
    u = halton_sequence(index, max_bits)
    return jnp.maximum(jnp.rint(0.5 + u * rescale(mean_steps)), 1).astype(jnp.int32)


def build(logdensity_fn: LogDensityFn, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm:
    """MAMS bound to one problem (see :class:`~engine.sampling.kernels.base.Kernel`)."""
    max_bits = int(np.ceil(np.log2(schedule.num_tune + schedule.num_draws + 2)))
    blackjax_kernel = amd.build_kernel(
        integration_steps_fn=lambda i, mean: _integration_steps(i, mean, max_bits),
        next_random_arg_fn=lambda i: i + 1,
    )

    def init(rng_keys, positions, inverse_mass_matrix=None) -> MAMSState:
        del inverse_mass_matrix  # a warm start's metric is not used: this warmup learns its own from scratch
        num_chains, dim = positions.shape
        hmc = jax.vmap(lambda x: amd.init(x, logdensity_fn, jnp.zeros((), jnp.int32)))(positions)
        return MAMSState(
            hmc=hmc,
            step_size=jnp.asarray(settings.initial_step_size, positions.dtype),
            L=jnp.asarray(MEAN_INTEGRATION_STEPS * settings.initial_step_size, positions.dtype),
            inverse_mass_matrix=jnp.ones(dim, positions.dtype),
            rng_key=rng_keys[0],
            num_done=jnp.zeros((), jnp.int32),
        )

    def warmup(state: MAMSState) -> MAMSState:
        warmup_key, sample_key = jax.random.split(state.rng_key)
        num_chains = state.hmc.position.shape[0]

        def one_chain(key, hmc):
            final, params, _ = blackjax.adjusted_mclmc_find_L_and_step_size(
                mclmc_kernel=blackjax_kernel,
                logdensity_fn=logdensity_fn,
                num_steps=schedule.num_tune,
                state=hmc,
                rng_key=key,
                target=settings.target_accept,
                frac_tune1=FRAC_TUNE1,
                frac_tune2=FRAC_TUNE2,
                frac_tune3=0.0,
                diagonal_preconditioning=True,
                target_num_integration_steps=MEAN_INTEGRATION_STEPS,
            )
            return final, params

        with jax.numpy_rank_promotion("allow"):
            hmc, params = jax.vmap(one_chain)(jax.random.split(warmup_key, num_chains), state.hmc)
        dtype = state.hmc.position.dtype
        # every chain ran the same number of transitions: one Halton index for all
        hmc = hmc._replace(random_generator_arg=jnp.broadcast_to(jnp.max(hmc.random_generator_arg), (num_chains,)))
        return state._replace(
            hmc=hmc,
            step_size=jnp.median(params.step_size).astype(dtype),
            L=jnp.median(params.L).astype(dtype),
            inverse_mass_matrix=jnp.median(params.inverse_mass_matrix, axis=0).astype(dtype),
            rng_key=sample_key,
        )

    def step(state: MAMSState) -> tuple[MAMSState, Transition]:
        key = jax.random.fold_in(state.rng_key, state.num_done)
        num_chains = state.hmc.position.shape[0]
        mean_steps = state.L / state.step_size

        def one_chain(k, hmc):
            return blackjax_kernel(
                rng_key=k, state=hmc, logdensity_fn=logdensity_fn, step_size=state.step_size,
                inverse_mass_matrix=state.inverse_mass_matrix, integration_steps_params=(mean_steps,),
            )

        with jax.numpy_rank_promotion("allow"):
            hmc, info = jax.vmap(one_chain)(jax.random.split(key, num_chains), state.hmc)
        stats = SampleStats(
            diverging=info.is_divergent,
            tree_depth=jnp.zeros_like(info.num_integration_steps),  # no tree
            n_steps=GRADIENTS_PER_STEP * info.num_integration_steps,
            energy=-hmc.logdensity,
            lp=hmc.logdensity,
            acceptance_rate=info.acceptance_rate,
            step_size=jnp.broadcast_to(state.step_size, (num_chains,)),
        )
        return state._replace(hmc=hmc, num_done=state.num_done + 1), Transition(hmc.position, stats)

    return SamplingAlgorithm(init=init, warmup=warmup, step=step)


KERNEL = Kernel(
    name="mams", description="MAMS adjusted microcanonical HMC", build=build, chains_inside=True, check=check,
    target_accept=MAMS_TARGET_ACCEPT,
)

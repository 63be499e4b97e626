"""BlackJAX NUTS for one chain: Stan-style window adaptation, then sampling.

Hoffman & Gelman (2014) NUTS with multinomial sampling; warmup follows Stan's windowed
adaptation of step size (dual averaging) and inverse mass matrix (Welford), as implemented in
``blackjax.window_adaptation`` (which runs its own loop over the warmup transitions).

A starting inverse mass matrix given to ``init`` (e.g. a belief's variances) seeds the
adaptation (``window_adaptation(initial_inverse_mass_matrix=...)``): the step size of the first
fast window is tuned for it, and each slow window's Welford estimate replaces it (Stan's
memoryless windows). With ``tune=0`` the chain samples with it unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.base import get_filter_adapt_info_fn
from blackjax.mcmc.hmc import HMCState

from engine.model import linalg
from engine.sampling.kernels.base import (
    Kernel, KernelSettings, LogDensityFn, SampleStats, SamplingAlgorithm, Schedule, Transition,
    initial_inverse_mass_matrix,
)

linalg.register_blackjax()  # dense metrics factor without LAPACK (engine.model.linalg)


class NUTSChainState(NamedTuple):
    """One chain between transitions.

    hmc
        BlackJAX's ``HMCState``: ``position [dim]``, ``logdensity []``, ``logdensity_grad [dim]``.
    step_size
        ``[]`` the step size (initial before warmup, adapted after).
    inverse_mass_matrix
        ``[dim]`` (diagonal) or ``[dim, dim]`` (dense).
    rng_key
        ``[2]``: before warmup the chain's key; after it, the key of the sampling phase, whose
        ``fold_in(rng_key, i)`` drives transition ``i`` (equal to ``split(rng_key, n)[i]``).
    num_done
        ``[]`` int: sampling transitions made since warmup.
    num_grads
        ``[]`` int: gradient evaluations (leapfrog steps) since ``init``, warmup included.
    """

    hmc: HMCState
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    rng_key: jax.Array
    num_done: jax.Array
    num_grads: jax.Array


def build(logdensity_fn: LogDensityFn, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm:
    """BlackJAX NUTS bound to one problem (see :class:`~engine.sampling.kernels.base.Kernel`)."""

    def init(rng_key, position, inverse_mass_matrix=None) -> NUTSChainState:
        dim = position.shape[-1]
        if inverse_mass_matrix is None:
            imm = jnp.eye(dim) if settings.dense_mass else jnp.ones(dim)
        else:
            imm = initial_inverse_mass_matrix(inverse_mass_matrix, dim, settings.dense_mass, position.dtype)
        return NUTSChainState(
            hmc=blackjax.nuts.init(position, logdensity_fn),
            step_size=jnp.asarray(settings.initial_step_size),
            inverse_mass_matrix=imm,
            rng_key=rng_key,
            num_done=jnp.zeros((), jnp.int32),
            num_grads=jnp.zeros((), jnp.int32),
        )

    def warmup(state: NUTSChainState) -> NUTSChainState:
        warmup_key, sample_key = jax.random.split(state.rng_key)
        state = state._replace(rng_key=sample_key)
        if schedule.num_tune == 0:
            return state
        adaptation = blackjax.window_adaptation(
            blackjax.nuts,
            logdensity_fn,
            is_mass_matrix_diagonal=not settings.dense_mass,
            initial_inverse_mass_matrix=state.inverse_mass_matrix,
            initial_step_size=settings.initial_step_size,
            target_acceptance_rate=settings.target_accept,
            adaptation_info_fn=get_filter_adapt_info_fn(info_keys={"num_integration_steps"}),
            max_num_doublings=settings.max_tree_depth,
        )
        (hmc, parameters), infos = adaptation.run(warmup_key, state.hmc.position, schedule.num_tune)
        num_grads = state.num_grads + infos.info.num_integration_steps.sum().astype(jnp.int32)
        return state._replace(
            hmc=hmc, step_size=parameters["step_size"], inverse_mass_matrix=parameters["inverse_mass_matrix"],
            num_grads=num_grads,
        )

    def step(state: NUTSChainState) -> tuple[NUTSChainState, Transition]:
        kernel = blackjax.nuts(
            logdensity_fn,
            step_size=state.step_size,
            inverse_mass_matrix=state.inverse_mass_matrix,
            max_num_doublings=settings.max_tree_depth,
        )
        hmc, info = kernel.step(jax.random.fold_in(state.rng_key, state.num_done), state.hmc)
        stats = SampleStats(
            diverging=info.is_divergent,
            tree_depth=info.num_trajectory_expansions,
            n_steps=info.num_integration_steps,
            energy=info.energy,
            lp=hmc.logdensity,
            acceptance_rate=info.acceptance_rate,
            step_size=jnp.asarray(state.step_size),
        )
        num_grads = state.num_grads + info.num_integration_steps.astype(jnp.int32)
        return state._replace(hmc=hmc, num_done=state.num_done + 1, num_grads=num_grads), Transition(hmc.position, stats)

    return SamplingAlgorithm(init=init, warmup=warmup, step=step, num_grads=lambda s: s.num_grads)


KERNEL = Kernel(name="blackjax", description="blackjax NUTS", build=build)

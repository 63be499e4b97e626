"""NumPyro NUTS for one chain through its functional interface (``numpyro.infer.hmc.hmc``).

Warmup (Stan-style windowed adaptation) happens inside NumPyro's ``sample_kernel`` during the
first ``num_tune`` transitions, so this kernel has no separate ``warmup``: the driver runs
``num_tune`` steps and keeps the next ``num_draws``. The state is NumPyro's ``HMCState`` (it
carries its own key, step counter and adaptation state).

A starting inverse mass matrix given to ``init`` is NumPyro's own ``init_kernel(inverse_mass_matrix=...)``:
the initial step size is searched for under it (``find_reasonable_step_size``) and it is the metric
until the first slow window's Welford estimate replaces it; with ``tune=0`` it is kept.
"""

from __future__ import annotations

import jax.numpy as jnp
from numpyro.infer.hmc import HMCState, hmc

from engine.sampling.kernels.base import (
    Kernel, KernelSettings, LogDensityFn, SampleStats, SamplingAlgorithm, Schedule, Transition,
    initial_inverse_mass_matrix,
)


def build(logdensity_fn: LogDensityFn, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm:
    """NumPyro NUTS bound to one problem (see :class:`~engine.sampling.kernels.base.Kernel`).

    NumPyro's ``init_kernel`` configures ``sample_kernel`` through its closure (at trace time),
    so a program that resumes from a stored state configures it first from that state.
    """
    init_kernel, sample_kernel = hmc(potential_fn=lambda x: -logdensity_fn(x), algo="NUTS")
    configured = []

    def init(rng_key, position, inverse_mass_matrix=None) -> HMCState:
        configured.append(True)
        if inverse_mass_matrix is not None:
            inverse_mass_matrix = initial_inverse_mass_matrix(
                inverse_mass_matrix, position.shape[-1], settings.dense_mass, position.dtype
            )
        return init_kernel(
            position,
            num_warmup=schedule.num_tune,
            step_size=settings.initial_step_size,
            inverse_mass_matrix=inverse_mass_matrix,
            adapt_step_size=schedule.num_tune > 0,
            adapt_mass_matrix=schedule.num_tune > 0,
            dense_mass=settings.dense_mass,
            target_accept_prob=settings.target_accept,
            max_tree_depth=settings.max_tree_depth,
            rng_key=rng_key,
        )

    def step(state: HMCState) -> tuple[HMCState, Transition]:
        if not configured:
            init(state.rng_key, state.z)  # output unused: sets sample_kernel's static settings
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
        return state, Transition(state.z, stats)

    return SamplingAlgorithm(init=init, warmup=None, step=step)


KERNEL = Kernel(name="numpyro", description="numpyro NUTS", build=build)

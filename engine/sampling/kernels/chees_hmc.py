"""ChEES-adapted jittered HMC for one problem (all its chains together).

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
once (``chains_inside``); ``engine.sampling.batch`` still adds the problem axis.

Needs at least 2 chains (the criterion is a cross-chain statistic; 4 or more is better) and a
warmup (``num_tune >= 50``). ``settings.max_tree_depth`` caps a trajectory at
``2**max_tree_depth - 1`` leapfrog steps, as it caps NUTS; ``dense_mass`` is not available.
Its ``target_accept`` is ``CHEES_TARGET_ACCEPT`` (0.8; see there why not HMC's asymptotic 0.651).

Warmup starts from a searched step size (:func:`reasonable_step_size`, from
``settings.initial_step_size``), at :data:`START_FRACTION` of it. A starting inverse mass matrix
given to ``init``: BlackJAX's ``chees_adaptation`` takes no initial metric (its diagonal estimate
is the identity until enough pooled late-warmup draws accumulate), so here it only scales where
that search starts, ``initial_step_size`` times the smallest scale ``sqrt(min diag)`` of the
matrix; the adapted diagonal replaces it after warmup.
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
    CHEES_DEFAULT_TUNE, CHEES_TARGET_ACCEPT, Kernel, KernelSettings, LogDensityFn, SampleStats, SamplingAlgorithm, Schedule, Transition,
    initial_inverse_mass_matrix,
)

linalg.register_blackjax()  # dense metrics factor without LAPACK (engine.model.linalg)

LEARNING_RATE = 0.025
"""Adam's learning rate for the log trajectory length (TFP's default for ChEES)."""

MIN_TUNE = 50
"""Fewest warmup steps the ChEES criterion is given (its moving averages need a few dozen)."""

MIN_CHAINS = 2
"""ChEES is a cross-chain statistic."""

START_FRACTION = 0.1
"""ChEES warmup starts at this fraction of :func:`reasonable_step_size`'s answer. Dual averaging
centres its search on 10x its starting value (Hoffman & Gelman's ``mu = log(10 eps0)``), so
that lands on the searched size at once, while the trajectory length, which starts at the
starting step size, begins one step long and grows at Adam's pace: the identity-metric first
half of warmup stays cheap, and the length is tuned for real once the diagonal metric engages.
Measured (ChEES float32, 2 devices, seed 0; warmup gradients per problem with the search at
fractions 1 / 0.1, and with the old fixed start of 1.0): w1 200+500 3,085 / 1,264 (2,931);
w2 300+700 5,161 / 2,531 (7,921); w4 200+500 2,553 / 1,602 (7,276), pass shares unchanged."""

MAX_STEP_SEARCH = 30
"""Most doublings or halvings :func:`reasonable_step_size` tries."""


class ChEESState(NamedTuple):
    """All chains of one problem between transitions.

    hmc
        BlackJAX's ``DynamicHMCState`` of every chain: ``position [chains, dim]``,
        ``logdensity [chains]``, ``logdensity_grad [chains, dim]``, ``random_generator_arg
        [chains]`` (the Halton index of the jitter).
    step_size
        ``[]`` shared by the chains (initial before warmup, adapted after).
    inverse_mass_matrix
        ``[dim]`` diagonal.
    mean_num_steps
        ``[]`` mean number of leapfrog steps of a trajectory before jitter, capped at
        ``2**max_tree_depth - 1``.
    rng_key
        ``[2]``: before warmup the first chain's key; after it, the sampling key whose
        ``fold_in(rng_key, i)`` drives transition ``i``.
    num_done
        ``[]`` int: sampling transitions made since warmup.
    num_grads
        ``[]`` int: gradient evaluations (leapfrog steps) of all chains since ``init``, warmup
        included.
    """

    hmc: DynamicHMCState
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    mean_num_steps: jax.Array
    rng_key: jax.Array
    num_done: jax.Array
    num_grads: jax.Array


def check(chains: int, tune: int, settings: KernelSettings) -> None:
    """ChEES adapts across chains, needs a warmup and adapts a diagonal mass matrix."""
    if int(chains) < MIN_CHAINS:
        raise InputError(f"sampler 'chees' adapts across chains: needs chains >= {MIN_CHAINS}, got {chains}")
    if int(tune) < MIN_TUNE:
        raise InputError(f"sampler 'chees' needs tune >= {MIN_TUNE} warmup steps, got {tune}")
    if settings.dense_mass:
        raise InputError("sampler 'chees' adapts a diagonal mass matrix; dense_mass is not available")


def reasonable_step_size(logdensity_fn, rng_key, hmc: DynamicHMCState, inverse_mass_matrix, step_size, target):
    """Starting step size for ChEES warmup: Hoffman & Gelman's (2014, Algorithm 4) heuristic over
    all chains of a problem.

    ``step_size`` is doubled while, or halved until, one leapfrog step from every chain's start
    (``hmc [chains]``, diagonal ``inverse_mass_matrix [dim]``, one momentum draw per chain) is
    accepted with probability >= ``target`` by the worst chain; at most :data:`MAX_STEP_SEARCH`
    tries, one gradient per chain each. Returns ``(step size, gradients spent)``.

    Why it matters here: ChEES starts its trajectory length at the step size and Adam moves it
    ~2.5% per warmup step, and until the diagonal metric engages (half-way through warmup) the
    trajectory is ``length / step size`` steps long; a start of 1.0 against posterior scales of
    ~0.1 made that first half cost 8-18 gradients per step where the adapted chain needs ~2 (w4:
    64% of a 200+500 run's gradients). BlackJAX's ``find_reasonable_step_size`` judges one chain
    by a whole transition; ChEES shares one step size across the chains, so the worst chain's
    single leapfrog step decides here.
    """
    position, logdensity, grad = hmc.position, hmc.logdensity, hmc.logdensity_grad
    imm = inverse_mass_matrix[None, :]
    momentum = jax.random.normal(rng_key, position.shape, position.dtype) / jnp.sqrt(imm)
    start_energy = -logdensity + 0.5 * jnp.sum(imm * momentum**2, axis=-1)
    value_and_grad = jax.vmap(jax.value_and_grad(logdensity_fn))

    def worst_acceptance(eps):
        p = momentum + 0.5 * eps * grad
        lp, g = value_and_grad(position + eps * imm * p)
        p = p + 0.5 * eps * g
        delta = -lp + 0.5 * jnp.sum(imm * p**2, axis=-1) - start_energy
        return jnp.min(jnp.where(jnp.isfinite(delta), jnp.exp(jnp.minimum(-delta, 0.0)), 0.0))

    step_size = jnp.asarray(step_size, position.dtype)
    up = worst_acceptance(step_size) >= target

    def body(carry):
        i, eps, _ = carry
        new = jnp.where(up, 2.0 * eps, 0.5 * eps)
        ok = worst_acceptance(new) >= target
        # going up: keep the last accepted size at the first refusal; going down: stop at the first accepted
        return i + 1, jnp.where(up & ~ok, eps, new), jnp.where(up, ok, ~ok)

    tries, step_size, _ = jax.lax.while_loop(
        lambda c: (c[0] < MAX_STEP_SEARCH) & c[2], body, (jnp.zeros((), jnp.int32), step_size, jnp.ones((), bool))
    )
    return step_size, (tries + 1) * position.shape[0]


def warmup_start(logdensity_fn, rng_key, hmc: DynamicHMCState, step_size, target):
    """``(step size, gradients spent)`` that ``blackjax.chees_adaptation`` starts from:
    :data:`START_FRACTION` of :func:`reasonable_step_size` under the identity metric, which that
    adaptation runs until its own diagonal estimate engages (shared with ``chees_dense``)."""
    searched, grads = reasonable_step_size(
        logdensity_fn, rng_key, hmc, jnp.ones(hmc.position.shape[-1], hmc.position.dtype), step_size, target)
    return START_FRACTION * searched, grads


def chains_step(logdensity_fn, integration_steps_fn, state):
    """One jittered-HMC transition of every chain of ``state`` (a ChEES-like state: ``hmc``,
    ``step_size``, ``inverse_mass_matrix``, ``mean_num_steps``, ``rng_key``, ``num_done``)
    -> ``(hmc states, info, SampleStats)``; shared with ``chees_dense``."""
    kernel = blackjax.dynamic_hmc(
        logdensity_fn,
        step_size=state.step_size,
        inverse_mass_matrix=state.inverse_mass_matrix,
        next_random_arg_fn=lambda i: i + 1,
        integration_steps_fn=integration_steps_fn,
        integration_steps_params=(state.mean_num_steps,),
    )
    imm = state.inverse_mass_matrix
    previous_lp = state.hmc.logdensity
    key = jax.random.fold_in(state.rng_key, state.num_done)
    with jax.numpy_rank_promotion("allow"):
        hmc, info = jax.vmap(kernel.step)(jax.random.split(key, previous_lp.shape[0]), state.hmc)
        # the Hamiltonian at the state kept (Stan's energy__), for E-BFMI
        start_energy = -previous_lp + 0.5 * jnp.sum(imm * info.momentum**2, axis=-1)
    stats = SampleStats(
        diverging=info.is_divergent,
        tree_depth=jnp.zeros_like(info.num_integration_steps),  # no tree: HMC
        n_steps=info.num_integration_steps,
        energy=jnp.where(info.is_accepted, info.energy, start_energy),
        lp=hmc.logdensity,
        acceptance_rate=info.acceptance_rate,
        step_size=jnp.broadcast_to(jnp.asarray(state.step_size), previous_lp.shape),
    )
    return hmc, info, stats


def build(logdensity_fn: LogDensityFn, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm:
    """ChEES HMC bound to one problem (see :class:`~engine.sampling.kernels.base.Kernel`)."""
    max_steps = 2**settings.max_tree_depth - 1
    # the jitter of blackjax.chees_adaptation (Halton, jitter_amount 1), rebuilt so that a
    # resumed state steps without rerunning the adaptation
    max_bits = np.ceil(np.log2(schedule.num_tune + schedule.num_draws))

    def integration_steps_fn(random_generator_arg, num_leapfrog_steps):
        jitter = halton_sequence(random_generator_arg, max_bits) * 1.0 + (1.0 - 1.0)
        return jnp.asarray(jnp.ceil(jitter * num_leapfrog_steps), dtype=int)

    def init(rng_keys, positions, inverse_mass_matrix=None) -> ChEESState:
        num_chains, dim = positions.shape
        hmc = jax.vmap(lambda x: blackjax.dynamic_hmc.init(x, logdensity_fn, jnp.zeros((), int)))(positions)
        step_size = jnp.asarray(settings.initial_step_size, positions.dtype)
        imm = jnp.ones(dim, positions.dtype)
        if inverse_mass_matrix is not None:
            imm = initial_inverse_mass_matrix(inverse_mass_matrix, dim, False, positions.dtype)
            step_size = step_size * jnp.sqrt(jnp.min(imm))
        return ChEESState(
            hmc=hmc,
            step_size=step_size,
            inverse_mass_matrix=imm,
            mean_num_steps=jnp.ones((), positions.dtype),
            rng_key=rng_keys[0],
            num_done=jnp.zeros((), jnp.int32),
            num_grads=jnp.zeros((), jnp.int32),
        )

    def warmup(state: ChEESState) -> ChEESState:
        warmup_key, sample_key = jax.random.split(state.rng_key)
        step_size, search_grads = warmup_start(logdensity_fn, jax.random.fold_in(warmup_key, 1), state.hmc,
                                               state.step_size, settings.target_accept)
        adaptation = blackjax.chees_adaptation(
            logdensity_fn,
            state.hmc.position.shape[0],
            target_acceptance_rate=settings.target_accept,
            max_leapfrog_steps=max_steps,
            adaptation_info_fn=get_filter_adapt_info_fn(info_keys={"num_integration_steps"}),
            mass_matrix_estimation="diagonal",
        )
        # blackjax's ChEES code broadcasts [chains, 1] against [dim] implicitly; allow it while
        # tracing it even where the caller asks JAX to raise on rank promotion (the tests do)
        with jax.numpy_rank_promotion("allow"):
            (hmc, parameters), infos = adaptation.run(
                warmup_key,
                state.hmc.position,
                step_size=step_size,
                optim=optax.adam(LEARNING_RATE),
                num_steps=schedule.num_tune,
                max_sampling_steps=schedule.num_draws,
            )
        (mean_steps,) = parameters["integration_steps_params"]
        return state._replace(
            hmc=hmc,
            step_size=parameters["step_size"],
            inverse_mass_matrix=parameters["inverse_mass_matrix"],
            mean_num_steps=jnp.minimum(mean_steps, max_steps),
            rng_key=sample_key,
            num_grads=state.num_grads + search_grads + infos.info.num_integration_steps.sum().astype(jnp.int32),
        )

    def step(state: ChEESState) -> tuple[ChEESState, Transition]:
        hmc, info, stats = chains_step(logdensity_fn, integration_steps_fn, state)
        num_grads = state.num_grads + info.num_integration_steps.sum().astype(jnp.int32)
        return state._replace(hmc=hmc, num_done=state.num_done + 1, num_grads=num_grads), Transition(hmc.position, stats)

    return SamplingAlgorithm(init=init, warmup=warmup, step=step, num_grads=lambda s: s.num_grads)


KERNEL = Kernel(
    name="chees", description="ChEES jittered HMC", build=build, chains_inside=True, check=check,
    target_accept=CHEES_TARGET_ACCEPT, default_tune=CHEES_DEFAULT_TUNE,
)

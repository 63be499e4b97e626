"""NUTS advanced one leapfrog step at a time, so vmapped chains never wait for each other.

Under ``vmap``, a recursive or doubling-loop NUTS runs every chain in the batch to the deepest
tree of the batch: all lanes wait for the slowest one at every transition (lockstep). Here one
call of :func:`step` moves ONE chain by exactly one leapfrog step through an explicit state
machine (extend the current subtree; finish a doubling; finish a transition, adapt, and start
the next). Under ``vmap`` every lane therefore does useful work at every iteration, and the
batch waits only once, at the very end, for the chain with the most leapfrog steps in total.

The transition is the multinomial NUTS of Betancourt (2017), "A conceptual introduction to
Hamiltonian Monte Carlo", arXiv:1701.02434 (biased progressive sampling between doublings,
uniform within a subtree), with the iterative U-turn checks of NumPyro's
``_iterative_build_subtree`` (Phan, Pradhan & Jankowiak 2019); warmup is Stan's windowed
adaptation built from BlackJAX's dual-averaging and Welford pieces. Statistically it is the
same Markov kernel as ``numpyro_nuts`` (tested against closed forms and the other samplers).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.mass_matrix import mass_matrix_adaptation
from blackjax.adaptation.staged_adaptation import build_schedule
from blackjax.adaptation.step_size import dual_averaging_adaptation

from engine.model import linalg
from engine.sampling.kernels.base import (
    MAX_DELTA_ENERGY, Kernel, KernelSettings, SampleStats, SamplingAlgorithm, Schedule,
    initial_inverse_mass_matrix,
)
from engine.model.linalg import solve_triangular


class Point(NamedTuple):
    """A point of phase space's position half: ``z [dim]``, ``logp []``, ``grad [dim]``."""

    z: jax.Array
    logp: jax.Array
    grad: jax.Array


class Proposal(NamedTuple):
    """A candidate sample: ``z [dim]``, ``logp []``, ``grad [dim]`` and its ``energy []``."""

    z: jax.Array
    logp: jax.Array
    grad: jax.Array
    energy: jax.Array


class Trajectory(NamedTuple):
    """The transition in flight.

    ``z_end``, ``r_end``, ``g_end`` ``[2, dim]`` and ``logp_end [2]``: the trajectory's ends
    (row 0 left, row 1 right); ``energy0 []`` the Hamiltonian at its start; ``proposal`` the
    tree's multinomial pick; ``weight []`` (log) and ``r_sum [dim]`` of the tree; ``depth []``
    doublings done; ``going_right []`` the direction of the doubling being built;
    ``sum_accept []`` and ``num_steps []`` the acceptance sum and leapfrog steps so far.
    """

    z_end: jax.Array
    r_end: jax.Array
    g_end: jax.Array
    logp_end: jax.Array
    energy0: jax.Array
    proposal: Proposal
    weight: jax.Array
    r_sum: jax.Array
    depth: jax.Array
    going_right: jax.Array
    sum_accept: jax.Array
    num_steps: jax.Array


class Subtree(NamedTuple):
    """The doubling being built: its uniform pick ``proposal``, ``weight []`` (log),
    ``r_sum [dim]``, ``count []`` leaves so far, and the U-turn checkpoints ``ckpt_r`` and
    ``ckpt_r_sum`` ``[max_tree_depth, dim]`` (NumPyro's iterative checks)."""

    proposal: Proposal
    weight: jax.Array
    r_sum: jax.Array
    count: jax.Array
    ckpt_r: jax.Array
    ckpt_r_sum: jax.Array


class Adaptation(NamedTuple):
    """Stan's windowed adaptation: BlackJAX's dual-averaging ``da_state`` and Welford
    ``mm_state``, the current ``step_size []``, ``inverse_mass_matrix`` (``[dim]`` or
    ``[dim, dim]``) and ``mass_chol``, its Cholesky factor when dense (``[dim]`` unused otherwise)."""

    da_state: NamedTuple
    mm_state: NamedTuple
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    mass_chol: jax.Array


class DrawBuffers(NamedTuple):
    """Recorded output: ``draws [num_draws + 1, dim]`` and ``stats`` (``SampleStats`` of
    ``[num_draws + 1]``); the spare last row absorbs the writes of steps that record nothing."""

    draws: jax.Array
    stats: SampleStats


class StepwiseState(NamedTuple):
    """One chain between leapfrog steps, composed as BlackJAX's ``DynamicHMCState`` is.

    ``rng_key [2]`` (advanced at every step), ``num_done []`` transitions finished, ``point``
    the current sample, ``trajectory`` and ``subtree`` the transition in flight, ``adaptation``
    the warmup's state, ``buffers`` the draws recorded so far, ``num_grads []`` the leapfrog
    steps (gradient evaluations) made since ``init``, warmup included.
    """

    rng_key: jax.Array
    num_done: jax.Array
    point: Point
    trajectory: Trajectory
    subtree: Subtree
    adaptation: Adaptation
    buffers: DrawBuffers
    num_grads: jax.Array


def _select(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _velocity(imm, r, dense):
    return imm @ r if dense else imm * r


def _kinetic(imm, r, dense):
    return 0.5 * jnp.dot(r, _velocity(imm, r, dense))


def _is_turning(imm, r_left, r_right, r_sum, dense):
    """Generalised U-turn check of NumPyro's ``_is_turning`` (Betancourt 2017, A.4.2)."""
    r_sum = r_sum - (r_left + r_right) / 2
    v_left = _velocity(imm, r_left, dense)
    v_right = _velocity(imm, r_right, dense)
    return (jnp.dot(v_left, r_sum) <= 0) | (jnp.dot(v_right, r_sum) <= 0)


def _popcount(x):
    return jax.lax.population_count(x)


def _ckpt_range(leaf_index):
    """Checkpoints to compare leaf ``leaf_index`` of a subtree with (NumPyro's bit trick)."""
    idx_max = _popcount(leaf_index >> 1)
    trailing_ones = _popcount(leaf_index ^ (leaf_index + 1)) - 1
    return idx_max - trailing_ones + 1, idx_max


def _draw_momentum(u, state_chol_or_imm, dense):
    z = jax.scipy.special.ndtri(u)
    if dense:
        # imm = L L^T, M = imm^-1: r = L^-T z has covariance M
        return solve_triangular(state_chol_or_imm, z, lower=True, trans=True)
    return z / jnp.sqrt(state_chol_or_imm)


def _uniforms(key, dim, dtype):
    """``(next_key, u)`` with ``u[0:3]`` for the accept/merge/direction coins and ``u[3:]`` for a
    momentum; one key split and one counter-based draw per leapfrog step keep RNG cost low."""
    key, sub = jax.random.split(key)
    tiny = jnp.finfo(dtype).tiny
    return key, jax.random.uniform(sub, (3 + dim,), dtype, minval=tiny, maxval=1.0)


def _start_transition(state: StepwiseState, dense: bool, u) -> StepwiseState:
    """Draw a momentum at the current sample and reset the trajectory to it."""
    ad, point = state.adaptation, state.point
    factor = ad.mass_chol if dense else ad.inverse_mass_matrix
    r = _draw_momentum(u[3:], factor, dense)
    energy0 = -point.logp + _kinetic(ad.inverse_mass_matrix, r, dense)
    two = lambda a: jnp.stack([a, a])  # noqa: E731
    trajectory = Trajectory(
        z_end=two(point.z),
        r_end=two(r),
        g_end=two(point.grad),
        logp_end=two(point.logp),
        energy0=energy0,
        proposal=Proposal(point.z, point.logp, point.grad, energy0),
        weight=jnp.zeros_like(energy0),
        r_sum=r,
        depth=jnp.zeros_like(state.trajectory.depth),
        going_right=u[2] < 0.5,
        sum_accept=jnp.zeros_like(state.trajectory.sum_accept),
        num_steps=jnp.zeros_like(state.trajectory.num_steps),
    )
    subtree = state.subtree._replace(count=jnp.zeros_like(state.subtree.count))
    return state._replace(trajectory=trajectory, subtree=subtree)


def init_state(rng_key, logdensity_fn: Callable, position, num_draws: int, settings: KernelSettings,
               inverse_mass_matrix=None) -> StepwiseState:
    """State at ``position`` with a fresh transition started; the inverse mass matrix is
    ``inverse_mass_matrix`` (``[dim]`` or ``[dim, dim]``) or the identity. Warmup starts from it:
    the first windows' step size is tuned for it and the first slow window's Welford estimate
    replaces it (the Welford state itself starts empty, as Stan's does)."""
    dim = position.shape[0]
    dtype = position.dtype
    logp, grad = jax.value_and_grad(logdensity_fn)(position)
    dense = settings.dense_mass
    da_init, _, _ = dual_averaging_adaptation(settings.target_accept)
    mm_init, _, _ = mass_matrix_adaptation(not dense)
    if inverse_mass_matrix is None:
        imm = jnp.eye(dim, dtype=dtype) if dense else jnp.ones(dim, dtype)
        chol = jnp.eye(dim, dtype=dtype)
    else:
        imm = initial_inverse_mass_matrix(inverse_mass_matrix, dim, dense, dtype)
        chol = linalg.cholesky(imm) if dense else None
    zero = jnp.zeros((), dtype)
    izero = jnp.zeros((), jnp.int32)
    vec = jnp.zeros(dim, dtype)
    pair = jnp.zeros((2, dim), dtype)
    empty = Proposal(vec, zero, vec, zero)
    as_float = lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a)  # noqa: E731
    state = StepwiseState(
        rng_key=rng_key,
        num_done=izero,
        point=Point(position, logp, grad),
        trajectory=Trajectory(
            z_end=pair, r_end=pair, g_end=pair, logp_end=jnp.zeros(2, dtype), energy0=zero,
            proposal=empty, weight=zero, r_sum=vec, depth=izero,
            going_right=jnp.zeros((), bool), sum_accept=zero, num_steps=izero,
        ),
        subtree=Subtree(
            proposal=empty, weight=zero, r_sum=vec, count=izero,
            ckpt_r=jnp.zeros((settings.max_tree_depth, dim), dtype),
            ckpt_r_sum=jnp.zeros((settings.max_tree_depth, dim), dtype),
        ),
        adaptation=Adaptation(
            da_state=jax.tree.map(lambda a: jnp.asarray(a, dtype), da_init(settings.initial_step_size)),
            mm_state=jax.tree.map(as_float, mm_init(dim)),
            step_size=jnp.asarray(settings.initial_step_size, dtype),
            inverse_mass_matrix=imm,
            mass_chol=chol if dense else vec,
        ),
        buffers=DrawBuffers(
            draws=jnp.zeros((num_draws + 1, dim), dtype),
            stats=SampleStats(
                diverging=jnp.zeros(num_draws + 1, bool),
                tree_depth=jnp.zeros(num_draws + 1, jnp.int32),
                n_steps=jnp.zeros(num_draws + 1, jnp.int32),
                energy=jnp.zeros(num_draws + 1, dtype),
                lp=jnp.zeros(num_draws + 1, dtype),
                acceptance_rate=jnp.zeros(num_draws + 1, dtype),
                step_size=jnp.zeros(num_draws + 1, dtype),
            ),
        ),
        num_grads=izero,
    )
    key, u = _uniforms(rng_key, dim, dtype)
    return _start_transition(state._replace(rng_key=key), dense, u)


def _adapt(ad: Adaptation, z, stage, window_end, is_last, accept_rate, settings: KernelSettings) -> Adaptation:
    """Stan windowed adaptation after a warmup transition that ended at ``z``."""
    dense = settings.dense_mass
    da_init, da_update, _ = dual_averaging_adaptation(settings.target_accept)
    _, mm_update, mm_final = mass_matrix_adaptation(not dense)
    da_state = da_update(ad.da_state, accept_rate)
    mm_state = _select(stage == 1, mm_update(ad.mm_state, z), ad.mm_state)
    # end of a slow window: new mass matrix, dual averaging restarted at the averaged step
    mm_closed = mm_final(mm_state)
    da_restart = da_init(jnp.exp(da_state.log_step_size_avg))
    mm_state = _select(window_end, mm_closed, mm_state)
    da_state = _select(window_end, jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), da_restart, da_state), da_state)
    imm = jnp.where(window_end, mm_closed.inverse_mass_matrix, ad.inverse_mass_matrix)
    step_size = jnp.where(is_last, jnp.exp(da_state.log_step_size_avg), jnp.exp(da_state.log_step_size))
    chol = linalg.cholesky(imm) if dense else ad.mass_chol
    return Adaptation(
        da_state=da_state,
        mm_state=mm_state,
        step_size=step_size.astype(z.dtype),
        inverse_mass_matrix=imm.astype(z.dtype),
        mass_chol=chol.astype(z.dtype),
    )


def step(state: StepwiseState, logdensity_fn: Callable, num_tune: int, num_total: int, settings: KernelSettings) -> StepwiseState:
    """Advance one chain by exactly one leapfrog step (and finish whatever that step completes).

    A chain that has finished its ``num_total`` transitions is left unchanged, so a batch can
    keep stepping until its last chain is done.
    """
    active = state.num_done < num_total
    dense = settings.dense_mass
    before = state
    tr, sub = state.trajectory, state.subtree
    imm = state.adaptation.inverse_mass_matrix
    step_size = state.adaptation.step_size
    key, u = _uniforms(state.rng_key, state.point.z.shape[0], state.point.z.dtype)
    side = tr.going_right.astype(jnp.int32)
    eps = jnp.where(tr.going_right, step_size, -step_size)

    # one leapfrog step from the end of the trajectory in the current direction
    # two-row and checkpoint updates as one-hot selects: elementwise, fused, no scatter
    pick = (jnp.arange(2) == side)[:, None]
    z0 = jnp.where(tr.going_right, tr.z_end[1], tr.z_end[0])
    r0 = jnp.where(tr.going_right, tr.r_end[1], tr.r_end[0])
    g0 = jnp.where(tr.going_right, tr.g_end[1], tr.g_end[0])
    r_half = r0 + 0.5 * eps * g0
    z1 = z0 + eps * _velocity(imm, r_half, dense)
    logp1, g1 = jax.value_and_grad(logdensity_fn)(z1)
    r1 = r_half + 0.5 * eps * g1
    energy1 = -logp1 + _kinetic(imm, r1, dense)
    delta = energy1 - tr.energy0
    delta = jnp.where(jnp.isnan(delta), jnp.inf, delta)
    leaf_weight = -delta
    diverging = delta > MAX_DELTA_ENERGY
    accept_prob = jnp.minimum(1.0, jnp.exp(-delta))

    # uniform progressive sampling inside the subtree
    first = sub.count == 0
    sub_weight = jnp.where(first, leaf_weight, jnp.logaddexp(sub.weight, leaf_weight))
    take_leaf = first | (u[0] < jnp.exp(leaf_weight - sub_weight))
    sub_proposal = _select(take_leaf, Proposal(z1, logp1, g1, energy1), sub.proposal)
    sub_r_sum = jnp.where(first, r1, sub.r_sum + r1)

    # iterative U-turn checks against the subtree's checkpoints
    leaf_index = sub.count
    idx_min, idx_max = _ckpt_range(leaf_index)
    is_even = (leaf_index % 2) == 0
    levels = jnp.arange(settings.max_tree_depth)
    write = (is_even & (levels == idx_max))[:, None]
    ckpt_r = jnp.where(write, r1[None, :], sub.ckpt_r)
    ckpt_r_sum = jnp.where(write, sub_r_sum[None, :], sub.ckpt_r_sum)
    turns = jax.vmap(lambda cr, crs: _is_turning(imm, cr, r1, sub_r_sum - crs + cr, dense))(ckpt_r, ckpt_r_sum)
    sub_turning = jnp.any(turns & (levels >= idx_min) & (levels <= idx_max))
    sub_count = leaf_index + 1

    tr = tr._replace(
        z_end=jnp.where(pick, z1[None, :], tr.z_end),
        r_end=jnp.where(pick, r1[None, :], tr.r_end),
        g_end=jnp.where(pick, g1[None, :], tr.g_end),
        logp_end=jnp.where(pick[:, 0], logp1, tr.logp_end),
        sum_accept=tr.sum_accept + accept_prob,
        num_steps=tr.num_steps + 1,
    )
    sub = Subtree(sub_proposal, sub_weight, sub_r_sum, sub_count, ckpt_r, ckpt_r_sum)
    state = state._replace(rng_key=key, trajectory=tr, subtree=sub)

    # a doubling ends: merge the subtree into the tree (biased progressive sampling)
    subtree_done = (sub_count == (1 << tr.depth)) | sub_turning | diverging
    valid = ~sub_turning & ~diverging
    merge_prob = jnp.where(valid, jnp.minimum(1.0, jnp.exp(sub_weight - tr.weight)), 0.0)
    take_sub = u[1] < merge_prob
    tree_r_sum = tr.r_sum + sub_r_sum
    depth = tr.depth + 1
    tree_turning = _is_turning(imm, tr.r_end[0], tr.r_end[1], tree_r_sum, dense)
    merged = state._replace(
        trajectory=tr._replace(
            proposal=_select(take_sub, sub_proposal, tr.proposal),
            weight=jnp.logaddexp(tr.weight, sub_weight),
            r_sum=tree_r_sum,
            depth=depth,
            going_right=u[2] < 0.5,
        ),
        subtree=sub._replace(count=jnp.zeros_like(sub_count)),
    )
    state = _select(subtree_done, merged, state)
    transition_done = subtree_done & (~valid | tree_turning | (depth >= settings.max_tree_depth))
    finished, stats = _finish_transition(state, diverging, num_tune, settings, u)
    # output buffers are written one row in place, never selected whole
    # rows 0..num_draws-1 are draws; the extra last row absorbs the writes that are not draws
    buffers = state.buffers
    record = active & transition_done & (state.num_done >= num_tune)
    slot = jnp.where(record, state.num_done - num_tune, buffers.draws.shape[0] - 1)
    new_buffers = DrawBuffers(
        draws=buffers.draws.at[slot].set(finished.point.z),
        stats=jax.tree.map(lambda buf, v: buf.at[slot].set(v.astype(buf.dtype)), buffers.stats, stats),
    )
    small = lambda st: st._replace(buffers=None)  # noqa: E731
    out = _select(transition_done, small(finished), small(state))
    out = _select(active, out, small(before))
    return out._replace(buffers=new_buffers, num_grads=before.num_grads + active.astype(before.num_grads.dtype))


@functools.cache
def _schedule(num_tune: int) -> np.ndarray:
    """Stan's warmup schedule ``[num_tune, 2]``: (stage: 0 fast / 1 slow, is slow-window end)."""
    with jax.ensure_compile_time_eval():
        return np.asarray(build_schedule(num_tune), dtype=np.int32).reshape(num_tune, 2)


def _finish_transition(state: StepwiseState, diverging, num_tune: int, settings: KernelSettings, u):
    """Accept the proposal, adapt during warmup, and start the next transition.

    Returns the new state (buffers untouched) and the finished transition's ``SampleStats``.
    """
    dense = settings.dense_mass
    tr = state.trajectory
    accept_rate = tr.sum_accept / tr.num_steps
    t = state.num_done
    point = Point(tr.proposal.z, tr.proposal.logp, tr.proposal.grad)
    state = state._replace(point=point)
    if num_tune > 0:
        schedule = _schedule(num_tune)
        index = jnp.clip(t, 0, num_tune - 1)
        stage = jnp.asarray(schedule[:, 0])[index]
        window_end = jnp.asarray(schedule[:, 1])[index].astype(bool)
        adapted = _adapt(state.adaptation, point.z, stage, window_end, t == num_tune - 1, accept_rate, settings)
        state = state._replace(adaptation=_select(t < num_tune, adapted, state.adaptation))
    stats = SampleStats(
        diverging=diverging,
        tree_depth=tr.depth,
        n_steps=tr.num_steps,
        energy=tr.proposal.energy,
        lp=point.logp,
        acceptance_rate=accept_rate,
        step_size=state.adaptation.step_size,
    )
    state = state._replace(num_done=t + 1)
    return _start_transition(state, dense, u), stats


def build(logdensity_fn: Callable, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm:
    """Stepwise NUTS bound to one problem: ``step`` is ONE leapfrog step (``loop="leapfrog"``).

    Warmup adapts inside ``step`` (Stan's windows over the first ``num_tune`` transitions), so
    there is no separate ``warmup``. A single chain's own while loop would, under ``vmap``, make
    JAX select the whole output buffers at every step; ``engine.sampling.batch`` instead runs one loop
    over the whole chunk until every lane ``is_done``.
    """
    total = schedule.num_total

    def init(rng_key, position, inverse_mass_matrix=None) -> StepwiseState:
        return init_state(rng_key, logdensity_fn, position, schedule.num_draws, settings, inverse_mass_matrix)

    def one_step(state: StepwiseState):
        return step(state, logdensity_fn, schedule.num_tune, total, settings), None

    def outputs(state: StepwiseState):
        """``(draws [num_draws, dim], SampleStats)`` of a finished chain (the spare row dropped)."""
        buffers = state.buffers
        return buffers.draws[..., :-1, :], jax.tree.map(lambda a: a[..., :-1], buffers.stats)

    return SamplingAlgorithm(
        init=init, warmup=None, step=one_step, outputs=outputs, is_done=lambda s: s.num_done >= total,
        num_grads=lambda s: s.num_grads,
    )



KERNEL = Kernel(name="stepwise", description="stepwise NUTS", build=build, loop="leapfrog")

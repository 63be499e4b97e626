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

from engine.samplers import NUTSSettings, SampleStats
from engine.linalg import solve_triangular

STEPWISE = True
"""``engine.batch`` drives this kernel's :func:`init` / :func:`step` itself (one batch-wide loop)."""

MAX_DELTA_ENERGY = 1000.0
"""Energy error above which a leapfrog step counts as divergent (Stan's and PyMC's value)."""


class StepwiseState(NamedTuple):
    """One chain's full state between leapfrog steps.

    Chain: ``rng_key``, ``num_done`` (transitions finished), ``z``/``logp``/``grad`` (current
    sample). Trajectory of the transition in flight: ``z_end``, ``r_end``, ``g_end``,
    ``logp_end`` (``[2, ...]``, index 0 the left end, 1 the right end), ``energy0``, the tree's
    proposal (``prop_*``), ``tree_weight`` (log), ``tree_r_sum``, ``depth`` (doublings done),
    ``going_right``. Subtree being built: ``sub_*`` and the U-turn checkpoints ``ckpt_r``,
    ``ckpt_r_sum`` (``[max_tree_depth, dim]``). Transition statistics: ``sum_accept``,
    ``num_steps``. Adaptation: ``da_state``, ``mm_state``, ``step_size``,
    ``inverse_mass_matrix``, ``mass_chol`` (Cholesky factor of the inverse mass matrix when
    dense). Output buffers ``draws [num_draws, dim]`` and ``stats`` (``SampleStats`` of
    ``[num_draws]``).
    """

    rng_key: jax.Array
    num_done: jax.Array
    z: jax.Array
    logp: jax.Array
    grad: jax.Array
    z_end: jax.Array
    r_end: jax.Array
    g_end: jax.Array
    logp_end: jax.Array
    energy0: jax.Array
    prop_z: jax.Array
    prop_logp: jax.Array
    prop_grad: jax.Array
    prop_energy: jax.Array
    tree_weight: jax.Array
    tree_r_sum: jax.Array
    depth: jax.Array
    going_right: jax.Array
    sub_z: jax.Array
    sub_logp: jax.Array
    sub_grad: jax.Array
    sub_energy: jax.Array
    sub_weight: jax.Array
    sub_r_sum: jax.Array
    sub_count: jax.Array
    ckpt_r: jax.Array
    ckpt_r_sum: jax.Array
    sum_accept: jax.Array
    num_steps: jax.Array
    da_state: NamedTuple
    mm_state: NamedTuple
    step_size: jax.Array
    inverse_mass_matrix: jax.Array
    mass_chol: jax.Array
    draws: jax.Array
    stats: SampleStats


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
    factor = state.mass_chol if dense else state.inverse_mass_matrix
    r = _draw_momentum(u[3:], factor, dense)
    energy0 = -state.logp + _kinetic(state.inverse_mass_matrix, r, dense)
    two = lambda a: jnp.stack([a, a])  # noqa: E731
    return state._replace(
        z_end=two(state.z),
        r_end=two(r),
        g_end=two(state.grad),
        logp_end=two(state.logp),
        energy0=energy0,
        prop_z=state.z,
        prop_logp=state.logp,
        prop_grad=state.grad,
        prop_energy=energy0,
        tree_weight=jnp.zeros_like(energy0),
        tree_r_sum=r,
        depth=jnp.zeros_like(state.depth),
        going_right=u[2] < 0.5,
        sub_count=jnp.zeros_like(state.sub_count),
        sum_accept=jnp.zeros_like(state.sum_accept),
        num_steps=jnp.zeros_like(state.num_steps),
    )


def init(rng_key, logdensity_fn: Callable, position, num_draws: int, settings: NUTSSettings) -> StepwiseState:
    """State at ``position`` with a fresh transition started and identity mass matrix."""
    dim = position.shape[0]
    dtype = position.dtype
    logp, grad = jax.value_and_grad(logdensity_fn)(position)
    dense = settings.dense_mass
    da_init, _, _ = dual_averaging_adaptation(settings.target_accept)
    mm_init, _, _ = mass_matrix_adaptation(not dense)
    imm = jnp.eye(dim, dtype=dtype) if dense else jnp.ones(dim, dtype)
    zero = jnp.zeros((), dtype)
    izero = jnp.zeros((), jnp.int32)
    vec = jnp.zeros(dim, dtype)
    pair = jnp.zeros((2, dim), dtype)
    state = StepwiseState(
        rng_key=rng_key,
        num_done=izero,
        z=position,
        logp=logp,
        grad=grad,
        z_end=pair,
        r_end=pair,
        g_end=pair,
        logp_end=jnp.zeros(2, dtype),
        energy0=zero,
        prop_z=vec,
        prop_logp=zero,
        prop_grad=vec,
        prop_energy=zero,
        tree_weight=zero,
        tree_r_sum=vec,
        depth=izero,
        going_right=jnp.zeros((), bool),
        sub_z=vec,
        sub_logp=zero,
        sub_grad=vec,
        sub_energy=zero,
        sub_weight=zero,
        sub_r_sum=vec,
        sub_count=izero,
        ckpt_r=jnp.zeros((settings.max_tree_depth, dim), dtype),
        ckpt_r_sum=jnp.zeros((settings.max_tree_depth, dim), dtype),
        sum_accept=zero,
        num_steps=izero,
        da_state=jax.tree.map(lambda a: jnp.asarray(a, dtype), da_init(settings.initial_step_size)),
        mm_state=jax.tree.map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a), mm_init(dim)),
        step_size=jnp.asarray(settings.initial_step_size, dtype),
        inverse_mass_matrix=imm,
        mass_chol=jnp.eye(dim, dtype=dtype) if dense else vec,
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
    )
    key, u = _uniforms(rng_key, dim, dtype)
    return _start_transition(state._replace(rng_key=key), dense, u)


def _adapt(state: StepwiseState, stage, window_end, is_last, accept_rate, settings: NUTSSettings):
    """Stan windowed adaptation after warmup transition ``num_done``."""
    dense = settings.dense_mass
    da_init, da_update, _ = dual_averaging_adaptation(settings.target_accept)
    _, mm_update, mm_final = mass_matrix_adaptation(not dense)
    da_state = da_update(state.da_state, accept_rate)
    mm_state = _select(stage == 1, mm_update(state.mm_state, state.z), state.mm_state)
    # end of a slow window: new mass matrix, dual averaging restarted at the averaged step
    mm_closed = mm_final(mm_state)
    da_restart = da_init(jnp.exp(da_state.log_step_size_avg))
    mm_state = _select(window_end, mm_closed, mm_state)
    da_state = _select(window_end, jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), da_restart, da_state), da_state)
    imm = jnp.where(window_end, mm_closed.inverse_mass_matrix, state.inverse_mass_matrix)
    step_size = jnp.where(is_last, jnp.exp(da_state.log_step_size_avg), jnp.exp(da_state.log_step_size))
    chol = jnp.linalg.cholesky(imm) if dense else state.mass_chol
    return state._replace(
        da_state=da_state,
        mm_state=mm_state,
        inverse_mass_matrix=imm.astype(state.z.dtype),
        mass_chol=chol.astype(state.z.dtype),
        step_size=step_size.astype(state.z.dtype),
    )


def step(state: StepwiseState, logdensity_fn: Callable, num_tune: int, num_total: int, settings: NUTSSettings) -> StepwiseState:
    """Advance one chain by exactly one leapfrog step (and finish whatever that step completes).

    A chain that has finished its ``num_total`` transitions is left unchanged, so a batch can
    keep stepping until its last chain is done.
    """
    active = state.num_done < num_total
    dense = settings.dense_mass
    before = state
    imm = state.inverse_mass_matrix
    key, u = _uniforms(state.rng_key, state.z.shape[0], state.z.dtype)
    side = state.going_right.astype(jnp.int32)
    eps = jnp.where(state.going_right, state.step_size, -state.step_size)

    # one leapfrog step from the end of the trajectory in the current direction
    # two-row and checkpoint updates as one-hot selects: elementwise, fused, no scatter
    pick = (jnp.arange(2) == side)[:, None]
    z0 = jnp.where(state.going_right, state.z_end[1], state.z_end[0])
    r0 = jnp.where(state.going_right, state.r_end[1], state.r_end[0])
    g0 = jnp.where(state.going_right, state.g_end[1], state.g_end[0])
    r_half = r0 + 0.5 * eps * g0
    z1 = z0 + eps * _velocity(imm, r_half, dense)
    logp1, g1 = jax.value_and_grad(logdensity_fn)(z1)
    r1 = r_half + 0.5 * eps * g1
    energy1 = -logp1 + _kinetic(imm, r1, dense)
    delta = energy1 - state.energy0
    delta = jnp.where(jnp.isnan(delta), jnp.inf, delta)
    leaf_weight = -delta
    diverging = delta > MAX_DELTA_ENERGY
    accept_prob = jnp.minimum(1.0, jnp.exp(-delta))

    # uniform progressive sampling inside the subtree
    first = state.sub_count == 0
    sub_weight = jnp.where(first, leaf_weight, jnp.logaddexp(state.sub_weight, leaf_weight))
    take_leaf = first | (u[0] < jnp.exp(leaf_weight - sub_weight))
    sub_z = jnp.where(take_leaf, z1, state.sub_z)
    sub_logp = jnp.where(take_leaf, logp1, state.sub_logp)
    sub_grad = jnp.where(take_leaf, g1, state.sub_grad)
    sub_energy = jnp.where(take_leaf, energy1, state.sub_energy)
    sub_r_sum = jnp.where(first, r1, state.sub_r_sum + r1)

    # iterative U-turn checks against the subtree's checkpoints
    leaf_index = state.sub_count
    idx_min, idx_max = _ckpt_range(leaf_index)
    is_even = (leaf_index % 2) == 0
    levels = jnp.arange(settings.max_tree_depth)
    write = (is_even & (levels == idx_max))[:, None]
    ckpt_r = jnp.where(write, r1[None, :], state.ckpt_r)
    ckpt_r_sum = jnp.where(write, sub_r_sum[None, :], state.ckpt_r_sum)
    turns = jax.vmap(lambda cr, crs: _is_turning(imm, cr, r1, sub_r_sum - crs + cr, dense))(ckpt_r, ckpt_r_sum)
    sub_turning = jnp.any(turns & (levels >= idx_min) & (levels <= idx_max))
    sub_count = leaf_index + 1

    state = state._replace(
        rng_key=key,
        z_end=jnp.where(pick, z1[None, :], state.z_end),
        r_end=jnp.where(pick, r1[None, :], state.r_end),
        g_end=jnp.where(pick, g1[None, :], state.g_end),
        logp_end=jnp.where(pick[:, 0], logp1, state.logp_end),
        sub_z=sub_z, sub_logp=sub_logp, sub_grad=sub_grad, sub_energy=sub_energy,
        sub_weight=sub_weight, sub_r_sum=sub_r_sum, sub_count=sub_count,
        ckpt_r=ckpt_r, ckpt_r_sum=ckpt_r_sum,
        sum_accept=state.sum_accept + accept_prob,
        num_steps=state.num_steps + 1,
    )

    # a doubling ends: merge the subtree into the tree (biased progressive sampling)
    subtree_done = (sub_count == (1 << state.depth)) | sub_turning | diverging
    valid = ~sub_turning & ~diverging
    merge_prob = jnp.where(valid, jnp.minimum(1.0, jnp.exp(sub_weight - state.tree_weight)), 0.0)
    take_sub = u[1] < merge_prob
    tree_r_sum = state.tree_r_sum + sub_r_sum
    depth = state.depth + 1
    tree_turning = _is_turning(imm, state.r_end[0], state.r_end[1], tree_r_sum, dense)
    merged = state._replace(
        prop_z=jnp.where(take_sub, sub_z, state.prop_z),
        prop_logp=jnp.where(take_sub, sub_logp, state.prop_logp),
        prop_grad=jnp.where(take_sub, sub_grad, state.prop_grad),
        prop_energy=jnp.where(take_sub, sub_energy, state.prop_energy),
        tree_weight=jnp.logaddexp(state.tree_weight, sub_weight),
        tree_r_sum=tree_r_sum,
        depth=depth,
        going_right=u[2] < 0.5,
        sub_count=jnp.zeros_like(sub_count),
    )
    state = _select(subtree_done, merged, state)
    transition_done = subtree_done & (~valid | tree_turning | (depth >= settings.max_tree_depth))
    finished, stats = _finish_transition(state, diverging, num_tune, settings, u)
    # output buffers are written one row in place, never selected whole
    # rows 0..num_draws-1 are draws; the extra last row absorbs the writes that are not draws
    record = active & transition_done & (state.num_done >= num_tune)
    slot = jnp.where(record, state.num_done - num_tune, state.draws.shape[0] - 1)
    draws = state.draws.at[slot].set(finished.z)
    new_stats = jax.tree.map(lambda buf, v: buf.at[slot].set(v.astype(buf.dtype)), state.stats, stats)
    small = lambda st: st._replace(draws=None, stats=None)  # noqa: E731
    out = _select(transition_done, small(finished), small(state))
    out = _select(active, out, small(before))
    return out._replace(draws=draws, stats=new_stats)


@functools.cache
def _schedule(num_tune: int) -> np.ndarray:
    """Stan's warmup schedule ``[num_tune, 2]``: (stage: 0 fast / 1 slow, is slow-window end)."""
    with jax.ensure_compile_time_eval():
        return np.asarray(build_schedule(num_tune), dtype=np.int32).reshape(num_tune, 2)


def _finish_transition(state: StepwiseState, diverging, num_tune: int, settings: NUTSSettings, u):
    """Accept the proposal, adapt during warmup, and start the next transition.

    Returns the new state (buffers untouched) and the finished transition's ``SampleStats``.
    """
    dense = settings.dense_mass
    accept_rate = state.sum_accept / state.num_steps
    t = state.num_done
    state = state._replace(z=state.prop_z, logp=state.prop_logp, grad=state.prop_grad)
    if num_tune > 0:
        schedule = _schedule(num_tune)
        index = jnp.clip(t, 0, num_tune - 1)
        stage = jnp.asarray(schedule[:, 0])[index]
        window_end = jnp.asarray(schedule[:, 1])[index].astype(bool)
        adapted = _adapt(state, stage, window_end, t == num_tune - 1, accept_rate, settings)
        state = _select(t < num_tune, adapted, state)
    stats = SampleStats(
        diverging=diverging,
        tree_depth=state.depth,
        n_steps=state.num_steps,
        energy=state.prop_energy,
        lp=state.logp,
        acceptance_rate=accept_rate,
        step_size=state.step_size,
    )
    state = state._replace(num_done=t + 1)
    return _start_transition(state, dense, u), stats


def run_chain(rng_key, logdensity_fn: Callable, position, *, num_tune: int, num_draws: int, settings: NUTSSettings):
    """Warmup then sample one chain; returns ``(positions [num_draws, dim], SampleStats)``.

    For ONE chain only: under ``vmap`` the loop's batched predicate would make JAX select the
    whole output buffers at every step. ``engine.batch`` instead drives :func:`step` with one
    loop over the whole batch (``STEPWISE = True``).
    """
    state = init(rng_key, logdensity_fn, position, num_draws, settings)
    total = num_tune + num_draws
    state = jax.lax.while_loop(
        lambda s: s.num_done < total,
        lambda s: step(s, logdensity_fn, num_tune, total, settings),
        state,
    )
    return outputs(state)


def outputs(state: StepwiseState):
    """``(draws [num_draws, dim], SampleStats)`` of a finished chain (the spare row dropped)."""
    return state.draws[..., :-1, :], jax.tree.map(lambda a: a[..., :-1], state.stats)


def is_done(state: StepwiseState, num_total: int):
    """Whether the chain has finished all its transitions."""
    return state.num_done >= num_total

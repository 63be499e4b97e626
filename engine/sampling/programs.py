"""The jitted programs of a chunk: the kernel bound to each problem, vmapped over problems and
chains, warmup then draws (or one ``while_loop`` for a ``loop="leapfrog"`` kernel), and the init
check; kept in a bounded cache keyed by value (model, settings, summary), never per call.

``engine.sampling.batch`` runs them chunk by chunk (and re-exports the public names);
``engine.sampling.stopping`` builds its block programs from :func:`bound_algorithm` and
:func:`cached`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from engine.caching import LRUCache
from engine.errors import InputError
from engine.model.compile import CompiledModel
from engine.sampling.kernels import get_kernel
from engine.sampling.kernels.base import SamplingAlgorithm, Schedule, pool_step_sizes
from engine.sampling.starts import START_INVERSE_MASS, problem_starts

if TYPE_CHECKING:
    from engine.sampling.batch import BatchConfig

__all__ = ["MAX_CACHED_PROGRAMS", "bound_algorithm", "build_chunk_program", "build_init_fn", "cached",
           "local_devices"]

MAX_CACHED_PROGRAMS = 32
"""Compiled chunk programs kept per process (least recently used dropped first)."""

_PROGRAMS = LRUCache(MAX_CACHED_PROGRAMS)


def cached(compiled: CompiledModel, kind: str, config: BatchConfig, summary_fn, build):
    """One jitted program per (compiled model, settings, summary); the seed is an argument, not
    part of the key."""
    return _PROGRAMS.get_or_build((id(compiled), kind, config.program_key(), summary_fn), build, owner=compiled)


def local_devices(requested: int | None) -> list:
    """The devices a run shards over: the first ``requested`` local ones (-1: all)."""
    available = jax.local_devices()
    if requested is None or requested == 1:
        return available[:1]
    count = len(available) if requested == -1 else int(requested)
    if count < 1 or count > len(available):
        raise InputError(
            f"runtime asks for {requested} devices but JAX sees {len(available)} "
            f"({available[0].platform}); on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
        )
    return available[:count]


def build_chunk_program(compiled: CompiledModel, config: BatchConfig, summary_fn):
    def build():
        chunk_fn = _make_chunk_fn(compiled, config, summary_fn)
        devices = local_devices(config.runtime.devices)
        if len(devices) == 1:
            return jax.jit(chunk_fn)
        from jax.sharding import Mesh, PartitionSpec

        mesh = Mesh(np.array(devices), ("problem",))
        sharded = jax.shard_map(
            chunk_fn,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec("problem"), PartitionSpec("problem")),
            out_specs=PartitionSpec("problem"),
            check_vma=False,
        )
        return jax.jit(sharded)

    return cached(compiled, "chunk", config, summary_fn, build)


def _warm(algorithm: SamplingAlgorithm, rng_key, position, schedule: Schedule):
    """Init and warmup of one ``loop="draws"`` kernel (one chain, or one problem's chains) ->
    (state, gradients of warmup ``step``s the driver ran)."""
    state = algorithm.init(rng_key, position)
    warmup_grads = jnp.zeros((), jnp.int32)
    if algorithm.warmup is not None:
        return algorithm.warmup(state), warmup_grads

    def tune(carry, _):
        s, grads = carry
        s, transition = algorithm.step(s)
        return (s, grads + transition.stats.n_steps.sum().astype(jnp.int32)), None

    (state, warmup_grads), _ = jax.lax.scan(tune, (state, warmup_grads), None, length=schedule.num_tune)
    return state, warmup_grads


def _draw(algorithm: SamplingAlgorithm, state, warmup_grads, schedule: Schedule):
    """``num_draws`` scanned steps from a warmed-up state -> (``Transition`` of ``[num_draws,
    ...]`` arrays, gradient count, warmup included)."""
    state, transitions = jax.lax.scan(lambda s, _: algorithm.step(s), state, None, length=schedule.num_draws)
    if algorithm.num_grads is not None:
        return transitions, algorithm.num_grads(state)
    return transitions, warmup_grads + transitions.stats.n_steps.sum().astype(jnp.int32)


def bound_algorithm(kernel, compiled: CompiledModel, settings, schedule: Schedule, data) -> SamplingAlgorithm:
    """``kernel`` bound to ONE problem's log density; a problem whose data carries
    ``START_INVERSE_MASS`` starts every chain's kernel (and its adaptation) from that metric."""
    built = kernel.build(lambda x: compiled.logdensity_fn(x, data), settings, schedule)
    if START_INVERSE_MASS in data:
        built = built._replace(init=functools.partial(built.init, inverse_mass_matrix=data[START_INVERSE_MASS]))
    return built


def _make_chunk_fn(compiled: CompiledModel, config: BatchConfig, summary_fn):
    kernel = get_kernel(config.sampler.name)
    if kernel.runs_on_host:
        raise ValueError(f"sampler {kernel.name!r} loops on the host; it has no batched program")
    schedule = Schedule(int(config.sampler.tune), int(config.sampler.draws))
    settings = config.sampler.kernel_settings
    start = functools.partial(problem_starts, compiled, config)

    def algorithm(data) -> SamplingAlgorithm:
        return bound_algorithm(kernel, compiled, settings, schedule, data)

    def over_chains(fn):
        return fn if kernel.chains_inside else jax.vmap(fn)

    def over_lanes(method, data):
        """``method(algorithm)`` applied to the states of every problem (with its data) and chain."""
        return lambda states: jax.vmap(lambda st, d: over_chains(method(algorithm(d)))(st))(states, data)

    def finish(positions, stats, ok, data):
        values = jax.vmap(jax.vmap(lambda x: compiled.constrain_fn(x, data)))(positions)
        summary = None if summary_fn is None else summary_fn(values, stats, data)
        loglik = None
        if config.keep_draws and config.log_likelihood:
            loglik = jax.vmap(jax.vmap(lambda x: compiled.loglik_fn(x, data)))(positions)
        kept = (values, stats, loglik) if config.keep_draws else (None, None, None)
        return kept, jnp.all(ok), summary

    def one_problem(root_key, index, data):
        positions, ok, run_keys = start(root_key, index, data)
        alg = algorithm(data)
        states, warmup_grads = over_chains(functools.partial(_warm, alg, schedule=schedule))(run_keys, positions)
        if settings.pool_step_size and not kernel.chains_inside:
            states = pool_step_sizes(states)
        (draws, stats), num_grads = over_chains(functools.partial(_draw, alg, schedule=schedule))(states, warmup_grads)
        if kernel.chains_inside:  # [draw, chain, ...] -> [chain, draw, ...]
            draws, stats = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (draws, stats))
        return finish(draws, stats, ok, data) + (jnp.sum(num_grads).astype(jnp.int32),)

    def chunk_fn(root_key, indices, data):
        if kernel.loop == "draws":
            return jax.vmap(one_problem, in_axes=(None, 0, 0))(root_key, indices, data)
        positions, ok, run_keys = jax.vmap(start, in_axes=(None, 0, 0))(root_key, indices, data)
        states = jax.vmap(lambda k, x, d: over_chains(algorithm(d).init)(k, x))(run_keys, positions, data)
        # one loop for the whole chunk: its predicate is a reduction, not batched, so JAX never
        # selects the output buffers whole; finished chains idle inside ``step``
        states = jax.lax.while_loop(
            lambda st: jnp.any(~over_lanes(lambda a: a.is_done, data)(st)),
            over_lanes(lambda a: lambda s: a.step(s)[0], data),
            states,
        )
        draws, stats = over_lanes(lambda a: a.outputs, data)(states)
        num_grads = over_lanes(lambda a: a.num_grads, data)(states).reshape(indices.shape[0], -1).sum(-1)
        return jax.vmap(finish)(draws, stats, ok, data) + (num_grads.astype(jnp.int32),)

    return chunk_fn


def build_init_fn(compiled: CompiledModel, config: BatchConfig):
    return cached(compiled, "init", config, None, lambda: _make_init_fn(compiled, config))


def _make_init_fn(compiled: CompiledModel, config: BatchConfig):
    def one_problem(root_key, index, data):
        _, ok, _ = problem_starts(compiled, config, root_key, index, data)
        return jnp.all(ok)

    return jax.jit(jax.vmap(one_problem, in_axes=(None, 0, 0)))

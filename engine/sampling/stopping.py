"""Per-problem stopping: warm up once, then draw in blocks until each problem is certified.

A chunk runs as four kinds of compiled programs, each cached with the driver's other programs
(the warmup, block, first gate and finish compiled ahead of time, side by side: :func:`compile_ahead`,
:mod:`engine.sampling.ahead`):

1. ``warmup``: starts, the kernel's warmup, and zeroed draw buffers ``[lanes, chain, max_draws,
   ...]`` (one spare lane more than the chunk, which padded lanes point at).
2. ``block``: for the lanes still active (an index vector, padded to a bucket), ``block_draws``
   transitions per chain from the kernel state each lane stopped at, written into the buffers at
   the current draw count. One compile per bucket size: the chunk size, then ``MIN_BUCKET * 4**k``
   lanes once one of them holds the active lanes in at most half the chunk, so lanes that
   retired cost nothing once enough of them have.
3. ``gate``: :func:`engine.sampling.gate.gate` over the same lanes' kept draws, on the first
   ``window`` draws of the buffers only (:func:`engine.sampling.gate.gate_window`: the smallest
   of ``GATE_WINDOWS`` holding the kept draws, a static size chosen on the host) and on the
   active lanes in buckets down to ``GATE_MIN_BUCKET``. Each (lanes, window) shape is one more
   compile, as costly on a small CPU as many gates, so :class:`GatePrograms` runs a gate on the
   smallest shape already compiled that holds it until the time that wastes pays for compiling
   its own (rent or buy); the gate over the chunk's lanes and 512 draws is compiled ahead.
4. ``finish``: constrained values, ``summary_fn`` over each problem's kept draws only (it is
   called with ``num_draws=``, see :func:`run_chunk`), and the gradient counts.

Every problem of a chunk starts drawing at the same time, so all active lanes always hold the
same number of draws: the count is a scalar argument (traced, so one program serves all
counts). A problem whose kept draws pass the gate retires with them. One whose kept draws hold a
divergent transition retires at once, unconverged: its kept draws only grow, so the gate's "no
divergence" can never hold again, and drawing on to ``max_draws`` would only cost time (for
``sampler="auto"``, time before its NUTS rerun). One that reaches ``max_draws`` without passing
stops, unconverged (its ``num_draws`` is ``max_draws``). The gate is rechecked by the caller's
own diagnostics, never assumed.

As soon as a chunk's inputs are known, :func:`compile_ahead` lowers every program from their
shapes (the block's and the finish's inputs from the previous program's output shapes) and
compiles them on a thread pool, so their compiles overlap each other and the warmup's run.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.sampling.ahead import AheadProgram, abstract, device_ids, placement_of
from engine.sampling.gate import gate, gate_window
from engine.sampling.kernels import get_kernel
from engine.sampling.kernels.base import Schedule, pool_step_sizes

__all__ = ["MIN_BUCKET", "StopPrograms", "build_stop_programs", "compile_ahead", "run_chunk", "bucket_size", "pad_kept",
           "chunk_outputs"]

MIN_BUCKET = 64
"""Fewest lanes a block program is compiled for: below it, smaller programs would cost more to
compile than the retired lanes they skip."""


COMPILE_AHEAD = True
"""Compile a chunk's programs ahead of time and side by side (:func:`compile_ahead`); ``False``
runs the plain jitted programs, each compiled on its first call (same results, bitwise)."""


class StopPrograms(NamedTuple):
    """The programs of a stopping run (see the module docstring): the warmup, block and finish,
    each an :class:`~engine.sampling.ahead.AheadProgram` (a jitted program, callable as one),
    and the gate's family of programs (:class:`GatePrograms`)."""

    warmup: object
    block: object
    finish: object
    gate: object


GATE_MIN_BUCKET = 4
"""Fewest lanes the gate program is compiled for: the gate costs far more per lane than a block
of draws on CPU and compiles quickly, so its lane buckets go much lower than the block's."""

BUCKET_FACTOR = 4
"""Lane buckets shrink by this factor: each new bucket size compiles the block program again
(tens of seconds on a small CPU), so there are few sizes: ``MIN_BUCKET * 4**k``."""


def bucket_size(num_active: int, chunk_size: int, min_bucket: int | None = None) -> int:
    """Lanes of the block program for ``num_active`` active problems: the chunk size, or the
    smallest ``min_bucket * BUCKET_FACTOR**k`` (k >= 0; default :data:`MIN_BUCKET`, read at the
    call) that holds them when that is at most half the chunk."""
    size = int(MIN_BUCKET if min_bucket is None else min_bucket)
    while size < num_active:
        size *= BUCKET_FACTOR
    return int(chunk_size) if 2 * size > chunk_size else size


AHEAD_GATE_DRAWS = 500
"""Draws per chain the gate compiled ahead holds (its window, :func:`engine.sampling.gate.gate_window`,
is 512): most problems retire by then at a target ESS of 400 over 4 chains (the demo audit's
median is 200 draws, 99% by 500), so one program serves most gates of a chunk; the first gates
run it at up to twice the cost of the 256-draw window, until the rent-or-buy rule of
:class:`GatePrograms` finds that window worth its compile."""

GATE_COMPILE_SECONDS = 1.0
"""What compiling one more gate program is assumed to cost until one has been timed."""


class GatePrograms:
    """The gate's programs, one per (lanes, window) shape, and the choice of the shape each
    block's gate runs on.

    The smallest shape for a gate (its *ideal*: the active lanes in a bucket down to
    :data:`GATE_MIN_BUCKET`, the smallest window of :func:`engine.sampling.gate.gate_window`)
    costs least to run, but each new shape is one more XLA compile, which on a small CPU costs
    as much as many runs of the gate. So a gate runs on the smallest program already compiled
    whose shape holds it, and its ideal program is compiled only once the run time spent on the
    larger one beyond the ideal's share (summed over the gates that would have used it) reaches
    what a compile has cost: the rent-or-buy rule, never more than twice the best choice made
    knowing the future. Without a program holding the gate, the ideal one is compiled at once.
    Compiles and runs are timed as they happen (a program the persistent compilation cache
    holds "compiles" in a fraction of a second, so the rule then buys at once). The bookkeeping
    is per device (each device compiles its own executables) and thread-safe.
    """

    def __init__(self, gate_fn):
        self._gate_fn = gate_fn
        self._programs: dict[int, AheadProgram] = {}
        self._lock = threading.Lock()
        self._run_seconds: dict[tuple, float] = {}  # (device, lanes, window) -> last run, s
        self._waste: dict[tuple, float] = {}  # (device, lanes, window) -> run time wasted, s
        self.compile_seconds = GATE_COMPILE_SECONDS

    def program(self, window: int) -> AheadProgram:
        """The gate program over the first ``window`` draws (any lanes)."""
        with self._lock:
            if window not in self._programs:
                self._programs[window] = AheadProgram(jax.jit(functools.partial(self._gate_fn, window)))
            return self._programs[window]

    def ahead(self, window: int, device, lanes: int, buffers, diverging):
        """Compile the gate of ``lanes`` lanes over ``window`` draws ahead (abstract inputs)."""
        count = jax.ShapeDtypeStruct((), jnp.int32)
        self.program(window).ahead(buffers, diverging, jax.ShapeDtypeStruct((lanes,), jnp.int32), count)
        with self._lock:
            self._run_seconds.setdefault((device, lanes, window), None)

    def choose(self, device, ideal_lanes: int, ideal_window: int) -> tuple[int, int]:
        """The (lanes, window) a gate whose ideal shape is ``(ideal_lanes, ideal_window)`` runs
        on, by the rent-or-buy rule of the class docstring."""
        ideal = (device, ideal_lanes, ideal_window)
        with self._lock:
            if ideal in self._run_seconds:
                return ideal_lanes, ideal_window
            held = [(lanes * window, lanes, window) for (dev, lanes, window) in self._run_seconds
                    if dev == device and lanes >= ideal_lanes and window >= ideal_window]
            if not held:
                return ideal_lanes, ideal_window
            size, lanes, window = min(held)
            seconds = self._run_seconds[(device, lanes, window)]
            if seconds is None:  # compiled ahead, not run yet: no cost known, use it
                return lanes, window
            waste = self._waste.get(ideal, 0.0) + seconds * (1.0 - ideal_lanes * ideal_window / size)
            if waste >= self.compile_seconds:
                return ideal_lanes, ideal_window
            self._waste[ideal] = waste
            return lanes, window

    def __call__(self, device, lanes: int, window: int, buffers, diverging, lane_index, count):
        """Run the gate of shape ``(lanes, window)`` (``lane_index`` has ``lanes`` entries) ->
        host ``(passed, diagnostics)`` (:func:`engine.sampling.gate.gate`'s, per lane), timing it
        for :meth:`choose`."""
        key = (device, lanes, window)
        program = self.program(window)
        with self._lock:
            new = key not in self._run_seconds
        program.wait(buffers, diverging, lane_index, count)  # a compile ahead is not a run
        started = time.perf_counter()
        passed, diagnostics = jax.device_get(program(buffers, diverging, lane_index, count))
        seconds = time.perf_counter() - started
        with self._lock:
            if new:  # compiled by this call: what a compile costs here (the run is a small part)
                self.compile_seconds = seconds
                self._run_seconds[key] = None
            else:
                self._run_seconds[key] = seconds
        return np.asarray(passed), diagnostics


def build_stop_programs(compiled, config, summary_fn, starts) -> StopPrograms:
    """The programs for ``config`` (a ``BatchConfig`` with ``sampler.target_ess`` set);
    ``starts(root_key, index, data) -> (positions, ok, run_keys)`` is one problem's start."""
    from engine.sampling.programs import bound_algorithm, cached as _cached

    kernel = get_kernel(config.sampler.name)
    sampler = config.sampler
    max_draws, block = sampler.max_draws_per_chain, int(sampler.block_draws)
    target = float(sampler.target_ess)
    schedule = Schedule(int(sampler.tune), max_draws)
    settings = sampler.kernel_settings

    def algorithm(data):
        return bound_algorithm(kernel, compiled, settings, schedule, data)

    def over_chains(fn):
        return fn if kernel.chains_inside else jax.vmap(fn)

    def chain_major(tree):  # a chains_inside scan gives [draw, chain, ...]
        return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree) if kernel.chains_inside else tree

    def scan_steps(alg, state, length):
        def body(carry, _):
            s, grads = carry
            s, transition = alg.step(s)
            return (s, grads + transition.stats.n_steps.sum().astype(jnp.int32)), transition
        (state, grads), transitions = jax.lax.scan(body, (state, jnp.zeros((), jnp.int32)), None, length=length)
        return state, grads, transitions

    def warm_lane(root_key, index, data):
        positions, ok, run_keys = starts(root_key, index, data)
        alg = algorithm(data)

        def warm(key, position):
            state = alg.init(key, position)
            if alg.warmup is not None:
                return alg.warmup(state), jnp.zeros((), jnp.int32)
            state, grads, _ = scan_steps(alg, state, schedule.num_tune)
            return state, grads

        states, grads = over_chains(warm)(run_keys, positions)
        if settings.pool_step_size and not kernel.chains_inside:
            states = pool_step_sizes(states)
        one = jax.eval_shape(lambda s: over_chains(lambda c: alg.step(c)[1])(s), states)
        dim = positions.shape[-1]
        chains = positions.shape[0]
        buffer = jnp.zeros((chains, max_draws, dim), positions.dtype)
        stats = jax.tree.map(lambda a: jnp.zeros((chains, max_draws), a.dtype), one.stats)
        return states, buffer, stats, jnp.sum(grads), jnp.all(ok)

    def warmup_fn(root_key, indices, data):
        return jax.vmap(warm_lane, in_axes=(None, 0, 0))(root_key, indices, data)

    def block_lane(state, data, buffer, stats, count):
        alg = algorithm(data)
        state, grads, (positions, new_stats) = over_chains(lambda s: scan_steps(alg, s, block))(state)
        positions, new_stats = chain_major((positions, new_stats))
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, positions.astype(buffer.dtype), count, axis=1)
        stats = jax.tree.map(
            lambda b, v: jax.lax.dynamic_update_slice_in_dim(b, v.astype(b.dtype), count, axis=1), stats, new_stats
        )
        return state, buffer, stats, jnp.sum(grads)

    def block_fn(states, buffers, stats, grads, data, lanes, count):
        take = lambda a: a[lanes]  # noqa: E731
        new = jax.vmap(block_lane, in_axes=(0, 0, 0, 0, None))(
            jax.tree.map(take, states), jax.tree.map(take, data), buffers[lanes], jax.tree.map(take, stats), count
        )
        state, buffer, stat, grad = new
        put = lambda full, part: full.at[lanes].set(part)  # noqa: E731
        return (jax.tree.map(put, states, state), buffers.at[lanes].set(buffer), jax.tree.map(put, stats, stat),
                grads.at[lanes].add(grad))

    def gate_fn(window, buffers, diverging, lanes, num_draws):
        return jax.vmap(lambda b, d: gate(b, d, num_draws, target, window=window))(buffers[lanes], diverging[lanes])

    def finish_lane(state, buffer, stats, grads, data, num_draws):
        values = jax.vmap(jax.vmap(lambda x: compiled.constrain_fn(x, data)))(buffer)
        summary = None if summary_fn is None else summary_fn(values, stats, data, num_draws=num_draws)
        loglik = None
        if config.keep_draws and config.log_likelihood:
            loglik = jax.vmap(jax.vmap(lambda x: compiled.loglik_fn(x, data)))(buffer)
        kept = (values, stats, loglik) if config.keep_draws else (None, None, None)
        alg = algorithm(data)
        if alg.num_grads is None:
            num_grads = grads
        else:
            num_grads = jnp.sum(over_chains(alg.num_grads)(state)).astype(jnp.int32)
        return kept, summary, num_grads

    def finish_fn(states, buffers, stats, grads, data, num_draws):
        return jax.vmap(finish_lane)(states, buffers, stats, grads, data, num_draws)

    key_fn = functools.partial(_cached, compiled, config=config)
    return StopPrograms(
        warmup=key_fn("stop_warmup", summary_fn=None, build=lambda: AheadProgram(jax.jit(warmup_fn))),
        block=key_fn("stop_block", summary_fn=None,
                     build=lambda: AheadProgram(jax.jit(block_fn, donate_argnums=(0, 1, 2, 3)))),
        finish=key_fn("stop_finish", summary_fn=summary_fn, build=lambda: AheadProgram(jax.jit(finish_fn))),
        gate=key_fn("stop_gate", summary_fn=None, build=lambda: GatePrograms(gate_fn)),
    )


def compile_ahead(programs: StopPrograms, root_key, index, data, num_real: int, block: int, max_draws: int):
    """Run the chunk's warmup program -> its outputs, with every program of the chunk compiled
    ahead of time and side by side.

    Each program is traced and lowered here, in the order the chunk runs them, the next from the
    previous one's output shapes (placed where the chunk's committed inputs are; the block for
    the first bucket), and compiled on :mod:`engine.sampling.ahead`'s thread pool: the warmup's
    and the block's compiles start first, the warmup runs as soon as its own is done, and the
    finish is traced while it runs. A program already compiled for these shapes is not traced
    again."""
    lanes_total = int(index.shape[0])
    place = placement_of((root_key, data))
    warm = programs.warmup.ahead(root_key, index, data)
    lanes = jax.ShapeDtypeStruct((bucket_size(num_real, lanes_total - 1),), jnp.int32)
    count = jax.ShapeDtypeStruct((), jnp.int32)
    blocked = programs.block.ahead(*abstract(warm[:4], place), data, lanes, count)
    out = programs.warmup(root_key, index, data)  # dispatched: it runs while the rest is traced
    buffers, stats = abstract((warm[1], warm[2].diverging), place)
    window = gate_window(max(block, min(AHEAD_GATE_DRAWS, max_draws)), max_draws)
    gate_lanes = bucket_size(num_real, lanes.shape[0], GATE_MIN_BUCKET)
    programs.gate.ahead(window, device_ids(out[1].sharding), gate_lanes, buffers, stats)
    programs.finish.ahead(*abstract(blocked[:4], place), data, jax.ShapeDtypeStruct((lanes_total,), jnp.int32))
    return out


def plain_programs(programs: StopPrograms) -> StopPrograms:
    """The same programs as plain jitted functions (each compiled on its first call)."""
    return StopPrograms(*(getattr(p, "jitted", p) for p in programs))


def run_chunk(programs: StopPrograms, root_key, index: np.ndarray, data, num_real: int, sampler):
    """One chunk with stopping -> ``(kept, ok, summary, num_draws, num_grads, converged)``.

    ``index`` and ``data`` hold the chunk's lanes plus at least one spare lane at the end (the
    target of padded lanes); only the first ``num_real`` lanes are sampled past warmup. A lane
    whose start failed (``ok`` false) is never sampled and keeps 0 draws. Returned arrays are
    device arrays over all lanes; ``num_draws``, ``converged`` host arrays.
    """
    max_draws, block = sampler.max_draws_per_chain, int(sampler.block_draws)
    index = jnp.asarray(index)
    if COMPILE_AHEAD:
        states, buffers, stats, grads, ok = compile_ahead(programs, root_key, index, data, num_real, block, max_draws)
    else:
        programs = plain_programs(programs)
        states, buffers, stats, grads, ok = programs.warmup(root_key, index, data)
    lanes_total = int(index.shape[0])
    spare, chunk = lanes_total - 1, lanes_total - 1
    device = device_ids(buffers.sharding)
    num_draws = np.zeros(lanes_total, np.int32)
    converged = np.zeros(lanes_total, bool)
    active = np.flatnonzero(np.asarray(ok)[:num_real])
    count = 0
    while active.size and count < max_draws:
        size = bucket_size(active.size, chunk)
        lanes = np.full(size, spare, np.int32)
        lanes[: active.size] = active
        states, buffers, stats, grads = programs.block(
            states, buffers, stats, grads, data, jnp.asarray(lanes), np.int32(count)
        )
        count += block
        gate_lanes, window = programs.gate.choose(
            device, bucket_size(active.size, size, GATE_MIN_BUCKET), gate_window(count, max_draws))
        gate_index = np.full(gate_lanes, spare, np.int32)
        gate_index[: active.size] = active
        passed, diagnostics = programs.gate(device, gate_lanes, window, buffers, stats.diverging,
                                            jnp.asarray(gate_index), np.int32(count))
        passed = passed[: active.size]
        diverged = np.asarray(diagnostics["divergences"])[: active.size] > 0  # can never pass: kept draws only grow
        done = passed | diverged | (count >= max_draws)
        num_draws[active[done]] = count
        converged[active[passed]] = True
        active = active[~done]
    kept, summary, num_grads = programs.finish(states, buffers, stats, grads, data, jnp.asarray(num_draws))
    return kept, ok, summary, num_draws, num_grads, converged


def pad_kept(kept, num_draws: np.ndarray):
    """Host draws ``[problem, chain, max_draws, ...]``: entries past each problem's ``num_draws``
    become NaN (floats), False or 0, so no padded draw can pass for a kept one."""
    values, stats, loglik = kept
    if values is None:
        return kept
    mask = np.arange(next(iter(values.values())).shape[2])[None, :] >= num_draws[:, None]  # [problem, draw]

    def blank(arr):
        arr = np.array(arr)
        m = np.broadcast_to(mask[:, None, :].reshape(mask.shape[:1] + (1,) + mask.shape[1:] + (1,) * (arr.ndim - 3)),
                            arr.shape)
        arr[m] = np.nan if np.issubdtype(arr.dtype, np.floating) else 0
        return arr

    values = {k: blank(v) for k, v in values.items()}
    stats = type(stats)(*(blank(a) for a in stats))
    loglik = None if loglik is None else {k: blank(v) for k, v in loglik.items()}
    return values, stats, loglik


def chunk_outputs(todo, stopping, size, devices, arrays, root, problem_index, runner_for):
    """``((start, stop), chunk_fn output)`` for each chunk of ``todo``, in order.

    Without stopping each chunk is one program sharded over ``devices``. With per-problem
    stopping the driver loops on the host, so whole chunks run side by side instead, one per
    device, each driven by its own thread with its inputs committed to its device (each device
    compiles the programs once, so a run of one chunk stays on one device). Stopping chunks
    carry one spare lane (the target of the block programs' padded lanes)."""

    from engine.sampling.batch import chunk_inputs

    def run(bounds, device=None):
        start, stop = bounds
        index, chunk = chunk_inputs(arrays, start, stop, size + 1 if stopping else size)
        if problem_index is not None:
            index = np.asarray(problem_index)[index]
        key = root
        if device is not None:
            chunk, key = jax.device_put((chunk, root), device)
        out = runner_for((int(start), int(stop)))(key, index, chunk, stop - start)
        if device is not None:  # finish on this thread: the next chunk waits for a free device
            out = jax.tree.map(np.asarray, out)
        return bounds, out

    if not stopping or len(devices) == 1 or len(todo) == 1:
        yield from (run(b) for b in todo)
        return
    import queue
    from concurrent.futures import ThreadPoolExecutor

    free = queue.Queue()
    for device in devices:
        free.put(device)
    x64 = bool(jax.config.jax_enable_x64)  # the caller's precision scope; JAX's is per thread

    def on_free_device(bounds):
        device = free.get()
        try:
            with jax.enable_x64(x64):
                return run(bounds, device)
        finally:
            free.put(device)

    with ThreadPoolExecutor(len(devices)) as pool:
        yield from pool.map(on_free_device, todo)

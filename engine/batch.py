"""The one place that adds the problem and chain axes.

A chunk of problems runs as ONE jitted program: ``vmap`` over problems, then over chains, of a
single-chain kernel from ``engine.samplers`` (a multi-chain kernel, ChEES, gets a problem's
chains together and is vmapped over problems only). Problem ``i`` draws every random number from
``fold_in(key(seed), i)`` (``i`` its global index), so its stream does not depend on how problems
are chunked, sharded or spread over devices. The last chunk is padded to the chunk size by
repeating its final problem, so every chunk reuses one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Collection, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.errors import InputError
from engine.compile import CompiledModel, ProblemData
from engine.samplers import NUTSSettings, SampleStats, describe, get_kernel, is_multi_chain

__all__ = ["BatchConfig", "BatchResult", "init_positions", "run_batched", "chunk_grid"]


@dataclass(frozen=True)
class BatchConfig:
    """What to run for every problem.

    sampler
        "blackjax", "numpyro", "stepwise" (NUTS) or "chees" (ChEES-adapted jittered HMC).
    chains, draws, tune
        Chains per problem; kept draws and warmup steps per chain.
    seed
        Root seed; problem ``i`` uses ``fold_in(PRNGKey(seed), i)``.
    batch_size
        Problems per compiled chunk (``None``: all at once).
    settings
        NUTS settings (target acceptance, tree depth, mass matrix).
    precision
        "float64" or "float32" (JAX's x64 mode for the whole run).
    init_tries
        Jittered initial points tried per chain before a problem is declared unstartable.
    jitter
        Half-width of the uniform jitter added to the model's initial point (PyMC's
        ``jitter+adapt_diag`` uses 1).
    keep_draws
        Bring full draws back to the host; otherwise only ``summary_fn``'s output returns.
    log_likelihood
        With ``keep_draws``, also return the pointwise observed log-likelihood of every draw.
    devices
        Local devices to shard each chunk's problem axis over (``jax.shard_map``); ``None`` or 1
        runs on the default device, -1 on all local devices. On CPU, several host devices
        need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts.
    """

    sampler: str = "blackjax"
    chains: int = 4
    draws: int = 1000
    tune: int = 1000
    seed: int = 0
    batch_size: int | None = None
    settings: NUTSSettings = NUTSSettings()
    precision: str = "float64"
    init_tries: int = 20
    jitter: float = 1.0
    keep_draws: bool = True
    log_likelihood: bool = False
    devices: int | None = None

    def __post_init__(self):
        if self.sampler not in ("blackjax", "numpyro", "stepwise", "chees"):
            raise InputError(
                f"sampler must be 'blackjax', 'numpyro', 'stepwise', 'chees' or 'pymc', got {self.sampler!r}"
            )
        if self.sampler == "chees":
            from engine.samplers.chees_hmc import MIN_CHAINS, MIN_TUNE

            if int(self.chains) < MIN_CHAINS:
                raise InputError(f"sampler 'chees' adapts across chains: needs chains >= {MIN_CHAINS}, got {self.chains}")
            if int(self.tune) < MIN_TUNE:
                raise InputError(f"sampler 'chees' needs tune >= {MIN_TUNE} warmup steps, got {self.tune}")
            if self.settings.dense_mass:
                raise InputError("sampler 'chees' adapts a diagonal mass matrix; dense_mass is not available")
        for name in ("chains", "draws"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.tune) < 0:
            raise InputError(f"tune must be >= 0, got {self.tune}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise InputError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.precision not in ("float32", "float64"):
            raise InputError(f"precision must be 'float32' or 'float64', got {self.precision!r}")


class BatchResult(NamedTuple):
    """Host-side results for all problems (leading axis ``problem``).

    draws
        Constrained variable name -> ``[problem, chain, draw, *shape]`` (``None`` unless kept).
    stats
        ``SampleStats`` of ``[problem, chain, draw]`` arrays (``None`` unless draws kept).
    log_likelihood
        Observed name -> ``[problem, chain, draw, *obs_shape]`` (``None`` unless asked).
    init_ok
        ``[problem]`` whether every chain found a finite initial log density.
    summaries
        ``summary_fn``'s per-problem output, stacked (``None`` without ``summary_fn``).
    """

    draws: dict[str, np.ndarray] | None
    stats: SampleStats | None
    log_likelihood: dict[str, np.ndarray] | None
    init_ok: np.ndarray
    summaries: Any


def chunk_grid(num_problems: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` chunk boundaries; the grid a run, its resume and its shards share."""
    size = num_problems if batch_size is None else min(int(batch_size), num_problems)
    return [(s, min(s + size, num_problems)) for s in range(0, num_problems, size)]


def _problem_key(root_key, index):
    return jax.random.fold_in(root_key, index)


def init_positions(rng_key, logdensity_fn: Callable, initial_position, num_tries: int, jitter: float):
    """One chain's start: the first of ``num_tries`` jittered points with a finite log density.

    Returns ``(position [dim], is_finite)``; when no try is finite the unjittered point is
    returned with ``is_finite=False``.
    """
    dim = initial_position.shape[-1]
    noise = jax.random.uniform(rng_key, (num_tries, dim), minval=-jitter, maxval=jitter)
    candidates = initial_position[None, :] + noise.astype(initial_position.dtype)
    lps = jax.vmap(logdensity_fn)(candidates)
    finite = jnp.isfinite(lps)
    first = jnp.argmax(finite)
    ok = jnp.any(finite)
    position = jnp.where(ok, candidates[first], initial_position)
    return position, ok


def _chain_keys(root_key, index, chains):
    keys = jax.random.split(_problem_key(root_key, index), chains)
    return jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [chains, 2]: (init, run)


def _cached(compiled: CompiledModel, kind: str, config: BatchConfig, extra, build):
    """One jitted program per (compiled model, settings); the seed is an argument, not a key."""
    cache = compiled.__dict__.setdefault("_program_cache", {})
    key = (kind, dataclasses.replace(config, seed=0), extra)
    if key not in cache:
        cache[key] = build()
    return cache[key]


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


def _build_chunk_fn(compiled: CompiledModel, config: BatchConfig, summary_fn):
    def build():
        chunk_fn = _make_chunk_fn(compiled, config, summary_fn)
        devices = local_devices(config.devices)
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

    return _cached(compiled, "chunk", config, summary_fn, build)


def _make_chunk_fn(compiled: CompiledModel, config: BatchConfig, summary_fn):
    kernel = get_kernel(config.sampler)
    multi_chain = is_multi_chain(config.sampler)
    stepwise = config.sampler == "stepwise"
    total = config.tune + config.draws

    start = functools.partial(_problem_starts, compiled, config)

    def finish(positions, stats, ok, data):
        values = jax.vmap(jax.vmap(lambda x: compiled.constrain_fn(x, data)))(positions)
        summary = None if summary_fn is None else summary_fn(values, stats, data)
        loglik = None
        if config.keep_draws and config.log_likelihood:
            loglik = jax.vmap(jax.vmap(lambda x: compiled.loglik_fn(x, data)))(positions)
        kept = (values, stats, loglik) if config.keep_draws else (None, None, None)
        return kept, jnp.all(ok), summary

    def one_problem(root_key, index, data):
        logdensity_fn = lambda x: compiled.logdensity_fn(x, data)  # noqa: E731
        positions, ok, run_keys = start(root_key, index, data)
        run = lambda k, x: kernel(  # noqa: E731
            k, logdensity_fn, x, num_tune=config.tune, num_draws=config.draws, settings=config.settings
        )
        if multi_chain:
            draws, stats = kernel(run_keys, logdensity_fn, positions, num_tune=config.tune,
                                  num_draws=config.draws, settings=config.settings)
        else:
            draws, stats = jax.vmap(run)(run_keys, positions)
        return finish(draws, stats, ok, data)

    def chunk_fn(root_key, indices, data):
        if not stepwise:
            return jax.vmap(one_problem, in_axes=(None, 0, 0))(root_key, indices, data)
        from engine.samplers import stepwise_nuts as sw

        positions, ok, run_keys = jax.vmap(start, in_axes=(None, 0, 0))(root_key, indices, data)

        def per_lane(fn):
            """``fn(state, logdensity_fn)`` over problems (with their data) and chains."""
            def problem(states, d):
                lp = lambda x: compiled.logdensity_fn(x, d)  # noqa: E731
                return jax.vmap(lambda st: fn(st, lp))(states)
            return lambda states: jax.vmap(problem)(states, data)

        states = jax.vmap(
            lambda keys, pos, d: jax.vmap(
                lambda k, x: sw.init(
                    k, lambda y: compiled.logdensity_fn(y, d), x, config.draws, config.settings
                )
            )(keys, pos)
        )(run_keys, positions, data)
        # one loop for the whole batch: its predicate is a reduction, not batched, so JAX never
        # selects the output buffers whole; finished chains idle inside ``step``
        states = jax.lax.while_loop(
            lambda st: jnp.any(st.num_done < total),
            per_lane(lambda st, lp: sw.step(st, lp, config.tune, total, config.settings)),
            states,
        )
        draws, stats = sw.outputs(states)
        return jax.vmap(finish)(draws, stats, ok, data)

    return chunk_fn


def _build_init_fn(compiled: CompiledModel, config: BatchConfig):
    return _cached(compiled, "init", config, None, lambda: _make_init_fn(compiled, config))


def _problem_starts(compiled: CompiledModel, config: BatchConfig, root_key, index, data):
    """ONE problem: jittered starts ``[chains, dim]``, their finiteness, and the run keys."""
    logdensity_fn = lambda x: compiled.logdensity_fn(x, data)  # noqa: E731
    keys = _chain_keys(root_key, index, config.chains)
    start = jnp.asarray(compiled.initial_position, dtype=jnp.result_type(float))
    positions, ok = jax.vmap(
        lambda k: init_positions(k, logdensity_fn, start, config.init_tries, config.jitter)
    )(keys[:, 0])
    return positions, ok, keys[:, 1]


def _make_init_fn(compiled: CompiledModel, config: BatchConfig):
    def one_problem(root_key, index, data):
        _, ok, _ = _problem_starts(compiled, config, root_key, index, data)
        return jnp.all(ok)

    return jax.jit(jax.vmap(one_problem, in_axes=(None, 0, 0)))


@contextmanager
def precision_scope(precision: str):
    """JAX's x64 mode for the run; float64 casts inside PyTensor's graph truncate quietly in float32."""
    with jax.enable_x64(precision == "float64"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
        yield


def _cast(arrays: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    if precision == "float64":
        return arrays
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()
    }


def _chunk_inputs(device_arrays, start, stop, size):
    """Problems ``start:stop`` padded to ``size`` by repeating the last one."""
    index = np.arange(start, stop)
    if stop - start < size:
        index = np.concatenate([index, np.full(size - (stop - start), stop - 1)])
    return index, {k: v[index] for k, v in device_arrays.items()}


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(total=total, desc=desc, unit="problem", disable=disable, leave=False)


def check_init(compiled: CompiledModel, problem_data: ProblemData, config: BatchConfig) -> np.ndarray:
    """``[problem]`` flags: every chain of the problem has a finite jittered start."""
    with precision_scope(config.precision):
        fn = _build_init_fn(compiled, config)
        arrays = _cast(problem_data.device_arrays(), config.precision)
        root = jax.random.PRNGKey(config.seed)
        out = []
        for start, stop in chunk_grid(problem_data.num_problems, config.batch_size):
            size = stop - start if config.batch_size is None else min(config.batch_size, problem_data.num_problems)
            index, chunk = _chunk_inputs(arrays, start, stop, size)
            out.append(np.asarray(fn(root, jnp.asarray(index), chunk))[: stop - start])
    return np.concatenate(out)


def run_batched(
    compiled: CompiledModel,
    problem_data: ProblemData,
    config: BatchConfig,
    *,
    summary_fn: Callable | None = None,
    chunks: list[tuple[int, int]] | None = None,
    on_chunk: Callable | None = None,
    progress: bool | None = None,
    keep_chunks: Collection[tuple[int, int]] = (),
) -> BatchResult:
    """Sample every problem of ``problem_data`` (or of the given ``chunks``) chunk by chunk.

    Parameters
    ----------
    compiled
        The template compiled for ``problem_data``'s padded shapes.
    problem_data
        Stacked per-problem data.
    config
        Sampler, sizes, seed, chunking and precision.
    summary_fn
        Optional ``(values {name: [chain, draw, ...]}, stats, data) -> pytree`` for ONE problem,
        run on the device inside the chunk's program (e.g. means and R-hat), so draws need not
        leave the device.
    chunks
        Subset of :func:`chunk_grid` to run (resume, shards); default all.
    on_chunk
        Called as ``on_chunk(start, stop, chunk_result)`` after each chunk (durable stores).
    progress
        Show a progress bar (default: only when stderr is a terminal).
    keep_chunks
        Chunks that also bring their full draws back (a ``keep_draws=True`` variant of the
        program) while the others return only summaries; the draws reach ``on_chunk`` only.
        Used to keep the draws of a few chosen problems of a long summary-only run.
    """
    num_problems = problem_data.num_problems
    grid = chunk_grid(num_problems, config.batch_size)
    todo = grid if chunks is None else list(chunks)
    num_devices = len(local_devices(config.devices))
    size = -(-(grid[0][1] - grid[0][0]) // num_devices) * num_devices  # a multiple of devices
    results = []
    with precision_scope(config.precision):
        fn = _build_chunk_fn(compiled, config, summary_fn)
        keep = {(int(a), int(b)) for a, b in keep_chunks}
        keep_config = dataclasses.replace(config, keep_draws=True)
        fn_keep = _build_chunk_fn(compiled, keep_config, summary_fn) if keep and not config.keep_draws else fn
        arrays = _cast(problem_data.device_arrays(), config.precision)
        root = jax.random.PRNGKey(config.seed)
        bar = _progress(sum(b - a for a, b in todo), progress, describe(config.sampler))
        try:
            for start, stop in todo:
                index, chunk = _chunk_inputs(arrays, start, stop, size)
                chunk_fn = fn_keep if (start, stop) in keep else fn
                kept, ok, summary = chunk_fn(root, jnp.asarray(index), chunk)
                n = stop - start
                host = jax.tree.map(lambda a: np.asarray(a)[:n], (kept, ok, summary))
                if on_chunk is not None:
                    on_chunk(start, stop, host)
                if chunk_fn is not fn:
                    host = ((None, None, None),) + host[1:]
                results.append(host)
                bar.update(n)
        finally:
            bar.close()
    if not results:
        return BatchResult(None, None, None, np.zeros(0, bool), None)
    concat = lambda *xs: np.concatenate(xs)  # noqa: E731
    kept, ok, summaries = jax.tree.map(concat, *results) if len(results) > 1 else results[0]
    values, stats, loglik = kept
    return BatchResult(
        draws=values, stats=stats, log_likelihood=loglik, init_ok=ok, summaries=summaries
    )

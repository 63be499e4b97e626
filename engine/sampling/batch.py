"""Runs problems chunk by chunk through the programs of ``engine.sampling.programs``.

A chunk of problems runs as ONE jitted program: ``vmap`` over problems, then over chains, of a
kernel from the registry (``engine.sampling.kernels``; a ``chains_inside`` kernel, ChEES, gets a
problem's chains together and is vmapped over problems only). The driver runs the kernel's
``warmup`` (or ``num_tune`` of its steps), then ``lax.scan``s its ``step`` over the draws; a
``loop="leapfrog"`` kernel (stepwise NUTS) instead runs in ONE ``lax.while_loop`` for the whole
chunk until every lane is done. Problem ``i`` draws every random number from
``fold_in(key(seed), i)`` (``i`` its global index), so its stream does not depend on how
problems are chunked, sharded or spread over devices. The last chunk is padded to the chunk size
by repeating its final problem, so every chunk reuses one compiled program; programs are kept in
a bounded cache keyed by value (model, settings, summary), never per call.

Warm starts (off unless a problem's data asks): a problem whose data carries ``START_MEAN`` and
``START_SCALE`` starts its first ``chains // 2`` chains from draws ``mean + scale * N(0, I)``
(the rest from the usual jittered start), and one that carries ``START_INVERSE_MASS`` starts
every chain's kernel from that inverse mass matrix (``Kernel.build(...).init``'s third argument).
``engine.audit.warm_start`` fills them from a belief q.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Collection, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from engine.errors import InputError
from engine.model.compile import CompiledModel, ProblemData
from engine.sampling import stopping as stopping_mod
from engine.sampling.kernels import SampleStats, describe, get_kernel
from engine.sampling.programs import (  # noqa: F401 (re-exported: the chunk programs)
    MAX_CACHED_PROGRAMS, bound_algorithm, build_chunk_program, build_init_fn, cached, local_devices,
)
from engine.sampling.starts import (  # noqa: F401 (re-exported: the batch API's start options)
    START_INVERSE_MASS, START_MEAN, START_SCALE, WARM_START_STREAM, init_positions,
    problem_starts, warm_positions,
)
from engine.settings import AUTO, RuntimeConfig, SamplerConfig

__all__ = ["BatchConfig", "BatchResult", "init_positions", "run_batched", "iter_chunks", "chunk_grid", "check_init",
           "build_chunk_program", "cast_arrays", "chunk_inputs",
           "local_devices", "precision_scope", "problem_starts", "bound_algorithm", "warm_positions",
           "START_MEAN", "START_SCALE", "START_INVERSE_MASS", "WARM_START_STREAM", "resolve_config"]

@dataclass(frozen=True)
class BatchConfig:
    """What to run for every problem, and how.

    sampler
        :class:`~engine.settings.SamplerConfig`: kernel, chains, draws, tune and its settings
        (validated here: ``InputError``, a ``ValueError``, naming the field).
    runtime
        :class:`~engine.settings.RuntimeConfig`: seed, chunk size (``batch_size``), precision,
        devices. On CPU, several host devices need
        ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts.
    keep_draws
        Bring full draws back to the host; otherwise only ``summary_fn``'s output returns.
    log_likelihood
        With ``keep_draws``, also return the pointwise observed log-likelihood of every draw.
    """

    sampler: SamplerConfig = SamplerConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    keep_draws: bool = True
    log_likelihood: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sampler", self.sampler.checked())
        object.__setattr__(self, "runtime", self.runtime.checked())

    @property
    def seed(self) -> int:
        return int(self.runtime.seed)

    @property
    def batch_size(self) -> int | None:
        return None if self.runtime.batch_size is None else int(self.runtime.batch_size)

    def identity(self) -> dict:
        """What determines a run's results apart from precision (a stored run's identity): the
        sampler settings, seed, chunk grid and devices, and what comes back; not progress bars,
        overwrite or failure isolation, which change no number."""
        r = self.runtime
        return {**dataclasses.asdict(self.sampler), "seed": r.seed, "batch_size": r.batch_size,
                "devices": r.devices, "keep_draws": self.keep_draws, "log_likelihood": self.log_likelihood}

    def program_key(self) -> tuple:
        """What a chunk program depends on: everything but the seed and the chunk grid."""
        r = self.runtime
        return (self.sampler, r.platform, r.precision, r.devices, self.keep_draws, self.log_likelihood)


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
        ``summary_fn``'s per-problem output, stacked (``None`` without ``summary_fn``). A dict
        output also gets the ``num_draws`` and ``num_grads`` entries below.
    num_draws
        ``[problem]`` kept draws per chain: ``draws``, or with ``target_ess`` the count at which
        the problem passed the gate or reached ``max_draws`` (0 for a problem that could not
        start). Draws and stats past it are padding (NaN, False or 0).
    num_grads
        ``[problem]`` gradient evaluations (leapfrog steps) of all chains, warmup included.
    converged
        ``[problem]`` with ``target_ess``: whether the problem passed the gate (``None`` without).
            sampler
        ``[problem]`` name of the kernel whose draws these are (``sampler="auto"`` only).
    gate_passed
        ``[problem]`` whether the problem passed the convergence gate (``sampler="auto"`` only,
        :func:`engine.sampling.auto.gate_passed`).
    """

    draws: dict[str, np.ndarray] | None
    stats: SampleStats | None
    log_likelihood: dict[str, np.ndarray] | None
    init_ok: np.ndarray
    summaries: Any
    num_draws: np.ndarray | None = None
    num_grads: np.ndarray | None = None
    converged: np.ndarray | None = None
    sampler: np.ndarray | None = None
    gate_passed: np.ndarray | None = None


def chunk_grid(num_problems: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` chunk boundaries; the grid a run, its resume and its shards share."""
    size = num_problems if batch_size is None else min(int(batch_size), num_problems)
    return [(s, min(s + size, num_problems)) for s in range(0, num_problems, size)]


@contextmanager
def precision_scope(precision: str):
    """JAX's x64 mode for the run; float64 casts inside PyTensor's graph truncate quietly in float32."""
    with jax.enable_x64(precision == "float64"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
        yield


def cast_arrays(arrays: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    if precision == "float64":
        return arrays
    return {
        k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()
    }


def chunk_inputs(device_arrays, start, stop, size):
    """Problems ``start:stop`` padded to ``size`` by repeating the last one."""
    index = np.arange(start, stop)
    if stop - start < size:
        index = np.concatenate([index, np.full(size - (stop - start), stop - 1)])
    return index, {k: v[index] for k, v in device_arrays.items()}


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(total=total, desc=desc, unit="problem", disable=disable, leave=False)


def resolve_config(compiled: CompiledModel, problem_data: ProblemData, config: BatchConfig,
                   *, batch_size: bool = True) -> BatchConfig:
    """``config`` with ``precision="auto"`` and (when ``batch_size``) ``batch_size=None`` made
    concrete for these problems (:func:`engine.sampling.auto.choose_precision`,
    :func:`engine.sampling.chunking.auto_batch_size`); unchanged when both are given."""
    r = config.runtime
    if r.precision == AUTO:
        from engine.sampling.auto import choose_precision

        r = dataclasses.replace(r, precision=choose_precision(problem_data))
    if batch_size and r.batch_size is None:
        from engine.sampling.chunking import auto_batch_size

        values = sum(int(np.prod(shape, dtype=int)) for shape in compiled.var_shapes.values())
        devices = local_devices(r.devices)
        r = dataclasses.replace(r, batch_size=auto_batch_size(
            problem_data.num_problems, chains=config.sampler.chains, draws=config.sampler.draws,
            values_per_draw=values, num_devices=len(devices),
            platform="cpu" if devices[0].platform == "cpu" else "gpu",
        ))
    return config if r == config.runtime else dataclasses.replace(config, runtime=r)


def check_init(compiled: CompiledModel, problem_data: ProblemData, config: BatchConfig) -> np.ndarray:
    """``[problem]`` flags: every chain of the problem has a finite jittered start."""
    config = resolve_config(compiled, problem_data, config)
    with precision_scope(config.runtime.precision):
        fn = build_init_fn(compiled, config)
        arrays = cast_arrays(problem_data.device_arrays(), config.runtime.precision)
        root = jax.random.PRNGKey(config.seed)
        out = []
        for start, stop in chunk_grid(problem_data.num_problems, config.batch_size):
            size = stop - start if config.batch_size is None else min(config.batch_size, problem_data.num_problems)
            index, chunk = chunk_inputs(arrays, start, stop, size)
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
    problem_index: np.ndarray | None = None,
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
        leave the device. With ``sampler.target_ess`` it is called as ``summary_fn(values,
        stats, data, num_draws=n)`` with ``draw`` axes of length ``max_draws``, of which only
        the first ``n`` (traced) are the problem's kept draws: it must use only those
        (``engine.sampling.gate.masked_summary``).
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
    problem_index
        ``[problem]`` global indices of ``problem_data``'s problems (their key streams) when they
        are a selection of a larger run (the ``auto`` sampler's reruns); default ``0..N-1``.

    A kernel with a ``driver`` (``auto``: :func:`engine.sampling.auto.run_auto`) runs instead (same
    arguments and result, plus ``sampler`` and ``gate_passed``). ``precision="auto"`` and, without ``chunks``,
    ``batch_size=None`` are resolved first (:func:`resolve_config`).
    """
    config = resolve_config(compiled, problem_data, config, batch_size=chunks is None)
    driver = get_kernel(config.sampler.name).driver
    if driver is not None:
        return driver(compiled, problem_data, config, summary_fn=summary_fn, chunks=chunks, on_chunk=on_chunk,
                      progress=progress, keep_chunks=keep_chunks)
    results = []
    for start, stop, host, kept_for_callback_only in iter_chunks(
            compiled, problem_data, config, summary_fn=summary_fn, chunks=chunks, progress=progress,
            keep_chunks=keep_chunks, problem_index=problem_index):
        if on_chunk is not None:
            on_chunk(start, stop, host[:3])
        if kept_for_callback_only:
            host = ((None, None, None),) + host[1:]
        results.append(host)
    if not results:
        return BatchResult(None, None, None, np.zeros(0, bool), None)
    concat = lambda *xs: np.concatenate(xs)  # noqa: E731
    kept, ok, summaries, num_draws, num_grads, converged = (
        jax.tree.map(concat, *results) if len(results) > 1 else results[0])
    values, stats, loglik = kept
    return BatchResult(
        draws=values, stats=stats, log_likelihood=loglik, init_ok=ok, summaries=summaries,
        num_draws=num_draws, num_grads=num_grads, converged=converged,
    )


def iter_chunks(compiled: CompiledModel, problem_data: ProblemData, config: BatchConfig, *,
                summary_fn: Callable | None = None, chunks: list[tuple[int, int]] | None = None,
                progress: bool | None = None, keep_chunks: Collection[tuple[int, int]] = (),
                problem_index: np.ndarray | None = None):
    """:func:`run_batched`'s chunks one by one, in order, for a kernel without a driver and a
    resolved ``config`` (:func:`resolve_config`): yields ``(start, stop, host, kept_for_callback_only)``
    with ``host = (kept, ok, summary, num_draws, num_grads, converged)`` on the host, cut to the
    chunk's problems (``converged`` None without stopping), and whether ``kept`` holds draws only
    because the chunk is in ``keep_chunks``.

    With per-problem stopping and several devices, later chunks keep running on the other
    devices while the caller handles one (the ``auto`` driver reruns its failures meanwhile)."""
    num_problems = problem_data.num_problems
    grid = chunk_grid(num_problems, config.batch_size)
    todo = grid if chunks is None else list(chunks)
    devices = local_devices(config.runtime.devices)
    stopping = config.sampler.is_stopping
    num_devices = 1 if stopping else len(devices)  # stopping: whole chunks per device, below
    size = -(-(grid[0][1] - grid[0][0]) // num_devices) * num_devices  # a multiple of devices
    with precision_scope(config.runtime.precision):
        fn = _chunk_runner(compiled, config, summary_fn)
        keep = {(int(a), int(b)) for a, b in keep_chunks}
        keep_config = dataclasses.replace(config, keep_draws=True)
        fn_keep = _chunk_runner(compiled, keep_config, summary_fn) if keep and not config.keep_draws else fn
        arrays = cast_arrays(problem_data.device_arrays(), config.runtime.precision)
        root = jax.random.PRNGKey(config.seed)
        bar = _progress(sum(b - a for a, b in todo), progress, describe(config.sampler.name))
        try:
            for (start, stop), out in stopping_mod.chunk_outputs(todo, stopping, size, devices, arrays, root, problem_index,
                                                     lambda c: fn_keep if c in keep else fn):
                n = stop - start
                kept, ok, summary, num_draws, num_grads, converged = out
                host = jax.tree.map(lambda a: np.asarray(a)[:n], (kept, ok, summary, num_draws, num_grads))
                if stopping:
                    host = (stopping_mod.pad_kept(host[0], host[3]),) + host[1:]
                if isinstance(host[2], dict):
                    host[2].update(num_draws=host[3], num_grads=host[4])
                bar.update(n)
                yield start, stop, host + (None if converged is None else np.asarray(converged)[:n],), (
                    (start, stop) in keep and fn_keep is not fn)
        finally:
            bar.close()


def _chunk_runner(compiled: CompiledModel, config: BatchConfig, summary_fn):
    """``(root, index, chunk_data, num_real) -> (kept, ok, summary, num_draws, num_grads,
    converged)`` for one chunk: the one chunk program, or the stopping driver's programs."""
    if config.sampler.is_stopping:
        if summary_fn is not None and "num_draws" not in inspect.signature(summary_fn).parameters:
            raise InputError("target_ess: this summary_fn takes no num_draws= (its problems' kept draws)")
        programs = stopping_mod.build_stop_programs(
            compiled, config, summary_fn, functools.partial(problem_starts, compiled, config))

        def run_stopping(root, index, chunk, num_real):
            kept, ok, summary, num_draws, num_grads, converged = stopping_mod.run_chunk(
                programs, root, index, chunk, num_real, config.sampler)
            return kept, ok, summary, num_draws, num_grads, converged

        return run_stopping
    fn = build_chunk_program(compiled, config, summary_fn)
    draws = int(config.sampler.draws)

    def run_fixed(root, index, chunk, num_real):
        kept, ok, summary, num_grads = fn(root, jnp.asarray(index), chunk)
        return kept, ok, summary, np.full(index.shape[0], draws, np.int32), num_grads, None

    return run_fixed

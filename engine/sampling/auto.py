"""The ``auto`` sampler and the other automatic defaults: kernel per template, precision per data.

``sampler="auto"`` (the default) runs every problem with the fastest kernel that suits the
template, checks each problem against the convergence gate on the device, and reruns the
problems that fail with a careful NUTS:

1. Kernel (:func:`choose_kernel`). ChEES-adapted HMC (``chees``) when the template is small
   (at most :data:`CHEES_MAX_DIM` unconstrained parameters), no free variable's prior reads
   another free variable (``CompiledModel.is_hierarchical``), there are at least 2 chains and
   a warmup ChEES can adapt in, and no dense mass matrix is asked for; BlackJAX NUTS otherwise.
   On this project's CPU benchmarks ChEES was 2.5-10x faster than NUTS per posterior on the
   1-D conjugate template (w1) and the ragged regressions (w4), both passing the gate, but it
   certified only 10% of the 40-parameter hierarchical attention template (w3), where one
   trajectory length per problem cannot serve a funnel; NUTS certified 80% there.
2. Gate (:func:`gate_stats`, :func:`gate_passed`), per problem over every element of every
   free variable: rank-normalised split R-hat < 1.01, bulk and tail ESS >= 400 (or a tenth of
   the draws, ``chains * draws / 10``, when that is fewer: short runs cannot reach 400), no
   divergent transition, and E-BFMI >= 0.3 in every chain. With per-problem stopping
   (``target_ess``) the ESS bar is ``target_ess`` and R-hat, ESS and divergences are the
   stopping gate's verdict when the problem retired (:func:`stopping_gate_passed`; the same
   rule, so it is not recomputed over the whole draw buffer); E-BFMI is checked on top.
3. Retry (ChEES without stopping only): failing problems without a divergence rerun once with
   ChEES in the first run's own compiled program, from fresh key streams
   (``fold_in(key, i +`` :data:`RETRY_STREAM` ``)``). ChEES misses R-hat < 1.01 by chance on a
   few problems in a thousand whose ESS is in the thousands; a second run certifies nearly all,
   and costs no compile (a NUTS program compiles in about as long as 5,000 w1 posteriors take
   to sample).
4. Fallback (:func:`fallback_config`): the problems still failing rerun with BlackJAX NUTS,
   twice the warmup, ``target_accept`` at least 0.95, in float64, from their own key streams
   (``fold_in(key, i)`` as before); their rows replace the first run's. For a template ``auto``
   starts with NUTS (:func:`is_nuts_template`: hierarchical or more than :data:`CHEES_MAX_DIM`
   parameters) the fallback targets acceptance 0.99 and stops per problem
   (:mod:`engine.sampling.stopping`): it draws in blocks until the problem passes the gate, up
   to :data:`FALLBACK_MAX_DRAWS_FACTOR` x ``draws`` per chain, so a shortfall of ESS or R-hat
   costs more draws instead of a failure (a divergence, which more draws cannot remove, stops
   the problem at once); problems still failing rerun once more the same way at
   ``target_accept`` 0.999 with every chain of a problem at the smallest of its chains' adapted
   step sizes (``pool_step_size``, :func:`fallback_stages`). The result's ``draw`` axis is then as
   long as the longest such problem's, and ``num_draws`` says how many each problem kept (NaN
   past them). Problems failing every rerun keep the last one's result and are counted in one
   ``RuntimeWarning``.

Reruns are pooled across chunks (:func:`run_auto`): a chunk with failures waits, with the chunks
after it, until a pool's worth fail (:func:`_pool_capacity`), :data:`FALLBACK_MAX_WAIT_S` pass
or the run ends, so a rerun's fixed cost is paid once per pool rather than once per chunk.

Each problem reports which kernel gave its result (``sampler``) and whether it passed the gate
(``gate_passed``).

Precision (:func:`choose_precision`, ``precision="auto"``): float32, about 1.5x faster on CPU,
unless the data make it unsafe. float32 resolves 2^-24 ~ 6e-8 relative to a value; measured on
w1 (``benchmarks/results/defaults.md``), its posterior means stay within Monte Carlo error of
the closed form while the data's magnitude stays below :data:`FLOAT32_MAX_ABS`, and the
log density sums at most :data:`FLOAT32_MAX_ROWS` rows per problem; beyond either, float64.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import numpy as np

from engine.sampling.auto_gate import (  # noqa: F401 (re-exported: the gate is part of auto's API)
    GateStats, _with_gate, gate_ess_min, gate_passed, gate_stats, masked_ebfmi, stopping_gate_passed,
)
from engine.sampling.auto_rules import (  # noqa: F401 (re-exported: the rules are part of auto's API)
    CHEES_MAX_DIM, FALLBACK_CHUNK_PER_DEVICE, FALLBACK_MAX_DRAWS_FACTOR, FALLBACK_MAX_WAIT_S, FALLBACK_SMALL_RUNS,
    FALLBACK_TARGET_ACCEPT, FALLBACK_TUNE_FACTOR, FLOAT32_MAX_ABS, FLOAT32_MAX_ROWS, LAST_STAGE_TARGET_ACCEPT,
    NUTS_TEMPLATE_FALLBACK_TARGET_ACCEPT, RETRY_STREAM, choose_kernel, choose_precision, fallback_config,
    fallback_stages, is_nuts_template, primary_config, sampler_names,
)

__all__ = ["CHEES_MAX_DIM", "FALLBACK_TARGET_ACCEPT", "FALLBACK_TUNE_FACTOR", "FALLBACK_CHUNK_PER_DEVICE", "FLOAT32_MAX_ABS",
           "FLOAT32_MAX_ROWS", "FALLBACK_MAX_DRAWS_FACTOR", "NUTS_TEMPLATE_FALLBACK_TARGET_ACCEPT", "GateStats",
           "LAST_STAGE_TARGET_ACCEPT", "fallback_stages",
           "choose_kernel", "is_nuts_template", "choose_precision", "fallback_config",
           "gate_ess_min", "gate_passed", "gate_stats", "run_auto", "sampler_names", "stopping_gate_passed"]

# ------------------------------------------------------------------------------ the run


def _fallback_size(count: int, chunk: int, num_devices: int) -> int:
    """Problems per fallback chunk: :data:`FALLBACK_CHUNK_PER_DEVICE` per device (never more than
    the run's chunk) while at most :data:`FALLBACK_SMALL_RUNS` such chunks hold the failures, the
    run's own chunk size when more fail: at most two fallback programs per run, and a run where
    most problems fail reruns in full chunks."""
    size = min(FALLBACK_CHUNK_PER_DEVICE * num_devices, max(chunk, 1))
    if count > FALLBACK_SMALL_RUNS * size:
        size = max(chunk, 1)
    return max(num_devices, size - size % num_devices)


def _pool_capacity(retry: bool, chunk_size: int, num_devices: int) -> int:
    """Failing problems that flush a pool (:func:`run_auto`): a full chunk of the first run's
    program when ChEES retries there first, else a fallback chunk
    (:data:`FALLBACK_CHUNK_PER_DEVICE` per device)."""
    return int(chunk_size) if retry else FALLBACK_CHUNK_PER_DEVICE * num_devices


def _takes_num_draws(summary_fn) -> bool:
    """Whether ``summary_fn`` can summarise a stopping run (``summary_fn(..., num_draws=n)``)."""
    import inspect

    return summary_fn is None or "num_draws" in inspect.signature(summary_fn).parameters


def _num_draw_slots(kept) -> int:
    """Length of the draw axis of host draws ``(values, stats, loglik)``, ``[n, chain, draw, ...]``."""
    return int(next(iter(kept[0].values())).shape[2])


def _pad_draws(kept, length: int):
    """Host draws ``(values, stats, loglik)`` with the draw axis (2) padded to ``length`` with
    NaN (floats), False or 0, as a stopping run pads the draws past a problem's ``num_draws``
    (:func:`engine.sampling.stopping.pad_kept`)."""
    import jax

    def pad(a):
        if a is None or a.shape[2] >= length:
            return a
        fill = np.nan if np.issubdtype(a.dtype, np.floating) else 0
        widths = [(0, 0)] * a.ndim
        widths[2] = (0, length - a.shape[2])
        return np.pad(np.asarray(a), widths, constant_values=np.array(fill).astype(a.dtype))

    return jax.tree.map(pad, kept, is_leaf=lambda x: x is None)


def _replace_rows(primary, fallback, rows):
    """``primary`` (host pytree ``[n, ...]``) with ``rows`` taken from ``fallback`` (``[k, ...]``),
    in the primary's dtypes."""
    import jax

    def put(a, b):
        if a is None:
            return None
        a = np.array(a)
        a[rows] = np.asarray(b)[: len(rows)].astype(a.dtype)
        return a

    return jax.tree.map(put, primary, fallback, is_leaf=lambda x: x is None)


class _Pending(NamedTuple):
    """A primary chunk held until its failing problems have rerun (:func:`run_auto`)."""

    start: int
    stop: int
    kept: Any
    ok: np.ndarray
    summary: Any
    counts: list
    passed: np.ndarray
    used: np.ndarray
    failing: np.ndarray  # row indices within the chunk
    since: float  # time.monotonic() when it was sampled
    gate: Any  # the first run's GateStats (host arrays), or its E-BFMI with stopping


def run_auto(compiled, problem_data, config, *, summary_fn=None, chunks=None, on_chunk=None, progress=None,
             keep_chunks=()):
    """``run_batched`` for the ``auto`` sampler (same arguments and result): each chunk runs
    with :func:`choose_kernel`'s kernel, then its problems failing the gate rerun with
    :func:`fallback_config`, each from its own key stream ``fold_in(key, i)``, before ``on_chunk``
    sees the chunk. The result's ``sampler`` names each problem's kernel and ``gate_passed`` flags
    the gate; a summary that is a dict also gets ``sampler_code`` (index into
    :func:`sampler_names`) and ``gate_passed`` per problem.

    Failures are pooled across chunks: a chunk with failing problems waits (with the chunks after
    it, so ``on_chunk`` still sees them in order) until the pool fills a fallback chunk
    (:data:`FALLBACK_CHUNK_PER_DEVICE` per device), :data:`FALLBACK_MAX_WAIT_S` have passed, or
    the primary chunks end; then the pool reruns together. A fallback run costs about as much for
    one problem as for a full fallback chunk (NUTS's steps are sequential), so where one problem
    in a thousand fails, pooling turns one fallback run per chunk into one per run."""
    import time

    import jax

    from engine.sampling.batch import BatchResult, chunk_grid, iter_chunks, local_devices, run_batched

    num_devices = len(local_devices(config.runtime.devices))
    primary = primary_config(config, compiled)
    stages = fallback_stages(config, compiled, can_stop=_takes_num_draws(summary_fn))
    s = config.sampler
    stopping = s.is_stopping
    wrapped = _with_gate(summary_fn, compiled.free_var_names, stopping)
    codes = {name: i for i, name in enumerate(sampler_names())}
    grid = chunk_grid(problem_data.num_problems, config.batch_size)
    todo = grid if chunks is None else [tuple(c) for c in chunks]
    keep = {(int(a), int(b)) for a, b in keep_chunks}
    results, names_out, passed_out, counts_out = [], [], [], []
    tally = {"still_failing": 0, "rerun": 0}
    # the gate's ESS bar: target_ess with stopping (the stopping gate's own), else gate_ess_min
    ess_bar = float(s.target_ess) if stopping else gate_ess_min(s.chains, s.draws)
    chunk_size = grid[0][1] - grid[0][0] if grid else 1  # the first run's chunk (program) size
    # a ChEES first run without stopping retries its failures without divergences once, in its
    # own program (no compile), before NUTS: their R-hat misses 1.01 by chance far more often
    # than a second run does (w1: 1 in 1000 problems at 4 x 500 draws)
    retry = primary.sampler.name != stages[0].sampler.name and not stopping  # ChEES first, NUTS after
    pool_size = _pool_capacity(retry, chunk_size, num_devices)

    def judge(gate, converged, stops=stopping):
        """A run's gate: the stopping gate's verdict plus E-BFMI for a run that stops per
        problem (its wrapper returned E-BFMI), :func:`gate_passed` otherwise."""
        if stops:
            return stopping_gate_passed(converged, gate)
        return gate_passed(gate, s.chains, int(s.draws))
    # R-hat needs 2 chains: with one, no problem can pass, and rerunning them all would not help
    can_certify = int(s.chains) >= 2

    def capture(store):
        return lambda start, stop, host: store.append(host)

    def rerun(pending, rows_of, stage, size, offset):
        """Rerun rows ``rows_of[j]`` of ``pending[j]`` (every chunk's together) with the
        ``stage`` config in chunks of ``size`` from key streams ``offset + i``, and put their
        rows into the chunks' results (returns the updated chunks)."""
        index = np.concatenate([p.start + r for p, r in zip(pending, rows_of)])
        tally["rerun"] += index.size
        total = -(-index.size // size) * size
        padded = np.concatenate([index, np.full(total - index.size, index[-1])])
        fb_config = dataclasses.replace(stage, runtime=dataclasses.replace(stage.runtime, batch_size=size))
        fb_got: list = []
        needs_draws = config.keep_draws or any((p.start, p.stop) in keep for p in pending)
        fb_grid = chunk_grid(total, size)
        fb_stops = fb_config.sampler.is_stopping  # a rerun may stop per problem where the first run did not
        fb_res = run_batched(compiled, problem_data.select(padded), fb_config,
                             summary_fn=_with_gate(summary_fn, compiled.free_var_names, fb_stops),
                             on_chunk=capture(fb_got), progress=False,
                             keep_chunks=fb_grid if needs_draws else (), problem_index=padded + offset)
        fb_kept, _, (fb_summary, fb_gate) = (
            jax.tree.map(lambda *xs: np.concatenate(xs), *fb_got) if len(fb_got) > 1 else fb_got[0])
        fb_counts = [fb_res.num_draws, fb_res.num_grads, fb_res.converged]
        fb_passed = judge(jax.tree.map(lambda a: np.asarray(a)[: index.size], fb_gate),
                          None if fb_res.converged is None else np.asarray(fb_res.converged)[: index.size], fb_stops)
        offset_rows = 0
        out = []
        for p, chunk_rows in zip(pending, rows_of):
            rows = slice(offset_rows, offset_rows + chunk_rows.size)
            offset_rows += chunk_rows.size
            if not chunk_rows.size:
                out.append(p)
                continue
            take = lambda tree: jax.tree.map(lambda a: np.asarray(a)[rows], tree)  # noqa: E731
            for i, (mine, theirs) in enumerate(zip(p.counts, fb_counts)):
                if mine is not None and theirs is not None:
                    before = mine[chunk_rows].copy()
                    mine[chunk_rows] = np.asarray(theirs)[rows]
                    if i == 1:  # a rerun's gradients come on top of the earlier runs'
                        mine[chunk_rows] += before
            kept = p.kept
            if kept[0] is not None:  # a stopping rerun's draw axis is max_draws long: pad both alike
                theirs = take(fb_kept)
                length = max(_num_draw_slots(kept), _num_draw_slots(theirs))
                kept = _replace_rows(_pad_draws(kept, length), _pad_draws(theirs, length), chunk_rows)
            summary = _replace_rows(p.summary, take(fb_summary), chunk_rows) if p.summary is not None else None
            p.passed[chunk_rows] = fb_passed[rows]
            p.used[chunk_rows] = stage.sampler.name
            failing = np.flatnonzero(~p.passed & np.asarray(p.ok, bool))
            out.append(p._replace(kept=kept, summary=summary, failing=failing))
        return out

    def emit(p):
        tally["still_failing"] += int(np.sum(~p.passed & np.asarray(p.ok, bool)))
        summary = p.summary
        if isinstance(summary, dict):
            summary = {**summary, "sampler_code": np.array([codes[u] for u in p.used], np.int8),
                       "gate_passed": p.passed.copy(), "num_draws": p.counts[0], "num_grads": p.counts[1]}
        host = (p.kept, p.ok, summary)
        if on_chunk is not None:
            on_chunk(p.start, p.stop, host)
        if not config.keep_draws:
            host = ((None, None, None),) + host[1:]
        results.append(host)
        counts_out.append(p.counts)
        names_out.append(p.used.astype(str))
        passed_out.append(p.passed)

    def flush(pending):
        if retry:  # ChEES again from fresh key streams, in the first run's own program
            rows_of = [p.failing[np.asarray(p.gate.divergences)[p.failing] == 0] for p in pending]
            if any(r.size for r in rows_of):
                pending = rerun(pending, rows_of, primary, chunk_size, RETRY_STREAM)
        for stage in stages:
            count = sum(p.failing.size for p in pending)
            if not count:
                break
            pending = rerun(pending, [p.failing for p in pending], stage,
                            _fallback_size(count, chunk_size, num_devices), 0)
        for p in pending:
            emit(p)

    # one generator over the primary chunks: with stopping and several devices, later chunks run
    # on the other devices while this loop reruns a pool's failures
    primary_chunks = iter_chunks(compiled, problem_data, primary, summary_fn=wrapped, chunks=todo, progress=progress,
                                 keep_chunks=[c for c in todo if c in keep])
    pending: list[_Pending] = []
    for start, stop, (kept, ok, (summary, gate), num_draws, num_grads, converged), _ in primary_chunks:
        counts = [np.array(num_draws), np.array(num_grads), None if converged is None else np.array(converged)]
        passed = judge(gate, converged)
        failing = np.flatnonzero(~passed & np.asarray(ok, bool)) if can_certify else np.zeros(0, int)
        pending.append(_Pending(start, stop, kept, ok, summary, counts, passed,
                                np.full(stop - start, primary.sampler.name, dtype=object), failing, time.monotonic(),
                                jax.tree.map(np.asarray, gate)))
        num_failing = sum(p.failing.size for p in pending)
        if (num_failing == 0 or num_failing >= pool_size
                or time.monotonic() - next(p.since for p in pending if p.failing.size) >= FALLBACK_MAX_WAIT_S):
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    still_failing, rerun_count = tally["still_failing"], tally["rerun"]
    if still_failing:
        warnings.warn(
            f"sampler 'auto': {still_failing} of {sum(b - a for a, b in todo)} problems fail the convergence gate "
            f"(R-hat, ESS >= {ess_bar:g}, divergences, E-BFMI) "
            + (f"after the NUTS fallback ({rerun_count} reran)" if can_certify else "(one chain: no R-hat, no fallback)")
            + "; see gate_passed", RuntimeWarning, stacklevel=3)
    if not results:
        return BatchResult(None, None, None, np.zeros(0, bool), None)

    if results[0][0][0] is not None:  # chunks whose fallback stopped late hold longer draw axes
        length = max(_num_draw_slots(host[0]) for host in results)
        results = [(_pad_draws(host[0], length),) + tuple(host[1:]) for host in results]
    concat = lambda *xs: np.concatenate(xs)  # noqa: E731
    kept, ok, summaries = jax.tree.map(concat, *results) if len(results) > 1 else results[0]
    values, stats, loglik = kept
    num_draws, num_grads, converged = (
        None if parts[0] is None else np.concatenate(parts) for parts in zip(*counts_out))
    return BatchResult(draws=values, stats=stats, log_likelihood=loglik, init_ok=ok, summaries=summaries,
                       num_draws=num_draws, num_grads=num_grads, converged=converged,
                       sampler=np.concatenate(names_out), gate_passed=np.concatenate(passed_out))

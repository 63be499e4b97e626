"""The engine contestants: the chunk program of ``engine.sampling.batch``, compiled ahead of time and timed.

Compile (PyMC -> JAX, trace, XLA) is timed apart from running; the run mirrors
``engine.sampling.batch.run_batched`` (chunks padded to one shape, a per-problem on-device summary back on
the host after every chunk).
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.measure import PeakRSS, cpu_seconds, device_peak_mb, row_common, subset_data

__all__ = ["STEP_SAMPLES", "make_summary_fn", "lockstep", "EngineProgram", "bench_engine"]

STEP_SAMPLES = 100
"""Draws (evenly spaced) whose leapfrog-step counts come back for the lockstep estimate."""


def make_summary_fn(free_var_names, num_draws: int):
    """Per-problem on-device summary for ``run_batched(summary_fn=...)``.

    Returns worst R-hat, smallest bulk and tail ESS over all parameter elements, the divergence
    count and, for ``STEP_SAMPLES`` evenly spaced draws, the sum and max over chains of leapfrog
    steps (``[STEP_SAMPLES]`` each), from which the host computes the lockstep efficiency of each
    chunk (a subsample keeps the transfer small at 10^6 problems).
    """
    every = max(1, num_draws // STEP_SAMPLES)
    import jax.numpy as jnp

    from engine.sampling.diagnostics import summarize_draws

    def summary_fn(values, stats, data):
        r_hat, ess_bulk, ess_tail = [], [], []
        for name in free_var_names:
            v = values[name]  # [chain, draw, *shape]
            x = jnp.moveaxis(v.reshape(v.shape[:2] + (-1,)), (0, 1), (-2, -1))  # [elem, chain, draw]
            s = summarize_draws(x)
            r_hat.append(jnp.max(s["r_hat"]))
            ess_bulk.append(jnp.min(s["ess_bulk"]))
            ess_tail.append(jnp.min(s["ess_tail"]))
        return {
            "r_hat_max": jnp.max(jnp.stack(r_hat)),
            "ess_bulk_min": jnp.min(jnp.stack(ess_bulk)),
            "ess_tail_min": jnp.min(jnp.stack(ess_tail)),
            "divergences": jnp.sum(stats.diverging).astype(jnp.int32),
            "steps_sum": jnp.sum(stats.n_steps[:, ::every], axis=0).astype(jnp.int32),
            "steps_max": jnp.max(stats.n_steps[:, ::every], axis=0).astype(jnp.int32),
            "tree_depth_max": jnp.max(stats.tree_depth).astype(jnp.int32),
            "steps_total_sum": jnp.sum(stats.n_steps).astype(jnp.float32),
            "steps_total_max": jnp.max(jnp.sum(stats.n_steps, axis=1)).astype(jnp.float32),
        }

    return summary_fn


def lockstep(chunks: list[dict], chains: int, stepwise: bool = False) -> dict:
    """Lockstep efficiency of NUTS under ``vmap`` from per-chunk step counts.

    For one chunk and one draw the batched step costs the MAX leapfrog steps over the chunk's
    problems x chains; useful work is their MEAN. Efficiency = mean/max per draw, averaged over
    (sampled) draws, then over chunks weighted by size (padded duplicate problems included: they
    occupy lanes). A stepwise sampler waits only once per chunk, for the chain with the most
    steps in total, so for it the efficiency is mean/max of per-chain TOTAL steps
    (``lockstep_efficiency_total``, reported for every sampler as that bound). Warmup steps are
    not recorded by the kernels and are not included.
    """
    effs, totals, weights, means, maxes = [], [], [], [], []
    for c in chunks:
        total = c["steps_sum"].sum(0) / (c["steps_sum"].shape[0] * chains)  # [draw]
        biggest = c["steps_max"].max(0)  # [draw]
        effs.append(float(np.mean(total / np.maximum(biggest, 1))))
        lanes = c["steps_sum"].shape[0] * chains
        totals.append(float(c["steps_total_sum"].sum() / lanes / max(c["steps_total_max"].max(), 1)))
        means.append(float(total.mean()))
        maxes.append(float(biggest.mean()))
        weights.append(c["steps_sum"].shape[0])
    w = np.asarray(weights, float)
    per_draw = float(np.average(effs, weights=w))
    whole = float(np.average(totals, weights=w))
    return {
        "lockstep_efficiency": whole if stepwise else per_draw,
        "lockstep_efficiency_per_draw": per_draw,
        "lockstep_efficiency_total": whole,
        "mean_steps": float(np.average(means, weights=w)),
        "mean_max_steps": float(np.average(maxes, weights=w)),
    }


# ------------------------------------------------------------------------------ the engine
class EngineProgram:
    """The chunk program ``run_batched`` would build, compiled ahead of time, for one chunk shape.

    Uses ``engine.sampling.batch``'s chunk builder so the timed program is exactly the engine's; AOT
    compilation lets compile time be measured apart from run time (there is no public hook yet).
    """

    def __init__(self, model, problem_data, config):
        import jax
        import jax.numpy as jnp

        from engine.sampling import batch
        from engine.model.compile import compile_model

        self.config = config
        self._scope = getattr(batch, "precision_scope", None) or (
            lambda precision: jax.enable_x64(precision == "float64")
        )
        t0, c0 = time.perf_counter(), cpu_seconds()
        self.compiled = compile_model(model, problem_data)
        t1 = time.perf_counter()
        self.summary_fn = make_summary_fn(self.compiled.free_var_names, config.sampler.draws)
        with self._scope(config.runtime.precision):
            fn = batch.build_chunk_program(self.compiled, config, self.summary_fn)
            arrays = batch.cast_arrays(problem_data.device_arrays(), config.runtime.precision)
            size = batch.chunk_grid(problem_data.num_problems, config.batch_size)[0][1]
            index, chunk = batch.chunk_inputs(arrays, 0, size, size)
            root = jax.random.PRNGKey(config.seed)
            lowered = fn.lower(root, jnp.asarray(index), chunk)
            t2 = time.perf_counter()
            self.executable = lowered.compile()
            t3 = time.perf_counter()
        self.compile_cpu_s = cpu_seconds() - c0
        self.chunk_size = size
        self.model_compile_s, self.trace_s, self.xla_compile_s = t1 - t0, t2 - t1, t3 - t2

    @property
    def compile_s(self) -> float:
        return self.model_compile_s + self.trace_s + self.xla_compile_s

    def run(self, problem_data, log=None) -> tuple[dict, list[dict]]:
        """All problems, chunk by chunk, summaries to the host; ``(per-problem, per-chunk)``.

        ``log`` (optional) gets one line per chunk: progress of long runs.
        """
        import jax
        import jax.numpy as jnp

        from engine.sampling import batch

        with self._scope(self.config.runtime.precision):
            arrays = batch.cast_arrays(problem_data.device_arrays(), self.config.runtime.precision)
            root = jax.random.PRNGKey(self.config.seed)
            chunks = []
            grid = batch.chunk_grid(problem_data.num_problems, self.chunk_size)
            t0 = time.perf_counter()
            for start, stop in grid:
                index, chunk = batch.chunk_inputs(arrays, start, stop, self.chunk_size)
                _, ok, summary = self.executable(root, jnp.asarray(index), chunk)[:3]  # then num_grads
                host = jax.tree.map(np.asarray, summary)
                host["init_ok"] = np.asarray(ok)
                host["_n"] = stop - start
                chunks.append(host)
                if log is not None and len(grid) > 1:
                    log(f"      chunk {len(chunks)}/{len(grid)} done at {time.perf_counter() - t0:.1f}s")
        keys = [k for k in chunks[0] if k != "_n"]
        per_problem = {k: np.concatenate([c[k][: c["_n"]] for c in chunks]) for k in keys}
        return per_problem, chunks


def bench_engine(model, data, n, contestant, args, programs: dict, log=None, workload_name="*") -> dict:
    """Time one engine contestant on the first ``n`` problems; one result row."""
    from engine.sampling.batch import BatchConfig
    from engine.model.compile import prepare_data
    from engine.sampling.kernels import get_kernel
    from engine.sampling.kernels.base import DEFAULT_TARGET_ACCEPT
    from engine.settings import RuntimeConfig, SamplerConfig

    problem_data = prepare_data(model, subset_data(data, n))
    wanted = args.batch_size_map.get(workload_name, args.batch_size_map["*"])
    batch_size = min(wanted, n) if wanted else n
    kernel = get_kernel(contestant.sampler)
    hmc = kernel.target_accept != DEFAULT_TARGET_ACCEPT  # tuned for HMC's optimum, not NUTS's
    config = BatchConfig(
        sampler=SamplerConfig(
            name=contestant.sampler, chains=args.chains, draws=args.draws, tune=args.tune,
            target_accept=getattr(args, "chees_target_accept", kernel.target_accept) if hmc else args.target_accept,
            max_tree_depth=args.max_tree_depth, dense_mass=contestant.dense_mass,
        ),
        runtime=RuntimeConfig(
            seed=args.seed, batch_size=batch_size, precision=contestant.precision,
            devices=None if getattr(args, "devices", 1) == 1 else args.devices,
        ),
        keep_draws=False,
    )
    key = (contestant.label, batch_size)
    with PeakRSS() as rss:
        fresh = key not in programs
        if fresh:  # one compile per chunk shape; later N with the same chunk reuse it
            programs[key] = EngineProgram(model, problem_data, config)
            if log is not None:
                log(f"      compiled in {programs[key].compile_s:.1f}s (chunk of {batch_size})")
        program = programs[key]
        run_times, cpu_times, spent, out = [], [], 0.0, None
        while len(run_times) < args.repeats and (not run_times or spent < args.repeat_budget_s):
            t, c = time.perf_counter(), cpu_seconds()
            result = program.run(problem_data, log=log)
            elapsed = time.perf_counter() - t
            cpu_times.append(cpu_seconds() - c)
            run_times.append(elapsed)
            spent += elapsed
            out = out or result
    per_problem, chunks = out
    run_s = float(np.median(run_times))
    row = row_common(per_problem, n, run_s + program.compile_s, run_s, args)
    row.update(
        compile_s=program.compile_s,
        model_compile_s=program.model_compile_s,
        trace_s=program.trace_s,
        xla_compile_s=program.xla_compile_s,
        compile_reused=not fresh,
        run_times_s=run_times,
        cpu_ms_per_posterior_run=1000 * float(np.median(cpu_times)) / n,
        cpu_ms_per_posterior_e2e=1000 * (float(np.median(cpu_times)) + program.compile_cpu_s) / n,
        batch_size=batch_size,
        num_chunks=len(chunks),
        init_ok_share=float(per_problem["init_ok"].mean()),
        tree_depth_max=int(per_problem["tree_depth_max"].max()),
        peak_rss_mb=rss.peak_mb,
        rss_increase_mb=rss.peak_mb - rss.start_mb,
        device_peak_mb=device_peak_mb(),
        **lockstep(chunks, args.chains, stepwise=get_kernel(contestant.sampler).loop == "leapfrog"),
    )
    return row


def bench_auto(model, data, n, args, log=None, workload_name="*") -> dict:
    """Time the default sampler ``auto`` (no chunk program of its own: a kernel choice, reruns).

    ``sample_batched`` end to end with the engine's defaults (precision, devices, chunks unless
    ``--batch-size`` is given), 4 chains x ``draws`` + ``tune``; ``run`` = wall time less the
    seconds JAX spent compiling (``CompileClock``). One row; its gate is the benchmark's.
    """
    from benchmarks.certified_runs import CompileClock
    from engine import sample_batched
    from engine.sampling.diagnostics import summarize_idata

    subset = subset_data(data, n)
    wanted = args.batch_size_map.get(workload_name, args.batch_size_map["*"])
    with PeakRSS() as rss, CompileClock() as clock:
        t, c = time.perf_counter(), cpu_seconds()
        idata = sample_batched(model, subset, chains=args.chains, draws=args.draws, tune=args.tune,
                               seed=args.seed, batch_size=min(wanted, n) if wanted else None, progress=False)
        e2e, cpu = time.perf_counter() - t, cpu_seconds() - c
    s = summarize_idata(idata)
    names = [rv.name for rv in model.free_RVs]
    stack = lambda ds, f: np.stack([f(ds[v].values.reshape(n, -1), axis=1) for v in names], axis=1)  # noqa: E731
    per_problem = {"r_hat_max": np.nanmax(stack(s["r_hat"], np.nanmax), axis=1),
                   "ess_bulk_min": np.nanmin(stack(s["ess_bulk"], np.nanmin), axis=1),
                   "divergences": np.asarray(s["divergences"].values).reshape(n)}
    run_s = max(e2e - clock.seconds, 1e-9)
    row = row_common(per_problem, n, e2e, run_s, args)
    kernels = {}
    if "sampler" in idata.sample_stats:
        labels, counts = np.unique(idata.sample_stats["sampler"].values, return_counts=True)
        kernels = {str(k): int(v) for k, v in zip(labels, counts)}
    row.update(compile_s=clock.seconds, compile_reused=False, batch_size=wanted or None,
               precision=str(idata.posterior[names[0]].dtype), kernels=kernels,
               cpu_ms_per_posterior_e2e=1000 * cpu / n, peak_rss_mb=rss.peak_mb,
               rss_increase_mb=rss.peak_mb - rss.start_mb, device_peak_mb=device_peak_mb())
    if log is not None:
        log(f"      kernels that certified: {kernels}")
    return row

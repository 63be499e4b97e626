"""Throughput of the batch engine against a loop of ``pm.sample``, measured side by side.

``python -m benchmarks.throughput [--quick] [options]`` runs, in ONE process, for every workload
(``benchmarks.workloads``) and every problem count N:

- the engine with BlackJAX and with NumPyro NUTS (any of ``blackjax``, ``numpyro``, optionally
  suffixed ``:dense`` and/or ``:f32``), on the realistic audit path: draws stay on the device and
  a per-problem summary (rank-normalised split R-hat, bulk/tail ESS from
  ``engine.diagnostics.summarize_draws``, divergences, leapfrog-step counts) comes back;
- the user's real alternative, a loop of plain ``pm.sample`` (defaults; draws, tune and chains
  matched), on a stated, evenly spread subset of the problems;
- nutpie in the same loop, when it is importable (the optional ``nutpie`` extra).

Timing rules (STYLE.md item 11): the PyMC -> JAX conversion, JAX tracing and XLA compilation are
timed apart from running (AOT ``.lower().compile()`` of the chunk program that
``engine.batch.run_batched`` builds), every run ends with the results on the host, run-only times
are medians over repeats, and the machine, versions, settings and load average are written next
to every figure. "End to end" = PyMC->JAX + trace + XLA compile + run; a fresh process pays
exactly that. Only problems that pass the quality gate (R-hat < 1.01 and bulk ESS >= 400 for
every parameter) count in posteriors/s and ESS/s; the pass share is reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmarks.workloads import WORKLOADS, get_workload

__all__ = ["Contestant", "parse_contestant", "main", "run_benchmark", "GATE"]

GATE = {"r_hat_max": 1.01, "ess_bulk_min": 400.0}
"""Quality gate a problem must pass to count: R-hat < 1.01 and bulk ESS >= 400 (all parameters)."""

ENGINE_SAMPLERS = ("blackjax", "numpyro", "stepwise")
LOOP_SAMPLERS = ("pymc", "nutpie")


@dataclass(frozen=True)
class Contestant:
    """One way of sampling all problems.

    label
        The spec as given, e.g. ``"blackjax:dense:f32"``.
    sampler
        "blackjax", "numpyro" (the engine) or "pymc", "nutpie" (a per-problem loop).
    dense_mass
        Engine only: adapt a dense inverse mass matrix.
    precision
        Engine only: "float64" or "float32".
    """

    label: str
    sampler: str
    dense_mass: bool = False
    precision: str = "float64"

    @property
    def is_engine(self) -> bool:
        return self.sampler in ENGINE_SAMPLERS


def parse_contestant(spec: str, default_precision: str = "float64") -> Contestant:
    """``"blackjax"``, ``"numpyro:dense"``, ``"blackjax:f32"``, ``"pymc"``, ``"nutpie"`` -> Contestant."""
    base, *opts = spec.strip().split(":")
    if base not in ENGINE_SAMPLERS + LOOP_SAMPLERS:
        raise ValueError(f"unknown contestant {spec!r}; base must be one of {ENGINE_SAMPLERS + LOOP_SAMPLERS}")
    dense, precision = False, default_precision
    for opt in opts:
        if opt == "dense":
            dense = True
        elif opt in ("f32", "float32"):
            precision = "float32"
        elif opt in ("f64", "float64"):
            precision = "float64"
        else:
            raise ValueError(f"contestant {spec!r}: unknown option {opt!r} (dense, f32, f64)")
    if base in LOOP_SAMPLERS and opts:
        raise ValueError(f"contestant {spec!r}: {base} runs with its own defaults, no options")
    return Contestant(spec.strip(), base, dense, precision if base in ENGINE_SAMPLERS else "float64")


# ------------------------------------------------------------------------------ measuring aids
class PeakRSS:
    """Context manager polling this process's resident set size; ``peak_mb`` when done."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_mb = self.peak_mb = 0.0

    def _poll(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, its threads and its reaped children.

    Beside wall time because the cores may be shared: CPU time is less sensitive to other
    processes' load (though not immune: they also share caches and memory bandwidth).
    """
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def subset_data(data: dict, n: int) -> dict:
    """The first ``n`` problems of a workload's data (arrays or ragged lists)."""
    return {k: (list(v[:n]) if isinstance(v, (list, tuple)) else np.asarray(v)[:n]) for k, v in data.items()}


def gate_mask(r_hat_max: np.ndarray, ess_bulk_min: np.ndarray) -> np.ndarray:
    """``[problem]`` passes the quality gate (NaN fails)."""
    r_hat_max = np.asarray(r_hat_max, dtype=float)
    ess_bulk_min = np.asarray(ess_bulk_min, dtype=float)
    return (r_hat_max < GATE["r_hat_max"]) & (ess_bulk_min >= GATE["ess_bulk_min"])


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

    from engine.diagnostics import summarize_draws

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

    Uses ``engine.batch``'s chunk builder so the timed program is exactly the engine's; AOT
    compilation lets compile time be measured apart from run time (there is no public hook yet).
    """

    def __init__(self, model, problem_data, config):
        import jax
        import jax.numpy as jnp

        from engine import batch
        from engine.compile import compile_model

        self.config = config
        self._scope = getattr(batch, "precision_scope", None) or (
            lambda precision: jax.enable_x64(precision == "float64")
        )
        t0, c0 = time.perf_counter(), cpu_seconds()
        self.compiled = compile_model(model, problem_data)
        t1 = time.perf_counter()
        self.summary_fn = make_summary_fn(self.compiled.free_var_names, config.draws)
        with self._scope(config.precision):
            fn = batch._build_chunk_fn(self.compiled, config, self.summary_fn)
            arrays = batch._cast(problem_data.device_arrays(), config.precision)
            size = batch.chunk_grid(problem_data.num_problems, config.batch_size)[0][1]
            index, chunk = batch._chunk_inputs(arrays, 0, size, size)
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

        from engine import batch

        with self._scope(self.config.precision):
            arrays = batch._cast(problem_data.device_arrays(), self.config.precision)
            root = jax.random.PRNGKey(self.config.seed)
            chunks = []
            grid = batch.chunk_grid(problem_data.num_problems, self.chunk_size)
            t0 = time.perf_counter()
            for start, stop in grid:
                index, chunk = batch._chunk_inputs(arrays, start, stop, self.chunk_size)
                _, ok, summary = self.executable(root, jnp.asarray(index), chunk)
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
    from engine.batch import BatchConfig
    from engine.compile import prepare_data
    from engine.samplers import NUTSSettings

    problem_data = prepare_data(model, subset_data(data, n))
    wanted = args.batch_size_map.get(workload_name, args.batch_size_map["*"])
    batch_size = min(wanted, n) if wanted else n
    config = BatchConfig(
        sampler=contestant.sampler, chains=args.chains, draws=args.draws, tune=args.tune,
        seed=args.seed, batch_size=batch_size, precision=contestant.precision, keep_draws=False,
        settings=NUTSSettings(
            target_accept=args.target_accept, max_tree_depth=args.max_tree_depth,
            dense_mass=contestant.dense_mass,
        ),
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
    row = _row_common(per_problem, n, run_s + program.compile_s, run_s, args)
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
        device_peak_mb=_device_peak_mb(),
        **lockstep(chunks, args.chains, stepwise=contestant.sampler == "stepwise"),
    )
    return row


def _device_peak_mb() -> float | None:
    """Accelerator's peak bytes in use so far (process-wide), where the backend reports it."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU backends may not implement it
        return None
    return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"] / 2**20


def _row_common(per_problem: dict, n: int, e2e_s: float, run_s: float | None, args) -> dict:
    passed = gate_mask(per_problem["r_hat_max"], per_problem["ess_bulk_min"])
    n_pass = int(passed.sum())
    per_post_e2e = e2e_s / n
    ess = per_problem["ess_bulk_min"][passed]
    return {
        "n": n,
        "n_pass": n_pass,
        "pass_share": n_pass / n,
        "e2e_s": e2e_s,
        "run_s": run_s,
        "posteriors_per_s_e2e": n_pass / e2e_s,
        "posteriors_per_s_run": None if run_s is None else n_pass / run_s,
        "ms_per_posterior_e2e": 1000 * per_post_e2e,
        "ms_per_posterior_run": None if run_s is None else 1000 * run_s / n,
        "min_bulk_ess_median": float(np.median(ess)) if n_pass else None,
        "min_bulk_ess_per_s": float(np.median(ess) / per_post_e2e) if n_pass else None,
        "r_hat_max_worst": float(np.nanmax(per_problem["r_hat_max"])),
        "divergences_total": int(np.sum(per_problem["divergences"])),
        "load_avg_1m": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------ the loops
def _loop_summary(draws: dict[str, np.ndarray], free_names, n_steps=None, diverging=None) -> dict:
    """Engine diagnostics of ``[problem, chain, draw, ...]`` draws (same arithmetic for all)."""
    import jax
    import jax.numpy as jnp

    from engine.diagnostics import summarize_draws

    with jax.enable_x64(True):
        r_hat, e_bulk = [], []
        for name in free_names:
            v = np.asarray(draws[name], dtype=float)
            x = np.moveaxis(v.reshape(v.shape[:3] + (-1,)), (1, 2), (-2, -1))  # [p, elem, c, d]
            s = summarize_draws(jnp.asarray(x))
            r_hat.append(np.max(np.asarray(s["r_hat"]), axis=-1))
            e_bulk.append(np.min(np.asarray(s["ess_bulk"]), axis=-1))
    div = np.zeros(len(r_hat[0]), int) if diverging is None else np.asarray(diverging).reshape(len(r_hat[0]), -1).sum(-1)
    return {"r_hat_max": np.max(r_hat, 0), "ess_bulk_min": np.min(e_bulk, 0), "divergences": div}


def loop_problems(num_problems: int, k: int) -> list[int]:
    """``k`` problem indices spread evenly over ``range(num_problems)``."""
    k = max(1, min(k, num_problems))
    return sorted({int(i) for i in np.linspace(0, num_problems - 1, k).round()})


def bench_pymc(model, data, problems: list[int], args) -> dict:
    """A loop of plain ``pm.sample`` (one call per problem) on ``problems``."""
    from engine.compile import prepare_data
    from engine.samplers import NUTSSettings
    from engine.samplers.pymc_default import sample_loop

    problem_data = prepare_data(model, data)
    free_names = [rv.name for rv in model.free_RVs]
    times, collected, divs = [], {n: [] for n in free_names}, []
    cpu0 = cpu_seconds()
    with PeakRSS() as rss:
        for i in problems:
            t = time.perf_counter()
            draws, stats = sample_loop(
                model, problem_data, chains=args.chains, draws=args.draws, tune=args.tune,
                seed=args.seed, settings=NUTSSettings(target_accept=args.target_accept),
                problems=[i], progress=False,
            )
            times.append(time.perf_counter() - t)
            for name in free_names:
                collected[name].append(draws[name][0])
            divs.append(np.asarray(stats.diverging[0]).sum())
    per_problem = _loop_summary({k: np.stack(v) for k, v in collected.items()}, free_names)
    per_problem["divergences"] = np.asarray(divs)
    row = _row_common(per_problem, len(problems), float(np.sum(times)), None, args)
    row.update(
        problems=problems, per_problem_s=times, per_problem_s_median=float(np.median(times)),
        cpu_ms_per_posterior_e2e=1000 * (cpu_seconds() - cpu0) / len(problems),
        peak_rss_mb=rss.peak_mb, rss_increase_mb=rss.peak_mb - rss.start_mb,
    )
    return row


def nutpie_available() -> tuple[bool, str]:
    try:
        import nutpie  # noqa: F401
    except Exception as err:  # ImportError, or a broken binary wheel
        return False, f"nutpie not importable ({type(err).__name__}: {err}); install the 'nutpie' extra"
    return True, ""


def bench_nutpie(model, data, problems: list[int], args) -> dict:
    """A loop of nutpie (compiled once with ``compile_pymc_model``, data swapped per problem)."""
    import nutpie

    from engine.compile import prepare_data
    from engine.samplers.pymc_default import _problem_inputs

    problem_data = prepare_data(model, data)
    free_names = [rv.name for rv in model.free_RVs]
    collected = {n: [] for n in free_names}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        compiled = nutpie.compile_pymc_model(model)
        compile_s = time.perf_counter() - t0
        times = []
        for i in problems:
            t = time.perf_counter()
            trace = nutpie.sample(
                compiled.with_data(**_problem_inputs(problem_data, i)), draws=args.draws,
                tune=args.tune, chains=args.chains, seed=args.seed * 1_000_003 + i,
                target_accept=args.target_accept, progress_bar=False,
            )
            times.append(time.perf_counter() - t)
            for name in free_names:
                collected[name].append(trace.posterior[name].values)
    per_problem = _loop_summary({k: np.stack(v) for k, v in collected.items()}, free_names)
    row = _row_common(per_problem, len(problems), compile_s + float(np.sum(times)), float(np.sum(times)), args)
    row.update(
        compile_s=compile_s, problems=problems, per_problem_s=times,
        per_problem_s_median=float(np.median(times)), peak_rss_mb=rss.peak_mb,
        rss_increase_mb=rss.peak_mb - rss.start_mb,
    )
    return row


# ------------------------------------------------------------------------------ driver
FULL = {
    "workloads": "w1,w2,w3,w4", "contestants": ["blackjax,numpyro,pymc,nutpie"], "chains": 4,
    "draws": 1000, "tune": 1000, "batch_size": ["100"], "loop_problems": ["10"], "repeats": 3,
    "n": ["10,100,1000,10000"],
}
"""Defaults of the full benchmark (the issue's target setting: 4 chains x 1000 tune + 1000 draws)."""

QUICK = {
    "workloads": "w1", "contestants": ["blackjax,numpyro,pymc,nutpie"], "draws": 500, "tune": 500,
    "batch_size": ["10"], "loop_problems": ["2"], "repeats": 1, "n": ["10,40"],
}
"""``--quick`` (CI smoke size, < 2 minutes on 2 cores); any option given explicitly wins."""


def parse_per_workload(option: str, values: list[str], default: str) -> dict[str, int]:
    """``["100", "w2=20"]`` -> ``{"*": 100, "w2": 20}`` for an integer option."""
    out: dict[str, int] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        if name and name not in WORKLOADS:
            raise ValueError(f"{option} {value!r}: unknown workload {name!r}")
        if not number.isdigit():
            raise ValueError(f"{option} {value!r}: give a non-negative integer")
        out[name or "*"] = int(number)
    out.setdefault("*", int(default))
    return out


def parse_n(values: list[str], workloads: list[str]) -> dict[str, list[int]]:
    """``["10,100", "w3=10,50"]`` -> ``{"*": [10, 100], "w3": [10, 50]}``."""
    out: dict[str, list[int]] = {}
    for value in values:
        name, _, nums = value.rpartition("=")
        name = name or "*"
        if name != "*" and name not in WORKLOADS:
            raise ValueError(f"--n {value!r}: unknown workload {name!r}")
        counts = sorted({int(x) for x in nums.split(",") if x})
        if not counts or counts[0] < 1:
            raise ValueError(f"--n {value!r}: give positive problem counts")
        out[name] = counts
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Posteriors per second of the batch engine vs a loop of pm.sample (one run).",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke size: w1, N=10,40, 500+500 draws, < 2 min")
    p.add_argument("--workloads", help="comma list of %s (default all)" % ",".join(WORKLOADS))
    p.add_argument("--n", action="append", metavar="[wX=]N1,N2",
                   help="problem counts (default 10,100,1000,10000); repeat with wX= for one workload's")
    p.add_argument("--contestants", action="append", metavar="[wX=]C1,C2",
                   help="comma list: blackjax|numpyro[:dense][:f32], pymc, nutpie (default "
                   "blackjax,numpyro,pymc,nutpie); repeat with wX= for one workload's")
    p.add_argument("--max-n", action="append", metavar="CONTESTANT=N", default=[],
                   help="largest N a contestant runs (e.g. numpyro=1000 to save time); repeatable")
    p.add_argument("--chains", type=int)
    p.add_argument("--draws", type=int)
    p.add_argument("--tune", type=int)
    p.add_argument("--precision", choices=["float64", "float32"], default="float64",
                   help="engine precision unless a contestant says :f32/:f64")
    p.add_argument("--batch-size", action="append", metavar="[wX=]B",
                   help="problems per compiled chunk (default 100; 0: all at once); repeat with wX= "
                   "for one workload's")
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--max-tree-depth", type=int, default=10)
    p.add_argument("--loop-problems", action="append", metavar="[wX=]K",
                   help="problems the pm.sample / nutpie loops run (default 10); repeat with wX= for "
                   "one workload's")
    p.add_argument("--repeats", type=int, help="run-only repeats, median reported (default 3)")
    p.add_argument("--repeat-budget-s", type=float, default=60.0,
                   help="no further repeat once the runs of one row took this long")
    p.add_argument("--cpu-eigen", choices=["single", "multi"], default="single",
                   help="XLA:CPU intra-op (Eigen) threads: 'single' (default, as in results/full) "
                   "adds --xla_cpu_multi_thread_eigen=false to XLA_FLAGS")
    p.add_argument("--cpu-scheduler", choices=["safe", "default"], default="safe",
                   help="'safe' (default; the engine's CLI does the same) adds "
                   "--xla_cpu_enable_concurrency_optimized_scheduler=false: jaxlib 0.10.2 otherwise "
                   "can deadlock in batched LAPACK kernels (w2) on few cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", help="file stem of the results (default: quick or full)")
    p.add_argument("--note", action="append", help="a line of context written into the results (repeatable)")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse ``argv``; unset options take the ``--quick`` or the full defaults."""
    args = build_parser().parse_args(argv)
    preset = {**FULL, **QUICK} if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        get_workload(w)
    by_workload: dict[str, list[Contestant]] = {}
    for value in args.contestants:
        name, _, specs = value.rpartition("=")
        if name and name not in WORKLOADS:
            raise ValueError(f"--contestants {value!r}: unknown workload {name!r}")
        by_workload[name or "*"] = [parse_contestant(c, args.precision) for c in specs.split(",") if c.strip()]
    by_workload.setdefault("*", [parse_contestant(c, args.precision) for c in preset["contestants"][0].split(",")])
    args.contestants_map = by_workload
    args.max_n_map = {}
    for value in args.max_n:
        label, _, cap = value.rpartition("=")
        if not label or not cap.isdigit():
            raise ValueError(f"--max-n {value!r}: give CONTESTANT=N")
        args.max_n_map[label] = int(cap)
    n_map = parse_n(args.n, args.workloads)
    n_map.setdefault("*", parse_n(preset["n"], args.workloads)["*"])
    args.n_map = n_map
    args.batch_size_map = parse_per_workload("--batch-size", args.batch_size, preset["batch_size"][0])
    args.loop_problems_map = parse_per_workload("--loop-problems", args.loop_problems, preset["loop_problems"][0])
    args.tag = args.tag or ("quick" if args.quick else "full")
    return args


def run_benchmark(args: argparse.Namespace, log=print, on_row=None) -> dict:
    """Run every workload x contestant x N; returns the results dict (also written by ``report``).

    ``on_row(results_so_far)`` is called after every row, so a run that is stopped (or wedged)
    keeps what it measured.
    """
    from benchmarks import report

    meta = report.machine_info()
    meta["load_avg_start"] = list(os.getloadavg())
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    t_start = time.perf_counter()
    rows, notes = [], list(args.note or [])
    settings = {k: v for k, v in vars(args).items() if k not in ("contestants_map", "n")}
    settings["contestants_map"] = {w: [c.label for c in cs] for w, cs in args.contestants_map.items()}
    settings["gate"] = GATE

    def snapshot() -> dict:
        report.add_ratios(rows)
        meta["load_avg_end"] = list(os.getloadavg())
        meta["wall_s"] = time.perf_counter() - t_start
        return {"meta": dict(meta), "settings": settings, "rows": list(rows), "notes": list(notes)}

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(snapshot())

    ok_nutpie, why = nutpie_available()
    for wname in args.workloads:
        workload = get_workload(wname)
        ns = args.n_map.get(wname, args.n_map["*"])
        model = workload.build_model()
        data = workload.make_data(max(ns), args.seed)
        for contestant in args.contestants_map.get(wname, args.contestants_map["*"]):
            base = {"workload": wname, "contestant": contestant.label, "sampler": contestant.sampler,
                    "precision": contestant.precision, "dense_mass": contestant.dense_mass}
            if contestant.sampler == "nutpie" and not ok_nutpie:
                if f"nutpie skipped: {why}" not in notes:
                    notes.append(f"nutpie skipped: {why}")
                log(f"[{wname}] nutpie skipped: {why}")
                continue
            if not contestant.is_engine:
                problems = loop_problems(max(ns), args.loop_problems_map.get(wname, args.loop_problems_map["*"]))
                log(f"[{wname}] {contestant.label}: loop over {len(problems)} of {max(ns)} problems ...")
                fn = bench_pymc if contestant.sampler == "pymc" else bench_nutpie
                try:
                    row = {**base, **fn(model, data, problems, args)}
                except Exception as err:  # a contestant that fails is recorded, not fatal
                    notes.append(f"{wname} {contestant.label} failed: {type(err).__name__}: {err}")
                    log(notes[-1])
                    continue
                add(row)
                log(f"    {row['ms_per_posterior_e2e']:.0f} ms/posterior, pass {row['pass_share']:.0%}")
                continue
            programs: dict = {}
            cap = args.max_n_map.get(contestant.label)
            for n in ns:
                if cap is not None and n > cap:
                    notes.append(f"{wname} {contestant.label}: N={n} not run (--max-n {contestant.label}={cap})")
                    continue
                log(f"[{wname}] {contestant.label} N={n} ...")
                row = {**base, **bench_engine(model, data, n, contestant, args, programs, log=log, workload_name=wname)}
                add(row)
                log(
                    f"    compile {row['compile_s']:.1f}s{' (reused)' if row['compile_reused'] else ''}, "
                    f"run {row['run_s']:.2f}s, {row['ms_per_posterior_run']:.2f} ms/posterior run, "
                    f"pass {row['pass_share']:.1%}, lockstep {row['lockstep_efficiency']:.2f}"
                )
    return snapshot()


EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""The engine's own CPU workaround (``engine.audit.CPU_XLA_FLAG``): with it, w2 in chunks of 100
ran; without it (with or without ``EIGEN_FLAG``) such chunks deadlocked in jaxlib 0.10.2's batched
LAPACK kernels (``lapack_dtrsm_ffi`` -> ``ParallelBatchMap``) on 2 cores."""


def configure_xla(cpu_eigen: str, cpu_scheduler: str = "safe") -> None:
    """Add the XLA:CPU workarounds to ``XLA_FLAGS`` (before JAX's backend starts)."""
    wanted = ([EIGEN_FLAG] if cpu_eigen == "single" else []) + ([SCHEDULER_FLAG] if cpu_scheduler == "safe" else [])
    if not wanted:
        return
    import sys as _sys

    if "jax" in _sys.modules:
        import jax

        if jax._src.xla_bridge.backends_are_initialized():
            raise RuntimeError("XLA_FLAGS workarounds must be applied before JAX starts its backend")
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in wanted:
        if flag.split("=")[0] not in flags:
            flags = (flags + " " + flag).strip()
    os.environ["XLA_FLAGS"] = flags


def main(argv=None) -> int:
    args = resolve_args(argv)
    configure_xla(args.cpu_eigen, args.cpu_scheduler)
    from benchmarks import report

    results = run_benchmark(
        args, log=lambda m: print(m, flush=True),
        on_row=lambda partial: report.write_results(partial, args.out, args.tag),
    )
    paths = report.write_results(results, args.out, args.tag)
    print("\n" + report.markdown_table(results["rows"]))
    print("\nwrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The per-problem loops: plain ``pm.sample`` (the user's real alternative) and nutpie."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.measure import PeakRSS, cpu_seconds, row_common

__all__ = ["loop_problems", "bench_pymc", "nutpie_available", "bench_nutpie"]

def _loop_summary(draws: dict[str, np.ndarray], free_names, n_steps=None, diverging=None) -> dict:
    """Engine diagnostics of ``[problem, chain, draw, ...]`` draws (same arithmetic for all)."""
    import jax
    import jax.numpy as jnp

    from engine.sampling.diagnostics import summarize_draws

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
    from engine.model.compile import prepare_data
    from engine.sampling.kernels.base import KernelSettings
    from engine.sampling.kernels.pymc_default import sample_loop

    problem_data = prepare_data(model, data)
    free_names = [rv.name for rv in model.free_RVs]
    times, collected, divs = [], {n: [] for n in free_names}, []
    cpu0 = cpu_seconds()
    with PeakRSS() as rss:
        for i in problems:
            t = time.perf_counter()
            draws, stats = sample_loop(
                model, problem_data, chains=args.chains, draws=args.draws, tune=args.tune,
                seed=args.seed, settings=KernelSettings(target_accept=args.target_accept),
                problems=[i], progress=False,
            )
            times.append(time.perf_counter() - t)
            for name in free_names:
                collected[name].append(draws[name][0])
            divs.append(np.asarray(stats.diverging[0]).sum())
    per_problem = _loop_summary({k: np.stack(v) for k, v in collected.items()}, free_names)
    per_problem["divergences"] = np.asarray(divs)
    row = row_common(per_problem, len(problems), float(np.sum(times)), None, args)
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


def bench_nutpie(model, data, problems: list[int], args, sample_kw=None) -> dict:
    """A loop of nutpie (compiled once with ``compile_pymc_model``, data swapped per problem);
    ``sample_kw``: nutpie's own settings, over ``args.target_accept``."""
    import nutpie

    from engine.model.compile import prepare_data
    from engine.sampling.kernels.pymc_default import problem_inputs

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
                compiled.with_data(**problem_inputs(problem_data, i)), draws=args.draws,
                tune=args.tune, chains=args.chains, seed=args.seed * 1_000_003 + i,
                progress_bar=False, **{"target_accept": args.target_accept, **(sample_kw or {})},
            )
            times.append(time.perf_counter() - t)
            for name in free_names:
                collected[name].append(trace.posterior[name].values)
    per_problem = _loop_summary({k: np.stack(v) for k, v in collected.items()}, free_names)
    row = row_common(per_problem, len(problems), compile_s + float(np.sum(times)), float(np.sum(times)), args)
    row.update(
        compile_s=compile_s, problems=problems, per_problem_s=times,
        per_problem_s_median=float(np.median(times)), peak_rss_mb=rss.peak_mb,
        rss_increase_mb=rss.peak_mb - rss.start_mb,
    )
    return row



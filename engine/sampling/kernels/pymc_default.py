"""The baseline: a plain loop of ``pm.sample``, one call per problem, PyMC's defaults.

This is what a user does without the engine. It returns the same structure as the batched
kernels (``[problem, chain, draw, ...]`` draws and ``SampleStats``) so results compare directly.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from engine.model.compile import ProblemData
from engine.sampling.kernels.base import Kernel, KernelSettings, SampleStats

_STAT_NAMES = {
    "diverging": "diverging",
    "tree_depth": "tree_depth",
    "n_steps": "n_steps",
    "energy": "energy",
    "lp": "lp",
    "acceptance_rate": "acceptance_rate",
    "step_size": "step_size",
}


def problem_inputs(problem_data: ProblemData, index: int) -> dict[str, np.ndarray]:
    """Problem ``index``'s inputs, ragged ones cut to its own number of rows (``pm.set_data``)."""
    out = {}
    rows = None if problem_data.num_rows is None else int(problem_data.num_rows[index])
    for name, arr in problem_data.arrays.items():
        value = arr[index]
        if rows is not None and name in problem_data.ragged_names:
            value = value[:rows]
        out[name] = value
    return out


def pm_sample_settings(settings: KernelSettings) -> dict:
    """``pm.sample`` keyword arguments that carry the engine's NUTS settings to PyMC's NUTS.

    ``max_tree_depth`` -> ``max_treedepth`` (passed on to PyMC's ``NUTS`` step);
    ``dense_mass`` -> ``init="jitter+adapt_full"`` (a dense mass matrix adapted in tuning), else
    PyMC's default ``"jitter+adapt_diag"``.
    """
    return {
        "target_accept": float(settings.target_accept),
        "max_treedepth": int(settings.max_tree_depth),
        "init": "jitter+adapt_full" if settings.dense_mass else "jitter+adapt_diag",
    }


def sample_loop(
    model,
    problem_data: ProblemData,
    *,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    settings: KernelSettings = KernelSettings(),
    problems=None,
    progress: bool | None = None,
):
    """``pm.sample`` once per problem (data swapped with ``pm.set_data``).

    Returns ``(draws {name: [problem, chain, draw, ...]}, SampleStats)`` for ``problems``
    (default all). Problem ``i`` uses ``random_seed = seed * 1_000_003 + i``.
    """
    import pymc as pm
    from tqdm.auto import tqdm

    index = range(problem_data.num_problems) if problems is None else list(problems)
    names = [rv.name for rv in model.free_RVs] + [d.name for d in model.deterministics]
    collected: dict[str, list] = {n: [] for n in names}
    stats: dict[str, list] = {k: [] for k in SampleStats._fields}
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    logger = logging.getLogger("pymc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for i in tqdm(index, desc="pm.sample loop", disable=disable, leave=False):
            with model:
                pm.set_data(problem_inputs(problem_data, i))
                idata = pm.sample(
                    draws=draws,
                    tune=tune,
                    chains=chains,
                    random_seed=seed * 1_000_003 + int(i),
                    **pm_sample_settings(settings),
                    progressbar=False,
                    compute_convergence_checks=False,
                )
            for n in names:
                collected[n].append(idata.posterior[n].values)
            ss = idata.sample_stats
            for k in SampleStats._fields:
                src = _STAT_NAMES[k]
                stats[k].append(ss[src].values if src in ss else np.full((chains, draws), np.nan))
    finally:
        logger.setLevel(level)
    draws_out = {n: np.stack(v) for n, v in collected.items()}
    stats_out = SampleStats(**{k: np.stack(v) for k, v in stats.items()})
    return draws_out, stats_out


KERNEL = Kernel(name="pymc", description="pymc NUTS (pm.sample loop)", build=None, host_loop=sample_loop)

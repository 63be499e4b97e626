"""Simulation-based calibration (SBC) of a PyMC template, every simulation in one batched fit.

SBC (Talts et al. 2018, "Validating Bayesian inference algorithms with simulation-based
calibration"; Modrák et al. 2023, the SBC R package; simuk for ArviZ) checks a whole inference
pipeline: draw parameters from the prior, simulate data from them, fit the data, and rank the
true parameter among the (nearly independent) posterior draws. When the fit is calibrated every
rank is uniform on ``0..L``. simuk and the SBC package call the sampler once per simulation; here
all ``M`` simulated data sets are the problem axis of ONE :func:`engine.sample_batched` call.

Steps of :func:`sbc`:

1. ``pm.sample_prior_predictive`` of the ``simulator`` template (the fitted ``model`` itself by
   default; compiled once for all ``M`` draws) gives the true parameters ``[M, *shape]`` and the
   observed variables ``[M, *shape]``.
2. Each observed variable's data is a ``pm.Data`` container of ``model``; the simulated values
   become that container's per-problem data, and ``sample_batched`` fits all simulations.
3. Draws are thinned by a stride ``ceil(chains * draws / ESS)`` with ESS the median over
   simulations of the smallest bulk ESS of any parameter, so the ``L`` kept draws are nearly
   independent (autocorrelated draws make calibrated ranks non-uniform; Talts et al. 2018 §5).
4. The rank of each scalar parameter (vector ones element by element, named ``theta[0]``) is the
   number of kept draws below the truth, in the constrained space.
5. Uniformity per parameter: Pearson's chi-square over ``B`` rank bins, Holm's step-down
   correction over parameters (family-wise error ``alpha``); the rank ECDF's simultaneous band
   (Säilynoja, Bürkner & Vehtari 2022) comes from ArviZ's ``ecdf_confidence_band``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "SBCResult", "sbc", "observed_containers", "simulate", "element_draws", "thinning_stride",
    "rank_statistics", "rank_bins", "uniformity_p_value", "holm_adjust", "ecdf_band",
]

ALPHA = 0.05
"""Default family-wise error rate of the per-parameter uniformity tests (Holm-corrected)."""

MAX_BINS = 20
"""Most rank-histogram bins; fewer when ``M`` is small (at least ~10 expected per bin)."""


@dataclass
class SBCResult:
    """What :func:`sbc` returns.

    Attributes
    ----------
    summary
        The dict written to ``summary.json``: ``parameters`` (name -> ``p_value``,
        ``p_adjusted``, ``pass``, ``chi2``, ``ecdf_in_band``, ``mean_rank``, ...),
        ``divergent_share``, ``converged_share``, ``num_simulations``, ``num_rank_draws``, ...
    ranks
        Parameter element name -> integer ranks ``[M]`` in ``0..num_rank_draws``.
    truth
        Parameter element name -> the simulated true values ``[M]``.
    outputs
        Files written under ``out_dir`` (empty when ``out_dir`` is None).
    """

    summary: dict
    ranks: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def num_rank_draws(self) -> int:
        return int(self.summary["num_rank_draws"])


# --------------------------------------------------------------------------- simulation
def observed_containers(model) -> dict[str, str]:
    """Observed variable name -> name of the ``pm.Data`` container holding its data.

    Raises ``ValueError`` when an observed variable's data is not a container (then every
    simulation could not carry its own data set).
    """
    containers = {id(v): v.name for v in model.data_vars}
    out = {}
    for rv in model.observed_RVs:
        value = model.rvs_to_values[rv]
        if id(value) not in containers:
            raise ValueError(
                f"observed variable {rv.name!r}: its data must be a pm.Data container "
                "(observed=pm.Data(...)) so that each simulation carries its own data set"
            )
        out[rv.name] = containers[id(value)]
    if not out:
        raise ValueError("the model has no observed variable to simulate")
    return out


def simulate(model, simulator, num_simulations: int, seed: int):
    """Prior predictive draws of ``simulator``: ``(truth, data)``.

    ``truth``: free and deterministic variable name -> ``[M, *shape]``; ``data``: ``model``'s
    container name -> simulated observations ``[M, *shape]`` (matched by observed variable name).
    One compiled forward-sampling function serves all ``M`` draws (``pm.sample_prior_predictive``).
    """
    import pymc as pm

    targets = observed_containers(model)
    sim_observed = {rv.name for rv in simulator.observed_RVs}
    missing = sorted(set(targets) - sim_observed)
    if missing:
        raise ValueError(
            f"simulator: has no observed variable {missing[0]!r} of the fitted model "
            f"(its observed variables are {sorted(sim_observed)})"
        )
    names = [v.name for v in simulator.free_RVs + simulator.deterministics]
    prior = pm.sample_prior_predictive(
        draws=num_simulations, model=simulator, var_names=names + sorted(targets),
        random_seed=seed,
    )
    truth = {n: np.asarray(prior.prior[n].values[0]) for n in names}
    data = {container: np.asarray(prior.prior_predictive[obs].values[0])
            for obs, container in targets.items()}
    for container, values in data.items():
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(1))[0])
            raise ValueError(f"simulation {bad}: simulated data {container!r} is not finite")
    return truth, data


def _element_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple]]:
    if not shape:
        return [(name, ())]
    return [(f"{name}[{', '.join(map(str, idx))}]", idx) for idx in np.ndindex(*shape)]


def element_draws(values: Mapping[str, np.ndarray], num_leading: int) -> dict[str, np.ndarray]:
    """Split every variable ``[*leading, *shape]`` into scalar elements ``name[i, j]`` ->
    ``[*leading]`` (``num_leading`` leading axes, e.g. 1 for truth ``[M]``, 3 for draws
    ``[M, chain, draw]``)."""
    out = {}
    for name, arr in values.items():
        arr = np.asarray(arr)
        for label, idx in _element_names(name, arr.shape[num_leading:]):
            out[label] = arr[(Ellipsis,) + idx]
    return out


# --------------------------------------------------------------------------- ranks
def thinning_stride(ess_min: np.ndarray, chains: int, draws: int) -> int:
    """Stride that leaves about as many draws as the effective sample size.

    ``ess_min``: ``[M]`` smallest bulk ESS over parameters, per simulation. The median over
    simulations sets the stride ``ceil(chains * draws / ESS)`` (at least 1, at most ``draws``).
    """
    ess = float(np.nanmedian(ess_min)) if np.any(np.isfinite(ess_min)) else 1.0
    stride = math.ceil(chains * draws / max(ess, 1.0))
    return int(min(max(stride, 1), draws))


def rank_statistics(draws: np.ndarray, truth: np.ndarray, stride: int) -> np.ndarray:
    """Ranks ``[M]`` of ``truth [M]`` among the thinned ``draws [M, chain, draw]``.

    Every chain keeps draws ``stride - 1, 2 * stride - 1, ...``; the rank is the number of kept
    draws strictly below the truth, in ``0..L`` with ``L = chains * (draws // stride)``.
    """
    kept = draws[:, :, stride - 1::stride]
    kept = kept.reshape(kept.shape[0], -1)
    return np.sum(kept < truth[:, None], axis=1).astype(int)


def rank_bins(num_rank_draws: int, num_simulations: int) -> np.ndarray:
    """Edges of the rank-histogram bins over ``0..L``: ``[B + 1]`` integers, each bin holding
    ``(L + 1) / B`` rank values or one fewer. ``B = min(20, L + 1, M // 10)``, at least 2."""
    values = num_rank_draws + 1
    num_bins = int(max(2, min(MAX_BINS, values, num_simulations // 10)))
    return np.round(np.linspace(0, values, num_bins + 1)).astype(int)


def uniformity_p_value(ranks: np.ndarray, num_rank_draws: int, edges: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-square test that ``ranks [M]`` are uniform on ``0..L``: ``(chi2, p_value)``.

    Expected counts are exact for the discrete uniform (bin width / (L + 1) of ``M``).
    """
    from scipy import stats

    counts = np.histogram(ranks, bins=edges - 0.5)[0]
    expected = len(ranks) * np.diff(edges) / (num_rank_draws + 1)
    result = stats.chisquare(counts, expected)
    return float(result.statistic), float(result.pvalue)


def holm_adjust(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): reject where ``adjusted < alpha`` keeps the
    family-wise error rate at ``alpha`` under any dependence between the tests."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


@functools.lru_cache(maxsize=8)
def ecdf_band(num_simulations: int, num_rank_draws: int, prob: float = 1 - ALPHA):
    """Simultaneous ``prob`` band of the ECDF of ``M`` uniform ranks on ``0..L`` (Säilynoja et al.
    2022, ArviZ's optimised method): ``(cdf, lower, upper)``, each ``[L + 1]`` at ranks ``0..L``.

    The counts of ranks ``<= k`` for discrete uniform ranks are distributed as those of
    continuous uniforms below ``(k + 1) / (L + 1)``, so the continuous band applies exactly.
    """
    from arviz.stats.ecdf_utils import ecdf_confidence_band

    cdf = (np.arange(num_rank_draws + 1) + 1.0) / (num_rank_draws + 1)
    lower, upper = ecdf_confidence_band(num_simulations, cdf, cdf, prob=prob, method="optimized")
    return cdf, lower, upper


# --------------------------------------------------------------------------- the analysis
def _diagnostics(draws: Mapping[str, np.ndarray], divergent: np.ndarray):
    """Per simulation: smallest bulk ESS ``[M]``, converged flags ``[M]`` (R-hat < 1.01, bulk
    and tail ESS >= 400, no divergence: the audit's definition) and R-hat < 1.01 ``[M]``. One jitted program: run op by op
    the rank normalisation of ``M x P`` series compiles dozens of small programs."""
    import jax
    import jax.numpy as jnp

    from engine.sampling.diagnostics import ess_bulk, ess_tail, rhat

    def worst(x):  # [M, P, chain, draw] -> three [M]
        return jnp.min(ess_bulk(x), 1), jnp.min(ess_tail(x), 1), jnp.max(rhat(x), 1)

    stacked = np.stack(list(draws.values()), axis=1)  # [M, P, chain, draw]
    with jax.enable_x64(True):
        bulk, tail, r_hat = (np.asarray(v) for v in jax.jit(worst)(jnp.asarray(stacked)))
    r_hat_ok = r_hat < 1.01
    return bulk, r_hat_ok & (bulk >= 400) & (tail >= 400) & (divergent == 0), r_hat_ok


def sbc(model, num_simulations: int = 1000, *, sampler: str = "blackjax", chains: int = 4,
        draws: int = 400, tune: int = 400, seed: int = 0, simulator=None, out_dir=None,
        alpha: float = ALPHA, **kw) -> SBCResult:
    """Simulation-based calibration of ``model`` with all simulations in one batched fit.

    Parameters
    ----------
    model
        ``pm.Model`` to fit. Every observed variable's data is a ``pm.Data`` container; other
        containers keep their values in every simulation.
    num_simulations
        ``M``, the number of simulated data sets (the problem axis of the fit).
    sampler, chains, draws, tune, seed
        As for :func:`engine.sample_batched` (``seed`` also seeds the prior predictive).
    simulator
        ``pm.Model`` that generates the truth and data (default ``model``). Its free and
        deterministic variables named as in ``model`` are ranked; its observed variables must
        carry the names of ``model``'s. A simulator that differs from ``model`` (another prior or
        likelihood scale) should fail the check: this is how a mis-specified fit shows.
    out_dir
        When given: ``summary.json``, ``ranks.parquet``, ``report.md`` and PNG plots there.
    alpha
        Family-wise error rate of the Holm-corrected uniformity tests.
    **kw
        Passed to ``sample_batched`` (``target_accept``, ``precision``, ``batch_size``, ...).

    Returns
    -------
    SBCResult
        ``.summary`` (the ``summary.json`` dict), ``.ranks`` and ``.truth`` per parameter element.
    """
    from engine.sampling.api import sample_batched

    if int(num_simulations) < 2:
        raise ValueError(f"num_simulations must be >= 2, got {num_simulations}")
    if kw.get("target_ess") is not None:
        from engine.errors import InputError

        raise InputError("target_ess: SBC ranks each truth among a fixed number of draws; per-problem "
                         "stopping would change that number per simulation (set sampler.target_ess=null)")
    if kw.get("fallback_stopping"):
        from engine.errors import InputError

        raise InputError("fallback_stopping: SBC ranks each truth among a fixed number of draws; a fallback "
                         "that stops per problem would change that number per simulation (set it to false)")
    simulator = model if simulator is None else simulator
    truth_vars, data = simulate(model, simulator, int(num_simulations), int(seed))
    # sampler="auto"'s fallback keeps ``draws`` too: every simulation is ranked among as many draws
    idata = sample_batched(model, data, sampler=sampler, chains=chains, draws=draws, tune=tune,
                           seed=seed, **{**kw, "fallback_stopping": False})
    if "num_draws" in idata.sample_stats and np.any(idata.sample_stats["num_draws"].values != draws):
        raise ValueError("SBC needs every simulation's full draws; the fit kept fewer for some (per-problem stopping)")
    posterior = {n: np.moveaxis(idata.posterior[n].values, 2, 0)  # [M, chain, draw, *shape]
                 for n in idata.posterior.data_vars if n in truth_vars}
    if not posterior:
        raise ValueError("simulator: shares no variable name with the fitted model's posterior")
    skipped = sorted(set(idata.posterior.data_vars) - set(posterior))
    post_el = element_draws(posterior, 3)
    truth_el = element_draws({n: truth_vars[n] for n in posterior}, 1)
    divergent = idata.sample_stats["diverging"].values.sum(axis=(0, 1)).astype(int)
    ess_min, converged, r_hat_ok = _diagnostics(post_el, divergent)
    stride = thinning_stride(ess_min, chains, draws)
    num_rank_draws = chains * (draws // stride)
    ranks = {n: rank_statistics(post_el[n], truth_el[n], stride) for n in post_el}
    summary = summarize(ranks, num_rank_draws, alpha=alpha)
    summary.update({
        "divergent_share": float(np.mean(divergent > 0)),
        "divergent_transitions": float(divergent.sum() / (divergent.size * chains * draws)),
        "converged_share": float(np.mean(converged)),
        "r_hat_ok_share": float(np.mean(r_hat_ok)),
        "median_min_ess_bulk": float(np.nanmedian(ess_min)),
        "thinning_stride": stride,
        "settings": {"sampler": sampler, "chains": chains, "draws": draws, "tune": tune,
                     "seed": seed, "simulator": "model" if simulator is model else "separate",
                     **{k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool))}},
        "not_ranked": skipped,
    })
    result = SBCResult(summary=summary, ranks=ranks, truth=truth_el)
    if out_dir is not None:
        from engine.calibration.report import write_outputs

        result.outputs = write_outputs(result, Path(out_dir))
    return result


def summarize(ranks: Mapping[str, np.ndarray], num_rank_draws: int, *, alpha: float = ALPHA) -> dict:
    """Per-parameter uniformity tests of ``ranks`` (name -> ``[M]``) and their Holm correction."""
    names = list(ranks)
    num_simulations = len(next(iter(ranks.values())))
    edges = rank_bins(num_rank_draws, num_simulations)
    cdf, lower, upper = ecdf_band(num_simulations, num_rank_draws, 1 - alpha)
    tests = [uniformity_p_value(ranks[n], num_rank_draws, edges) for n in names]
    adjusted = holm_adjust(np.array([p for _, p in tests]))
    parameters = {}
    for n, (chi2, p), p_adj in zip(names, tests, adjusted):
        ecdf = np.mean(ranks[n][:, None] <= np.arange(num_rank_draws + 1)[None, :], axis=0)
        parameters[n] = {
            "p_value": p, "p_adjusted": float(p_adj), "pass": bool(p_adj >= alpha), "chi2": chi2,
            "ecdf_in_band": bool(np.all((ecdf >= lower - 1e-12) & (ecdf <= upper + 1e-12))),
            "mean_rank": float(np.mean(ranks[n]) / num_rank_draws),
            "sd_rank": float(np.std(ranks[n]) / num_rank_draws),
        }
    return {
        "parameters": parameters,
        "all_pass": all(v["pass"] for v in parameters.values()),
        "num_failed": sum(not v["pass"] for v in parameters.values()),
        "num_simulations": num_simulations,
        "num_rank_draws": num_rank_draws,
        "num_bins": len(edges) - 1,
        "alpha": alpha,
        "test": "Pearson chi-square on rank bins, Holm-corrected over parameters",
    }


def write_summary_json(summary: Mapping[str, Any], path: Path) -> Path:
    """``summary.json`` (NaN -> null)."""
    from engine.analyses._common import jsonable

    path.write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    return path

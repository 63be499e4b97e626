"""Batched MCMC convergence diagnostics in JAX, computed where the draws are.

Rank-normalised split R-hat, bulk and tail effective sample size and the Monte Carlo standard
error of the mean, following Vehtari, Gelman, Simpson, Carpenter & Burkner (2021), "Rank-
normalization, folding, and localization: an improved R-hat for assessing convergence of MCMC",
Bayesian Analysis 16(2). The arithmetic mirrors ArviZ's reference implementation
(``arviz.stats.diagnostics``) step for step, so both agree to rounding on the same draws (tested).

Layers, as in ``arviz_stats``: pure array functions on ``x[..., chain, draw]`` (any leading batch
axes, e.g. problems), then :func:`summarize_draws` for a dict of variables, then
:func:`summarize_idata` as the InferenceData adapter at the edge.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from engine.sampling import sorting

__all__ = [
    "split_chains",
    "z_scale",
    "rhat",
    "ess",
    "ess_bulk",
    "ess_tail",
    "ess_mean",
    "mcse_mean",
    "summarize_draws",
    "summarize_idata",
    "ebfmi",
    "CONVERGENCE_RULES",
    "EBFMI_MIN",
]

CONVERGENCE_RULES = {"r_hat_max": 1.01, "ess_min": 400.0}
"""Thresholds of the ``converged`` flag: R-hat < 1.01, bulk and tail ESS >= 400, no divergences."""


def split_chains(x):
    """``[..., chain, draw] -> [..., 2 * chain, draw // 2]``; the middle draw of odd chains is dropped."""
    half = x.shape[-1] // 2
    return jnp.concatenate([x[..., :half], x[..., x.shape[-1] - half :]], axis=-2)


def _flat_batch(fn, x, sample_axes: int):
    """Apply ``fn`` to the trailing ``sample_axes`` axes for every leading batch index."""
    batch = x.shape[: x.ndim - sample_axes]
    flat = x.reshape((-1,) + x.shape[x.ndim - sample_axes :])
    out = jax.vmap(fn)(flat)
    return out.reshape(batch + out.shape[1:])


_average_ranks = sorting.average_ranks
"""1-based average ranks of a 1-D array (ties share their mean rank, like scipy's 'average')."""


def z_scale(x):
    """Rank-normalise ``x[..., chain, draw]`` over all its draws: Phi^-1((r - 3/8) / (S + 1/4))."""
    size = x.shape[-1] * x.shape[-2]
    ranks = _flat_batch(lambda v: _average_ranks(v.reshape(-1)).reshape(v.shape), x, 2)
    return ndtri((ranks - 0.375) / (size + 0.25))


def _rhat_basic(x):
    """Classic R-hat of ``x[..., chain, draw]`` (no splitting or ranking)."""
    num_draws = x.shape[-1]
    chain_mean = x.mean(-1)
    chain_var = x.var(-1, ddof=1)
    between = num_draws * chain_mean.var(-1, ddof=1)
    within = chain_var.mean(-1)
    return jnp.sqrt((between / within + num_draws - 1) / num_draws)


def rhat(x):
    """Rank-normalised split R-hat, the max of bulk and folded (tail) versions. ``[..., C, D] -> [...]``."""
    split = split_chains(x)
    bulk = _rhat_basic(z_scale(split))
    median = sorting.median(split.reshape(split.shape[:-2] + (-1,)))
    folded = jnp.abs(split - median[..., None, None])
    tail = _rhat_basic(z_scale(folded))
    out = jnp.maximum(bulk, tail)
    # constant draws: R-hat is 0/0 (ArviZ returns NaN); rounding in the variances would give
    # sqrt((n - 1) / n) < 1, which would pass as converged
    is_constant = jnp.all(x == x[..., :1, :1], axis=(-2, -1))
    out = jnp.where(is_constant, jnp.nan, out)
    if x.shape[-2] < 2 or x.shape[-1] < 4:
        return jnp.full(out.shape, jnp.nan, out.dtype)
    return out


def _autocov(x):
    """Autocovariance along the last axis (biased, divided by n), via FFT."""
    n = x.shape[-1]
    centred = x - x.mean(-1, keepdims=True)
    m = 1 << (2 * n - 1).bit_length()
    f = jnp.fft.rfft(centred, n=m, axis=-1)
    acov = jnp.fft.irfft(f * jnp.conj(f), n=m, axis=-1)[..., :n]
    return acov / n


def ess(x):
    """Effective sample size of ``x[..., chain, draw]`` with Geyer's initial monotone sequence.

    Vectorised form of ArviZ's ``_ess``: the sequential loops become a first-non-positive pair
    search and a cumulative minimum over pair sums.
    """
    num_chains, num_draws = x.shape[-2], x.shape[-1]
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    x = x.astype(dtype)
    acov = _autocov(x)
    chain_mean = x.mean(-1)
    mean_var = acov[..., 0].mean(-1) * num_draws / (num_draws - 1.0)
    var_plus = mean_var * (num_draws - 1.0) / num_draws
    if num_chains > 1:
        var_plus = var_plus + chain_mean.var(-1, ddof=1)
    rho = 1.0 - (mean_var[..., None] - acov.mean(-2)) / var_plus[..., None]
    rho = rho.at[..., 0].set(1.0)
    # pair j = (rho[2j], rho[2j+1]); ArviZ processes pairs j >= 1 while 2j - 1 < num_draws - 3
    max_pair = max((num_draws - 1) // 2 - 1, 0)
    num_pairs = max_pair + 1
    even = rho[..., 0 : 2 * num_pairs : 2]
    odd = rho[..., 1 : 2 * num_pairs : 2]
    pair_sums = even + odd
    nonpos = pair_sums <= 0
    last = jnp.where(jnp.any(nonpos, -1), jnp.argmax(nonpos, -1), max_pair)
    monotone = jax.lax.cummin(pair_sums, axis=pair_sums.ndim - 1)
    index = jnp.arange(num_pairs).reshape((1,) * last.ndim + (num_pairs,))
    sum_pairs = jnp.sum(jnp.where(index < last[..., None], monotone, 0.0), -1)
    even_last = jnp.take_along_axis(even, last[..., None], -1)[..., 0]
    pair_last = jnp.take_along_axis(pair_sums, last[..., None], -1)[..., 0]
    tail_term = jnp.where((pair_last >= 0) | (even_last > 0), even_last, 0.0)
    tau = -1.0 + 2.0 * sum_pairs + tail_term
    size = num_chains * num_draws
    tau = jnp.maximum(tau, 1.0 / math.log10(size))
    out = size / tau
    flat = x.reshape(x.shape[:-2] + (-1,))
    constant = (flat.max(-1) - flat.min(-1)) < np.finfo(np.float64).resolution
    out = jnp.where(constant, float(size), out)
    return jnp.where(jnp.any(jnp.isnan(rho), -1) & ~constant, jnp.nan, out)


def ess_bulk(x):
    """Bulk ESS: ESS of the rank-normalised split chains. ``[..., C, D] -> [...]``."""
    return ess(z_scale(split_chains(x)))


def ess_tail(x):
    """Tail ESS: the smaller ESS of the 5% and 95% quantile indicators. ``[..., C, D] -> [...]``."""
    dtype = x.dtype
    q05, q95 = sorting.quantile(x.reshape(x.shape[:-2] + (-1,)), (0.05, 0.95))  # numpy's linear quantiles
    low = ess(split_chains((x <= q05[..., None, None]).astype(dtype)))
    high = ess(split_chains((x <= q95[..., None, None]).astype(dtype)))
    return jnp.minimum(low, high)


def ess_mean(x):
    """ESS for the mean: ESS of the split chains, no ranking. ``[..., C, D] -> [...]``."""
    return ess(split_chains(x))


def mcse_mean(x):
    """Monte Carlo standard error of the posterior mean: sd / sqrt(ESS_mean). ``[..., C, D] -> [...]``."""
    flat = x.reshape(x.shape[:-2] + (-1,))
    return flat.std(-1, ddof=1) / jnp.sqrt(ess_mean(x))


EBFMI_MIN = 0.3
"""E-BFMI below this flags a chain whose momentum resampling explores the energy distribution
poorly (Betancourt 2016, "Diagnosing suboptimal cotangent disintegrations in Hamiltonian Monte
Carlo", arXiv:1604.00695; Stan's and ArviZ's threshold)."""


def ebfmi(energy):
    """Energy Bayesian fraction of missing information per chain. ``[..., C, D] -> [..., C]``.

    The mean squared energy change between successive draws over the variance of the energy
    (Betancourt 2016, eq. 3.3), each chain on its own, as ``arviz.bfmi`` estimates it (the
    mean over ``D - 1`` changes, the variance with ``ddof=1``).
    """
    energy = jnp.asarray(energy)
    dtype = energy.dtype if jnp.issubdtype(energy.dtype, jnp.floating) else jnp.result_type(float)
    energy = energy.astype(dtype)
    num = jnp.mean(jnp.square(jnp.diff(energy, axis=-1)), axis=-1)
    return num / jnp.var(energy, axis=-1, ddof=1)


def summarize_draws(x):
    """Diagnostics of ``x[..., chain, draw]`` as a dict of ``[...]`` arrays.

    Keys: ``mean``, ``sd``, ``mcse_mean``, ``r_hat``, ``ess_bulk``, ``ess_tail``.
    """
    flat = x.reshape(x.shape[:-2] + (-1,))
    return {
        "mean": flat.mean(-1),
        "sd": flat.std(-1, ddof=1),
        "mcse_mean": mcse_mean(x),
        "r_hat": rhat(x),
        "ess_bulk": ess_bulk(x),
        "ess_tail": ess_tail(x),
    }


def summarize_idata(idata, var_names=None):
    """Batched diagnostics of an engine InferenceData: one ``xarray.Dataset`` per diagnostic.

    Every variable of the posterior (dims ``chain, draw, problem, ...``) is summarised for each
    problem and element at once. Returns ``{diagnostic: Dataset}`` with the posterior's
    variables, minus chain and draw; ``divergences`` counts ``sample_stats.diverging`` per problem.
    """
    import xarray as xr

    post = idata.posterior
    names = list(post.data_vars) if var_names is None else list(var_names)
    out: dict[str, dict] = {}
    for name in names:
        arr = post[name]
        other = [d for d in arr.dims if d not in ("chain", "draw")]
        values = jnp.asarray(arr.transpose(*other, "chain", "draw").values)
        for key, value in summarize_draws(values).items():
            out.setdefault(key, {})[name] = xr.DataArray(
                np.asarray(value), dims=other, coords={d: arr.coords[d] for d in other if d in arr.coords}
            )
    result = {key: xr.Dataset(vars_) for key, vars_ in out.items()}
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        result["divergences"] = idata.sample_stats["diverging"].sum(("chain", "draw"))
    return result

"""Convergence diagnostics over the first ``num_draws`` draws of a fixed-size buffer, and the
stopping gate built on them.

Sampling in blocks keeps each problem's draws in a buffer ``x[..., chain, max_draws]`` of which
only the first ``num_draws`` (a traced integer, the same for every chain) are kept draws. These
functions compute rank-normalised split R-hat and bulk / tail ESS (Vehtari, Gelman, Simpson,
Carpenter & Burkner 2021, Bayesian Analysis 16(2)) of exactly those kept draws, with static
shapes, so ONE compiled program serves every draw count. The arithmetic is that of
:mod:`engine.sampling.diagnostics` (ArviZ's, step for step) with masks: ranks put padded entries
last, autocovariances are taken of zero-padded centred draws, the Geyer pair sums stop at the
kept length. On the kept draws they agree with ArviZ to rounding (tested).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from engine.sampling import sorting
from engine.sampling.diagnostics import CONVERGENCE_RULES

__all__ = ["masked_split", "masked_rhat", "masked_ess", "masked_ess_bulk", "masked_ess_tail",
           "masked_diagnostics", "masked_summary", "gate", "gate_window", "GATE_KEYS", "GATE_WINDOWS"]

GATE_KEYS = ("r_hat", "ess_bulk", "ess_tail", "divergences")
"""What :func:`gate` reports per problem besides its decision."""

GATE_WINDOWS = (256, 512, 1024)
"""Draws per chain of the gate's short windows: while a problem holds at most ``w`` draws, the
gate sorts and transforms only the first ``w`` of its buffer (the smallest such window; the
whole buffer past the largest). Sorting dominates the gate's cost and XLA:CPU sorts slowly, so
a gate over 300 kept draws costs about a third of one over a 1024-draw window."""


def _valid(length: int, num_draws):
    return jnp.arange(length) < num_draws


def _kept(x, num_draws):
    """``x``-shaped mask of the kept draws (the last axis is the draw axis)."""
    return jnp.broadcast_to(_valid(x.shape[-1], num_draws), x.shape)


def masked_split(x, num_draws):
    """``x[..., C, L]`` with ``num_draws <= L`` kept -> ``(split [..., 2C, ceil(L / 2)], half)``:
    the first and last ``half = num_draws // 2`` kept draws of each chain as two chains (ArviZ's
    ``_split_chains``), left-aligned; entries at or after ``half`` are padding. Half the buffer
    holds every split chain, so the sorts and transforms after it touch no more than they need."""
    length = x.shape[-1]
    half = num_draws // 2
    second = jnp.roll(x, -(num_draws - half), axis=-1)  # draws num_draws-half.. first
    keep = (length + 1) // 2
    return jnp.concatenate([x[..., :keep], second[..., :keep]], axis=-2), half


def _masked_ranks(x, n, return_sorted=False):
    """Average ranks ``[C, L]`` of the first ``n`` draws of every chain of ``x[C, L]``, ranked
    jointly (padding ranks last); with ``return_sorted`` also the kept draws sorted (padding
    after them as ``inf``)."""
    valid = jnp.broadcast_to(_valid(x.shape[-1], n), x.shape)
    flat = jnp.where(valid, x, jnp.inf).reshape(-1)
    if return_sorted:  # one sort for both
        ranks, ordered = sorting.average_ranks_and_sort(flat)
        return ranks.reshape(x.shape), ordered
    return sorting.average_ranks(flat).reshape(x.shape), None


def _z_scores(ranks, n):
    """Rank normalisation of ``ranks [..., C, L]`` (:func:`_masked_ranks`, ``n`` kept per chain):
    ``ndtri((rank - 3/8) / (size + 1/4))`` on the kept entries, 0 on the padding. One call for
    every stacked series: ``ndtri`` is a large program."""
    valid = jnp.broadcast_to(_valid(ranks.shape[-1], n), ranks.shape)
    size = ranks.shape[-2] * n
    # average ranks are whole or half numbers in [1, C * L]: ndtri of every possible one (a
    # table, once per kept count, not per coordinate under vmap) and a lookup; ndtri costs more
    # than the sort did
    possible = jnp.arange(2 * ranks.shape[-2] * ranks.shape[-1] - 1, dtype=ranks.dtype) * 0.5 + 1.0
    table = ndtri((possible - 0.375) / (size + 0.25))
    index = jnp.clip((ranks * 2.0 - 2.0).astype(jnp.int32), 0, possible.shape[0] - 1)
    return jnp.where(valid, table[index], 0.0)


def _masked_rhat_basic(x, n):
    valid = _kept(x, n)
    mean = jnp.where(valid, x, 0.0).sum(-1) / n
    var = jnp.where(valid, (x - mean[..., None]) ** 2, 0.0).sum(-1) / (n - 1)
    between = n * mean.var(-1, ddof=1)
    within = var.mean(-1)
    return jnp.sqrt((between / within + n - 1) / n)


def _sorted_quantile(ordered, size, prob):
    pos = prob * (size - 1)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, size - 1)
    frac = pos - lo
    return ordered[lo] + frac * (ordered[hi] - ordered[lo])


def masked_rhat(x, num_draws):
    """Rank-normalised split R-hat of the kept draws of ``x[..., C, L]`` -> ``[...]``."""
    return masked_diagnostics(x, num_draws)["r_hat"]


def _one_ess(x, n):
    """ESS of the first ``n`` draws of each chain of ``x[C, L]`` (ArviZ's ``_ess``)."""
    num_chains, length = x.shape
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    x = x.astype(dtype)
    valid = _kept(x, n)
    nf = n.astype(dtype)
    mean = jnp.where(valid, x, 0.0).sum(-1) / nf
    centred = jnp.where(valid, x - mean[:, None], 0.0)
    m = 1 << (2 * length - 1).bit_length()
    f = jnp.fft.rfft(centred, n=m, axis=-1)
    # only the chains' MEAN autocovariance is needed past lag 0, and the inverse transform is
    # linear: one inverse FFT of the mean power spectrum instead of one per chain
    acov_mean = jnp.fft.irfft((f * jnp.conj(f)).mean(0), n=m)[:length] / nf
    mean_var = (jnp.sum(centred * centred, axis=-1) / nf).mean() * nf / (nf - 1.0)
    var_plus = mean_var * (nf - 1.0) / nf
    if num_chains > 1:
        var_plus = var_plus + mean.var(ddof=1)
    rho = 1.0 - (mean_var - acov_mean) / var_plus
    rho = rho.at[0].set(1.0)
    num_pairs = max((length - 1) // 2, 1)
    max_pair = jnp.maximum((n - 1) // 2 - 1, 0)
    even = rho[0 : 2 * num_pairs : 2]
    odd = rho[1 : 2 * num_pairs : 2]
    pair_sums = even + odd
    index = jnp.arange(num_pairs)
    in_range = index <= max_pair
    nonpos = (pair_sums <= 0) & in_range
    last = jnp.where(jnp.any(nonpos), jnp.argmax(nonpos), max_pair)
    monotone = jax.lax.cummin(pair_sums, axis=0)
    sum_pairs = jnp.sum(jnp.where(index < last, monotone, 0.0))
    tail_term = jnp.where((pair_sums[last] >= 0) | (even[last] > 0), even[last], 0.0)
    tau = -1.0 + 2.0 * sum_pairs + tail_term
    size = num_chains * nf
    tau = jnp.maximum(tau, 1.0 / jnp.log10(size))
    out = size / tau
    flat_valid = jnp.broadcast_to(valid, x.shape)
    spread = jnp.where(flat_valid, x, -jnp.inf).max() - jnp.where(flat_valid, x, jnp.inf).min()
    constant = spread < np.finfo(np.float64).resolution
    out = jnp.where(constant, size, out)
    lag_valid = jnp.arange(length) < 2 * (max_pair + 1)
    return jnp.where(jnp.any(jnp.isnan(rho) & lag_valid) & ~constant, jnp.nan, out)


def _batched(fn, x, n):
    batch = x.shape[:-2]
    flat = x.reshape((-1,) + x.shape[-2:])
    out = jax.vmap(lambda v: fn(v, jnp.asarray(n)))(flat)
    return out.reshape(batch)


def masked_ess(x, num_draws):
    """ESS (no ranking, no splitting) of the kept draws of ``x[..., C, L]`` -> ``[...]``."""
    return _batched(_one_ess, x, num_draws)


def masked_ess_bulk(x, num_draws):
    """Bulk ESS: ESS of the rank-normalised split kept draws. ``[..., C, L] -> [...]``."""
    return masked_diagnostics(x, num_draws)["ess_bulk"]


def masked_ess_tail(x, num_draws):
    """Tail ESS: the smaller ESS of the kept draws' 5% and 95% quantile indicators."""
    return masked_diagnostics(x, num_draws)["ess_tail"]


def masked_diagnostics(x, num_draws, with_mean_ess: bool = False):
    """R-hat, bulk and tail ESS (``r_hat``, ``ess_bulk``, ``ess_tail``; with ``with_mean_ess``
    also ``ess_mean``, the ESS of the split draws for the MCSE of the mean) of the kept draws of
    ``x[..., C, L]`` -> ``{key: [...]}``; one fused computation per coordinate, equal to
    :func:`masked_rhat`, :func:`masked_ess_bulk` and :func:`masked_ess_tail`. ``num_draws`` is
    one count for every coordinate, or an array of ``x``'s batch shape ``[...]`` with a count per
    coordinate (then the kept-count branches become selects: both are computed)."""
    batch = x.shape[:-2]
    flat = x.reshape((-1,) + x.shape[-2:])
    num = jnp.asarray(num_draws)
    if num.ndim:  # a count per coordinate
        out = jax.vmap(lambda v, n: _coordinate(v, n, with_mean_ess=with_mean_ess))(flat, num.reshape(-1))
    else:
        out = jax.vmap(lambda v: _coordinate(v, num, with_mean_ess=with_mean_ess))(flat)
    out = {k: v.reshape(batch) for k, v in out.items()}
    if x.shape[-2] < 2:
        out["r_hat"] = jnp.full(batch, jnp.nan, out["r_hat"].dtype)
    return out


def masked_summary(x, num_draws):
    """:func:`engine.sampling.diagnostics.summarize_draws` of the kept draws of ``x[..., C, L]``.

    Keys: ``mean``, ``sd``, ``mcse_mean``, ``r_hat``, ``ess_bulk``, ``ess_tail``.
    """
    valid = _kept(x, num_draws)
    size = x.shape[-2] * num_draws
    mean = jnp.where(valid, x, 0.0).sum((-2, -1)) / size
    sq = jnp.where(valid, (x - mean[..., None, None]) ** 2, 0.0).sum((-2, -1))
    sd = jnp.sqrt(sq / (size - 1))
    d = masked_diagnostics(x, num_draws, with_mean_ess=True)
    return {
        "mean": mean,
        "sd": sd,
        "mcse_mean": sd / jnp.sqrt(d["ess_mean"]),
        "r_hat": d["r_hat"],
        "ess_bulk": d["ess_bulk"],
        "ess_tail": d["ess_tail"],
    }


def gate_window(num_draws: int, length: int) -> int:
    """Draws per chain the gate reads for ``num_draws`` kept draws of a ``length``-draw buffer:
    the smallest of :data:`GATE_WINDOWS` holding them, else the whole buffer."""
    return next((w for w in GATE_WINDOWS if num_draws <= w < length), int(length))


def gate(positions, diverging, num_draws, target_ess: float, window: int | None = None):
    """The stopping gate of ONE problem over its kept draws.

    Parameters
    ----------
    positions
        ``[chain, max_draws, dim]`` draws on the unconstrained space (rank-based R-hat and ESS
        are invariant under the elementwise monotone transforms to the constrained space).
    diverging
        ``[chain, max_draws]`` divergence flags.
    num_draws
        Kept draws per chain (traced).
    target_ess
        Bulk and tail ESS every coordinate must reach.
    window
        Optional static window (:func:`gate_window`, for a caller that knows ``num_draws`` on
        the host): only the first ``window`` draws are read and the program has no conditional.
        Without it, the window is picked inside the program (``lax.switch``).

    Returns
    -------
    (passed, diagnostics)
        ``passed []`` bool: worst R-hat < ``CONVERGENCE_RULES["r_hat_max"]``, smallest bulk and
        tail ESS >= ``target_ess``, no divergence among the kept draws; ``diagnostics`` maps
        :data:`GATE_KEYS` to those worst values.
    """
    if window is not None:
        return _gate(positions[:, :window], diverging[:, :window], num_draws, target_ess)
    length = positions.shape[-2]
    windows = [w for w in GATE_WINDOWS if w < length] + [length]
    if len(windows) == 1:
        return _gate(positions, diverging, num_draws, target_ess)
    branches = [
        functools.partial(lambda w: _gate(positions[:, :w], diverging[:, :w], num_draws, target_ess), w)
        for w in windows
    ]
    index = jnp.sum(jnp.asarray(num_draws) > jnp.asarray(windows[:-1])).astype(jnp.int32)
    return jax.lax.switch(index, branches)


def _coordinate(v, n, with_mean_ess: bool = False):
    """R-hat, bulk ESS and tail ESS (and, with ``with_mean_ess``, the ESS of the split draws
    themselves, for the MCSE of the mean) of ONE coordinate's kept draws ``v[C, L]``.

    The same arithmetic as :func:`masked_rhat`, :func:`masked_ess_bulk` and
    :func:`masked_ess_tail`, arranged to compile small: one sort serves the ranks, the median
    and (when the kept count is even, so the split halves hold every kept draw) the tail
    quantiles, and the two R-hats and the three or four ESS are each ONE batched computation
    over stacked series instead of separate copies of it."""
    split, half = masked_split(v, n)
    ranks, ordered = _masked_ranks(split, half, return_sorted=True)
    size = split.shape[-2] * half
    median = _sorted_quantile(ordered, size, 0.5)
    kept_sorted = jax.lax.cond(
        n % 2 == 0,
        lambda: ordered[: v.size],
        lambda: sorting.sort(jnp.where(_kept(v, n), v, jnp.inf).reshape(-1)),
    )
    z_both = _z_scores(jnp.stack([ranks, _masked_ranks(jnp.abs(split - median), half)[0]]), half)
    z = z_both[0]
    basic = jax.vmap(_masked_rhat_basic, in_axes=(0, None))(z_both, half)
    valid = _kept(v, n)
    is_constant = jnp.all(jnp.where(valid, v == v[:1, :1], True))
    r_hat = jnp.where(is_constant | (n < 4), jnp.nan, jnp.maximum(basic[0], basic[1]))
    tail_size = v.shape[-2] * n
    series = [z] + [masked_split((v <= _sorted_quantile(kept_sorted, tail_size, prob)).astype(v.dtype), n)[0]
                    for prob in (0.05, 0.95)]
    if with_mean_ess:
        series.append(split)
    dtype = jnp.result_type(*series)
    ess = jax.vmap(_one_ess, in_axes=(0, None))(jnp.stack([s.astype(dtype) for s in series]), half)
    out = {"r_hat": r_hat, "ess_bulk": ess[0], "ess_tail": jnp.minimum(ess[1], ess[2])}
    if with_mean_ess:
        out["ess_mean"] = ess[3]
    return out


def _gate(positions, diverging, num_draws, target_ess: float):
    x = jnp.moveaxis(positions, -1, 0)  # [dim, chain, max_draws]
    d = jax.vmap(lambda v: _coordinate(v, num_draws))(x)
    r_hats, bulks, tails = d["r_hat"], d["ess_bulk"], d["ess_tail"]
    if x.shape[-2] < 2:
        r_hats = jnp.full_like(r_hats, jnp.nan)
    r_hat, bulk, tail = r_hats.max(), bulks.min(), tails.min()
    divergences = jnp.where(_kept(diverging, num_draws), diverging, False).sum()
    passed = (r_hat < CONVERGENCE_RULES["r_hat_max"]) & (bulk >= target_ess) & (tail >= target_ess) & (divergences == 0)
    return passed, {"r_hat": r_hat, "ess_bulk": bulk, "ess_tail": tail, "divergences": divergences}

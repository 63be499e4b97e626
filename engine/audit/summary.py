"""An audit's per-problem summary, computed ON the device inside each chunk's program.

Only these summaries leave the device: moments, R-hat / ESS / MCSE (``engine.sampling.diagnostics``),
divergences, the coverage of q's interval by the draws, and the largest PSIS log weights of q
as a proposal for the posterior (``engine.audit.metrics.pareto_khat_from_tail`` finishes k-hat on
the host). Problem ``p``'s draws from q use ``fold_in(fold_in(PRNGKey(seed), p), Q_STREAM)``.

A sampled target may serve several problems (``engine.audit.dedup``): the target's part (moments,
diagnostics) is computed once from its draws, the q part (``MEMBER_OUTPUTS``) once per member, from
the same draws, with the member's q, labels and index (``MEMBER_FIELDS``, each ``[M, ...]``).

With per-problem stopping the driver passes ``num_draws`` (traced): only the first ``num_draws``
draws of each chain are the problem's, and every moment, diagnostic, coverage and divergence
count is taken over those alone (``engine.sampling.gate.masked_summary``).
"""

from __future__ import annotations

import functools
import math

__all__ = ["problem_summary_fn", "Q_STREAM", "MEMBER_FIELDS", "MEMBER_OUTPUTS"]

Q_STREAM = 0x51
"""Extra ``fold_in`` tag of the random stream that draws from q (PSIS k-hat)."""

MEMBER_FIELDS = ("mu_q", "sigma_q", "chol_q", "z_true", "__index__")
"""Per-member data of a sampled target (``[M, ...]``): q, the true latent, the flat problem index."""

MEMBER_OUTPUTS = ("coverage", "z_pit_mcmc", "top_log_weights")
"""Summary entries computed per member (``[M, ...]``); the others are the target's."""


@functools.lru_cache(maxsize=32)
def problem_summary_fn(compiled, kind: str, dim: int, seed: int, num_q_draws: int, interval: float, psis: bool):
    """ONE problem's on-device summary of ``values {name: [chain, draw, ...]}``; one function per
    value of the arguments, so the chunk program that closes over it is compiled once."""
    import jax
    import jax.numpy as jnp
    from scipy.special import ndtri  # on the host: JAX's would compile a dozen tiny programs
    from scipy.stats import chi2

    from engine.sampling.diagnostics import summarize_draws
    from engine.sampling.gate import masked_summary
    from engine.model.linalg import solve_triangular
    from engine.audit.metrics import psis_tail_size

    keep = psis_tail_size(num_q_draws)
    z = float(ndtri(0.5 + interval / 2.0))
    radius2 = float(chi2.ppf(interval, dim))
    log2pi = math.log(2.0 * math.pi)

    def target_part(theta, stats, kept, kept_mean, summarize):
        size = kept.sum()
        out = {
            "divergences": jnp.where(kept, stats.diverging, False).sum(),
            "mean_n_steps": kept_mean(stats.n_steps),
        }
        if kind == "univariate":
            out.update(summarize(theta))
        else:
            s = summarize(jnp.moveaxis(theta, -1, 0))  # each [K]
            flat = theta.reshape((-1, dim))
            weight = kept.reshape(-1)[:, None]
            mean = jnp.where(weight, flat, 0).sum(0) / size
            centred = jnp.where(weight, flat - mean[None, :], 0)
            out["mean"] = mean
            out["cov"] = centred.T @ centred / (size - 1)
            out["mcse_mean"] = s["mcse_mean"].max()
            out["r_hat"] = s["r_hat"].max()
            out["ess_bulk"] = s["ess_bulk"].min()
            out["ess_tail"] = s["ess_tail"].min()
        return out

    def member_part(theta, member, data, kept_mean):
        """q's part for ONE member: coverage, z_true's rank, PSIS log weights."""
        out = {}
        mu_q = member["mu_q"]
        chains, length = theta.shape[:2]
        if kind == "univariate":
            out["coverage"] = kept_mean(jnp.abs(theta - mu_q) <= z * member["sigma_q"])
        else:
            flat = theta.reshape((-1, dim))
            white = solve_triangular(member["chol_q"], (flat - mu_q[None, :]).T, lower=True)
            out["coverage"] = kept_mean(((white**2).sum(0) <= radius2).reshape(chains, length))
        if "z_true" in member:  # share of draws below the true latent (per dimension): its PIT
            z_true = member["z_true"]
            out["z_pit_mcmc"] = kept_mean(theta < z_true.reshape((1, 1) + z_true.shape))
        if psis:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), member["__index__"]), Q_STREAM)
            if kind == "univariate":
                eps = jax.random.normal(key, (num_q_draws,), mu_q.dtype)
                x = (mu_q + member["sigma_q"] * eps)[:, None]
                log_q = -0.5 * eps**2 - jnp.log(member["sigma_q"]) - 0.5 * log2pi
            else:
                eps = jax.random.normal(key, (num_q_draws, dim), mu_q.dtype)
                x = mu_q[None, :] + eps @ member["chol_q"].T
                log_q = (-0.5 * (eps**2).sum(-1) - jnp.log(jnp.diagonal(member["chol_q"])).sum()
                         - 0.5 * dim * log2pi)
            log_p = jax.vmap(lambda v: compiled.logdensity_fn(v, data))(x)
            log_w = jnp.where(jnp.isfinite(log_p), log_p - log_q, -jnp.inf)
            out["top_log_weights"] = jax.lax.top_k(log_w, keep)[0]
        return out

    def summary_fn(values, stats, data, num_draws=None):
        """``values {name: [chain, draw, ...]}``, ``stats`` of ``[chain, draw]`` and the target's
        data (``MEMBER_FIELDS`` with a leading member axis) -> the target's summary, with
        ``MEMBER_OUTPUTS`` ``[M, ...]``; ``num_draws``: the kept draws per chain (stopping)."""
        theta = values["theta"]
        chains, length = theta.shape[:2]
        if num_draws is None:
            kept = jnp.ones((chains, length), bool)
            summarize = summarize_draws
        else:
            kept = jnp.broadcast_to(jnp.arange(length) < num_draws, (chains, length))
            summarize = functools.partial(masked_summary, num_draws=num_draws)
        size = kept.sum()

        def kept_mean(a):  # mean over the kept [chain, draw] entries
            w = kept.reshape(kept.shape + (1,) * (a.ndim - 2))
            return jnp.where(w, a, 0).sum((0, 1)) / size

        out = target_part(theta, stats, kept, kept_mean, summarize)
        members = {k: data[k] for k in MEMBER_FIELDS if k in data}
        out.update(jax.vmap(lambda m: member_part(theta, m, data, kept_mean))(members))
        return out

    return summary_fn

"""The ``auto`` sampler's convergence gate (:mod:`engine.sampling.auto`, step 2): per-problem
diagnostics computed on the device inside the chunk program, and the host-side verdict.

Per problem, over every element of every free variable: rank-normalised split R-hat < 1.01,
bulk and tail ESS >= 400 (or a tenth of the draws when ``chains * draws < 4000``), no divergent
transition, E-BFMI >= 0.3 in every chain. With per-problem stopping the stopping gate's own
verdict stands for R-hat, ESS and divergences (:func:`stopping_gate_passed`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

__all__ = ["GateStats", "gate_ess_min", "gate_stats", "masked_ebfmi", "gate_passed", "stopping_gate_passed"]


class GateStats(NamedTuple):
    """One problem's worst convergence diagnostics over the elements of its free variables.

    r_hat
        Largest rank-normalised split R-hat.
    ess_bulk, ess_tail
        Smallest bulk and tail ESS.
    divergences
        Divergent transitions over all chains.
    ebfmi
        Smallest E-BFMI over chains.
    """

    r_hat: Any
    ess_bulk: Any
    ess_tail: Any
    divergences: Any
    ebfmi: Any


def gate_ess_min(chains: int, draws: int) -> float:
    """The gate's ESS threshold: 400, or a tenth of the draws when ``chains * draws < 4000``."""
    from engine.sampling.diagnostics import CONVERGENCE_RULES

    return float(min(CONVERGENCE_RULES["ess_min"], 0.1 * int(chains) * int(draws)))


def gate_stats(values: dict, stats, names, num_draws=None) -> GateStats:
    """ONE problem's :class:`GateStats` from its constrained ``values {name: [chain, draw, ...]}``
    (only ``names``, the free variables, are read) and ``stats`` (``SampleStats`` of
    ``[chain, draw]``); runs on the device inside the chunk program."""
    import jax.numpy as jnp

    from engine.sampling import diagnostics

    parts = []
    for name in names:
        v = values[name]
        parts.append(jnp.moveaxis(v.reshape(v.shape[:2] + (-1,)), -1, 0))  # [elements, chain, draw]
    x = jnp.concatenate(parts, axis=0)
    from engine.sampling import gate

    if num_draws is None:
        d = gate.masked_diagnostics(x, x.shape[-1])
        return GateStats(
            r_hat=jnp.max(d["r_hat"]),
            ess_bulk=jnp.min(d["ess_bulk"]),
            ess_tail=jnp.min(d["ess_tail"]),
            divergences=jnp.sum(stats.diverging.astype(jnp.int32)),
            ebfmi=jnp.min(diagnostics.ebfmi(stats.energy)),
        )

    kept = jnp.arange(x.shape[-1]) < num_draws
    d = gate.masked_diagnostics(x, num_draws)
    return GateStats(
        r_hat=jnp.max(d["r_hat"]),
        ess_bulk=jnp.min(d["ess_bulk"]),
        ess_tail=jnp.min(d["ess_tail"]),
        divergences=jnp.sum(jnp.where(kept, stats.diverging, False).astype(jnp.int32)),
        ebfmi=jnp.min(masked_ebfmi(stats.energy, num_draws)),
    )


def masked_ebfmi(energy, num_draws):
    """:func:`engine.sampling.diagnostics.ebfmi` of the first ``num_draws`` (traced) draws of
    ``energy [chain, draw]`` -> ``[chain]``."""
    import jax.numpy as jnp

    dtype = energy.dtype if jnp.issubdtype(energy.dtype, jnp.floating) else jnp.result_type(float)
    energy = energy.astype(dtype)
    kept = jnp.arange(energy.shape[-1]) < num_draws
    e = jnp.where(kept, energy, 0.0)
    mean = e.sum(-1, keepdims=True) / num_draws
    var = jnp.where(kept, (energy - mean) ** 2, 0.0).sum(-1) / (num_draws - 1)
    steps = jnp.where(kept[1:], jnp.square(jnp.diff(e, axis=-1)), 0.0).sum(-1) / (num_draws - 1)
    return steps / var


def gate_passed(gate: GateStats, chains: int, draws: int) -> np.ndarray:
    """``[problem]`` flags of the gate (module docstring); NaN diagnostics fail."""
    from engine.sampling.diagnostics import CONVERGENCE_RULES, EBFMI_MIN

    ess_min = gate_ess_min(chains, draws)
    g = GateStats(*(np.asarray(a, dtype=float) for a in gate))
    with np.errstate(invalid="ignore"):
        return ((g.r_hat < CONVERGENCE_RULES["r_hat_max"]) & (g.ess_bulk >= ess_min)
                & (g.ess_tail >= ess_min) & (g.divergences == 0) & (g.ebfmi >= EBFMI_MIN))


def stopping_gate_passed(converged, ebfmi) -> np.ndarray:
    """``[problem]`` flags of the gate for a run with per-problem stopping: the stopping gate's
    verdict ``converged`` (R-hat, bulk and tail ESS >= ``target_ess``, no divergence over the
    kept draws: the same rule, already checked on the device when each problem retired) and the
    smallest E-BFMI over chains ``ebfmi`` >= ``EBFMI_MIN`` (NaN fails)."""
    from engine.sampling.diagnostics import EBFMI_MIN

    with np.errstate(invalid="ignore"):
        return np.asarray(converged, bool) & (np.asarray(ebfmi, dtype=float) >= EBFMI_MIN)


_WRAPPED: dict = {}


def _with_gate(summary_fn, names, stopping: bool = False) -> Callable:
    """``summary_fn`` extended with the gate: ``(summary, GateStats)``; with per-problem stopping
    ``(summary, smallest E-BFMI over chains)`` (the stopping gate already judged R-hat, ESS and
    divergences: recomputing them over the whole ``max_draws`` buffer cost more than sampling).
    One wrapper per ``(summary_fn, names, stopping)``, so compiled chunk programs are reused
    across calls."""
    key = (summary_fn, tuple(names), bool(stopping))
    if key not in _WRAPPED:
        def wrapped(values, stats, data, num_draws=None):
            if summary_fn is None:
                summary = None
            elif num_draws is None:
                summary = summary_fn(values, stats, data)
            else:
                summary = summary_fn(values, stats, data, num_draws=num_draws)
            if stopping:
                import jax.numpy as jnp

                return summary, jnp.min(masked_ebfmi(stats.energy, num_draws))
            return summary, gate_stats(values, stats, names, num_draws)

        if len(_WRAPPED) > 64:
            _WRAPPED.clear()
        _WRAPPED[key] = wrapped
    return _WRAPPED[key]

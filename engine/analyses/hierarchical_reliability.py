"""Reliability aids of ``analysis=hierarchical_attention``: the per-checkpoint parameterisation
(``parameterization=auto``) and the per-checkpoint verdict of the convergence gate.

- :func:`choose_parameterization` picks centred or non-centred for one checkpoint from its data;
- :func:`merge_traces` joins the traces of checkpoints sampled under different templates into one
  trace in the checkpoints' order (the variables both forms share: ``theta``, ``layer_mean``,
  ``mu``, ``tau_*``, ``sigma``);
- :func:`gate_verdict` says whether a checkpoint's fit certifies (R-hat < 1.01, bulk and tail
  ESS >= 400, no divergences) and, when not, why and what to try.
"""

from __future__ import annotations

import numpy as np

GATE_R_HAT = 1.01
GATE_ESS = 400.0


def choose_parameterization(y) -> str:
    """The parameterisation to sample one checkpoint ``y [L, H, S]`` in, from the data alone.

    The head level is informed by its data when a head's sample mean is more precise than the
    spread of heads: the standard error ``se = sigma / sqrt(S)`` (``sigma`` pooled within heads)
    is below the between-head SD estimated by moments (``tau^2 = var(head means) - se^2``, within
    layers). Then the centred form has no funnel, while the non-centred one has its mirror image
    (``z_head`` and ``tau_head`` on a thin ridge), so ``"centered"``; else ``"noncentered"``
    (Betancourt & Girolami 2015; Papaspiliopoulos, Roberts & Skold 2007).
    """
    y = np.asarray(y, dtype=float)
    if y.ndim != 3 or y.shape[1] < 2:
        return "noncentered"
    se2 = float(np.mean(np.var(y, axis=-1, ddof=1))) / y.shape[-1]
    tau2 = float(np.mean(np.var(y.mean(-1), axis=-1, ddof=1))) - se2
    return "centered" if tau2 > se2 else "noncentered"


def merge_traces(traces: list, groups: list[list[int]]):
    """One trace from ``traces[g]`` holding checkpoints ``groups[g]`` (positions in the output).

    Keeps the posterior variables every trace has, and ``sample_stats`` and ``log_likelihood``
    when every trace has them; the problem coordinate ends in the order of ``sorted(sum(groups))``.
    Traces whose draw axes differ in length (per-problem stopping, e.g. ``sampler="auto"``'s
    fallback) are padded to the longest as a stopping run pads (NaN, False or 0), and every
    checkpoint keeps its ``num_draws`` (kept draws per chain; the draw axis' length where a
    trace had none).
    """
    import arviz as az
    import xarray as xr

    order = np.argsort(np.concatenate([np.asarray(g, dtype=int) for g in groups]), kind="stable")
    length = max(int(t.posterior.sizes["draw"]) for t in traces)
    if any(int(t.posterior.sizes["draw"]) < length for t in traces):
        traces = [_with_num_draws(t) for t in traces]
    out = {}
    for group in ("posterior", "sample_stats", "log_likelihood"):
        parts = [getattr(t, group, None) for t in traces]
        if any(p is None for p in parts):
            continue
        common = set(parts[0].data_vars).intersection(*(set(p.data_vars) for p in parts[1:]))
        names = [n for n in parts[0].data_vars if n in common]
        parts = [pad_draws(p[names], length) for p in parts]
        joined = xr.concat(parts, dim="problem", coords="minimal", compat="override")
        out[group] = joined.isel(problem=order)
    return az.InferenceData(**out)


def _with_num_draws(idata):
    """``idata`` with ``sample_stats.num_draws`` (the draw axis' length for every problem) where
    it has sample stats without it."""
    stats = getattr(idata, "sample_stats", None)
    if stats is None or "num_draws" in stats or "problem" not in idata.posterior.dims:
        return idata
    idata = idata.copy()
    count = int(idata.posterior.sizes["draw"])
    idata.sample_stats["num_draws"] = ("problem", np.full(idata.posterior.sizes["problem"], count))
    return idata


def pad_draws(dataset, length: int):
    """``dataset`` with its ``draw`` axis padded to ``length``: NaN for floats, False or 0 for the
    rest (what :func:`engine.sampling.stopping.pad_kept` puts past a problem's kept draws)."""
    size = int(dataset.sizes.get("draw", length))
    if size >= length:
        return dataset
    out = {}
    for name, arr in dataset.data_vars.items():
        if "draw" in arr.dims:
            fill = np.nan if np.issubdtype(arr.dtype, np.floating) else np.zeros((), arr.dtype)[()]
            arr = arr.pad(draw=(0, length - size), constant_values=fill)
        out[name] = arr
    return type(dataset)(out, attrs=dataset.attrs).assign_coords(draw=np.arange(length))


def gate_verdict(r_hat: float, ess_bulk: float, ess_tail: float, divergences: int,
                 parameterization: str, target_accept: float) -> tuple[str, str]:
    """``(verdict, what to try)`` for one checkpoint: ``("ok", "")`` when it certifies, else the
    failed criteria (``"divergences 12; R-hat 1.03; tail ESS 210"``) and the next setting to try."""
    why, advice = [], []
    if divergences:
        why.append(f"divergences {int(divergences)}")
        # measured on w3 (benchmarks/results/w3_reliability.md): a higher target removes most
        # divergences; the other form helps where the data favour it
        if target_accept < 0.99:
            advice.append(f"analysis.target_accept={0.95 if target_accept < 0.95 else 0.99}")
        other = "noncentered" if parameterization == "centered" else "centered"
        advice.append(f"analysis.parameterization={other}")
    if not r_hat < GATE_R_HAT:
        why.append(f"R-hat {r_hat:.3f}")
        advice.append("a longer warmup (sampler.tune)")
    low = [f"{kind} ESS {value:.0f}" for kind, value in (("bulk", ess_bulk), ("tail", ess_tail))
           if not value >= GATE_ESS]
    if low:
        why.extend(low)
        advice.append("more draws (sampler.draws)")
    if not why:
        return "ok", ""
    seen = []
    for a in advice:
        if a not in seen:
            seen.append(a)
    return "; ".join(why), "; ".join(seen)

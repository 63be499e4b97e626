"""``analysis=loo``: PSIS-LOO and WAIC model comparison from the engine's pointwise log-likelihood.

Fits model variants of the attention-entropy data (``pooled``: one mean for all heads,
``unpooled``: independent heads, ``hierarchical``: partial pooling; see
``engine.analyses.hierarchical_attention``), each in ONE batched run over checkpoints with
``log_likelihood=True``, then per checkpoint computes PSIS-LOO (Vehtari, Gelman & Gabry 2017;
Pareto-smoothed importance sampling, Vehtari et al. 2024) and WAIC (Watanabe 2010) with ArviZ, and
ranks the variants with ``az.compare`` (stacking weights). Observations whose Pareto k exceeds
ArviZ's threshold (``min(1 - 1/log10(S), 0.7)`` for S draws) are reported as warnings: their
LOO estimate is unreliable.

Alternatively ``analysis.traces={name: path.nc, ...}`` compares saved traces that carry a
``log_likelihood`` group (an engine trace is compared problem by problem).
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np

from engine.analyses import _common as C
from engine.errors import InputError
from engine.cli import Result


def per_problem_idata(idata, loglik: np.ndarray | None, problem: int):
    """Problem ``problem`` of an engine trace as an ordinary InferenceData for ArviZ.

    ``loglik`` ``[problem, chain, draw, *obs]`` replaces the trace's ``log_likelihood`` group
    (e.g. the raw-unit one); ``None`` keeps the trace's own. Only the problem's kept draws are
    used (:func:`~engine.analyses._common.select_problem`): a per-problem stopping run pads the
    rest of the draw axis with NaN.
    """
    import arviz as az
    import xarray as xr

    one = C.select_problem(idata, problem)
    groups = {"posterior": one.posterior}
    if "sample_stats" in one.groups():
        groups["sample_stats"] = one.sample_stats
    if loglik is not None:
        ll = loglik[problem][:, : one.posterior.sizes["draw"]]
        dims = ["chain", "draw"] + [f"obs_dim_{i}" for i in range(ll.ndim - 2)]
        groups["log_likelihood"] = xr.Dataset({"obs": (dims, ll)}, coords={
            "chain": one.posterior["chain"].values, "draw": one.posterior["draw"].values})
    elif "log_likelihood" in one.groups():
        groups["log_likelihood"] = _drop_padding(one.log_likelihood)
    else:
        raise InputError("trace has no log_likelihood group; sample it with log_likelihood=True")
    return az.InferenceData(**groups)


def _drop_padding(log_likelihood):
    """Drop observations whose log-likelihood is NaN in every draw (the padded rows of a ragged
    engine trace), flattening that variable's observation axes."""
    out = {}
    for name, arr in log_likelihood.data_vars.items():
        obs_dims = [d for d in arr.dims if d not in ("chain", "draw")]
        if not obs_dims or not bool(arr.isnull().any()):
            out[name] = arr
            continue
        flat = arr.stack(__obs__=obs_dims).reset_index("__obs__", drop=True)
        keep = ~flat.isnull().all(("chain", "draw")).values
        out[name] = flat.isel(__obs__=np.flatnonzero(keep)).rename(__obs__=f"{name}_obs")
    return type(log_likelihood)(out)


def pareto_k_threshold(num_samples: int) -> float:
    """ArviZ's Pareto k threshold for ``num_samples`` draws: ``min(1 - 1/log10(S), 0.7)``."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def information_criteria(models: dict, *, scale: str = "log"):
    """LOO and WAIC of each model's InferenceData, and ``az.compare`` of them.

    Returns ``(rows, compare_frame, loo_results)``: one row per model with ``elpd_loo``, ``se``,
    ``p_loo``, ``elpd_waic``, ``p_waic``, the count of high Pareto k and the threshold; the
    comparison table (ranked, LOO); and the ArviZ ``ELPDData`` of each model's LOO.
    """
    import arviz as az

    rows, loos = [], {}
    for name, idata in models.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loo = az.loo(idata, pointwise=True, scale=scale)
            waic = az.waic(idata, pointwise=True, scale=scale)
        khat = np.asarray(loo.pareto_k).ravel()
        threshold = float(getattr(loo, "good_k", pareto_k_threshold(int(loo.n_samples))))
        num_bad = int(np.sum(khat > threshold))
        loos[name] = loo
        rows.append({
            "model": name, "elpd_loo": float(loo.elpd_loo), "se": float(loo.se), "p_loo": float(loo.p_loo),
            "elpd_waic": float(waic.elpd_waic), "waic_se": float(waic.se), "p_waic": float(waic.p_waic),
            "n_obs": int(khat.size), "max_pareto_k": float(np.nanmax(khat)), "num_high_k": num_bad,
            "k_threshold": threshold,
            "warnings": "; ".join(sorted({" ".join(str(w.message).split()) for w in caught})),
        })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compare = az.compare(loos, ic="loo", scale=scale) if len(loos) > 1 else None
    return rows, compare, loos


def lower_is_better(scale: str) -> bool:
    """ArviZ's ``log`` scale is an expected log density (higher is better); ``negative_log`` and
    ``deviance`` (-2 x) flip it (lower is better)."""
    return scale != "log"


def compare_title(label, scale: str) -> str:
    """The comparison panel's title, with the direction that holds on ``scale``."""
    return f"problem {label}: PSIS-LOO, {scale} scale ({'lower' if lower_is_better(scale) else 'higher'} is better)"


def sample_kwargs(cfg) -> dict:
    """The sampler settings with this analysis' own ``analysis.target_accept`` (0.9 by default, as
    ``analysis=hierarchical_attention``: the variants are the same hierarchical models)."""
    from engine.analyses import hierarchical_attention as ha

    return ha.sample_kwargs(cfg)


def fit_diagnostics(idata, problem: int) -> dict:
    """Problem ``problem``'s worst rank-normalised R-hat over every posterior element and its
    divergent transitions, so a comparison of a fit that did not converge can be discounted."""
    one = C.select_problem(idata, problem).posterior
    worst = float("nan")
    for name in one.data_vars:
        draws = one[name].transpose("chain", "draw", ...).values
        if draws.shape[1] < 4:
            continue
        r = C.draw_summary(np.moveaxis(draws.reshape(draws.shape[:2] + (-1,)), -1, 0))["r_hat"]
        worst = float(np.nanmax([worst, *r])) if np.isfinite(r).any() else worst
    return {"max_r_hat": worst, "divergences": int(C.divergences(idata)[problem])}


def fit_variants(entropies, labels, variants, sample_kw):
    """``{variant: (idata, raw-unit loglik [C, chain, draw, L, H, S])}``, one batched run each."""
    from engine.analyses import hierarchical_attention as ha

    out = {}
    for variant in variants:
        idata, _, loglik = ha.fit(entropies, sample_kw, variant=variant, log_likelihood=True, labels=labels)
        out[variant] = (idata, loglik)
    return out


def load_traces(traces: dict):
    """Saved traces by name, each with a ``log_likelihood`` group; same problems in all."""
    from engine.analyses.convergence import load_trace

    loaded = {}
    for name, path in traces.items():
        idata = load_trace(path)
        if "log_likelihood" not in idata.groups():
            raise InputError(f"trace {name!r} ({path}): no log_likelihood group; sample it with log_likelihood=True")
        loaded[name] = idata
    sizes = {n: d.posterior.sizes.get("problem", 1) for n, d in loaded.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"analysis.traces: the traces hold different numbers of problems: {sizes}")
    return loaded


def plot_compare(compares: dict, path: Path, scale: str = "log", max_panels: int = 4) -> Path:
    """``az.plot_compare`` of each problem's comparison (the last ``max_panels`` problems)."""
    import arviz as az

    plt = C.pyplot()
    items = list(compares.items())[-max_panels:]
    fig, axes = plt.subplots(len(items), 1, figsize=(6.5, 1.0 + 1.3 * len(items) * 1.0 + 0.4), squeeze=False)
    for ax, (label, frame) in zip(axes[:, 0], items):
        with C.quiet_plots():
            az.plot_compare(frame, ax=ax, insample_dev=False, legend=False)
        ax.set_title(compare_title(label, scale), fontsize=9)
    fig.tight_layout()
    return C.save_figure(fig, path)


def plot_khat(loos: dict, label, path: Path) -> Path:
    """Pareto k of every observation for each model of one problem (``az.plot_khat``)."""
    import arviz as az

    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(loos), figsize=(4.0 * len(loos), 3.0), sharey=True, squeeze=False)
    for ax, (name, loo) in zip(axes[0], loos.items()):
        with C.quiet_plots():
            az.plot_khat(loo, ax=ax, show_hlines=True, markersize=8)
        ax.set_title(f"{name} (problem {label})", fontsize=9)
    fig.tight_layout()
    return C.save_figure(fig, path)


def run(cfg, run_dir: Path) -> Result:
    """Compare model variants by PSIS-LOO/WAIC; writes ``summary.json``, ``report.md``,
    ``loo_table.csv``, ``loo_compare.png`` and ``loo_khat.png``."""
    import pandas as pd

    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    scale = str(opt("scale", "log"))
    if scale not in ("log", "negative_log", "deviance"):
        raise InputError(f"analysis.scale must be log, negative_log or deviance, got {scale!r}")
    traces = C.plain(opt("traces"))
    if traces:
        if not isinstance(traces, dict):
            raise InputError("analysis.traces must map model names to .nc paths")
        loaded = load_traces(traces)
        fitted = {n: (d, None) for n, d in loaded.items()}
        first = next(iter(loaded.values())).posterior
        labels = list(first["problem"].values) if "problem" in first.dims else [0]
        source = f"saved traces {list(traces)}"
        fitted_with = ""
    else:
        from engine.analyses import hierarchical_attention as ha

        variants = C.plain(opt("variants", ["pooled", "unpooled", "hierarchical"]))
        variants = [variants] if isinstance(variants, str) else list(variants)
        if len(variants) < 2 or len(set(variants)) != len(variants):
            raise InputError(f"analysis.variants: name at least two different variants, got {variants}")
        for v in variants:
            if v not in ha.VARIANTS:
                raise InputError(f"analysis.variants: unknown variant {v!r}; choose from {list(ha.VARIANTS)}")
        path = opt("input")
        if path is None:
            entropies = ha.demo_entropies(int(opt("demo_seed", 0)), num_checkpoints=int(opt("demo_checkpoints", 2)),
                                          num_samples=int(opt("demo_samples", 6)))
            source = "embedded demo attention entropies"
        else:
            entropies = ha.load_entropies(path, str(opt("key", "entropies")))
            source = str(path)
        labels = list(range(entropies.shape[0]))
        kw = sample_kwargs(cfg)
        fitted = fit_variants(entropies, labels, variants, kw)
        fitted_with = f" Each variant fitted with target_accept {kw['target_accept']:g} (`analysis.target_accept`)."
    rows, compares, last_loos = [], {}, None
    for p, label in enumerate(labels):
        models = {name: per_problem_idata(idata, loglik, p) for name, (idata, loglik) in fitted.items()}
        prow, compare, loos = information_criteria(models, scale=scale)
        for r in prow:
            r["problem"] = label
            r.update(fit_diagnostics(fitted[r["model"]][0], p))
            if compare is not None:
                r["rank"] = int(compare.loc[r["model"], "rank"])
                r["weight"] = float(compare.loc[r["model"], "weight"])
                r["elpd_diff"] = float(compare.loc[r["model"], "elpd_diff"])
                r["dse"] = float(compare.loc[r["model"], "dse"])
        rows.extend(prow)
        compares[label] = compare
        last_loos = loos
    table_path = run_dir / "loo_table.csv"
    pd.DataFrame(rows).to_csv(table_path, index=False)
    outputs = {"table": table_path}
    if all(c is not None for c in compares.values()):
        outputs["compare plot"] = plot_compare(compares, run_dir / "loo_compare.png", scale)
    outputs["pareto k plot"] = plot_khat(last_loos, labels[-1], run_dir / "loo_khat.png")
    high_k = [r for r in rows if r["num_high_k"]]
    best = {str(lbl): next((r["model"] for r in rows if r["problem"] == lbl and r.get("rank") == 0), None)
            for lbl in labels}
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "source": source, "scale": scale, "best": best, "pareto_k_warnings": len(high_k), "models": rows,
    })
    warn = "".join(f"- problem {r['problem']}, `{r['model']}`: {r['num_high_k']} of {r['n_obs']} observations "
                   f"with Pareto k > {r['k_threshold']:.2f} (max {r['max_pareto_k']:.2f}); its LOO is "
                   "unreliable (consider K-fold CV or moment matching).\n" for r in high_k)
    cols = ["problem", "model", "rank", "elpd_loo", "se", "p_loo", "elpd_diff", "dse", "weight",
            "elpd_waic", "p_waic", "max_pareto_k", "num_high_k", "max_r_hat", "divergences"]
    caveats = "".join(f"- problem {r['problem']}, `{r['model']}`: {r['warnings']}\n" for r in rows if r["warnings"])
    unconverged = "".join(f"- problem {r['problem']}, `{r['model']}`: max R-hat {r['max_r_hat']:.4f}, "
                          f"{r['divergences']} divergences; its LOO/WAIC describe a fit that may not have "
                          "converged.\n" for r in rows if not r["max_r_hat"] < 1.01 or r["divergences"])
    direction = "lower" if lower_is_better(scale) else "higher"
    outputs["report"] = C.write_report(run_dir, "LOO / WAIC model comparison", [
        ("Setup", f"{source}; models {list(fitted)}; PSIS-LOO and WAIC from the pointwise "
                  f"log-likelihood (ArviZ, scale `{scale}`: {direction} is better; the `elpd_*` columns "
                  f"are on this scale), ranked by `az.compare` per problem (rank 0 best). Each variant's "
                  f"fit: max R-hat over every posterior element and its divergences.{fitted_with}\n"),
        ("Comparison", C.markdown_table(rows, cols)),
        ("Pareto k warnings", warn or "None: every observation's Pareto k is below ArviZ's threshold.\n"),
        ("WAIC and LOO warnings (ArviZ)", (caveats + "\nWhere WAIC warns, prefer PSIS-LOO, whose Pareto k "
                                           "says when it is reliable (Vehtari, Gelman & Gabry 2017).\n")
         if caveats else "None.\n"),
        ("Convergence of the fits", unconverged or "Every fit: R-hat < 1.01 and no divergences.\n"),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"loo: {source}, models {list(fitted)}, scale {scale} ({direction} is better)"]
    for lbl in labels:
        sub = sorted((r for r in rows if r["problem"] == lbl),
                     key=lambda r: r["elpd_loo"] if lower_is_better(scale) else -r["elpd_loo"])
        lines.append(f"  problem {lbl}: " + ", ".join(f"{r['model']} elpd_loo {r['elpd_loo']:.1f} "
                                                      f"(se {r['se']:.1f})" for r in sub))
    if high_k:
        lines.append(f"  warning: {len(high_k)} model fit(s) have observations with high Pareto k (see report)")
    if caveats:
        lines.append(f"  warning: ArviZ warned for {sum(bool(r['warnings']) for r in rows)} fit(s) (see report)")
    if unconverged:
        lines.append("  warning: some fits have R-hat >= 1.01 or divergences (see report)")
    return Result("\n".join(lines), outputs, data={"rows": rows, "compares": compares, "fitted": fitted})

"""``analysis=ppc``: posterior predictive checks of the experiment models.

For each chosen model (``sensitivity``, ``hierarchical_attention``, ``model_comparison``) the
posterior is sampled by the engine (batched over that model's problems), replicated data sets
are drawn by vectorised forward sampling from the posterior draws (NumPy, one seeded generator),
and each observed series is compared with its replications through the test statistics ``mean``
and ``sd``. The Bayesian p-value of a statistic T is ``P(T(y_rep) >= T(y) | y)`` (Gelman, Meng
& Stern 1996; BDA3 ch. 6); values near 0 or 1 flag a feature of the data the model does not
reproduce.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import OmegaConf

from engine.analyses import _common as C
from engine.errors import InputError
from engine.cli import Result

STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda y: np.mean(y, axis=-1),
    "sd": lambda y: np.std(y, axis=-1, ddof=1),
    "min": lambda y: np.min(y, axis=-1),
    "max": lambda y: np.max(y, axis=-1),
}
"""Test statistics over the last axis (one observed series or each replication)."""

MODELS = ("hierarchical_attention", "model_comparison", "sensitivity")


def bayesian_p_value(y_obs: np.ndarray, y_rep: np.ndarray, statistic: str = "mean") -> float:
    """``P(T(y_rep) >= T(y_obs))`` over replications ``y_rep [S, n]`` of ``y_obs [n]``."""
    fn = STATISTICS[statistic]
    return float(np.mean(fn(y_rep) >= fn(y_obs)))


def _sub_cfg(cfg, model: str, options: dict):
    """A config for ``model``'s own loader: its options, the shared sampler and runtime."""
    return OmegaConf.create({"analysis": {"name": model, **options}, "sampler": cfg.sampler,
                             "runtime": cfg.runtime})


def replicate(cfg, model: str, options: dict, rng, num_draws: int):
    """Fit ``model`` on its input (or demo) and return ``[(label, y_obs [n], y_rep [S, n])]``."""
    sub = _sub_cfg(cfg, model, options)
    kw = C.sample_kwargs(cfg)
    if model == "hierarchical_attention":
        from engine.analyses import hierarchical_attention as ha

        entropies, labels = ha.load_input(sub)
        opt = functools.partial(C.analysis_option, sub)
        idata, draws, _ = ha.fit(entropies, ha.sample_kwargs(sub), variant=str(opt("variant", "hierarchical")),
                                 parameterization=str(opt("parameterization", "noncentered")), labels=labels)
        return ha.posterior_predictive(entropies, draws, labels, rng, num_draws), idata
    if model == "model_comparison":
        from engine.analyses import model_comparison as mc

        pairs = mc.load_pairs(sub)
        opt = functools.partial(C.analysis_option, sub)
        idata, draws = mc.fit(pairs, kw, likelihood=str(opt("likelihood", "student_t")),
                              prior_width=float(opt("prior_width", 10.0)))
        return mc.posterior_predictive(pairs, idata, draws, rng, num_draws), idata
    if model == "sensitivity":
        from engine.analyses import sensitivity as se

        _, _, metrics, design, y = se.prepare(sub)
        idata, _, _ = se.fit(design, y, kw, prior_sd=float(C.analysis_option(sub, "prior_sd", 1.0)),
                             labels=metrics)
        return se.posterior_predictive(design, metrics, y, idata, rng, num_draws), idata
    raise InputError(f"analysis.models: unknown model {model!r}; choose from {list(MODELS)}")


def p_value_table(model: str, series, statistics) -> list[dict]:
    """One row per (series, statistic): observed T, replicated mean and SD of T, the p-value."""
    rows = []
    for label, y_obs, y_rep in series:
        for stat in statistics:
            t_rep = STATISTICS[stat](y_rep)
            p = bayesian_p_value(y_obs, y_rep, stat)
            rows.append({"model": model, "series": label, "statistic": stat,
                         "observed": STATISTICS[stat](y_obs), "replicated_mean": t_rep.mean(),
                         "replicated_sd": t_rep.std(), "p_value": p, "extreme": p < 0.025 or p > 0.975})
    return rows


def plot_ppc(model: str, series, statistics, path: Path, max_series: int = 4, max_lines: int = 60) -> Path:
    """Per series: observed vs replicated ECDFs, then T(y_rep) with T(y) for each statistic."""
    plt = C.pyplot()
    shown = series[:max_series]
    ncols = 1 + len(statistics)
    fig, axes = plt.subplots(len(shown), ncols, figsize=(3.3 * ncols, 2.5 * len(shown)), squeeze=False)
    for r, (label, y_obs, y_rep) in enumerate(shown):
        ax = axes[r, 0]
        levels = (np.arange(y_obs.size) + 1) / y_obs.size
        for rep in y_rep[:max_lines]:
            ax.step(np.sort(rep), levels, where="post", color="C0", alpha=0.15, lw=1)
        ax.step(np.sort(y_obs), levels, where="post", color="k", lw=2)
        ax.set_title(f"{label}: ECDF", fontsize=8)
        for c, stat in enumerate(statistics, start=1):
            ax = axes[r, c]
            ax.hist(STATISTICS[stat](y_rep), bins=40, color="C0", alpha=0.7)
            ax.axvline(STATISTICS[stat](y_obs), color="k", lw=2)
            ax.set_title(f"T = {stat}, p = {bayesian_p_value(y_obs, y_rep, stat):.2f}", fontsize=8)
    fig.suptitle(f"posterior predictive checks: {model} (black: observed)", fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, path)


def run(cfg, run_dir: Path) -> Result:
    """PPCs for each model in ``analysis.models``; writes ``summary.json``, ``report.md`` and
    ``ppc_<model>.png`` per model."""
    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    models = C.plain(opt("models", list(MODELS)))
    models = [models] if isinstance(models, str) else list(models)
    statistics = C.plain(opt("statistics", ["mean", "sd"]))
    statistics = [statistics] if isinstance(statistics, str) else list(statistics)
    for model in models:
        if model not in MODELS:
            raise InputError(f"analysis.models: unknown model {model!r}; choose from {list(MODELS)}")
    for stat in statistics:
        if stat not in STATISTICS:
            raise InputError(f"analysis.statistics: unknown statistic {stat!r}; choose from {list(STATISTICS)}")
    options = dict(C.plain(opt("options", {})) or {})
    if opt("input") is not None:
        if len(models) != 1:
            raise InputError("analysis.input: give exactly one model in analysis.models with an input")
        options["input"] = opt("input")
    rng = np.random.default_rng(int(opt("seed", 0)))
    num_draws = int(opt("num_draws", 500))
    rows, outputs, divs = [], {}, {}
    for model in models:
        series, idata = replicate(cfg, model, options, rng, num_draws)
        rows.extend(p_value_table(model, series, statistics))
        divs[model] = int(C.divergences(idata).sum())
        outputs[f"{model} plot"] = plot_ppc(model, series, statistics, run_dir / f"ppc_{model}.png")
    num_extreme = sum(r["extreme"] for r in rows)
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "models": models, "statistics": statistics, "num_draws": num_draws, "divergences": divs,
        "num_extreme": num_extreme, "p_values": rows,
    })
    outputs["report"] = C.write_report(run_dir, "Posterior predictive checks", [
        ("Setup", f"Models {models}; test statistics {statistics}; {num_draws} replicated data sets per "
                  "series. Bayesian p-value = P(T(y_rep) >= T(y)); 'extreme' marks p < 0.025 or > 0.975.\n"),
        ("Bayesian p-values", C.markdown_table(rows)),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"ppc: {len(rows)} p-values over {len(models)} model(s), {num_extreme} extreme"]
    for model in models:
        sub = [r for r in rows if r["model"] == model]
        ps = ", ".join(f"{r['series']} {r['statistic']} {r['p_value']:.2f}" for r in sub[:6])
        lines.append(f"  {model}: {ps}{' ...' if len(sub) > 6 else ''}")
    return Result("\n".join(lines), outputs, data={"rows": rows})

"""``analysis=ppc``: posterior predictive checks of the experiment models.

For each chosen model (``sensitivity``, ``hierarchical_attention``, ``model_comparison``) the
posterior is sampled by the engine (batched over that model's problems), replicated data sets
are drawn by vectorised forward sampling from the posterior draws (NumPy, one seeded generator),
and each observed series is compared with its replications through test statistics. The Bayesian
p-value of a statistic T is ``P(T(y_rep) >= T(y) | y)`` (Gelman, Meng & Stern 1996; BDA3 ch. 6);
values near 0 or 1 flag a feature of the data the model does not reproduce.

A statistic that a model parameter fits directly (the mean: every model here has a location
parameter) has a p-value near 0.5 almost whatever the data, so the defaults add statistics the
models do not fit directly: ``min``, ``max`` and ``skewness`` (tails and asymmetry, which a
Normal likelihood fixes), besides ``sd`` (fitted by the noise scale only in part). For the
attention model, whose series pools every head of a checkpoint, ``between_head_sd`` (the SD of
the per-head means) checks the between-head spread that partial pooling must reproduce (BDA3
sec. 6.3 uses such group-level statistics for hierarchical models).
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

def _skewness(y: np.ndarray) -> np.ndarray:
    z = y - y.mean(-1, keepdims=True)
    return (z ** 3).mean(-1) / np.maximum((z ** 2).mean(-1), 1e-300) ** 1.5


STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda y: np.mean(y, axis=-1),
    "sd": lambda y: np.std(y, axis=-1, ddof=1),
    "min": lambda y: np.min(y, axis=-1),
    "max": lambda y: np.max(y, axis=-1),
    "skewness": _skewness,
}
"""Test statistics over the last axis (one observed series or each replication)."""

GROUP_STATISTICS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "between_head_sd": lambda y, size: y.reshape(y.shape[:-1] + (-1, size)).mean(-1).std(-1, ddof=1),
}
"""Statistics of a series made of consecutive groups of ``size`` values (the attention model's
heads, each ``num_samples`` long): the SD of the group means."""

FITTED_DIRECTLY = ("mean",)
"""Statistics every model here fits with a parameter (its p-value is near 0.5 by construction)."""


def statistic(name: str, y: np.ndarray, group_size: int | None = None) -> np.ndarray:
    """Test statistic ``name`` of ``y [..., n]`` -> ``[...]``."""
    if name in GROUP_STATISTICS:
        return GROUP_STATISTICS[name](y, int(group_size))
    return STATISTICS[name](y)

MODELS = ("hierarchical_attention", "model_comparison", "sensitivity")


def bayesian_p_value(y_obs: np.ndarray, y_rep: np.ndarray, name: str = "mean",
                     group_size: int | None = None) -> float:
    """``P(T(y_rep) >= T(y_obs))`` over replications ``y_rep [S, n]`` of ``y_obs [n]``."""
    return float(np.mean(statistic(name, y_rep, group_size) >= statistic(name, y_obs, group_size)))


def _sub_cfg(cfg, model: str, options: dict):
    """A config for ``model``'s own loader: its options, the shared sampler and runtime."""
    return OmegaConf.create({"analysis": {"name": model, **options}, "sampler": cfg.sampler,
                             "runtime": cfg.runtime})


def replicate(cfg, model: str, options: dict, rng, num_draws: int):
    """Fit ``model`` on its input (or demo): ``(series [(label, y_obs [n], y_rep [S, n])], idata,
    group_size)``, ``group_size`` the length of each head's run of values (attention) or None."""
    sub = _sub_cfg(cfg, model, options)
    kw = C.sample_kwargs(cfg)
    if model == "hierarchical_attention":
        from engine.analyses import hierarchical_attention as ha

        entropies, labels = ha.load_input(sub)
        opt = functools.partial(C.analysis_option, sub)
        idata, draws, _ = ha.fit(entropies, ha.sample_kwargs(sub), variant=str(opt("variant", "hierarchical")),
                                 parameterization=str(opt("parameterization", "noncentered")), labels=labels)
        return ha.posterior_predictive(entropies, draws, labels, rng, num_draws), idata, entropies.shape[-1]
    if model == "model_comparison":
        from engine.analyses import model_comparison as mc

        pairs = mc.load_pairs(sub)
        opt = functools.partial(C.analysis_option, sub)
        idata, draws = mc.fit(pairs, kw, likelihood=str(opt("likelihood", "student_t")),
                              prior_width=float(opt("prior_width", 10.0)))
        return mc.posterior_predictive(pairs, idata, draws, rng, num_draws), idata, None
    if model == "sensitivity":
        from engine.analyses import sensitivity as se

        _, _, metrics, design, y = se.prepare(sub)
        idata, _, _ = se.fit(design, y, kw, prior_sd=float(C.analysis_option(sub, "prior_sd", 1.0)),
                             labels=metrics)
        return se.posterior_predictive(design, metrics, y, idata, rng, num_draws), idata, None
    raise InputError(f"analysis.models: unknown model {model!r}; choose from {list(MODELS)}")


def statistics_for(statistics, group_size: int | None) -> list[str]:
    """The statistics that apply to a model's series: group statistics only with groups, and
    ``between_head_sd`` added for grouped (attention) series."""
    if group_size is None:
        return [s for s in statistics if s not in GROUP_STATISTICS]
    return list(statistics) + [s for s in GROUP_STATISTICS if s not in statistics]


def p_value_table(model: str, series, statistics, group_size: int | None = None) -> list[dict]:
    """One row per (series, statistic): observed T, replicated mean and SD of T, the p-value."""
    rows = []
    for label, y_obs, y_rep in series:
        for stat in statistics:
            t_rep = statistic(stat, y_rep, group_size)
            p = bayesian_p_value(y_obs, y_rep, stat, group_size)
            rows.append({"model": model, "series": label, "statistic": stat,
                         "observed": statistic(stat, y_obs, group_size), "replicated_mean": t_rep.mean(),
                         "replicated_sd": t_rep.std(), "p_value": p, "extreme": p < 0.025 or p > 0.975,
                         "fitted_directly": stat in FITTED_DIRECTLY})
    return rows


def shown_series(series, rows: list[dict], max_series: int) -> tuple[list, list[str]]:
    """The series to plot (all, or the ``max_series`` with the most extreme p-value, in their
    order) and the labels left out, so an outlying series is never the one hidden."""
    if len(series) <= max_series:
        return list(series), []
    worst = {}
    for r in rows:
        if not r["fitted_directly"]:
            worst[r["series"]] = max(worst.get(r["series"], 0.0), abs(r["p_value"] - 0.5))
    keep = set(sorted(range(len(series)), key=lambda i: -worst.get(series[i][0], 0.0))[:max_series])
    return [s for i, s in enumerate(series) if i in keep], [s[0] for i, s in enumerate(series) if i not in keep]


def plot_ppc(model: str, series, statistics, path: Path, group_size: int | None = None, rows=None,
             max_series: int = 8, max_lines: int = 60) -> tuple[Path, list[str]]:
    """Per series: observed vs replicated ECDFs, then T(y_rep) with T(y) for each statistic.

    Returns ``(path, left_out)``: at most ``max_series`` rows of panels; the labels of series not
    shown (named in the figure's title too)."""
    plt = C.pyplot()
    rows = rows if rows is not None else p_value_table(model, series, statistics, group_size)
    shown, left_out = shown_series(series, rows, max_series)
    ncols = 1 + len(statistics)
    fig, axes = plt.subplots(len(shown), ncols, figsize=(2.9 * ncols, 2.3 * len(shown)), squeeze=False)
    for r, (label, y_obs, y_rep) in enumerate(shown):
        ax = axes[r, 0]
        levels = (np.arange(y_obs.size) + 1) / y_obs.size
        for rep in y_rep[:max_lines]:
            ax.step(np.sort(rep), levels, where="post", color="C0", alpha=0.15, lw=1)
        ax.step(np.sort(y_obs), levels, where="post", color="k", lw=2)
        ax.set_title(f"{label}: ECDF", fontsize=8)
        for c, stat in enumerate(statistics, start=1):
            ax = axes[r, c]
            ax.hist(statistic(stat, y_rep, group_size), bins=40, color="C0", alpha=0.7)
            ax.axvline(statistic(stat, y_obs, group_size), color="k", lw=2)
            p = bayesian_p_value(y_obs, y_rep, stat, group_size)
            note = " (fitted)" if stat in FITTED_DIRECTLY else ""
            ax.set_title(f"{label}\nT = {stat}{note}, p = {p:.2f}", fontsize=7,
                         color="C3" if p < 0.025 or p > 0.975 else "k")
            ax.set_yticks([])
    title = f"posterior predictive checks: {model} (black: observed; blue: replicated; red title: extreme p)"
    if left_out:
        title += f"\n{len(left_out)} series not shown (p-values in the report): {', '.join(left_out)}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, path), left_out


def run(cfg, run_dir: Path) -> Result:
    """PPCs for each model in ``analysis.models``; writes ``summary.json``, ``report.md`` and
    ``ppc_<model>.png`` per model."""
    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    models = C.plain(opt("models", list(MODELS)))
    models = [models] if isinstance(models, str) else list(models)
    statistics = C.plain(opt("statistics", ["mean", "sd", "min", "max", "skewness"]))
    statistics = [statistics] if isinstance(statistics, str) else list(statistics)
    for model in models:
        if model not in MODELS:
            raise InputError(f"analysis.models: unknown model {model!r}; choose from {list(MODELS)}")
    for stat in statistics:
        if stat not in STATISTICS and stat not in GROUP_STATISTICS:
            raise InputError(f"analysis.statistics: unknown statistic {stat!r}; choose from "
                             f"{list(STATISTICS) + list(GROUP_STATISTICS)}")
    options = dict(C.plain(opt("options", {})) or {})
    if opt("input") is not None:
        if len(models) != 1:
            raise InputError("analysis.input: give exactly one model in analysis.models with an input")
        options["input"] = opt("input")
    rng = np.random.default_rng(int(opt("seed", 0)))
    num_draws = int(opt("num_draws", 500))
    rows, outputs, divs, hidden = [], {}, {}, {}
    for model in models:
        series, idata, group_size = replicate(cfg, model, options, rng, num_draws)
        stats = statistics_for(statistics, group_size)
        model_rows = p_value_table(model, series, stats, group_size)
        rows.extend(model_rows)
        divs[model] = int(C.divergences(idata).sum())
        outputs[f"{model} plot"], left_out = plot_ppc(model, series, stats, run_dir / f"ppc_{model}.png",
                                                      group_size, model_rows, int(opt("max_series", 8)))
        if left_out:
            hidden[model] = left_out
    num_extreme = sum(r["extreme"] for r in rows)
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "models": models, "statistics": statistics, "num_draws": num_draws, "divergences": divs,
        "num_extreme": num_extreme, "not_plotted": hidden, "p_values": rows,
    })
    fitted = [s for s in statistics if s in FITTED_DIRECTLY]
    note = (f" The {', '.join(fitted)} is fitted directly by each model's location parameter, so its p-value "
            "sits near 0.5 whatever the fit; the other statistics are not fitted directly and are the "
            "informative checks." if fitted else "")
    if any(m == "hierarchical_attention" for m in models):
        note += (" For `hierarchical_attention` each series pools every head of a checkpoint; "
                 "`between_head_sd` (SD of the per-head means) checks the spread between heads.")
    plotted = "".join(f" Not plotted for `{m}` (more than `analysis.max_series` series; the least extreme "
                      f"left out): {', '.join(v)}." for m, v in hidden.items())
    outputs["report"] = C.write_report(run_dir, "Posterior predictive checks", [
        ("Setup", f"Models {models}; test statistics {statistics}; {num_draws} replicated data sets per "
                  "series. Bayesian p-value = P(T(y_rep) >= T(y)); 'extreme' marks p < 0.025 or > 0.975."
                  f"{note}{plotted}\n"),
        ("Bayesian p-values", C.markdown_table(rows, ["model", "series", "statistic", "observed",
                                                      "replicated_mean", "replicated_sd", "p_value",
                                                      "extreme", "fitted_directly"])),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"ppc: {len(rows)} p-values over {len(models)} model(s), {num_extreme} extreme"]
    for model in models:
        sub = [r for r in rows if r["model"] == model]
        ps = ", ".join(f"{r['series']} {r['statistic']} {r['p_value']:.2f}" for r in sub[:6])
        lines.append(f"  {model}: {ps}{' ...' if len(sub) > 6 else ''}")
    return Result("\n".join(lines), outputs, data={"rows": rows})

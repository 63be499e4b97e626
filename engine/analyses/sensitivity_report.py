"""Report of ``analysis=sensitivity``: the fit as a whole (intercept, sigma, Bayesian R^2), the
design it used, the forest plot and the report text.

Effects are shown on the scale a reader can act on: a numeric predictor's effect per SD of that
predictor (labelled with the SD in its own units), a one-hot level's effect as the level vs the
reference level (per unit of its 0/1 indicator; a "per SD of a dummy" would depend on how often
the level occurs), an interaction's per (SD x SD). Bayesian R^2 follows Gelman, Goodrich, Gabry &
Vehtari (2019, "R-squared for Bayesian regression models"): per draw, the variance of the fitted
values over that variance plus sigma^2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.analyses import _common as C


def model_table(idata, y: np.ndarray, x: np.ndarray, metrics: list[str], hdi_prob: float) -> list[dict]:
    """One row per (metric, quantity): intercept and sigma in metric units, and Bayesian R^2.

    ``y`` is ``[num_metrics, n_runs]`` (raw), ``x`` the standardised design ``[n_runs, n_terms]``.
    The intercept is the expected metric at the mean of every predictor.
    """
    loc = y.mean(-1)[:, None, None]
    sd_y = y.std(-1, ddof=1)
    sd_y = np.where(sd_y > 0, sd_y, 1.0)[:, None, None]
    alpha = C.var_draws(idata, "alpha")                           # [m, chain, draw]
    beta = C.var_draws(idata, "beta")                             # [m, p, chain, draw]
    sigma = C.var_draws(idata, "sigma")
    fitted_var = np.einsum("np,mpcd->mncd", x, beta).var(axis=1, ddof=1)   # [m, chain, draw]
    draws = {"intercept": loc + sd_y * alpha, "sigma": sd_y * sigma,
             "R^2": fitted_var / (fitted_var + sigma ** 2)}
    stats = {k: C.draw_summary(v, hdi_prob) for k, v in draws.items()}
    rows = []
    for m, metric in enumerate(metrics):
        for name, s in stats.items():
            rows.append({"metric": metric, "quantity": name, "mean": s["mean"][m], "sd": s["sd"][m],
                         "hdi_low": s["hdi_low"][m], "hdi_high": s["hdi_high"][m], "r_hat": s["r_hat"][m],
                         "ess_bulk": s["ess_bulk"][m]})
    return rows


def shown_effect(row: dict) -> tuple[float, float, float, str]:
    """``(mean, hdi_low, hdi_high, label)`` of a term on its plotted scale: one-hot levels per
    unit (the level vs the reference), numeric terms per SD (the SD in the label)."""
    if row["kind"] == "one-hot":
        return row["per_unit_mean"], row["per_unit_hdi_low"], row["per_unit_hdi_high"], \
            f"{row['term']} vs {row['reference']}"
    suffix = "per SD x SD" if row["kind"] == "interaction" else f"per SD = {C.fmt(row['predictor_sd'])}"
    return row["per_sd_mean"], row["per_sd_hdi_low"], row["per_sd_hdi_high"], f"{row['term']} ({suffix})"


def plot_forest(metrics: list[str], rows: list[dict], directions: dict, hdi_prob: float, path: Path,
                truth: dict | None = None) -> Path:
    """Effects with HDIs, one panel per metric, on the scale of :func:`shown_effect`; the true
    effects (demo) as red crosses."""
    plt = C.pyplot()
    n_terms = len(rows) // len(metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 1.4 + 0.45 * n_terms), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sub = [r for r in rows if r["metric"] == metric]
        shown = [shown_effect(r) for r in sub]
        C.forest_plot(ax, [s[3] for s in shown], [s[0] for s in shown], [s[1] for s in shown],
                      [s[2] for s in shown],
                      xlabel=f"change in {metric} ({C.percent(hdi_prob)} HDI)\n"
                             f"{directions[metric]} is better: "
                             f"{'left' if directions[metric] == 'lower' else 'right'} of 0 improves")
        if truth:
            ys = np.arange(len(sub))[::-1]
            true = [truth_on_shown_scale(r, truth) for r in sub]
            ok = [i for i, t in enumerate(true) if t is not None]
            ax.plot([true[i] for i in ok], ys[ok], "x", color="C3", ms=8, mew=2, label="true effect (demo)")
            ax.legend(fontsize=8, loc="best")
            misses, num_checked = truth_misses(sub, truth)
            ax.set_title(f"{metric}: {len(misses)} of {num_checked} true effects outside their HDIs\n"
                         f"(about {(1 - hdi_prob) * num_checked:.1f} expected; coverage is nominal over seeds)",
                         fontsize=9)
        else:
            ax.set_title(metric, fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, path)


def truth_on_shown_scale(row: dict, truth: dict) -> float | None:
    """The true per-unit effect of a term (demo) on the scale :func:`shown_effect` plots."""
    value = truth.get(row["term"])
    if value is None or row["kind"] == "one-hot":
        return value
    return value * row["predictor_sd"]


def design_text(design, source: str) -> str:
    """The design as the report states it: each term, its kind, its SD in raw units, and what
    was dropped or left out and why."""
    lines = [f"Predictors from {source}: {len(design.terms)} term(s).", "",
             "| term | kind | SD (raw units) | shown per |", "|---|---|---|---|"]
    for term, kind, sd, ref in zip(design.terms, design.kinds, design.scale, design.references):
        per = {"one-hot": f"level vs `{ref}` (reference)", "interaction": "SD x SD"}.get(kind, "SD")
        lines.append(f"| {term} | {kind} | {C.fmt(sd)} | {per} |")
    lines.append("")
    if design.dropped:
        lines.append(f"Dropped: {', '.join(design.dropped)}.")
    if design.left_out:
        lines.append(f"Not predictors (name them in `analysis.predictors` to use them): "
                     f"{'; '.join(design.left_out)}.")
    return "\n".join(lines) + "\n"


def truth_misses(rows: list[dict], truth: dict) -> tuple[list[str], int]:
    """The terms whose stated true effect falls outside their HDI, and how many were checked."""
    checked = [r for r in rows if r["term"] in truth]
    misses = [r["term"] for r in checked if not r["per_unit_hdi_low"] <= truth[r["term"]] <= r["per_unit_hdi_high"]]
    return misses, len(checked)


def truth_note(rows: list[dict], truth: dict, hdi_prob: float) -> str:
    """How many stated true effects fall outside their HDIs, against the expected miss rate."""
    misses, num_checked = truth_misses(rows, truth)
    expected = (1.0 - hdi_prob) * num_checked
    return (f"Demo: the true per-unit effects are in the `truth_per_unit` column. {len(misses)} of "
            f"{num_checked} fall outside their {C.percent(hdi_prob)} HDIs"
            f"{' (' + ', '.join(misses) + ')' if misses else ''}; about {expected:.1f} are expected to "
            f"(each HDI misses its truth {C.percent(1.0 - hdi_prob)} of the time over repeated sweeps).\n")

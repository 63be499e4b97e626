"""``analysis=model_comparison``: BEST (Kruschke 2013) for many pairs of metric samples at once.

Bayesian estimation supersedes the t-test (Kruschke 2013, J. Exp. Psych.: General 142(2)): each
group's values get their own mean and scale, with a Student-t (or Normal) likelihood, and the
posterior of the difference of means and of the effect size answers "is A better than B, and by
how much?". Every metric pair (e.g. gauge vs standard perplexity, accuracy, ...) is one problem
of ONE compiled template: the values of both groups are one ragged container ``y`` with a group
index, so pairs with different run counts share the program.

Each pair is standardised by its pooled mean and SD before sampling (the template's initial point
and priors are then right for every pair) and the draws are mapped back to the metric's units.
Priors on the standardised scale: ``mu_g ~ Normal(0, prior_width)``, ``sigma_g ~
HalfNormal(prior_width)``, ``nu - 1 ~ Exponential(1/29)`` (Kruschke's). Kruschke's uniform
``sigma`` on ``[sd/1000, 1000 sd]`` is replaced by the wide half-normal (both are flat over any
plausible scale; the half-normal gives NUTS a proper, smooth target).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.analyses import _common as C
from engine.errors import InputError
from engine.cli import Result

LIKELIHOODS = ("student_t", "normal")


@dataclass
class PairData:
    """Metric pairs in the metric's own units.

    labels
        One name per pair (the problem axis).
    a, b
        Per pair, the 1-D values of group A and of group B.
    name_a, name_b
        The group labels (e.g. "gauge", "standard").
    """

    labels: list[str]
    a: list[np.ndarray]
    b: list[np.ndarray]
    name_a: str = "A"
    name_b: str = "B"


@functools.lru_cache(maxsize=None)
def build_model(likelihood: str = "student_t", prior_width: float = 10.0):
    """The BEST template for ONE pair (cached, so the engine compiles it once per process).

    Containers: ``y`` [n] standardised values of both groups, ``group`` [n] 0 for A, 1 for B.
    Free variables: ``mu`` [2], ``sigma`` [2] and, for Student-t, ``nu_minus_one``.
    """
    import pymc as pm

    if likelihood not in LIKELIHOODS:
        raise InputError(f"analysis.likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}")
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(4))
        group = pm.Data("group", np.array([0, 0, 1, 1], dtype="int64"))
        mu = pm.Normal("mu", 0.0, prior_width, shape=2)
        sigma = pm.HalfNormal("sigma", prior_width, shape=2)
        if likelihood == "student_t":
            nu_minus_one = pm.Exponential("nu_minus_one", 1.0 / 29.0)
            pm.StudentT("obs", nu=nu_minus_one + 1.0, mu=mu[group], sigma=sigma[group], observed=y)
        else:
            pm.Normal("obs", mu=mu[group], sigma=sigma[group], observed=y)
    return model


DEMO_BETTER = {"perplexity": "lower", "accuracy": "higher", "calibration_error": "lower"}
"""Which way is better for each metric of :func:`demo_pairs` (used when ``analysis.better`` is null)."""


def demo_pairs(seed: int = 0) -> PairData:
    """Deterministic demo: gauge vs standard transformer runs on three metrics.

    Perplexity is truly 5% lower for gauge, accuracy differs by a negligible amount and the
    calibration error is heavy-tailed (one outlying run) with no real difference.
    """
    rng = np.random.default_rng(seed)
    ppl_a = rng.normal(22.8, 0.8, 12)
    ppl_b = rng.normal(24.0, 0.9, 10)
    acc_a = rng.normal(0.612, 0.01, 12)
    acc_b = rng.normal(0.610, 0.01, 10)
    ece_a = 0.05 + 0.01 * rng.standard_t(3, 12)
    ece_b = 0.05 + 0.01 * rng.standard_t(3, 10)
    ece_b[3] = 0.11
    return PairData(["perplexity", "accuracy", "calibration_error"], [ppl_a, acc_a, ece_a],
                    [ppl_b, acc_b, ece_b], "gauge", "standard")


def pairs_from_table(frame, *, value_column: str, group_column: str, pair_column: str | None,
                     group_a: str, group_b: str, source: str) -> PairData:
    """Long table (one row per run and metric) -> :class:`PairData`."""
    cols = [value_column, group_column] + ([pair_column] if pair_column else [])
    C.require_columns(frame, cols, source)
    values = C.numeric_column(frame, value_column, source)
    groups = frame[group_column].astype(str).to_numpy()
    for name in (group_a, group_b):
        if not np.any(groups == str(name)):
            raise InputError(
                f"{source}: column {group_column!r} has no rows of group {name!r}; groups are "
                f"{sorted(set(groups))}"
            )
    pair_keys = frame[pair_column].astype(str).to_numpy() if pair_column else np.full(len(frame), "metric")
    labels = list(dict.fromkeys(pair_keys))
    a, b = [], []
    for label in labels:
        sel = pair_keys == label
        va, vb = values[sel & (groups == str(group_a))], values[sel & (groups == str(group_b))]
        for name, v in ((group_a, va), (group_b, vb)):
            if v.size < 2:
                raise InputError(
                    f"{source}: pair {label!r} has {v.size} value(s) for group {name!r}; BEST "
                    "needs at least 2 per group"
                )
        a.append(va)
        b.append(vb)
    return PairData(labels, a, b, str(group_a), str(group_b))


def load_pairs(cfg) -> PairData:
    """The analysis input: ``analysis.input`` (CSV/parquet) or the demo pairs."""
    opt = functools.partial(C.analysis_option, cfg)
    path = opt("input")
    if path is None:
        return demo_pairs(int(opt("demo_seed", 0)))
    return pairs_from_table(
        C.read_table(path), value_column=opt("value_column", "value"),
        group_column=opt("group_column", "group"), pair_column=opt("pair_column", "metric"),
        group_a=str(opt("group_a", "A")), group_b=str(opt("group_b", "B")), source=str(path),
    )


def standardise(pairs: PairData):
    """Per pair pooled ``loc``/``scale`` and the ragged containers ``y``, ``group``."""
    loc, scale, ys, gs = [], [], [], []
    for a, b in zip(pairs.a, pairs.b):
        pooled = np.concatenate([a, b])
        m, s = pooled.mean(), pooled.std(ddof=1)
        if not s > 0:
            s = 1.0
        loc.append(m)
        scale.append(s)
        ys.append((pooled - m) / s)
        gs.append(np.concatenate([np.zeros(a.size, "int64"), np.ones(b.size, "int64")]))
    return np.array(loc), np.array(scale), ys, gs


def fit(pairs: PairData, sample_kw: dict, *, likelihood: str = "student_t", prior_width: float = 10.0):
    """Sample every pair's BEST posterior in one ``sample_batched`` call.

    Returns ``(idata, draws)``: the engine trace on the standardised scale and a dict of raw-unit
    draws ``[pair, chain, draw]``: ``mu_a``, ``mu_b``, ``sigma_a``, ``sigma_b``, ``diff``
    (``mu_a - mu_b``), ``effect_size`` (``diff / sqrt((sigma_a^2 + sigma_b^2) / 2)``) and ``nu``.
    """
    model = build_model(likelihood, float(prior_width))
    loc, scale, ys, gs = standardise(pairs)
    same = len({y.size for y in ys}) == 1
    data = {"y": np.stack(ys) if same else ys, "group": np.stack(gs) if same else gs}
    idata = C.sample(model, data, problem_coords=list(pairs.labels), **sample_kw)
    mu = C.var_draws(idata, "mu")  # [pair, 2, chain, draw]
    sigma = C.var_draws(idata, "sigma")
    s, m = scale[:, None, None], loc[:, None, None]
    draws = {
        "mu_a": m + s * mu[:, 0], "mu_b": m + s * mu[:, 1],
        "sigma_a": s * sigma[:, 0], "sigma_b": s * sigma[:, 1],
    }
    draws["diff"] = draws["mu_a"] - draws["mu_b"]
    draws["effect_size"] = draws["diff"] / np.sqrt((draws["sigma_a"] ** 2 + draws["sigma_b"] ** 2) / 2)
    if "nu_minus_one" in idata.posterior:
        draws["nu"] = 1.0 + C.var_draws(idata, "nu_minus_one")
    return idata, draws


def decide(low: float, high: float, rope: tuple[float, float]) -> str:
    """Kruschke's HDI+ROPE rule: the HDI outside the ROPE, inside it, or overlapping."""
    if high < rope[0] or low > rope[1]:
        return "credible difference"
    if low >= rope[0] and high <= rope[1]:
        return "practically equivalent"
    return "undecided"


def check_options(better, rope, rope_on: str) -> None:
    """:class:`InputError` for a bad direction (``lower``/``higher`` or a map of them), ROPE or ROPE
    target (before any sampling; a map's metric names are checked once the pairs are read)."""
    better = C.plain(better)
    for direction in (better.values() if isinstance(better, dict) else [better]):
        if direction not in C.DIRECTIONS:
            raise InputError(f"analysis.better must be 'lower' or 'higher' (or a map of them), got {direction!r}")
    if rope_on not in ("effect_size", "diff"):
        raise InputError(f"analysis.rope_on must be 'effect_size' or 'diff', got {rope_on!r}")
    try:
        lo, hi = (float(v) for v in rope)
    except (TypeError, ValueError):  # not a pair of numbers
        raise InputError(f"analysis.rope must be [low, high], got {rope!r}") from None
    if not lo <= hi:
        raise InputError(f"analysis.rope must be [low, high] with low <= high, got {list(rope)}")


def resolve_better(cfg, pairs: PairData) -> dict[str, str]:
    """``{pair: "lower" | "higher"}`` from ``analysis.better``; when it is null: the demo's own
    directions (:data:`DEMO_BETTER`, accuracy higher) for the demo, else lower for every pair."""
    better = C.plain(C.analysis_option(cfg, "better"))
    if better is None:
        better = DEMO_BETTER if C.analysis_option(cfg, "input") is None else "lower"
    return C.metric_directions(better, pairs.labels)


def summarize(pairs: PairData, draws: dict, *, better="lower", rope=(-0.1, 0.1),
              rope_on: str = "effect_size", hdi_prob: float = C.HDI_PROB) -> list[dict]:
    """One row per pair: which way is better, means, scales and (Student-t) normality ``nu``,
    difference and effect size with HDIs, P(A better), ROPE mass.

    ``better`` is ``"lower"``/``"higher"`` for every pair or a ``{pair: direction}`` map; P(A
    better) is ``P(diff < 0)`` where lower is better and ``P(diff > 0)`` where higher is.
    """
    check_options(better, rope, rope_on)
    directions = C.metric_directions(better, pairs.labels)
    lo, hi = float(rope[0]), float(rope[1])
    stats = {k: C.draw_summary(v, hdi_prob) for k, v in draws.items()}
    diff_flat = draws["diff"].reshape(len(pairs.labels), -1)
    target = draws[rope_on].reshape(len(pairs.labels), -1)
    lower = np.array([directions[label] == "lower" for label in pairs.labels])
    p_better = np.where(lower, C.kept_share(diff_flat < 0, diff_flat), C.kept_share(diff_flat > 0, diff_flat))
    p_rope = C.kept_share((target >= lo) & (target <= hi), target)
    rows = []
    for i, label in enumerate(pairs.labels):
        t = stats[rope_on]
        nu = ({"nu": stats["nu"]["mean"][i], "nu_hdi_low": stats["nu"]["hdi_low"][i],
               "nu_hdi_high": stats["nu"]["hdi_high"][i]} if "nu" in stats else {})
        rows.append({
            "pair": label, "better": directions[label], "n_a": pairs.a[i].size, "n_b": pairs.b[i].size,
            "mean_a": stats["mu_a"]["mean"][i], "mean_b": stats["mu_b"]["mean"][i],
            "sigma_a": stats["sigma_a"]["mean"][i], "sigma_b": stats["sigma_b"]["mean"][i], **nu,
            "diff": stats["diff"]["mean"][i],
            "diff_hdi_low": stats["diff"]["hdi_low"][i], "diff_hdi_high": stats["diff"]["hdi_high"][i],
            "effect_size": stats["effect_size"]["mean"][i],
            "es_hdi_low": stats["effect_size"]["hdi_low"][i],
            "es_hdi_high": stats["effect_size"]["hdi_high"][i],
            "p_a_better": p_better[i], "p_rope": p_rope[i],
            "decision": decide(t["hdi_low"][i], t["hdi_high"][i], (lo, hi)),
            "r_hat": max(stats[k]["r_hat"][i] for k in ("mu_a", "mu_b", "sigma_a", "sigma_b")),
            "ess_bulk": min(stats[k]["ess_bulk"][i] for k in ("mu_a", "mu_b", "sigma_a", "sigma_b")),
        })
    return rows


def _posterior_panel(ax, x: np.ndarray, low: float, high: float, hdi_prob: float, xlabel: str) -> None:
    """Histogram of one pair's draws with its mean, the HDI and its bounds, 0, and the share of
    the posterior on each side of 0 (Kruschke 2013, Fig. 3)."""
    x = np.ravel(C.trim_padding(x))
    ax.hist(x, bins=50, color="C0", alpha=0.6)
    ax.axvline(0.0, color="k", lw=1)
    mean = float(x.mean())
    ax.axvline(mean, color="C1", lw=1.5, ls="--")
    top = ax.get_ylim()[1]
    ax.hlines(0.04 * top, low, high, color="C3", lw=4)
    for v, ha in ((low, "right"), (high, "left")):
        ax.text(v, 0.09 * top, C.fmt(v), color="C3", ha=ha, va="bottom", fontsize=7,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    ax.text(0.02, 0.97, f"mean {C.fmt(mean)}\n{C.percent(hdi_prob)} HDI\n"
                        f"{100 * (x < 0).mean():.1f}% < 0 < {100 * (x > 0).mean():.1f}%",
            transform=ax.transAxes, ha="left", va="top", fontsize=7,
            bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_yticks([])


def plot_posteriors(pairs: PairData, draws: dict, rows: list[dict], rope, rope_on: str, path: Path,
                    hdi_prob: float = C.HDI_PROB, max_pairs: int = 6) -> Path:
    """Per pair: the posterior of the difference of means (metric units) and of the effect size
    (pooled-SD units), each with mean, HDI bounds, % on each side of 0; ROPE where it applies."""
    return C.save_figure(posterior_figure(pairs, draws, rows, rope, rope_on, hdi_prob, max_pairs), path)


def posterior_figure(pairs: PairData, draws: dict, rows: list[dict], rope, rope_on: str,
                     hdi_prob: float = C.HDI_PROB, max_pairs: int = 6):
    """The figure of :func:`plot_posteriors` (the first ``max_pairs`` pairs)."""
    plt = C.pyplot()
    n = min(len(pairs.labels), max_pairs)
    fig, axes = plt.subplots(2, n, figsize=(3.8 * n, 5.8), squeeze=False)
    a_minus_b = f"{pairs.name_a} - {pairs.name_b}"
    for j in range(n):
        row = rows[j]
        side = "left" if row["better"] == "lower" else "right"
        for r, key in enumerate(("diff", "effect_size")):
            ax = axes[r, j]
            prefix = "diff" if key == "diff" else "es"
            xlabel = (f"mean {a_minus_b} ({pairs.labels[j]} units)" if key == "diff"
                      else f"effect size {a_minus_b} (pooled-SD units)")
            _posterior_panel(ax, draws[key][j], row[f"{prefix}_hdi_low"], row[f"{prefix}_hdi_high"],
                             hdi_prob, xlabel)
            if key == rope_on:
                ax.axvspan(float(rope[0]), float(rope[1]), color="C2", alpha=0.25, label="ROPE")
                ax.legend(fontsize=7, loc="upper right")
            ax.set_title(f"{pairs.labels[j]} ({row['better']} is better:\n{pairs.name_a} better {side} of 0)"
                         if r == 0 else f"{pairs.labels[j]}: effect size", fontsize=9)
    left = len(pairs.labels) - n
    fig.suptitle(f"BEST posteriors, {pairs.name_a} vs {pairs.name_b} (dashed: mean; red bar: HDI)"
                 + (f"; {left} more pair(s) in the table" if left else ""), fontsize=10)
    fig.tight_layout()
    return fig


def plot_forest(pairs: PairData, rows: list[dict], rope, rope_on: str, path: Path,
                hdi_prob: float = C.HDI_PROB) -> Path:
    """The ROPE quantity (effect size, or the difference in each metric's units) with its HDI for
    every pair, the ROPE band, and on each row the side where A is better."""
    return C.save_figure(forest_figure(pairs, rows, rope, rope_on, hdi_prob), path)


def forest_figure(pairs: PairData, rows: list[dict], rope, rope_on: str, hdi_prob: float = C.HDI_PROB):
    """The figure of :func:`plot_forest`."""
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.5 * len(rows)))
    prefix = "es" if rope_on == "effect_size" else "diff"
    key = "effect_size" if rope_on == "effect_size" else "diff"
    ax.axvspan(float(rope[0]), float(rope[1]), color="C2", alpha=0.25, label=f"ROPE {list(rope)}")
    C.forest_plot(ax, pairs.labels, [r[key] for r in rows], [r[f"{prefix}_hdi_low"] for r in rows],
                  [r[f"{prefix}_hdi_high"] for r in rows],
                  xlabel=(f"effect size {pairs.name_a} - {pairs.name_b} (pooled-SD units), {C.percent(hdi_prob)} HDI"
                          if rope_on == "effect_size" else
                          f"mean {pairs.name_a} - {pairs.name_b} (each metric's own units), {C.percent(hdi_prob)} HDI"))
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        text = f"<- {pairs.name_a} better" if r["better"] == "lower" else f"{pairs.name_a} better ->"
        ax.annotate(f"{text} ({r['better']} is better)", xy=(1.02, y), xycoords=("axes fraction", "data"),
                    va="center", fontsize=8)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0))
    return fig


def posterior_predictive(pairs: PairData, idata, draws: dict, rng, max_draws: int = 500):
    """Replicated data per pair and group: ``[(label, y_obs [n], y_rep [S, n])]`` (raw units)."""
    out = []
    for i, label in enumerate(pairs.labels):
        flat = {k: C.trim_padding(v[i]).reshape(-1) for k, v in draws.items()}  # kept draws only
        take = rng.choice(flat["mu_a"].size, size=min(max_draws, flat["mu_a"].size), replace=False)
        for g, obs in (("a", pairs.a[i]), ("b", pairs.b[i])):
            mu, sd = flat[f"mu_{g}"][take, None], flat[f"sigma_{g}"][take, None]
            noise = (rng.standard_t(flat["nu"][take, None], (take.size, obs.size)) if "nu" in flat
                     else rng.standard_normal((take.size, obs.size)))
            name = pairs.name_a if g == "a" else pairs.name_b
            out.append((f"{label}[{name}]", obs, mu + sd * noise))
    return out


def run(cfg, run_dir: Path) -> Result:
    """BEST for every metric pair; writes ``summary.json``, ``report.md``, ``best_posterior.png``
    and ``best_forest.png``."""
    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    likelihood = str(opt("likelihood", "student_t"))
    better = C.plain(opt("better", "lower"))
    rope = C.plain(opt("rope", [-0.1, 0.1]))
    rope_on = str(opt("rope_on", "effect_size"))
    hdi_prob = float(opt("hdi_prob", C.HDI_PROB))
    check_options(better, rope, rope_on)
    rope = [float(v) for v in rope]
    pairs = load_pairs(cfg)
    directions = resolve_better(cfg, pairs)                                # before sampling
    idata, draws = fit(pairs, C.sample_kwargs(cfg), likelihood=likelihood,
                       prior_width=float(opt("prior_width", 10.0)))
    rows = summarize(pairs, draws, better=directions, rope=rope, rope_on=rope_on, hdi_prob=hdi_prob)
    div = C.divergences(idata)
    for row, d in zip(rows, div):
        row["divergences"] = int(d)
    outputs = {
        "posterior plot": plot_posteriors(pairs, draws, rows, rope, rope_on, run_dir / "best_posterior.png",
                                          hdi_prob),
        "forest plot": plot_forest(pairs, rows, rope, rope_on, run_dir / "best_forest.png", hdi_prob),
    }
    a, b = pairs.name_a, pairs.name_b
    direction = "; ".join(f"`{m}`: {d} is better, P({a} better) = P(mean_{a} {'<' if d == 'lower' else '>'} "
                          f"mean_{b})" for m, d in directions.items())
    rope_units = ("in pooled-SD units (effect size = diff / sqrt((sigma_A^2 + sigma_B^2) / 2))"
                  if rope_on == "effect_size" else
                  "in each metric's own units (diff = mean_A - mean_B; one ROPE for every metric)")
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "likelihood": likelihood, "better": directions, "rope": rope, "rope_on": rope_on,
        "group_a": pairs.name_a, "group_b": pairs.name_b, "hdi_prob": hdi_prob, "pairs": rows,
    })
    cols = ["pair", "better", "n_a", "n_b", "mean_a", "mean_b", "sigma_a", "sigma_b"] + (
        ["nu", "nu_hdi_low", "nu_hdi_high"] if "nu" in draws else []) + [
        "diff", "diff_hdi_low", "diff_hdi_high", "effect_size", "es_hdi_low", "es_hdi_high", "p_a_better",
        "p_rope", "decision", "r_hat", "ess_bulk", "divergences"]
    outputs["report"] = C.write_report(run_dir, "BEST model comparison (Kruschke 2013)", [
        ("Setup", f"Group A = `{a}`, group B = `{b}`; likelihood `{likelihood}`. Direction per metric: "
                  f"{direction}. ROPE {rope} on `{rope_on}`, {rope_units}; {C.percent(hdi_prob)} HDIs. "
                  f"Decision: Kruschke's HDI+ROPE rule. `sigma_a`, `sigma_b`: each group's scale (metric "
                  f"units)" + ("; `nu`: Student-t normality (large: near-Normal, below ~30: heavy tails)"
                               if "nu" in draws else "") + ".\n"),
        ("Results", C.markdown_table(rows, cols)),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"BEST ({likelihood}), {len(rows)} metric pair(s), {pairs.name_a} vs {pairs.name_b}:"]
    for r in rows:
        lines.append(
            f"  {r['pair']} ({r['better']} is better): diff {r['diff']:.4g} [{r['diff_hdi_low']:.4g}, {r['diff_hdi_high']:.4g}], "
            f"effect size {r['effect_size']:.2f}, P({pairs.name_a} better) {r['p_a_better']:.3f}, "
            f"P(ROPE) {r['p_rope']:.3f} -> {r['decision']}"
        )
    return Result("\n".join(lines), outputs, data={"rows": rows, "idata": idata, "draws": draws})

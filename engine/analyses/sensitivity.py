"""``analysis=sensitivity``: Bayesian linear regression of a metric on hyperparameters.

Input: a CSV/parquet table (one row per training run), or a Hydra multirun directory (each job's
``.hydra/overrides.yaml`` gives the hyperparameters, a metrics file in the job directory the
metric). Predictors are standardised before fitting, because priors on raw units would make the
answer depend on the units (a learning rate in 1e-4 vs a layer count in 1..48); the metric is
standardised too. Categorical hyperparameters are one-hot coded against their first level;
optional interactions are products of standardised predictors. Model, on the standardised
scale::

    alpha ~ Normal(0, 1),  beta_j ~ Normal(0, prior_sd),  sigma ~ HalfNormal(1)
    y ~ Normal(alpha + X @ beta, sigma)

Reported per term: the effect per SD of the predictor (``beta_j * sd_y``, in metric units) and
per unit (``beta_j * sd_y / sd_j``; for a one-hot column: the level vs the reference level),
with 94% HDIs, R-hat, ESS and P(effect < 0). Several metric columns are several problems of one
batched run (the design matrix is shared).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.analyses import _common as C
from engine.errors import InputError
from engine.cli import Result


@dataclass
class Design:
    """A standardised design matrix.

    terms
        Column names (``lr``, ``optimizer[sgd]``, ``lr:layers``).
    x
        ``[n_runs, n_terms]`` standardised columns.
    scale
        ``[n_terms]`` SD of each column in its raw units (for per-unit effects).
    kinds
        Per term: "numeric", "one-hot" or "interaction".
    dropped
        Predictors left out (constant over runs), with the reason.
    references
        Per term: the reference level of a one-hot term, else ``None``.
    left_out
        Columns not considered as predictors by default (metrics-file keys, seeds), with the
        reason; naming them in ``analysis.predictors`` uses them.
    """

    terms: list[str]
    x: np.ndarray
    scale: np.ndarray
    kinds: list[str]
    dropped: list[str]
    left_out: list[str] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def build_model(num_runs: int, num_terms: int, prior_sd: float = 1.0):
    """Template for ONE metric: containers ``x`` [n, p] and ``y`` [n] (standardised)."""
    import pymc as pm

    with pm.Model() as model:
        x = pm.Data("x", np.zeros((num_runs, num_terms)))
        y = pm.Data("y", np.zeros(num_runs))
        alpha = pm.Normal("alpha", 0.0, 1.0)
        beta = pm.Normal("beta", 0.0, prior_sd, shape=num_terms)
        sigma = pm.HalfNormal("sigma", 1.0)
        pm.Normal("obs", alpha + pm.math.dot(x, beta), sigma, observed=y)
    return model


# --------------------------------------------------------------------------- inputs
DEMO_TRUTH = {"log10_lr": -2.0, "layers": -0.6, "dropout": 4.0, "optimizer[adamw]": -0.5,
              "optimizer[sgd]": 1.5}
"""True per-unit effects of :func:`demo_table` on perplexity (one-hot: vs ``adam``)."""


def demo_table(seed: int = 0, num_runs: int = 48):
    """Deterministic demo sweep: perplexity vs learning rate, depth, dropout and optimizer.

    Truth (per unit): -2.0 per log10(lr), -0.6 per layer, +4.0 per unit dropout, sgd +1.5 and
    adamw -0.5 vs adam, noise SD 0.5.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    log_lr = rng.uniform(-4.0, -2.0, num_runs)
    layers = rng.choice([2, 4, 6, 8], num_runs)
    dropout = rng.uniform(0.0, 0.3, num_runs)
    optimizer = np.array(["adam", "adamw", "sgd"])[np.arange(num_runs) % 3]
    opt_effect = np.select([optimizer == "sgd", optimizer == "adamw"], [1.5, -0.5], 0.0)
    ppl = 20.0 - 2.0 * log_lr - 0.6 * layers + 4.0 * dropout + opt_effect + 0.5 * rng.standard_normal(num_runs)
    return pd.DataFrame({"log10_lr": log_lr, "layers": layers, "dropout": dropout,
                         "optimizer": optimizer, "perplexity": ppl})


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif not isinstance(value, list):
        out[prefix] = value


def _read_metrics(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            raw = json.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        elif suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(path)
            raw = frame.iloc[-1].to_dict() if len(frame) else {}
        else:
            raise InputError(f"metrics file {str(path)!r}: expected .json, .yaml or .csv")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"metrics file {str(path)!r}: could not read: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise InputError(f"metrics file {str(path)!r}: expected a mapping of metric names to values")
    out: dict = {}
    _flatten("", raw, out)
    return out


def table_from_multirun(sweep_dir, metrics_file: str = "metrics.json"):
    """One row per Hydra job of a multirun directory: its overrides and its metrics.

    A job is any directory below ``sweep_dir`` holding ``.hydra/overrides.yaml`` (or
    ``.hydra/config.yaml``, whose scalars are used when there is no overrides file).
    ``frame.attrs["hyperparameters"]`` lists the override (config) keys and
    ``frame.attrs["metric_keys"]`` the metrics-file keys: by default only the former are
    predictors (:func:`default_predictors`), since a metric-file key such as ``loss`` when the
    response is ``perplexity`` would condition every real effect away.
    """
    import pandas as pd
    import yaml

    root = C.resolve_path(sweep_dir)
    if not root.is_dir():
        raise InputError(f"multirun {str(sweep_dir)!r} is not a directory")
    jobs = sorted({p.parent.parent for p in root.glob("**/.hydra/*.yaml")
                   if p.name in ("overrides.yaml", "config.yaml")}, key=lambda p: (len(p.parts), str(p)))
    if not jobs:
        raise InputError(
            f"multirun {str(sweep_dir)!r}: no Hydra job directories (none holds .hydra/overrides.yaml)"
        )
    rows, hyper, metric_keys = [], {}, {}
    for job in jobs:
        row: dict = {}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.exists():
            for item in yaml.safe_load(overrides.read_text()) or []:
                key, sep, value = str(item).partition("=")
                key = key.lstrip("+~")
                if not sep or key.startswith("hydra."):
                    continue
                row[key] = yaml.safe_load(value) if value != "" else None
        else:
            _flatten("", yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}, row)
        hyper.update(dict.fromkeys(row))
        metrics_path = job / metrics_file
        if not metrics_path.exists():
            raise InputError(f"multirun job {str(job)!r}: no metrics file {metrics_file!r}")
        for key, value in _read_metrics(metrics_path).items():
            row[key] = value
            metric_keys[key] = None
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["hyperparameters"] = [k for k in hyper if k not in metric_keys]
    frame.attrs["metric_keys"] = list(metric_keys)
    return frame


def is_seed(name: str) -> bool:
    """``seed``, ``runtime.seed``, ``data.seed``...: a random seed, not a hyperparameter."""
    return str(name).rsplit(".", 1)[-1] == "seed"


def default_predictors(frame, metrics: list[str], exclude=()) -> tuple[list[str], list[str]]:
    """The predictors when ``analysis.predictors`` is not given, and what was left out (reasons).

    A Hydra multirun table (``frame.attrs["hyperparameters"]``): the swept hyperparameters only;
    the metrics-file keys are outcomes, not settings. Any table: every other column but the
    metrics, ``exclude`` and seeds (name them in ``analysis.predictors`` to use them).
    """
    excluded = set(exclude) | set(metrics)
    hyper = frame.attrs.get("hyperparameters")
    candidates = list(frame.columns) if hyper is None else list(hyper)
    left_out = []
    if hyper is not None:
        others = [c for c in frame.attrs.get("metric_keys", []) if c not in metrics]
        if others:
            left_out.append(f"metrics-file keys {others} (outcomes, not hyperparameters)")
    seeds = [c for c in candidates if is_seed(c) and c not in excluded]
    if seeds:
        left_out.append(f"{seeds} (random seeds)")
    return [c for c in candidates if c not in excluded and not is_seed(c)], left_out


def load_table(cfg):
    """The runs table: ``analysis.input`` (a table or a multirun dir) or the demo sweep."""
    opt = functools.partial(C.analysis_option, cfg)
    path = opt("input")
    if path is None:
        return demo_table(int(opt("demo_seed", 0))), "embedded demo sweep"
    p = C.resolve_path(path)
    if p.is_dir():
        return table_from_multirun(p, str(opt("metrics_file", "metrics.json"))), f"multirun {p}"
    return C.read_table(p), str(p)


# --------------------------------------------------------------------------- design
def _as_list(value) -> list:
    value = C.plain(value)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def build_design(frame, metrics: list[str], *, predictors=None, categorical=None, interactions=None,
                 log10=None, exclude=None, source: str = "table") -> Design:
    """Standardised design matrix from the predictor columns of ``frame``.

    Parameters
    ----------
    frame
        One row per run.
    metrics
        Response columns (excluded from the predictors).
    predictors
        Predictor columns; ``None``: :func:`default_predictors` (the swept hyperparameters of a
        multirun table, else every column but the metrics; never seeds).
    categorical
        Columns to one-hot code; non-numeric columns always are.
    interactions
        ``"a:b"`` strings (products of the standardised columns; a categorical side interacts
        through each of its one-hot columns), or ``"all"`` for every pair of numeric predictors.
    log10
        Positive columns to use on a log10 scale (learning rates, weight decays); the term is
        named ``log10(<column>)`` and its per-unit effect is per decade.
    exclude
        Columns never used as predictors (seeds, run ids).
    """
    import pandas as pd

    C.require_columns(frame, metrics, source)
    left_out: list[str] = []
    if predictors is None:
        names, left_out = default_predictors(frame, metrics, _as_list(exclude))
    else:
        names = _as_list(predictors)
    C.require_columns(frame, names, source)
    frame = frame.copy()
    for name in _as_list(log10):
        if name not in names:
            raise InputError(f"analysis.log10: {name!r} is not a predictor; predictors are {names}")
        values = C.numeric_column(frame, name, source)
        bad = np.flatnonzero(values <= 0)
        if bad.size:
            raise InputError(f"{source}: column {name!r} must be positive for log10; row {int(bad[0])} is {values[bad[0]]}")
        frame[f"log10({name})"] = np.log10(values)
        names[names.index(name)] = f"log10({name})"
    if not names:
        raise InputError(f"{source}: no predictor columns besides the metric(s) {metrics}")
    categorical = set(_as_list(categorical))
    columns: dict[str, tuple[np.ndarray, float, str, str]] = {}   # term -> (z, sd, kind, base)
    references: dict[str, str] = {}
    dropped = []
    for name in names:
        col = frame[name]
        numeric = pd.to_numeric(col, errors="coerce")
        is_cat = name in categorical or col.dtype == bool or numeric.isna().any()
        if is_cat:
            if col.isna().any():
                raise InputError(f"{source}: predictor {name!r} is missing in row {int(np.flatnonzero(col.isna())[0])}")
            levels = sorted(col.astype(str).unique())
            if len(levels) < 2:
                dropped.append(f"{name} (one level)")
                continue
            for level in levels[1:]:
                dummy = (col.astype(str) == level).to_numpy(dtype=float)
                columns[f"{name}[{level}]"] = ((dummy - dummy.mean()) / dummy.std(ddof=1), dummy.std(ddof=1),
                                               "one-hot", name)
                references[f"{name}[{level}]"] = f"{name}[{levels[0]}]"
        else:
            values = numeric.to_numpy(dtype=float)
            sd = values.std(ddof=1) if values.size > 1 else 0.0
            if not sd > 0:
                dropped.append(f"{name} (constant)")
                continue
            columns[name] = ((values - values.mean()) / sd, sd, "numeric", name)
    if not columns:
        raise InputError(f"{source}: every predictor is constant over the runs: {dropped}")
    inter = _as_list(interactions)
    if inter == ["all"]:
        numeric_terms = [t for t, v in columns.items() if v[2] == "numeric"]
        inter = [f"{a}:{b}" for i, a in enumerate(numeric_terms) for b in numeric_terms[i + 1:]]
    main = dict(columns)
    for spec in inter:
        parts = str(spec).split(":")
        if len(parts) != 2:
            raise InputError(f"analysis.interactions: {spec!r} is not of the form 'a:b'")
        sides = []
        for part in parts:
            terms = [t for t, v in main.items() if v[3] in (part, f"log10({part})")]
            if not terms:
                raise InputError(f"analysis.interactions: {spec!r} names {part!r}, which is not a used predictor")
            sides.append(terms)
        for ta in sides[0]:
            for tb in sides[1]:
                za, sa = main[ta][:2]
                zb, sb = main[tb][:2]
                columns[f"{ta}:{tb}"] = (za * zb, sa * sb, "interaction", spec)
    terms = list(columns)
    x = np.stack([columns[t][0] for t in terms], axis=1)
    return Design(terms, x, np.array([columns[t][1] for t in terms]), [columns[t][2] for t in terms], dropped,
                  left_out, [references.get(t) for t in terms])


# --------------------------------------------------------------------------- fit and report
def fit(design: Design, y: np.ndarray, sample_kw: dict, *, prior_sd: float = 1.0, labels=None):
    """Regress every row of ``y`` ``[num_metrics, n_runs]`` on the design in ONE batched call.

    Returns ``(idata, per_sd, per_unit)``: the engine trace and effect draws in metric units
    ``[num_metrics, n_terms, chain, draw]``.
    """
    y = np.atleast_2d(np.asarray(y, dtype=float))
    num_metrics, num_runs = y.shape
    loc = y.mean(-1, keepdims=True)
    sd_y = y.std(-1, ddof=1, keepdims=True)
    sd_y = np.where(sd_y > 0, sd_y, 1.0)
    model = build_model(num_runs, len(design.terms), float(prior_sd))
    data = {"x": np.broadcast_to(design.x, (num_metrics,) + design.x.shape).copy(), "y": (y - loc) / sd_y}
    idata = C.sample(model, data, problem_coords=labels, **sample_kw)
    beta = C.var_draws(idata, "beta")                                  # [m, p, chain, draw]
    per_sd = beta * sd_y[:, :, None, None]
    per_unit = per_sd / design.scale[None, :, None, None]
    return idata, per_sd, per_unit


def effect_table(design: Design, metrics: list[str], per_sd, per_unit, hdi_prob: float,
                 directions: dict | None = None) -> list[dict]:
    """One row per (metric, term): per-SD and per-unit effects, HDIs, diagnostics, P(effect < 0)
    and P(improves) (P(effect < 0) where lower is better, per ``directions``; default lower)."""
    s_sd = C.draw_summary(per_sd, hdi_prob)
    s_unit = C.draw_summary(per_unit, hdi_prob)
    flat = per_sd.reshape(per_sd.shape[:2] + (-1,))
    p_neg = C.kept_share(flat < 0, flat)
    rows = []
    for m, metric in enumerate(metrics):
        for j, term in enumerate(design.terms):
            better = (directions or {}).get(metric, "lower")
            rows.append({
                "metric": metric, "term": term, "kind": design.kinds[j],
                "predictor_sd": design.scale[j],
                "reference": design.references[j] if design.references else None,
                "per_sd_mean": s_sd["mean"][m, j], "per_sd_sd": s_sd["sd"][m, j],
                "per_sd_hdi_low": s_sd["hdi_low"][m, j], "per_sd_hdi_high": s_sd["hdi_high"][m, j],
                "per_unit_mean": s_unit["mean"][m, j],
                "per_unit_hdi_low": s_unit["hdi_low"][m, j], "per_unit_hdi_high": s_unit["hdi_high"][m, j],
                "r_hat": s_sd["r_hat"][m, j], "ess_bulk": s_sd["ess_bulk"][m, j],
                "ess_tail": s_sd["ess_tail"][m, j], "p_negative": p_neg[m, j],
                "p_improves": p_neg[m, j] if better == "lower" else 1.0 - p_neg[m, j],
            })
    return rows


def prepare(cfg):
    """Read and check the input: ``(frame, source, metrics, design, y [m, n])``."""
    opt = functools.partial(C.analysis_option, cfg)
    frame, source = load_table(cfg)
    metrics = _as_list(opt("metric", "perplexity"))
    if not metrics:
        raise InputError("analysis.metric: name at least one metric column")
    C.require_columns(frame, metrics, source)
    y = np.stack([C.numeric_column(frame, m, source) for m in metrics])
    if y.shape[1] < 3:
        raise InputError(f"{source}: {y.shape[1]} run(s); a regression needs at least 3")
    design = build_design(frame, metrics, predictors=opt("predictors"), categorical=opt("categorical"),
                          interactions=opt("interactions"), log10=opt("log10"), exclude=opt("exclude"),
                          source=source)
    if y.shape[1] <= len(design.terms):
        raise InputError(
            f"{source}: {y.shape[1]} runs for {len(design.terms)} terms; the effects are not identified"
        )
    return frame, source, metrics, design, y


def posterior_predictive(design: Design, metrics, y, idata, rng, max_draws: int = 500):
    """Replicated metric values per metric: ``[(label, y_obs [n], y_rep [S, n])]``."""
    loc, sd_y = y.mean(-1), y.std(-1, ddof=1)
    out = []
    for m, metric in enumerate(metrics):
        alpha = C.trim_padding(C.var_draws(idata, "alpha")[m]).reshape(-1)  # kept draws only
        beta = C.trim_padding(C.var_draws(idata, "beta")[m]).reshape(design.x.shape[1], -1)
        sigma = C.trim_padding(C.var_draws(idata, "sigma")[m]).reshape(-1)
        take = rng.choice(alpha.size, size=min(max_draws, alpha.size), replace=False)
        mean = alpha[take, None] + (design.x @ beta[:, take]).T
        rep = mean + sigma[take, None] * rng.standard_normal(mean.shape)
        out.append((metric, y[m], loc[m] + sd_y[m] * rep))
    return out


def run(cfg, run_dir: Path) -> Result:
    """Effects of every hyperparameter on the metric(s); writes ``summary.json``, ``report.md``,
    ``effects.csv`` and ``sensitivity_forest.png``."""
    import pandas as pd

    from engine.analyses import sensitivity_report as report

    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    hdi_prob = float(opt("hdi_prob", C.HDI_PROB))
    frame, source, metrics, design, y = prepare(cfg)
    directions = C.metric_directions(opt("better", "lower"), metrics)
    idata, per_sd, per_unit = fit(design, y, C.sample_kwargs(cfg), prior_sd=float(opt("prior_sd", 1.0)),
                                  labels=metrics)
    rows = effect_table(design, metrics, per_sd, per_unit, hdi_prob, directions)
    truth = DEMO_TRUTH if opt("input") is None and metrics == ["perplexity"] else None
    if truth:
        for r in rows:
            r["truth_per_unit"] = truth.get(r["term"])
    fit_rows = report.model_table(idata, y, design.x, metrics, hdi_prob)
    div = C.divergences(idata)
    effects_path = run_dir / "effects.csv"
    pd.DataFrame(rows).to_csv(effects_path, index=False)
    outputs = {"forest plot": report.plot_forest(metrics, rows, directions, hdi_prob,
                                                 run_dir / "sensitivity_forest.png", truth),
               "effects table": effects_path}
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "source": source, "num_runs": int(y.shape[1]), "metrics": metrics, "better": directions,
        "terms": design.terms, "kinds": design.kinds, "dropped": design.dropped, "left_out": design.left_out,
        "divergences": div, "fit": fit_rows, "effects": rows,
    })
    sense = "; ".join(f"`{m}`: {d} is better, so a {'negative' if d == 'lower' else 'positive'} effect is "
                      f"an improvement (`p_improves`)" for m, d in directions.items())
    cols = ["metric", "term", "per_sd_mean", "per_sd_hdi_low", "per_sd_hdi_high", "per_unit_mean",
            "per_unit_hdi_low", "per_unit_hdi_high"] + (["truth_per_unit"] if truth else []) + [
            "p_improves", "r_hat", "ess_bulk", "ess_tail"]
    outputs["report"] = C.write_report(run_dir, "Hyperparameter sensitivity", [
        ("Setup", f"{y.shape[1]} runs from {source}; metric(s) {metrics}. {sense}. Predictors and the "
                  f"metric are standardised for fitting; effects are reported in metric units per SD "
                  f"of a numeric predictor and per unit (a one-hot level: vs the reference level), "
                  f"with {C.percent(hdi_prob)} HDIs; divergences {[int(d) for d in div]}.\n"),
        ("Design", report.design_text(design, source)),
        ("Fit", "Intercept: the expected metric at the mean of every predictor; sigma: the residual SD "
                "(metric units); R^2: Bayesian R^2 (Gelman et al. 2019).\n\n"
                + C.markdown_table(fit_rows, ["metric", "quantity", "mean", "sd", "hdi_low", "hdi_high",
                                              "r_hat", "ess_bulk"])),
        ("Effects", (report.truth_note(rows, truth, hdi_prob) + "\n" if truth else "")
         + C.markdown_table(rows, cols)),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"sensitivity: {y.shape[1]} runs ({source}), {len(design.terms)} terms {design.terms}"]
    if design.left_out:
        lines.append(f"  not predictors: {'; '.join(design.left_out)}")
    for r in (r for r in fit_rows if r["quantity"] == "R^2"):
        lines.append(f"  {r['metric']}: R^2 {r['mean']:.2f} [{r['hdi_low']:.2f}, {r['hdi_high']:.2f}]")
    for r in sorted(rows, key=lambda r: -abs(r["per_sd_mean"]))[:8]:
        lines.append(f"  {r['metric']} ~ {r['term']}: {r['per_sd_mean']:+.3g} per SD "
                     f"[{r['per_sd_hdi_low']:+.3g}, {r['per_sd_hdi_high']:+.3g}], P(improves) {r['p_improves']:.2f}")
    return Result("\n".join(lines), outputs, data={"rows": rows, "fit": fit_rows, "idata": idata,
                                                   "design": design})

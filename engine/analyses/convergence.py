"""``analysis=convergence``: MCMC convergence checks on any saved trace (``.nc`` InferenceData).

Works on this engine's traces (a ``problem`` dimension: every problem is checked, batched) and on
ordinary single-posterior traces such as ``pm.sample``'s. Checks, after Vehtari et al. (2021,
"Rank-normalization, folding, and localization: an improved R-hat") and Betancourt (2016,
"Diagnosing suboptimal cotangent disintegrations in HMC", E-BFMI):

- rank-normalised split R-hat > ``r_hat_max`` (1.01) for any element of any variable;
- bulk or tail ESS < ``ess_min`` (400);
- any divergent transition;
- tree-depth saturation: transitions that hit the maximum depth (``max_tree_depth``), as a
  fraction of draws above ``treedepth_max_fraction`` (0);
- E-BFMI < ``bfmi_min`` (0.3) in any chain.

``analysis.strict=true`` turns failed checks into exit status 1 (after the outputs are written).
With no input it samples and checks a demo trace: the centered hierarchical model on a
funnel-prone data set, which fails some checks on purpose.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from engine.analyses import _common as C
from engine.errors import CheckFailed, InputError
from engine.cli import Result

DEFAULT_RULES = {"r_hat_max": 1.01, "ess_min": 400.0, "bfmi_min": 0.3, "treedepth_max_fraction": 0.0}


def load_trace(path):
    """An InferenceData from ``.nc``; :class:`InputError` when unreadable or without a posterior."""
    import arviz as az

    p = C.resolve_path(path)
    if p.suffix.lower() not in (".nc", ".netcdf", ".h5", ".zarr"):
        raise InputError(f"input {str(path)!r}: expected a NetCDF InferenceData (.nc), got {p.suffix!r}")
    try:
        idata = az.from_netcdf(p)
    except Exception as err:
        raise InputError(f"input {str(path)!r}: not a readable InferenceData: {str(err).splitlines()[0]}") from err
    return check_trace(idata, str(path))


def check_trace(idata, source: str = "trace"):
    """:class:`InputError` unless ``idata`` has a posterior with chain and draw dimensions."""
    if "posterior" not in idata.groups():
        raise InputError(f"{source}: the trace has no posterior group (groups: {list(idata.groups())})")
    post = idata.posterior
    if not post.data_vars:
        raise InputError(f"{source}: the posterior group has no variables")
    for name, arr in post.data_vars.items():
        if "chain" not in arr.dims or "draw" not in arr.dims:
            raise InputError(f"{source}: posterior variable {name!r} lacks chain/draw dims: {arr.dims}")
    if post.sizes["draw"] < 4:
        raise InputError(f"{source}: {post.sizes['draw']} draws per chain; need at least 4")
    return idata


def _stat(idata, name: str):
    """``sample_stats[name]`` as ``[problem, chain, draw]`` or ``None``."""
    ss = getattr(idata, "sample_stats", None)
    if ss is None or name not in ss:
        return None
    return C.var_draws(idata, name, "sample_stats")[..., :, :].reshape(
        (-1,) + (ss[name].sizes["chain"], ss[name].sizes["draw"]))


def e_bfmi(energy: np.ndarray) -> np.ndarray:
    """Energy Bayesian fraction of missing information per chain: ``[..., draw] -> [...]``.

    ``sum(diff(E)^2) / sum((E - mean E)^2)`` (Betancourt 2016; ArviZ's ``bfmi``).
    """
    e = np.asarray(energy, dtype=float)
    num = np.square(np.diff(e, axis=-1)).sum(-1)
    den = np.square(e - e.mean(-1, keepdims=True)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def check(idata, *, rules: dict | None = None, max_tree_depth: int = 10, var_names=None):
    """Run every check on every problem.

    Returns ``(problems, elements)``: one row per problem (worst values and pass/fail flags) and
    one row per checked variable element (R-hat and ESS), each a list of dicts. Every check reads
    each problem's kept draws only (:func:`~engine.analyses._common.kept_counts`: a per-problem
    stopping run pads the rest of the draw axis).
    """
    rules = {**DEFAULT_RULES, **(rules or {})}
    post = idata.posterior
    names = list(post.data_vars) if var_names is None else list(var_names)
    missing = [n for n in names if n not in post]
    if missing:
        raise InputError(f"analysis.var_names: {missing[0]!r} is not in the posterior; it has {list(post.data_vars)}")
    has_problem = "problem" in post.dims
    num_problems = post.sizes["problem"] if has_problem else 1
    labels = list(post["problem"].values) if has_problem else [0]
    kept = C.kept_counts(idata)                                        # [problem]
    elements = []
    worst = {k: [] for k in ("r_hat", "ess_bulk", "ess_tail")}
    for name in names:
        draws = C.var_draws(idata, name)                               # [problem, *dims, chain, draw]
        if not np.issubdtype(draws.dtype, np.number) or draws.dtype == bool:
            continue
        stats = C.draw_summary(draws.astype(float))                   # each element's kept draws
        flat = {k: stats[k].reshape(num_problems, -1) for k in ("r_hat", "ess_bulk", "ess_tail", "mean")}
        elem_shape = draws.shape[1:-2]
        for p in range(num_problems):
            for e, index in enumerate(np.ndindex(*elem_shape) if elem_shape else [()]):
                elements.append({
                    "problem": labels[p], "variable": name + (str(list(index)) if index else ""),
                    "mean": flat["mean"][p, e], "r_hat": flat["r_hat"][p, e],
                    "ess_bulk": flat["ess_bulk"][p, e], "ess_tail": flat["ess_tail"][p, e],
                })
        worst["r_hat"].append(np.nanmax(np.where(np.isnan(flat["r_hat"]), np.inf, flat["r_hat"]), axis=1))
        worst["ess_bulk"].append(np.nanmin(np.where(np.isnan(flat["ess_bulk"]), 0.0, flat["ess_bulk"]), axis=1))
        worst["ess_tail"].append(np.nanmin(np.where(np.isnan(flat["ess_tail"]), 0.0, flat["ess_tail"]), axis=1))
    if not worst["r_hat"]:
        raise InputError("trace: no numeric posterior variables to check")
    max_rhat = np.max(np.stack(worst["r_hat"]), axis=0)
    min_bulk = np.min(np.stack(worst["ess_bulk"]), axis=0)
    min_tail = np.min(np.stack(worst["ess_tail"]), axis=0)
    diverging = _stat(idata, "diverging")
    length = post.sizes["draw"]
    in_kept = np.arange(length)[None, None, :] < kept[:, None, None]   # [problem, 1, draw]
    divergences = (np.zeros(num_problems, int) if diverging is None
                   else (diverging.astype(bool) & in_kept).sum((1, 2)).astype(int))
    reached = _stat(idata, "reached_max_treedepth")
    depth = _stat(idata, "tree_depth")
    hit = reached.astype(bool) if reached is not None else None if depth is None else depth >= max_tree_depth
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = (np.full(num_problems, np.nan) if hit is None
                      else (hit & in_kept).sum((1, 2)) / (hit.shape[1] * kept))
    energy = _stat(idata, "energy")
    bfmi = (np.full(num_problems, np.nan) if energy is None
            else np.array([np.min(e_bfmi(energy[p, :, :n])) if n > 1 else np.nan for p, n in enumerate(kept)]))
    problems = []
    for p in range(num_problems):
        fails = []
        if not max_rhat[p] < rules["r_hat_max"]:
            fails.append("r_hat")
        if not min_bulk[p] >= rules["ess_min"]:
            fails.append("ess_bulk")
        if not min_tail[p] >= rules["ess_min"]:
            fails.append("ess_tail")
        if divergences[p] > 0:
            fails.append("divergences")
        if np.isfinite(saturation[p]) and saturation[p] > rules["treedepth_max_fraction"]:
            fails.append("tree_depth")
        if np.isfinite(bfmi[p]) and bfmi[p] < rules["bfmi_min"]:
            fails.append("e_bfmi")
        problems.append({
            "problem": labels[p], "max_r_hat": max_rhat[p], "min_ess_bulk": min_bulk[p],
            "min_ess_tail": min_tail[p], "divergences": int(divergences[p]),
            "treedepth_saturation": saturation[p], "min_e_bfmi": bfmi[p],
            "passed": not fails, "failed": ",".join(fails),
        })
    return problems, elements


def demo_trace(cfg, run_dir: Path):
    """Sample the demo trace (centered hierarchical model, funnel-prone data) and save it."""
    from engine.analyses import hierarchical_attention as ha

    rng = np.random.default_rng(int(C.analysis_option(cfg, "demo_seed", 0)))
    entropies = 2.0 + 0.05 * rng.standard_normal((2, 2, 4, 1)) + 1.0 * rng.standard_normal((2, 2, 4, 3))
    idata, _, _ = ha.fit(entropies, C.sample_kwargs(cfg), variant="hierarchical", parameterization="centered")
    path = Path(run_dir) / "demo_trace.nc"
    idata.to_netcdf(str(path))
    return idata, path


def rank_figure(idata, var_names, ncols: int = 3):
    """``az.plot_rank`` of every element of ``var_names`` on a grid sized for its panels, laid out
    so that no title or axis label overlaps another panel (ArviZ's own figure stacks them)."""
    import arviz as az

    plt = C.pyplot()
    post = idata.posterior[var_names]
    num_panels = sum(int(np.prod([post[v].sizes[d] for d in post[v].dims if d not in ("chain", "draw")]))
                     for v in var_names)
    ncols = max(1, min(ncols, num_panels))
    nrows = -(-num_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    with C.quiet_plots():
        az.plot_rank(idata, var_names=var_names, ax=axes.ravel()[:num_panels])
    for ax in axes.ravel()[num_panels:]:
        ax.set_visible(False)
    for ax in axes.ravel()[:num_panels]:
        ax.set_title(ax.get_title().replace("\n", "[", 1) + ("]" if "\n" in ax.get_title() else ""), fontsize=10)
        ax.xaxis.label.set_fontsize(9)
        ax.yaxis.label.set_fontsize(9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_worst(idata, problems, elements, run_dir: Path, max_vars: int = 4):
    """Trace and rank plots of the worst problem's worst variables (ArviZ)."""
    import arviz as az

    plt = C.pyplot()
    order = sorted(range(len(problems)), key=lambda i: (problems[i]["passed"], -problems[i]["max_r_hat"]))
    worst = order[0]
    label = problems[worst]["problem"]
    one = C.select_problem(idata, worst)
    ranked = sorted((e for e in elements if e["problem"] == label),
                    key=lambda e: -(e["r_hat"] if np.isfinite(e["r_hat"]) else np.inf))
    var_names = list(dict.fromkeys(e["variable"].split("[")[0] for e in ranked))[:max_vars]
    post = one.posterior[var_names]
    big = {d: slice(0, 2) for d in post.dims if d not in ("chain", "draw") and post.sizes[d] > 2}
    groups = {"posterior": post.isel(big)}  # at most a few elements of each variable
    if "sample_stats" in one.groups():
        groups["sample_stats"] = one.sample_stats
    one = az.InferenceData(**groups)
    out = {}
    with C.quiet_plots():
        axes = az.plot_trace(one, var_names=var_names, compact=True, divergences="bottom")
    fig = np.ravel(axes)[0].figure
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.suptitle(f"problem {label}: {problems[worst]['failed'] or 'all checks passed'}", fontsize=10)
    out["trace plot"] = C.save_figure(fig, Path(run_dir) / "convergence_trace.png")
    fig = rank_figure(one, var_names)
    fig.suptitle(f"problem {label}: rank plots (uniform in every chain when the chains agree)", fontsize=10)
    out["rank plot"] = C.save_figure(fig, Path(run_dir) / "convergence_rank.png")
    plt.close("all")
    return out


def run(cfg, run_dir: Path) -> Result:
    """Check a trace; writes ``summary.json``, ``report.md``, ``convergence_table.csv``,
    ``convergence_trace.png`` and ``convergence_rank.png``; ``strict`` failures raise CheckFailed."""
    import pandas as pd

    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    rules = {k: float(opt(k, v)) for k, v in DEFAULT_RULES.items()}
    max_depth = opt("max_tree_depth")
    if max_depth is None:
        max_depth = cfg.sampler.get("max_tree_depth", 10) if "sampler" in cfg else 10
    path = opt("input")
    if path is None:
        idata, path = demo_trace(cfg, run_dir)
        source = f"demo trace {path.name} (centered hierarchical model on funnel-prone data)"
    else:
        idata = load_trace(path)
        source = str(path)
    var_names = C.plain(opt("var_names"))
    problems, elements = check(idata, rules=rules, max_tree_depth=int(max_depth),
                               var_names=[var_names] if isinstance(var_names, str) else var_names)
    table_path = run_dir / "convergence_table.csv"
    pd.DataFrame(elements).to_csv(table_path, index=False)
    outputs = {**plot_worst(idata, problems, elements, run_dir), "element table": table_path}
    num_failed = sum(not p["passed"] for p in problems)
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "source": source, "rules": rules, "max_tree_depth": int(max_depth),
        "num_problems": len(problems), "num_failed": num_failed, "problems": problems,
    })
    failed_rows = [p for p in problems if not p["passed"]] or problems[:20]
    outputs["report"] = C.write_report(run_dir, "Convergence checks", [
        ("Setup", f"Trace: {source}. Rules: R-hat < {rules['r_hat_max']}, bulk and tail ESS >= "
                  f"{rules['ess_min']:g}, no divergences, tree-depth saturation <= "
                  f"{rules['treedepth_max_fraction']:g} (max depth {max_depth}), E-BFMI >= {rules['bfmi_min']}.\n"),
        ("Result", f"{num_failed} of {len(problems)} problem(s) failed at least one check.\n"),
        ("Problems" + (" that failed" if num_failed else ""), C.markdown_table(failed_rows[:200])),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"convergence: {source}", f"  {num_failed} of {len(problems)} problem(s) failed a check"]
    for p in [p for p in problems if not p["passed"]][:5]:
        lines.append(f"  problem {p['problem']}: {p['failed']} (max R-hat {p['max_r_hat']:.4f}, "
                     f"min ESS bulk {p['min_ess_bulk']:.0f}, divergences {p['divergences']})")
    summary = "\n".join(lines)
    if num_failed and bool(opt("strict", False)):
        raise CheckFailed(f"{num_failed} of {len(problems)} problem(s) failed convergence checks; see {outputs['report']}")
    return Result(summary, outputs, data={"problems": problems, "elements": elements})

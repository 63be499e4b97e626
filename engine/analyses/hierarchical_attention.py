"""``analysis=hierarchical_attention``: partial pooling of per-head attention entropies.

Input: entropies ``[n_layers, n_heads, n_samples]`` or stacked over checkpoints
``[C, n_layers, n_heads, n_samples]``; each checkpoint is one problem of ONE compiled template, so
all checkpoints are sampled in a single batched run. The likelihood is vectorised over layers,
heads and samples (one ``Normal`` on the whole ``[L, H, S]`` block, no Python loop per head)::

    mu ~ Normal(0, 1)                              global mean entropy
    tau_layer, tau_head, sigma ~ HalfNormal(1)     between-layer, between-head, within-head SDs
    layer_mean[l] = mu + tau_layer * z_layer[l]    z ~ Normal(0, 1)   (non-centered, default)
    theta[l, h] = layer_mean[l] + tau_head * z_head[l, h]
    y[l, h, s] ~ Normal(theta[l, h], sigma)

The centered form samples ``layer_mean ~ Normal(mu, tau_layer)`` and ``theta ~ Normal(layer_mean,
tau_head)`` directly; with little data per head it has Neal's funnel and NUTS diverges, which the
non-centered form removes (Betancourt & Girolami 2015, "Hamiltonian Monte Carlo for hierarchical
models"). With informative data per head it is the other way round, so ``parameterization=auto``
picks the form per checkpoint from its data
(:func:`~engine.analyses.hierarchical_reliability.choose_parameterization`) and samples each group
of checkpoints in one batched run. Every checkpoint's row says whether its fit passes the gate
(R-hat < 1.01, bulk and tail ESS >= 400, no divergences) and, when not, why and what to try. Variants ``pooled`` (one mean for all heads) and ``unpooled`` (independent heads) are the
comparison models of ``analysis=loo``.

Each checkpoint is standardised by its own mean and SD before sampling (unit priors then fit any
entropy scale); draws and log-likelihoods are mapped back to the input's units (nats).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from engine.analyses import _common as C
from engine.errors import InputError
from engine.cli import Result
from engine.analyses.hierarchical_plots import forest_figure, plot_forest, plot_shrinkage  # noqa: F401 (re-exported)
from engine.analyses.hierarchical_reliability import choose_parameterization, gate_verdict, merge_traces

VARIANTS = ("hierarchical", "pooled", "unpooled")
PARAMETERIZATIONS = ("noncentered", "centered")
AUTO_FORM = "auto"
PARAMETERIZATION_OPTIONS = PARAMETERIZATIONS + (AUTO_FORM,)
"""``auto`` picks one of the two per checkpoint from its data (:func:`choose_parameterization`)."""


@functools.lru_cache(maxsize=None)
def build_model(num_layers: int, num_heads: int, num_samples: int, variant: str = "hierarchical",
                parameterization: str = "noncentered"):
    """Template for ONE checkpoint with container ``y`` ``[L, H, S]`` (standardised entropies).

    Every variant has ``theta`` ``[L, H]`` (head means) and ``sigma``; the hierarchical one also
    ``mu``, ``tau_head``, ``layer_mean`` ``[L]`` and, with more than one layer, ``tau_layer`` (a
    single layer has no layer level). Cached per arguments so the engine compiles a template once
    per process.
    """
    import pymc as pm

    if variant not in VARIANTS:
        raise InputError(f"analysis.variant must be one of {list(VARIANTS)}, got {variant!r}")
    if parameterization not in PARAMETERIZATIONS:
        raise InputError(
            f"analysis.parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}"
        )
    shape = (num_layers, num_heads)
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(shape + (num_samples,)))
        sigma = pm.HalfNormal("sigma", 1.0)
        if variant == "pooled":
            mu = pm.Normal("mu", 0.0, 1.0)
            theta = pm.Deterministic("theta", mu * np.ones(shape))
        elif variant == "unpooled":
            theta = pm.Normal("theta", 0.0, 2.0, shape=shape)
        else:
            mu = pm.Normal("mu", 0.0, 1.0)
            tau_head = pm.HalfNormal("tau_head", 1.0)
            if num_layers == 1:  # no layer level: mu + tau_layer * z would be unidentified
                layer_mean = pm.Deterministic("layer_mean", mu * np.ones(1))
            elif parameterization == "noncentered":
                tau_layer = pm.HalfNormal("tau_layer", 1.0)
                z_layer = pm.Normal("z_layer", 0.0, 1.0, shape=num_layers)
                layer_mean = pm.Deterministic("layer_mean", mu + tau_layer * z_layer)
            else:
                tau_layer = pm.HalfNormal("tau_layer", 1.0)
                layer_mean = pm.Normal("layer_mean", mu, tau_layer, shape=num_layers)
            if parameterization == "noncentered":
                z_head = pm.Normal("z_head", 0.0, 1.0, shape=shape)
                theta = pm.Deterministic("theta", layer_mean[:, None] + tau_head * z_head)
            else:
                theta = pm.Normal("theta", layer_mean[:, None], tau_head, shape=shape)
        pm.Normal("obs", theta[..., None], sigma, observed=y)
    return model


def demo_entropies(seed: int = 0, num_checkpoints: int = 3, num_layers: int = 6, num_heads: int = 8,
                   num_samples: int = 8) -> np.ndarray:
    """Deterministic demo ``[C, L, H, S]``: entropies that sharpen over training and with depth."""
    rng = np.random.default_rng(seed)
    c = np.arange(num_checkpoints)[:, None]
    layer = 2.6 - 0.25 * c - 0.2 * np.arange(num_layers)[None, :]            # [C, L]
    heads = layer[..., None] + 0.3 * rng.standard_normal((num_checkpoints, num_layers, num_heads))
    return heads[..., None] + 0.4 * rng.standard_normal(heads.shape + (num_samples,))


def load_entropies(path, key: str = "entropies") -> np.ndarray:
    """Entropies from ``.npy``, ``.npz``/``.pt`` (key ``key``) or ``.nc`` (variable ``key``) as
    ``[C, L, H, S]`` float; :class:`InputError` for a missing key, a wrong rank or non-finite values."""
    p = C.resolve_path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                if key not in f:
                    raise InputError(f"input {str(path)!r}: no array {key!r}; keys are {sorted(f.files)}")
                arr = f[key]
        elif suffix == ".pt":
            import torch

            obj = torch.load(p, map_location="cpu", weights_only=True)
            if hasattr(obj, "numpy"):
                arr = obj.numpy()
            elif isinstance(obj, dict) and key in obj:
                arr = np.asarray(obj[key])
            else:
                raise InputError(f"input {str(path)!r}: no tensor {key!r} in the saved dict")
        elif suffix == ".nc":
            import xarray as xr

            with xr.open_dataset(p) as ds:
                if key not in ds:
                    raise InputError(f"input {str(path)!r}: no variable {key!r}; variables are {list(ds)}")
                arr = ds[key].values
        else:
            raise InputError(f"input {str(path)!r}: expected .npy, .npz, .pt or .nc, got {suffix!r}")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"input {str(path)!r}: could not read: {str(err).splitlines()[0]}") from err
    return check_entropies(arr, str(path))


def check_entropies(arr, source: str = "entropies") -> np.ndarray:
    """Validate an entropy array and add the checkpoint axis: ``-> [C, L, H, S]`` float."""
    try:
        arr = np.asarray(arr, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{source}: entropies must be numeric") from None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise InputError(
            f"{source}: entropies must be [n_layers, n_heads, n_samples] or "
            f"[checkpoints, n_layers, n_heads, n_samples], got shape {arr.shape}"
        )
    if min(arr.shape) < 1 or arr.shape[3] < 2:
        raise InputError(f"{source}: need at least 2 samples per head, got shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        raise InputError(f"{source}: non-finite entropy at index {tuple(int(i) for i in bad[0])}")
    return arr


def fit(entropies: np.ndarray, sample_kw: dict, *, variant: str = "hierarchical",
        parameterization: str = "noncentered", log_likelihood: bool = False, labels=None):
    """Sample every checkpoint's posterior in one batched call.

    Parameters
    ----------
    entropies
        ``[C, L, H, S]`` in the user's units.
    sample_kw
        ``sample_batched`` keyword arguments (sampler, chains, draws, ...).
    variant, parameterization
        The model (see :func:`build_model`); ``parameterization="auto"`` picks it per checkpoint
        (:func:`parameterizations`).
    log_likelihood
        Also return the pointwise log-likelihood ``[C, chain, draw, L, H, S]`` in the input's
        units: the engine's when the sampler gives one, else the Normal density of the draws.
    labels
        Checkpoint labels (the problem coordinate).

    Returns
    -------
    (idata, draws, loglik)
        The engine trace (standardised scale); raw-unit draws ``theta`` ``[C, L, H, chain, draw]``
        and ``sigma`` (and for ``hierarchical`` ``mu``, ``tau_layer``, ``tau_head``) with the
        problem first and chain, draw last; ``loglik`` or ``None``. A checkpoint that stopped
        per problem (``sampler="auto"``'s fallback, ``target_ess``) keeps ``num_draws`` draws
        per chain and NaN past them, in the draws and ``loglik`` alike.
    """
    from engine.sampling.kernels import get_kernel

    entropies = check_entropies(entropies)
    num_checkpoints, num_layers, num_heads, num_samples = entropies.shape
    loc = entropies.reshape(num_checkpoints, -1).mean(-1)
    scale = entropies.reshape(num_checkpoints, -1).std(-1, ddof=1)
    scale = np.where(scale > 0, scale, 1.0)
    z = (entropies - loc[:, None, None, None]) / scale[:, None, None, None]
    kw = dict(sample_kw)
    want_engine_ll = log_likelihood and not get_kernel(kw.get("sampler", "blackjax")).runs_on_host
    if want_engine_ll:
        kw["log_likelihood"] = True
    if labels is None:
        labels = list(range(num_checkpoints))
    forms = parameterizations(z, variant, parameterization)
    groups = {form: [c for c, f in enumerate(forms) if f == form] for form in PARAMETERIZATIONS}
    groups = {form: members for form, members in groups.items() if members}
    traces = []
    for form, members in groups.items():
        template = build_model(num_layers, num_heads, num_samples, variant, form)
        traces.append(C.sample(template, {"y": z[members]}, problem_coords=[labels[c] for c in members], **kw))
    idata = traces[0] if len(traces) == 1 else merge_traces(traces, list(groups.values()))
    s = scale.reshape((-1, 1, 1, 1, 1))
    draws = {"theta": loc.reshape((-1, 1, 1, 1, 1)) + s * C.var_draws(idata, "theta")}
    draws["sigma"] = scale[:, None, None] * C.var_draws(idata, "sigma")
    if variant == "hierarchical":
        draws["mu"] = loc[:, None, None] + scale[:, None, None] * C.var_draws(idata, "mu")
        if "tau_layer" in idata.posterior:
            draws["tau_layer"] = scale[:, None, None] * C.var_draws(idata, "tau_layer")
        draws["tau_head"] = scale[:, None, None] * C.var_draws(idata, "tau_head")
    loglik = None
    if log_likelihood:
        if want_engine_ll:
            ll = idata.log_likelihood["obs"].transpose("problem", "chain", "draw", ...).values
            loglik = ll - np.log(scale)[:, None, None, None, None, None]
        else:
            loglik = pointwise_loglik(entropies, draws)
    return idata, draws, loglik


def parameterizations(entropies, variant: str = "hierarchical", parameterization: str = "auto") -> list[str]:
    """The form each checkpoint of ``entropies [C, L, H, S]`` is sampled in: ``parameterization``
    for all, or with ``"auto"`` :func:`choose_parameterization` of each (the data's scale does not
    change the choice)."""
    if parameterization not in PARAMETERIZATION_OPTIONS:
        raise InputError(
            f"analysis.parameterization must be one of {list(PARAMETERIZATION_OPTIONS)}, got {parameterization!r}"
        )
    if parameterization != AUTO_FORM:
        return [parameterization] * len(entropies)
    if variant != "hierarchical":
        return ["noncentered"] * len(entropies)
    return [choose_parameterization(y) for y in entropies]


def pointwise_loglik(entropies: np.ndarray, draws: dict) -> np.ndarray:
    """Normal log density of every entropy under every draw: ``[C, chain, draw, L, H, S]``."""
    theta = np.moveaxis(draws["theta"], (-2, -1), (1, 2))          # [C, chain, draw, L, H]
    sigma = draws["sigma"][..., None, None, None]                     # [C, chain, draw, 1, 1, 1]
    return C.pointwise_normal_loglik(entropies[:, None, None], theta[..., None], sigma)


def head_table(entropies: np.ndarray, draws: dict, labels, hdi_prob: float) -> list[dict]:
    """One row per (checkpoint, layer, head): raw sample mean, posterior mean, HDI, diagnostics."""
    stats = C.draw_summary(draws["theta"], hdi_prob)
    raw = entropies.mean(-1)
    rows = []
    for c, layer, head in np.ndindex(*raw.shape):
        rows.append({
            "checkpoint": labels[c], "layer": layer, "head": head, "raw_mean": raw[c, layer, head],
            "mean": stats["mean"][c, layer, head], "sd": stats["sd"][c, layer, head],
            "hdi_low": stats["hdi_low"][c, layer, head], "hdi_high": stats["hdi_high"][c, layer, head],
            "r_hat": stats["r_hat"][c, layer, head], "ess_bulk": stats["ess_bulk"][c, layer, head],
        })
    return rows


def checkpoint_table(idata, draws: dict, labels, hdi_prob: float, forms=None, target_accept: float = 0.9) -> list[dict]:
    """One row per checkpoint: hyperparameters (mean and HDI), worst R-hat, least bulk and tail
    ESS, divergences, the parameterisation (``forms``) and the gate's verdict with what to try."""
    div = C.divergences(idata)
    names = [n for n in ("mu", "tau_layer", "tau_head", "sigma") if n in draws]
    stats = {n: C.draw_summary(draws[n], hdi_prob) for n in names}
    theta = C.draw_summary(draws["theta"], hdi_prob)
    rows = []
    for c, label in enumerate(labels):
        row = {"checkpoint": label}
        for n in names:
            row[n] = stats[n]["mean"][c]
            row[f"{n}_hdi"] = f"[{C.fmt(stats[n]['hdi_low'][c])}, {C.fmt(stats[n]['hdi_high'][c])}]"
        row["max_r_hat"] = float(max(np.nanmax(theta["r_hat"][c]), *(stats[n]["r_hat"][c] for n in names)))
        row["min_ess_bulk"] = float(min(np.nanmin(theta["ess_bulk"][c]), *(stats[n]["ess_bulk"][c] for n in names)))
        row["min_ess_tail"] = float(min(np.nanmin(theta["ess_tail"][c]), *(stats[n]["ess_tail"][c] for n in names)))
        row["divergences"] = int(div[c])
        form = forms[c] if forms is not None else "noncentered"
        row["parameterization"] = form
        row["gate"], row["try"] = gate_verdict(row["max_r_hat"], row["min_ess_bulk"], row["min_ess_tail"],
                                               row["divergences"], form, target_accept)
        rows.append(row)
    return rows


def posterior_predictive(entropies, draws, labels, rng, max_draws: int = 500):
    """Replicated entropies per checkpoint: ``[(label, y_obs [n], y_rep [S, n])]``, from draws
    picked among each checkpoint's kept draws (:func:`~engine.analyses._common.trim_padding`)."""
    out = []
    for c, label in enumerate(labels):
        theta = C.trim_padding(draws["theta"][c]).reshape(entropies.shape[1:3] + (-1,))   # [L, H, chain*draw]
        sigma = C.trim_padding(draws["sigma"][c]).reshape(-1)
        take = rng.choice(sigma.size, size=min(max_draws, sigma.size), replace=False)
        mean = np.moveaxis(theta[..., take], -1, 0)[..., None]             # [S, L, H, 1]
        rep = mean + sigma[take, None, None, None] * rng.standard_normal((take.size,) + entropies.shape[1:])
        out.append((f"checkpoint {label}", entropies[c].ravel(), rep.reshape(take.size, -1)))
    return out


def divergence_advice(num_divergences: int, parameterization: str, target_accept: float) -> str:
    """What to change when the fit diverged, naming only settings that act in this analysis and
    are not already set: ``analysis.parameterization`` (when centred) and
    ``analysis.target_accept`` (it overrides ``sampler.target_accept`` here), else more tuning."""
    if not num_divergences:
        return "No divergent transitions.\n"
    steps = []
    if parameterization == "centered":
        steps.append("`analysis.parameterization=noncentered` (removes the funnel)")
    if target_accept < 0.99:
        higher = 0.95 if target_accept < 0.95 else 0.99
        steps.append(f"`analysis.target_accept={higher}` (now {target_accept:g}; this analysis' own setting "
                     "overrides `sampler.target_accept`)")
    steps.append("a longer warmup, `sampler.tune`")
    if parameterization == "noncentered" and target_accept >= 0.99:
        steps.append("a closer look at the data: divergences that survive both usually mean a model "
                     "that does not fit them")
    return (f"**{num_divergences} divergent transitions**: estimates may be biased; try "
            + "; then ".join(steps) + ".\n")


def sample_kwargs(cfg) -> dict:
    """The sampler settings, with this analysis' ``target_accept`` (0.9 by default: hierarchical
    posteriors have regions of high curvature where smaller steps avoid divergences)."""
    return C.sample_kwargs(cfg, target_accept=float(C.analysis_option(cfg, "target_accept", 0.9)))


def load_input(cfg):
    """``(entropies [C, L, H, S], checkpoint labels)`` from ``analysis.input`` or the demo."""
    opt = functools.partial(C.analysis_option, cfg)
    path = opt("input")
    if path is None:
        arr = demo_entropies(int(opt("demo_seed", 0)))
    else:
        arr = load_entropies(path, str(opt("key", "entropies")))
    return arr, list(range(arr.shape[0]))


def run(cfg, run_dir: Path) -> Result:
    """Fit the hierarchical model to every checkpoint; writes ``summary.json``, ``report.md``,
    ``head_means.csv``, ``attention_forest.png`` and ``attention_shrinkage.png``."""
    import pandas as pd

    run_dir = C.prepare_run_dir(run_dir)
    opt = functools.partial(C.analysis_option, cfg)
    variant = str(opt("variant", "hierarchical"))
    parameterization = str(opt("parameterization", "noncentered"))
    hdi_prob = float(opt("hdi_prob", C.HDI_PROB))
    units = str(opt("units", "nats"))
    entropies, labels = load_input(cfg)
    build_model(*entropies.shape[1:], variant)  # option errors before sampling
    forms = parameterizations(entropies, variant, parameterization)
    target_accept = float(sample_kwargs(cfg)["target_accept"])
    idata, draws, _ = fit(entropies, sample_kwargs(cfg), variant=variant,
                          parameterization=parameterization, labels=labels)
    heads = head_table(entropies, draws, labels, hdi_prob)
    checkpoints = checkpoint_table(idata, draws, labels, hdi_prob, forms, target_accept)
    table_path = run_dir / "head_means.csv"
    pd.DataFrame(heads).to_csv(table_path, index=False)
    outputs = {
        "forest plot": plot_forest(entropies, draws, labels, hdi_prob, run_dir / "attention_forest.png",
                                   units=units),
        "shrinkage plot": plot_shrinkage(entropies, draws, labels, run_dir / "attention_shrinkage.png",
                                         units=units),
        "head table": table_path,
    }
    total_div = int(sum(r["divergences"] for r in checkpoints))
    outputs["summary"] = C.write_summary(run_dir, cfg, {
        "shape": dict(zip(("checkpoints", "layers", "heads", "samples"), entropies.shape)),
        "variant": variant, "parameterization": parameterization, "parameterizations": forms,
        "divergences": total_div,
        "checkpoints": checkpoints, "heads": heads,
    })
    failing = [r for r in checkpoints if r["gate"] != "ok"]
    warn = "\n" + divergence_advice(total_div, parameterization, target_accept)
    if failing:
        warn += (f"\n**{len(failing)} of {len(checkpoints)} checkpoints fail the gate** (R-hat < 1.01, bulk and "
                 "tail ESS >= 400, no divergences); their rows say why and what to try.\n")
    outputs["report"] = C.write_report(run_dir, "Hierarchical attention entropies", [
        ("Setup", f"Entropies of shape {list(entropies.shape)} (checkpoints, layers, heads, samples); "
                  f"variant `{variant}`, `{parameterization}` parameterisation; one batched run over "
                  f"checkpoints. {C.percent(hdi_prob)} HDIs in the input's units ({units}).\n" + warn),
        ("Checkpoints", C.markdown_table(checkpoints)),
        ("Heads (last checkpoint)", C.markdown_table([h for h in heads if h["checkpoint"] == labels[-1]])),
    ], {k: v for k, v in outputs.items() if str(v).endswith(".png")})
    lines = [f"hierarchical attention ({variant}, {parameterization}), entropies {list(entropies.shape)}:"]
    for r in checkpoints:
        extra = "".join(f", {n} {r[n]:.3f}" for n in ("tau_layer", "tau_head") if n in r)
        lines.append(f"  checkpoint {r['checkpoint']}: sigma {r['sigma']:.3f}{extra}, "
                     f"max R-hat {r['max_r_hat']:.4f}, divergences {r['divergences']}, {r['parameterization']}, "
                     f"gate {r['gate']}" + (f" (try {r['try']})" if r["try"] else ""))
    return Result("\n".join(lines), outputs, data={"idata": idata, "draws": draws, "heads": heads,
                                                   "checkpoints": checkpoints})


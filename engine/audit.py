"""``audit_vfe``: every token's Gaussian belief against its model's posterior, all at once.

For each (checkpoint, token) problem the engine samples the posterior of the generative model
the belief approximates (one compiled PyMC template, ``engine.batch.run_batched``), summarises
the draws ON the device (``summary_fn``: moments, R-hat/ESS/MCSE, divergences, coverage of q's
interval, and the largest PSIS log weights of q as a proposal), and compares q with the
moment-matched MCMC posterior and, for conjugate models, with the exact one. Only per-problem
summaries leave the device.

Flat problem index ``p = checkpoint * T + token``; problem ``p``'s MCMC stream is
``fold_in(PRNGKey(seed), p)`` (``batch.py``) and its draws from q use
``fold_in(fold_in(PRNGKey(seed), p), Q_STREAM)``, so results do not depend on chunking.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from engine.beliefs import BeliefSet, beliefs_from_arrays, load_beliefs
from engine.errors import InputError

__all__ = ["audit_vfe", "AuditResult", "Q_STREAM", "MODELS"]

Q_STREAM = 0x51
"""Extra ``fold_in`` tag of the random stream that draws from q (PSIS k-hat)."""

MODELS = {"normal_normal": True, "student_t": False, "bernoulli_logit": False}
"""Built-in univariate templates (``engine.vfe_models``) -> whether a closed form exists."""


@dataclass
class AuditResult:
    """An audit's per-token table, per-checkpoint summary and the arrays behind the plots.

    table
        One row per (checkpoint, token): contract-4 columns plus ``w2``, ``pareto_k``,
        ``mcmc_mcse``, ``coverage``, ``status``.
    summary
        JSON-ready: ``checkpoints`` (per-checkpoint aggregates), ``settings``, ``timings``,
        ``notes``.
    extras
        Arrays for plots: multivariate ``vfe_mean``/``mcmc_mean``/``std_ratio`` ``[P, K]``.
    draws
        InferenceData of the tokens asked for with ``keep_draws`` (None otherwise).
    """

    kind: str
    table: Any
    summary: dict
    extras: dict = field(default_factory=dict)
    draws: Any = None

    def write(self, out_dir, *, plots: bool = True, worst_tokens: int = 10) -> dict[str, Path]:
        """Write metrics.parquet, PNG plots, report.md, summary.json (and draws.nc) atomically."""
        from engine.report import write_outputs

        return write_outputs(self, Path(out_dir), plots=plots, worst_tokens=worst_tokens)


def _as_beliefs(beliefs) -> BeliefSet:
    if isinstance(beliefs, BeliefSet):
        return beliefs
    if isinstance(beliefs, (str, Path, list, tuple)):
        return load_beliefs(beliefs)
    if isinstance(beliefs, Mapping):
        return beliefs_from_arrays(beliefs)
    raise InputError(f"beliefs: expected a path, a mapping of arrays or a BeliefSet, got {type(beliefs).__name__}")


def _resolve_model(model, kind: str, dim: int, closed_form):
    """-> (pm.Model, model name, has closed form)."""
    from engine import vfe_models

    if kind == "multivariate":
        if model not in (None, "mvnormal"):
            raise InputError("field 'model': multivariate beliefs use the built-in MvNormal template")
        return _cached_template("mvnormal", dim), "mvnormal", True
    if model is None:
        model = "normal_normal"
    if isinstance(model, str):
        if model not in MODELS:
            raise InputError(f"field 'model': unknown template {model!r}; built-in: {sorted(MODELS)}")
        exact = MODELS[model] if closed_form is None else bool(closed_form)
        return _cached_template(model), model, exact
    if callable(model) and not hasattr(model, "free_RVs"):
        name = getattr(model, "__name__", "custom")
        model = model()
    else:
        name = getattr(model, "name", "") or "custom"
    if not hasattr(model, "free_RVs"):
        raise InputError(f"field 'model': the builder returned {type(model).__name__}, not a pm.Model")
    return model, name, bool(closed_form)


_TEMPLATES: dict[tuple, Any] = {}


def _cached_template(name: str, *args):
    """One template per (name, args) per process, so ``compile_for``'s cache hits."""
    from engine import vfe_models

    key = (name,) + args
    if key not in _TEMPLATES:
        with _quiet_pytensor():
            _TEMPLATES[key] = getattr(vfe_models, name)(*args)
    return _TEMPLATES[key]


@contextlib.contextmanager
def _quiet_pytensor():
    """Silence PyTensor's C-BLAS notice: the engine runs the model through JAX, not C."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS")
        yield


def _model_inputs(model, bs: BeliefSet) -> dict[str, Any]:
    """The model's ``pm.Data`` containers filled from the beliefs, flat over problems."""
    names = [v.name for v in model.data_vars]
    if bs.kind == "univariate":
        source = {n: bs.flat(n) for n in ("observed", "prior_mu", "prior_sigma", "obs_sigma")}
    else:
        source = {
            "observed": bs.flat("observed"),
            "prior_mu": bs.flat("prior_mu"),
            "prior_chol": _cholesky(bs.flat("prior_cov")),
            "obs_chol": _cholesky(bs.flat("obs_cov")),
        }
    unknown = [n for n in names if n not in source]
    if unknown:
        raise InputError(
            f"field 'model': pm.Data container {unknown[0]!r} is not a beliefs field; "
            f"templates may read {sorted(source)}"
        )
    if "observed" not in names:
        raise InputError("field 'model': the template has no pm.Data container named 'observed'")
    if "theta" not in [rv.name for rv in model.free_RVs]:
        raise InputError("field 'model': the template has no free variable named 'theta'")
    return {n: source[n] for n in names}


def _cholesky(cov):
    from engine.beliefs import _xp

    return _xp(cov).linalg.cholesky(cov)


def _problem_data(inputs: dict, num_obs: np.ndarray, extras: dict | None = None):
    from engine.compile import ProblemData

    n = inputs["observed"].shape[1]
    ragged = bool((num_obs != n).any())
    arrays = dict(inputs)
    if extras:
        arrays.update(extras)
    return ProblemData(
        arrays=arrays,
        num_rows=num_obs if ragged else None,
        ragged_names=("observed",) if ragged else (),
    )


def _summary_fn(compiled, kind: str, dim: int, seed: int, num_q_draws: int, interval: float, psis: bool):
    """ONE problem's on-device summary of ``values {name: [chain, draw, ...]}``."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import ndtri
    from scipy.stats import chi2

    from engine.diagnostics import summarize_draws
    from engine.linalg import solve_triangular
    from engine.metrics import psis_tail_size

    keep = psis_tail_size(num_q_draws)
    z = float(ndtri(0.5 + interval / 2.0))
    radius2 = float(chi2.ppf(interval, dim))
    log2pi = math.log(2.0 * math.pi)

    def summary_fn(values, stats, data):
        theta = values["theta"]
        out = {
            "divergences": stats.diverging.sum(),
            "mean_n_steps": stats.n_steps.mean(),
        }
        mu_q = data["mu_q"]
        if kind == "univariate":
            s = summarize_draws(theta)
            out.update(s)
            out["coverage"] = (jnp.abs(theta - mu_q) <= z * data["sigma_q"]).mean()
        else:
            s = summarize_draws(jnp.moveaxis(theta, -1, 0))  # each [K]
            flat = theta.reshape((-1, dim))
            centred = flat - flat.mean(0, keepdims=True)
            out["mean"] = flat.mean(0)
            out["cov"] = centred.T @ centred / (flat.shape[0] - 1)
            out["mcse_mean"] = s["mcse_mean"].max()
            out["r_hat"] = s["r_hat"].max()
            out["ess_bulk"] = s["ess_bulk"].min()
            out["ess_tail"] = s["ess_tail"].min()
            chol_q = data["chol_q"]
            white = solve_triangular(chol_q, (flat - mu_q[None, :]).T, lower=True)
            out["coverage"] = ((white**2).sum(0) <= radius2).mean()
        if "z_true" in data:  # share of draws below the true latent (per dimension): its PIT
            z_true = data["z_true"]
            out["z_pit_mcmc"] = (theta < z_true.reshape((1, 1) + z_true.shape)).mean((0, 1))
        if psis:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), data["__index__"]), Q_STREAM)
            if kind == "univariate":
                eps = jax.random.normal(key, (num_q_draws,), mu_q.dtype)
                x = (mu_q + data["sigma_q"] * eps)[:, None]
                log_q = -0.5 * eps**2 - jnp.log(data["sigma_q"]) - 0.5 * log2pi
            else:
                eps = jax.random.normal(key, (num_q_draws, dim), mu_q.dtype)
                x = mu_q[None, :] + eps @ data["chol_q"].T
                log_q = (-0.5 * (eps**2).sum(-1) - jnp.log(jnp.diagonal(data["chol_q"])).sum()
                         - 0.5 * dim * log2pi)
            log_p = jax.vmap(lambda v: compiled.logdensity_fn(v, data))(x)
            log_w = jnp.where(jnp.isfinite(log_p), log_p - log_q, -jnp.inf)
            out["top_log_weights"] = jax.lax.top_k(log_w, keep)[0]
        return out

    return summary_fn


def audit_vfe(
    beliefs,
    *,
    model=None,
    closed_form: bool | None = None,
    model_name: str | None = None,
    model_config=None,
    sampler: str = "blackjax",
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    precision: str = "float64",
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    devices: int | None = None,
    interval: float = 0.9,
    num_q_draws: int = 1000,
    progress: bool | None = None,
    out_dir=None,
    store_dir=None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    isolate_failures: bool = False,
    keep_draws=None,
    log_file=None,
) -> AuditResult | None:
    """Audit Gaussian beliefs against MCMC (and exact) posteriors, every token at once.

    Parameters
    ----------
    beliefs
        A beliefs file path (``.npz``/``.pt``/``.nc``), a list of them (stacked as checkpoints),
        a mapping of contract-3 arrays (numpy, JAX, torch incl. CUDA via DLPack), or a
        :class:`~engine.beliefs.BeliefSet`.
    model
        Univariate template: None or "normal_normal" (default), "student_t",
        "bernoulli_logit", a ``pm.Model``, or a zero-argument builder returning one (latent
        ``theta``, data in ``pm.Data`` containers named after beliefs fields).
        Multivariate beliefs always use the MvNormal known-covariance template.
    closed_form
        Whether ``references.normal_normal`` is the model's exact posterior (default: True for
        the conjugate built-ins, False for anything else, which leaves ``kl_q_exact`` NaN).
    model_name
        Label of the model in outputs (default: the built-in's or builder's name).
    model_config
        The resolved model config the template was built from (JSON-ready), part of the stored
        results' identity together with the template's graph (``store_dir``).
    sampler, chains, draws, tune, seed, batch_size, precision, target_accept, max_tree_depth, dense_mass
        As in :func:`engine.sample_batched`; ``sampler="pymc"`` loops ``pm.sample`` (baseline).
        ``batch_size=None`` picks equal chunks whose in-program draws fit ``CHUNK_MEMORY_BYTES``.
    devices
        Local devices to shard each chunk's problems over (None: one; -1: all), see ``batch.py``.
    interval
        Central credible mass of q whose MCMC coverage is reported (``coverage``).
    num_q_draws
        Draws from q per token for the PSIS k-hat of q as a proposal (Yao et al. 2018).
    progress
        Progress bar over chunks (None: only when stderr is a terminal).
    out_dir
        When given, write metrics.parquet, summary.json, report.md and plots there.
    store_dir
        When given, every finished chunk's summaries are written there durably
        (``engine.store.ChunkStore``) and a rerun with the same inputs and settings skips them:
        a killed audit resumes, losing at most the chunk in flight, with the same final table.
    overwrite
        With ``store_dir``: recompute instead of refusing when the data, model config, template
        graph, sampler settings or precision changed (the old chunks are moved aside).
    isolate_failures
        A token whose log density is not finite at any jittered start is flagged in its row
        (``status``, ``converged=False``, NaN MCMC columns) instead of failing the whole audit
        with an ``InputError``; other tokens' results are unchanged. Tokens whose every
        transition diverged are flagged either way.
    keep_draws
        Tokens (labels of the beliefs' ``token`` axis, or ``"all"``) whose full draws are kept,
        at every checkpoint, as ``AuditResult.draws`` (InferenceData with dims ``chain, draw,
        checkpoint, token``; written as ``draws.nc``). Only the chunks holding them bring draws
        back from the device, so memory stays bounded by the chunk and the subset.
    log_file
        Append one JSON line per finished chunk (done, rate, ETA, RSS) to this file
        (``engine.progress.RunLog``); a rate/ETA line is logged either way.
    shard
        ``(i, k)`` with ``store_dir``: run only chunks ``j`` of the run's chunk grid with
        ``j % k == i`` and return ``None`` (no table) when ``k > 1``; ``analysis=merge`` joins
        the shards' stores into the table a single run gives, bitwise.

    Returns
    -------
    AuditResult

    Notes
    -----
    On CPU, start Python with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``
    (the CLI sets it, see ``engine.run.CPU_XLA_FLAGS``): without it, large multivariate chunk programs
    intermittently hang in XLA's CPU runtime.

    Raises
    ------
    InputError
        Bad beliefs or a model whose log density is not finite for some token, before sampling.
    """
    t_start = time.perf_counter()
    if shard is not None and int(shard[1]) > 1 and store_dir is None and sampler != "pymc":
        raise InputError("field 'shard': a shard's results live only in its store; give store_dir")
    bs = _as_beliefs(beliefs)  # validate before the heavy imports: bad input fails fast

    import jax

    from engine.api import compile_for
    from engine.audit_chunks import kept_inference_data, kept_problems, open_store, run_chunks
    from engine.batch import BatchConfig, check_init
    from engine.samplers import NUTSSettings

    if not 0.0 < float(interval) < 1.0:
        raise InputError(f"field 'analysis.interval': must be in (0, 1), got {interval}")
    if int(num_q_draws) < 25:
        raise InputError(f"field 'analysis.num_q_draws': need at least 25 draws, got {num_q_draws}")
    pm_model, default_name, exact = _resolve_model(model, bs.kind, bs.dim, closed_form)
    model_name = model_name or default_name
    inputs = _model_inputs(pm_model, bs)
    P = bs.num_problems
    extras = {"mu_q": bs.flat("mu_q"), "__index__": np.arange(P, dtype=np.int32)}
    if bs.kind == "univariate":
        extras["sigma_q"] = bs.flat("sigma_q")
    else:
        extras["chol_q"] = _cholesky(bs.flat("cov_q"))
    if "z_true" in bs.fields:
        extras["z_true"] = bs.flat("z_true")
    model_data = _problem_data(inputs, bs.num_obs.reshape(-1))
    full_data = _problem_data(inputs, bs.num_obs.reshape(-1), extras)

    batch_size = _chunk_size(P, int(chains), int(draws), bs.dim, int(num_q_draws), batch_size)
    settings = NUTSSettings(target_accept=float(target_accept), max_tree_depth=int(max_tree_depth),
                            dense_mass=bool(dense_mass))
    jax_sampler = sampler if sampler != "pymc" else "blackjax"
    try:
        config = BatchConfig(sampler=jax_sampler, chains=int(chains), draws=int(draws), tune=int(tune),
                             seed=int(seed), batch_size=batch_size, settings=settings,
                             precision=precision, keep_draws=False, devices=devices)
    except InputError as err:
        raise InputError(f"field 'sampler': {err}") from None
    try:
        with _quiet_pytensor():
            compiled = compile_for(pm_model, model_data)
    except InputError as err:
        raise InputError(f"field 'model': {err}") from None
    psis = set(compiled.value_slices) == {"theta"}  # theta is the only, untransformed, latent
    ok = check_init(compiled, model_data, config)
    if not ok.any() or (not isolate_failures and not ok.all()):
        c, t = divmod(int(np.flatnonzero(~ok)[0]), bs.num_tokens)
        raise InputError(
            f"field 'observed': model {model_name!r} has no finite log density for these data, "
            f"first bad index [{c}, {t}] (checkpoint {bs.checkpoints[c]!r}, token {bs.tokens[t]!r})"
        )
    summary_fn = _summary_fn(compiled, bs.kind, bs.dim, int(seed), int(num_q_draws), float(interval), psis)
    keep = kept_problems(bs, keep_draws)
    t_compiled = time.perf_counter()
    kept = None
    if sampler == "pymc":
        if keep.size:
            raise InputError("field 'analysis.keep_draws': not available with sampler=pymc_default")
        summaries = _pymc_summaries(pm_model, model_data, full_data, summary_fn, config, progress)
    else:
        store = None
        if store_dir is not None:
            extra = {"model": {"name": model_name, "config": model_config},
                     "analysis": {"interval": float(interval), "num_q_draws": int(num_q_draws),
                                  "keep_draws": keep.tolist()}}
            store = open_store(store_dir, overwrite, full_data, config, pm_model, extra)
        summaries, kept = run_chunks(
            compiled, full_data, config, summary_fn, progress, store=store, shard=shard, keep=keep,
            log_file=log_file,
        )
        if summaries is None:
            return None
    jax.block_until_ready(summaries)
    t_sampled = time.perf_counter()

    from engine import report
    from engine.calibration import calibration_summary
    from engine.metrics import build_table

    with np.errstate(divide="ignore", invalid="ignore"):  # failed tokens' rows become NaN below
        table, plot_arrays = build_table(bs, summaries, model_name, exact, interval, num_q_draws, psis)
    table = _flag_failures(table, ok, int(chains) * int(draws))
    notes = report.notes(bs, table, model_name, exact, psis)
    summary = {
        "kind": bs.kind,
        "model": model_name,
        "closed_form": exact,
        "source": bs.source,
        "num_checkpoints": bs.num_checkpoints,
        "num_tokens": bs.num_tokens,
        "dim": bs.dim,
        "checkpoints": report.per_checkpoint(table, bs.kind),
        "settings": {
            "sampler": sampler, "chains": int(chains), "draws": int(draws), "tune": int(tune),
            "seed": int(seed), "batch_size": batch_size, "precision": precision,
            "target_accept": float(target_accept), "max_tree_depth": int(max_tree_depth),
            "dense_mass": bool(dense_mass), "devices": devices, "interval": float(interval),
            "num_q_draws": int(num_q_draws),
        },
        "timings_s": {
            "prepare_compile": round(t_compiled - t_start, 3),
            "sampling": round(t_sampled - t_compiled, 3),
            "metrics": round(time.perf_counter() - t_sampled, 3),
        },
        "notes": notes,
        "versions": report.versions(),
    }
    if (calibration := calibration_summary(table)) is not None:
        summary["z_true_calibration"] = calibration
    draws = None if kept is None else kept_inference_data(bs, keep, kept, summary["settings"], model_name)
    audit = AuditResult(kind=bs.kind, table=table, summary=summary, extras=plot_arrays, draws=draws)
    if out_dir is not None:
        audit.summary["outputs"] = {k: str(v) for k, v in audit.write(out_dir).items()}
    return audit


CHUNK_MEMORY_BYTES = 1 << 30
"""Default memory budget of one chunk's per-draw arrays (draws and NUTS statistics)."""


def _chunk_size(num_problems: int, chains: int, draws: int, dim: int, num_q_draws: int, batch_size):
    """``batch_size``, or when None the fewest equal chunks whose draws fit CHUNK_MEMORY_BYTES.

    Draws never leave the device, but inside a chunk's program every problem's
    ``[chain, draw, dim]`` values and seven ``[chain, draw]`` statistics exist at once, so
    10^5 tokens in one chunk would need tens of GB. Equal chunks keep padding small.
    """
    if batch_size is not None:
        return int(batch_size)
    from engine.samplers import SampleStats

    per_problem = 8 * (chains * draws * (dim + len(SampleStats._fields)) + num_q_draws * (dim + 2))
    max_size = max(1, CHUNK_MEMORY_BYTES // per_problem)
    num_chunks = -(-num_problems // max_size)
    return -(-num_problems // num_chunks)


MCMC_COLUMNS = ("mcmc_mean", "mcmc_std", "mean_diff", "std_ratio", "kl_q_mcmc", "mean_l2_error",
                "r_hat", "ess_bulk", "ess_tail", "mcmc_mcse", "w2_mcmc")


def _flag_failures(table, init_ok: np.ndarray, num_transitions: int):
    """Isolate failed problems in their rows: ``status`` says why, ``converged`` is False, and
    the MCMC columns of an unstartable problem are NaN. Other rows are untouched (each problem
    samples in its own lanes and key stream)."""
    table = table.copy()
    bad_init = ~np.asarray(init_ok, bool)
    all_divergent = table["divergences"].to_numpy() >= num_transitions
    table.loc[all_divergent, "status"] = "every transition diverged"
    table.loc[bad_init, "status"] = "no finite log density at any jittered start"
    cols = [c for c in MCMC_COLUMNS if c in table.columns]
    table.loc[bad_init, cols] = np.nan
    table.loc[bad_init | all_divergent, "converged"] = False
    return table


def _pymc_summaries(pm_model, model_data, full_data, summary_fn: Callable, config, progress):
    """The baseline: a loop of ``pm.sample``, then the same on-device summaries of its draws."""
    import jax

    from engine.samplers.pymc_default import sample_loop

    draws, stats = sample_loop(
        pm_model, model_data, chains=config.chains, draws=config.draws, tune=config.tune,
        seed=config.seed, settings=config.settings, progress=progress,
    )
    arrays = full_data.device_arrays()
    with jax.enable_x64(config.precision == "float64"):
        fn = jax.jit(jax.vmap(summary_fn))
        return jax.tree.map(np.asarray, fn({"theta": draws["theta"]}, stats, arrays))

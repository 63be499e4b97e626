"""``sample_batched``: many small posteriors of one PyMC template, as one InferenceData."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from engine import settings as settings_schema
from engine.caching import LRUCache
from engine.errors import InputError
from engine.sampling.batch import BatchConfig, resolve_config, run_batched
from engine.model.compile import CompiledModel, ProblemData, compile_model, prepare_data
from engine.sampling.kernels import get_kernel

__all__ = ["sample_batched", "compile_for"]

MAX_CACHED_MODELS = 16
"""Compiled (template, padded shape) pairs kept per process."""

_COMPILED = LRUCache(MAX_CACHED_MODELS)


def _shape_key(problem_data: ProblemData) -> tuple:
    return tuple(
        (k, v.shape[1:], str(v.dtype)) for k, v in problem_data.arrays.items()
    ) + (problem_data.ragged_names,)


def compile_for(model, problem_data: ProblemData) -> CompiledModel:
    """Compile ``model`` once per padded data shape (cached; the entry holds the model, so its
    ``id`` cannot be reused by another model while cached)."""
    key = (id(model), _shape_key(problem_data))
    return _COMPILED.get_or_build(key, lambda: compile_model(model, problem_data), owner=model)


_OPTIONS = {"target_accept", "target_accept_prob", "max_tree_depth", "max_treedepth", "dense_mass",
            "initial_step_size", "pool_step_size", "init_tries", "jitter", "precision", "devices", "target_ess",
            "max_draws", "block_draws", "fallback_stopping"}
"""``sample_batched``'s settings keywords (the rest of :class:`~engine.settings.SamplerConfig`
and :class:`~engine.settings.RuntimeConfig` belong to audits and the CLI)."""


def sample_batched(
    model,
    data: Mapping[str, Any],
    *,
    sampler: str = settings_schema.AUTO,
    chains: int = 4,
    draws: int = 1000,
    tune: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    **kw,
):
    """Sample one posterior per problem with a single compiled program.

    Parameters
    ----------
    model
        ``pm.Model`` whose per-problem inputs are ``pm.Data`` containers.
    data
        Container name -> array ``[num_problems, ...]``, or a list of per-problem arrays whose
        leading (row) axes may differ (ragged; padded and masked).
    sampler
        "auto" (default): ChEES HMC for small templates with independent priors, BlackJAX NUTS
        otherwise, and every problem that fails the convergence gate (R-hat, ESS >= 400 or
        ``target_ess`` with stopping, divergences, E-BFMI) rerun with NUTS at twice the warmup,
        ``target_accept >= 0.95``, in float64 (:mod:`engine.sampling.auto`); for templates started
        with NUTS (hierarchical, or more than 16 parameters) the rerun targets 0.99 and draws in
        blocks until the gate passes, up to 4 x ``draws`` per chain (``num_draws`` per problem;
        NaN past it), and a problem still failing reruns once more at 0.999 with every chain at
        the smallest of its chains' adapted steps (``pool_step_size``); a ``RuntimeWarning``
        counts those still failing.
        NUTS: "blackjax", "numpyro", "stepwise" (the engine's lockstep-free NUTS);
        "chees" (ChEES-adapted jittered HMC, tuned across each problem's chains: fastest on
        small well-conditioned posteriors, needs ``chains >= 2`` and ``tune >= 50``, diagonal
        mass only; ``target_accept`` 0.8, see ``CHEES_TARGET_ACCEPT``); or "pymc" (a loop of
        ``pm.sample``, the baseline).
    chains, draws, tune
        Chains per problem; draws kept and warmup steps per chain. ``tune=None`` (default): the
        kernel's own warmup, 1000 for NUTS and MAMS, 300 for ChEES (it adapts a few parameters
        per problem across its chains and settles sooner; ``CHEES_DEFAULT_TUNE``); with
        ``auto``, whichever kernel runs a problem uses its own (the NUTS fallback 2 x 1000).
    seed
        Root seed. Problem ``i`` uses ``fold_in(PRNGKey(seed), i)`` whatever the chunking.
    batch_size
        Problems per compiled chunk (bounds memory); ``None``: chosen for speed within a 1 GiB
        budget (a few hundred problems per device on CPU, :mod:`engine.sampling.chunking`).
    **kw
        ``target_accept`` (0.8), ``max_tree_depth`` (10), ``dense_mass`` (False),
        ``initial_step_size`` (1.0; ChEES: where its step-size search starts), ``pool_step_size`` (False; blackjax NUTS: after warmup
        every chain of a problem uses the smallest of its chains' adapted steps), ``precision``
        ("auto": float32 unless the data's magnitudes or sizes need float64; "float64"; "float32"), ``init_tries`` (20), ``jitter``
        (1.0), ``devices`` (-1: shard problems over all local devices; None or 1: one device; N), ``log_likelihood`` (False: add the pointwise log-likelihood
        group), ``problem_coords`` (labels of the problem axis), ``progress`` (None: only on
        a terminal). Per-problem stopping (off by default): ``target_ess`` (None; e.g. 400:
        draw in blocks of ``block_draws`` (100) per chain and stop each problem once R-hat <
        1.01, bulk and tail ESS >= ``target_ess`` and no divergences hold over its draws),
        ``max_draws`` (per chain, default ``max(4000, draws)``: a problem still failing there
        stops unconverged; one with a divergence stops at that block). Not for ``sampler="pymc"`` or ``"stepwise"``.
        ``fallback_stopping`` (True; ``sampler="auto"`` only): False keeps ``draws`` per
        problem in the fallback too (a draw axis without padding).

    Returns
    -------
    arviz.InferenceData
        ``posterior`` with dims ``(chain, draw, problem, *var_dims)``; ``sample_stats`` with
        ``diverging``, ``tree_depth``, ``n_steps``, ``energy``, ``lp``, ``acceptance_rate``,
        ``step_size``, and per problem ``num_draws`` (kept draws per chain) and ``num_grads``
        (gradient evaluations of all chains, warmup included), dims ``(problem,)``;
        ``log_likelihood`` if asked. With ``target_ess`` the ``draw`` axis has ``max_draws``
        entries and problem ``p`` keeps the first ``num_draws[p]``; the rest are NaN (posterior,
        float stats), False or 0. ArviZ's diagnostics of one problem need its kept draws:
        ``idata.isel(problem=p, draw=slice(0, int(idata.sample_stats.num_draws[p])))``. With
        ``sampler="auto"`` also per problem ``sampler`` (the kernel whose draws these are) and
        ``gate_passed``.

    Raises
    ------
    InputError (a ValueError)
        Bad data (names, shapes, non-finite values) or a problem whose log density is not finite
        at any jittered initial point; raised when the chunk holding it has run (the chunk
        program finds each problem's starts, so no separate program is compiled to check them).
    """
    log_likelihood = bool(kw.pop("log_likelihood", False))
    problem_coords = kw.pop("problem_coords", None)
    progress = kw.pop("progress", None)
    unknown = [k for k in kw if k not in _OPTIONS]
    if unknown:
        raise TypeError(f"sample_batched() got unexpected keyword argument {unknown[0]!r}")
    kw.update(sampler=sampler, chains=chains, draws=draws, tune=tune, seed=seed, batch_size=batch_size)
    sampler_config, runtime = settings_schema.from_kwargs(kw)
    sampler_config = sampler_config.checked()
    kernel = get_kernel(sampler_config.name)
    if kernel.runs_on_host:
        if runtime.precision not in ("float64", settings_schema.AUTO):
            raise InputError(f"sampler={kernel.name!r} runs in PyMC's own precision; drop precision=")
        problem_data = prepare_data(model, data)
        draws_, stats = kernel.host_loop(
            model, problem_data, chains=chains, draws=draws, tune=int(sampler_config.tune), seed=seed,
            settings=sampler_config.kernel_settings, progress=progress,
        )
        return to_inference_data(draws_, stats, problem_coords=problem_coords)
    config = BatchConfig(sampler=sampler_config, runtime=runtime, log_likelihood=log_likelihood)
    problem_data = prepare_data(model, data)
    compiled = compile_for(model, problem_data)
    config = resolve_config(compiled, problem_data, config)
    result = run_batched(compiled, problem_data, config, progress=progress,
                         on_chunk=_require_finite_starts(sampler_config.init_tries))
    loglik = _mask_padded_rows(result.log_likelihood, problem_data, compiled.row_indexed_names) if (
        log_likelihood) else None
    idata = to_inference_data(
        result.draws, result.stats, problem_coords=problem_coords, log_likelihood=loglik,
        num_draws=result.num_draws, num_grads=result.num_grads,
    )
    if result.sampler is not None:
        idata.sample_stats["sampler"] = ("problem", np.asarray(result.sampler, dtype=str))
        idata.sample_stats["gate_passed"] = ("problem", np.asarray(result.gate_passed, dtype=bool))
    return idata


def _require_finite_starts(init_tries: int):
    """``on_chunk`` raising :class:`InputError` for the first problem of a chunk with no finite
    jittered start (``init_ok`` false)."""
    def check(start, stop, host):
        ok = np.asarray(host[1], bool)
        if not ok.all():
            bad = start + int(np.flatnonzero(~ok)[0])
            raise InputError(f"problem {bad}: the log density is not finite at any of {init_tries} jittered "
                             "initial points; check its data and priors")

    return check


def _mask_padded_rows(loglik, problem_data: ProblemData, row_indexed_names):
    """Set the log-likelihood of padded rows to NaN (they are not data).

    ``loglik`` maps observed names to ``[problem, chain, draw, row, ...]``; only the observed
    variables indexed by the ragged row axis (``row_indexed_names``) are masked, whatever the
    lengths of the others' axes.
    """
    if problem_data.num_rows is None or not loglik:
        return loglik
    n_pad = problem_data.arrays[problem_data.ragged_names[0]].shape[1]
    rows = problem_data.num_rows
    out = {}
    for name, arr in loglik.items():
        arr = np.array(arr, dtype=float)
        if name in row_indexed_names:
            pad = np.arange(n_pad)[None, :] >= rows[:, None]  # [problem, row]
            arr[np.broadcast_to(pad[:, None, None, :], arr.shape[:4])] = np.nan
        out[name] = arr
    return out


def to_inference_data(draws, stats, *, problem_coords=None, log_likelihood=None, num_draws=None, num_grads=None):
    """``[problem, chain, draw, ...]`` arrays -> InferenceData with dims ``(chain, draw, problem, ...)``;
    ``num_draws`` / ``num_grads`` ``[problem]`` join ``sample_stats`` with dims ``(problem,)``."""
    import arviz as az

    def move(arr):
        return np.moveaxis(np.asarray(arr), 0, 2)

    posterior = {k: move(v) for k, v in draws.items()}
    num_problems = next(iter(draws.values())).shape[0]
    coords = {"problem": np.arange(num_problems) if problem_coords is None else np.asarray(problem_coords)}
    dims = {k: ["problem"] + [f"{k}_dim_{i}" for i in range(v.ndim - 3)] for k, v in posterior.items()}
    sample_stats = {k: move(getattr(stats, k)) for k in stats._fields}
    ss_dims = {k: ["problem"] for k in sample_stats}
    groups = {"posterior": posterior, "sample_stats": sample_stats}
    all_dims = {**dims, **ss_dims}
    if log_likelihood:
        ll = {k: move(v) for k, v in log_likelihood.items()}
        groups["log_likelihood"] = ll
        all_dims.update({k: ["problem"] + [f"{k}_dim_{i}" for i in range(v.ndim - 3)] for k, v in ll.items()})
    idata = az.from_dict(**groups, coords=coords, dims=all_dims)
    for name, value in (("num_draws", num_draws), ("num_grads", num_grads)):
        if value is not None:
            idata.sample_stats[name] = ("problem", np.asarray(value))
    return idata

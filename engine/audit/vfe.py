"""``audit_vfe``: every token's Gaussian belief against its model's posterior, all at once.

A pipeline of named stages: :func:`read_beliefs` (validate the input), :func:`build_problems`
(fill, compile and check the template for every problem), :func:`sample_problems` (run the
chunk grid, ``engine.audit.chunks``), :func:`audit_table` (``engine.audit.table``) and
:func:`audit_summary` (``engine.audit.report`` writes the files).

For each (checkpoint, token) problem the engine samples the posterior of the generative model
the belief approximates (one compiled PyMC template, ``engine.sampling.batch.run_batched``), summarises
the draws ON the device (``summary_fn``: moments, R-hat/ESS/MCSE, divergences, coverage of q's
interval, and the largest PSIS log weights of q as a proposal), and compares q with the
moment-matched MCMC posterior and, for conjugate models, with the exact one. Only per-problem
summaries leave the device.

Flat problem index ``p = checkpoint * T + token``; problem ``p``'s MCMC stream is
``fold_in(PRNGKey(seed), p)`` (``batch.py``) and its draws from q use
``fold_in(fold_in(PRNGKey(seed), p), Q_STREAM)``, so results do not depend on chunking.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from engine.audit.beliefs import BeliefSet, beliefs_from_arrays
from engine.audit.inputs import make_problem_data, member_data, model_inputs
from engine.audit.beliefs_files import load_beliefs
from engine.audit.summary import MEMBER_OUTPUTS, Q_STREAM, problem_summary_fn
from engine.audit.warm_start import WARM_START_TUNE, WarmStart
from engine.audit.templates import MODELS, cached_template, quiet_pytensor, resolve_model  # noqa: F401 (re-exported)
from engine.errors import InputError

__all__ = ["audit_vfe", "AuditResult", "AuditProblems", "read_beliefs", "build_problems", "sample_problems",
           "audit_table", "audit_summary", "Q_STREAM", "MODELS", "cached_template"]

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
        from engine.audit.report import write_outputs

        return write_outputs(self, Path(out_dir), plots=plots, worst_tokens=worst_tokens)


def audit_vfe(
    beliefs,
    *,
    model=None,
    closed_form: bool | None = None,
    model_name: str | None = None,
    model_config=None,
    sampler: str = "auto",
    chains: int = 4,
    draws: int = 1000,
    tune: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    precision: str = "auto",
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    devices: int | None = -1,
    target_ess: int | None = None,
    max_draws: int | None = None,
    block_draws: int = 100,
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
    warm_start: bool = True,
    warm_start_tune: int | None = None,
    dedup: bool = True,
) -> AuditResult | None:
    """Audit Gaussian beliefs against MCMC (and exact) posteriors, every token at once.

    Parameters
    ----------
    beliefs
        A beliefs file path (``.npz``/``.pt``/``.nc``), a list of them (stacked as checkpoints),
        a mapping of contract-3 arrays (numpy, JAX, torch incl. CUDA via DLPack), or a
        :class:`~engine.audit.beliefs.BeliefSet`.
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
        ``tune=None``: the kernel's own warmup (1000; ChEES 300), or ``WARM_START_TUNE`` when warm-started.
        ``batch_size=None`` picks equal chunks whose in-program draws fit ``chunks.CHUNK_MEMORY_BYTES``.
    devices
        Local devices to shard each chunk's problems over (-1, default: all; None or 1: one), see ``batch.py``.
    target_ess, max_draws, block_draws
        Per-problem stopping (see :class:`engine.settings.SamplerConfig`): each token draws in
        blocks until R-hat < 1.01, bulk and tail ESS >= ``target_ess`` and no divergences hold
        over its kept draws, or ``max_draws`` per chain (then ``converged`` is False). Every
        column is computed over the token's kept draws; ``num_draws`` and ``num_grads`` say how
        many draws it kept and how many gradients it cost. ``None`` here; the CLI's audits
        default to ``analysis.target_ess: 400``.
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
        (``engine.audit.store.ChunkStore``) and a rerun with the same inputs and settings skips them:
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
        (``engine.audit.progress.RunLog``); a rate/ETA line is logged either way.
    shard
        ``(i, k)`` with ``store_dir``: run only chunks ``j`` of the run's chunk grid with
        ``j % k == i`` and return ``None`` (no table) when ``k > 1``; ``analysis=merge`` joins
        the shards' stores into the table a single run gives, bitwise.
    warm_start
        Start half of each token's chains from its q (scale inflated 2x) and every chain's
        adaptation from q's variances (``engine.audit.warm_start``, which explains why R-hat
        still means something). Only where valid (``theta`` the template's only, untransformed
        latent; a batched kernel); otherwise default starts, said in ``summary["notes"]``.
    warm_start_tune
        Warmup transitions per chain when warm-started; ``None``: ``tune`` when given, else
        ``WARM_START_TUNE`` (measured on the demo audits, see README). Without a warm start
        ``tune`` applies.
    dedup
        Sample each distinct target once (``engine.audit.dedup``): tokens whose template inputs are
        bitwise identical (usually the same token at every checkpoint) share one MCMC run, and
        q's columns are still computed per checkpoint from the shared draws.

    Returns
    -------
    AuditResult

    Notes
    -----
    ``import engine`` sets the XLA:CPU workarounds of :mod:`engine.platform` before JAX starts;
    a process that started JAX before importing the engine runs without them.

    Raises
    ------
    InputError
        Bad beliefs or a model whose log density is not finite for some token, before sampling.
    """
    from engine.audit.chunks import kept_inference_data
    from engine.settings import RuntimeConfig, SamplerConfig

    t_start = time.perf_counter()
    from engine.sampling.kernels import get_kernel

    if shard is not None and int(shard[1]) > 1 and store_dir is None and not get_kernel(sampler).runs_on_host:
        raise InputError("field 'shard': a shard's results live only in its store; give store_dir")
    bs = read_beliefs(beliefs)  # validate before the heavy imports: bad input fails fast
    if warm_start_tune is None and tune is None:
        warm_start_tune = WARM_START_TUNE
    sampler_config = SamplerConfig(name=sampler, chains=int(chains), draws=int(draws),
                                   tune=None if tune is None else int(tune),
                                   target_accept=float(target_accept), max_tree_depth=int(max_tree_depth),
                                   dense_mass=bool(dense_mass), target_ess=target_ess, max_draws=max_draws,
                                   block_draws=int(block_draws))
    runtime = RuntimeConfig(seed=int(seed), batch_size=batch_size, precision=precision, devices=devices,
                            progress=progress, overwrite=bool(overwrite), isolate_failures=bool(isolate_failures))
    for name, value in (("warm_start", warm_start), ("dedup", dedup)):
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"field 'analysis.{name}': must be true or false, got {value!r}")
    problems = build_problems(bs, model=model, closed_form=closed_form, model_name=model_name,
                              sampler=sampler_config, runtime=runtime, interval=interval, num_q_draws=num_q_draws,
                              warm_start=bool(warm_start), warm_start_tune=warm_start_tune, dedup=bool(dedup))
    t_compiled = time.perf_counter()
    summaries, kept = sample_problems(problems, keep_draws=keep_draws, store_dir=store_dir, shard=shard,
                                      log_file=log_file, model_config=model_config)
    if summaries is None:
        return None
    t_sampled = time.perf_counter()
    with np.errstate(divide="ignore", invalid="ignore"):  # failed tokens' rows become NaN
        table, plot_arrays = audit_table(problems, summaries)
    timings = {"prepare_compile": t_compiled - t_start, "sampling": t_sampled - t_compiled,
               "metrics": time.perf_counter() - t_sampled}
    summary = audit_summary(problems, table, timings)
    from engine.audit.calibration import calibration_summary

    if (calibration := calibration_summary(table)) is not None:
        summary["z_true_calibration"] = calibration
    draws = None if kept is None else kept_inference_data(bs, kept["problems"], kept, summary["settings"],
                                                          problems.model_name)
    audit = AuditResult(kind=bs.kind, table=table, summary=summary, extras=plot_arrays, draws=draws)
    if out_dir is not None:
        audit.summary["outputs"] = {k: str(v) for k, v in audit.write(out_dir).items()}
    return audit


@dataclass(frozen=True)
class AuditProblems:
    """Every (checkpoint, token) problem of an audit, compiled and checked (stage 2's output).

    ``targets`` (``engine.audit.dedup.TargetGroups``) maps the ``P = C * T`` problems to the
    ``D`` distinct targets sampled. ``model_data`` holds the targets' template inputs,
    ``full_data`` those plus each target's members' q (``[D, M, ...]``) for the on-device
    summary and, with ``warm_start.applied``, the start arrays (``[D, ...]``); ``init_ok [P]``
    says which problems' targets have a finite jittered start; ``psis`` whether q's PSIS k-hat
    is computed (theta the only, untransformed, latent); ``dedup`` whether grouping was asked.
    """

    beliefs: BeliefSet
    model: Any
    model_name: str
    exact: bool
    model_data: Any
    full_data: Any
    compiled: Any
    config: Any
    init_ok: np.ndarray
    psis: bool
    summary_fn: Callable
    interval: float
    num_q_draws: int
    targets: Any = None
    warm_start: WarmStart = WarmStart(False)
    dedup: bool = False


def read_beliefs(beliefs) -> BeliefSet:
    """Stage 1: a path, a list of paths, a mapping of arrays or a BeliefSet -> validated BeliefSet."""
    if isinstance(beliefs, BeliefSet):
        return beliefs
    if isinstance(beliefs, (str, Path, list, tuple)):
        return load_beliefs(beliefs)
    if isinstance(beliefs, Mapping):
        return beliefs_from_arrays(beliefs)
    raise InputError(f"beliefs: expected a path, a mapping of arrays or a BeliefSet, got {type(beliefs).__name__}")


def build_problems(bs: BeliefSet, *, model, closed_form, model_name, sampler, runtime, interval,
                   num_q_draws, warm_start: bool = False, warm_start_tune: int | None = None,
                   dedup: bool = False) -> AuditProblems:
    """Stage 2: the template filled from the beliefs, grouped into distinct targets (``dedup``),
    compiled once, warm starts prepared (``warm_start``), every target's start checked.

    ``sampler`` and ``runtime`` are the :mod:`engine.settings` schema; a ``runtime.batch_size``
    of None becomes equal chunks that fit ``chunks.CHUNK_MEMORY_BYTES``; a warm-started audit
    runs ``warm_start_tune`` warmup transitions (None: ``sampler.tune``). Raises
    :class:`InputError` naming the field for bad settings, a template that does not fit the
    beliefs, or (unless ``runtime.isolate_failures``) a problem with no finite log density.
    """
    from engine.audit import dedup as dedup_module
    from engine.audit.chunks import chunk_size
    from engine.audit.warm_start import warm_start_arrays, warm_start_supported
    from engine.sampling.api import compile_for
    from engine.sampling.batch import BatchConfig, check_init
    from engine.sampling.kernels import get_kernel

    if not 0.0 < float(interval) < 1.0:
        raise InputError(f"field 'analysis.interval': must be in (0, 1), got {interval}")
    if int(num_q_draws) < 25:
        raise InputError(f"field 'analysis.num_q_draws': need at least 25 draws, got {num_q_draws}")
    pm_model, default_name, exact = resolve_model(model, bs.kind, bs.dim, closed_form)
    model_name = model_name or default_name
    inputs = model_inputs(pm_model, bs)
    num_obs = bs.num_obs.reshape(-1)
    targets = (dedup_module.group_targets(inputs, num_obs) if dedup
               else dedup_module.identity_groups(bs.num_problems))
    model_data = make_problem_data({k: v[targets.first] for k, v in inputs.items()}, num_obs[targets.first])
    from engine.sampling.auto import choose_precision
    from engine.sampling.batch import local_devices
    from engine.sampling.kernels import get_kernel
    from engine.settings import AUTO

    try:
        host = get_kernel(sampler.name).runs_on_host
    except ValueError as err:
        raise InputError(f"field 'sampler': {err}") from None
    if runtime.precision == AUTO:
        runtime = dataclasses.replace(runtime, precision="float64" if host else choose_precision(model_data))
    devices = [None] if host or runtime.batch_size is not None else local_devices(runtime.devices)
    batch_size = chunk_size(targets.num_targets, int(sampler.chains), int(sampler.max_draws_per_chain), bs.dim,
                            int(num_q_draws) * targets.max_members, runtime.batch_size, num_devices=len(devices),
                            platform="cpu" if host or devices[0] is None or devices[0].platform == "cpu" else "gpu")
    try:
        config = BatchConfig(sampler=sampler, runtime=dataclasses.replace(runtime, batch_size=batch_size),
                             keep_draws=False)
    except ValueError as err:
        raise InputError(f"field 'sampler': {err}") from None
    try:
        with quiet_pytensor():
            compiled = compile_for(pm_model, model_data)
    except InputError as err:
        raise InputError(f"field 'model': {err}") from None
    psis = set(compiled.value_slices) == {"theta"}  # theta is the only, untransformed, latent
    warm = warm_start_supported(compiled, get_kernel(sampler.name)) if warm_start else WarmStart(False)
    extras = member_data(bs, targets)
    if warm.applied:
        extras.update(warm_start_arrays(bs, targets.latest, bool(sampler.dense_mass)))
        if warm_start_tune is not None:
            try:
                config = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler,
                                                                                 tune=int(warm_start_tune)))
            except ValueError as err:
                raise InputError(f"field 'analysis.warm_start_tune': {err}") from None
    full_data = make_problem_data(model_data.arrays, num_obs[targets.first], extras)
    ok = check_init(compiled, model_data, config)[targets.target_of]
    if not ok.any() or (not runtime.isolate_failures and not ok.all()):
        c, t = divmod(int(np.flatnonzero(~ok)[0]), bs.num_tokens)
        raise InputError(
            f"field 'observed': model {model_name!r} has no finite log density for these data, "
            f"first bad index [{c}, {t}] (checkpoint {bs.checkpoints[c]!r}, token {bs.tokens[t]!r})"
        )
    summary_fn = problem_summary_fn(compiled, bs.kind, bs.dim, config.seed, int(num_q_draws), float(interval), psis)
    return AuditProblems(bs, pm_model, model_name, exact, model_data, full_data, compiled, config, ok, psis,
                         summary_fn, float(interval), int(num_q_draws), targets, warm, bool(dedup))


def sample_problems(problems: AuditProblems, *, keep_draws=None, store_dir=None, shard=None, log_file=None,
                    model_config=None):
    """Stage 3: every problem's on-device summary -> ``(summaries, kept draws or None)``, or
    ``(None, None)`` for one shard of several (see :func:`engine.audit.chunks.run_chunks`).
    ``model_config`` (the resolved model config, JSON-ready) is part of the store's identity."""
    import jax

    from engine.audit.chunks import host_summaries, kept_problems, open_store, run_chunks
    from engine.sampling.kernels import get_kernel

    from engine.audit.dedup import expand_rows

    config, runtime = problems.config, problems.config.runtime
    kernel = get_kernel(config.sampler.name)
    targets = problems.targets
    keep = kept_problems(problems.beliefs, keep_draws)
    keep_targets = np.unique(targets.target_of[keep])
    kept = None
    if kernel.runs_on_host:
        if keep.size:
            raise InputError(f"field 'analysis.keep_draws': not available with sampler={kernel.name}")
        summaries = host_summaries(kernel, problems.model, problems.model_data, problems.full_data,
                                   problems.summary_fn, config, runtime.progress)
    else:
        store = None
        if store_dir is not None:
            extra = {"model": {"name": problems.model_name, "config": model_config},
                     "analysis": {"interval": problems.interval, "num_q_draws": problems.num_q_draws,
                                  "keep_draws": keep.tolist(), "dedup": problems.dedup,
                                  "warm_start": problems.warm_start.applied}}
            store = open_store(store_dir, runtime.overwrite, problems.full_data, config, problems.model, extra)
        summaries, kept = run_chunks(
            problems.compiled, problems.full_data, config, problems.summary_fn, runtime.progress,
            store=store, shard=shard, keep=keep_targets, log_file=log_file,
        )
        if summaries is None:
            return None, None
        if kept is not None:  # each kept problem gets its target's draws
            rows = np.searchsorted(kept["index"], targets.target_of[keep])
            kept = {"index": keep, "values": {k: v[rows] for k, v in kept["values"].items()},
                    "stats": {k: v[rows] for k, v in kept["stats"].items()}, "problems": keep}
    jax.block_until_ready(summaries)
    return expand_rows(summaries, targets, MEMBER_OUTPUTS), kept


def audit_table(problems: AuditProblems, summaries):
    """Stage 4: the per-token table (``engine.audit.table``), failed problems flagged in their rows."""
    from engine.audit.table import build_table, flag_failures

    s = problems.config.sampler
    table, plot_arrays = build_table(problems.beliefs, summaries, problems.model_name, problems.exact,
                                     problems.interval, problems.num_q_draws, problems.psis, sampler=s.name)
    num_transitions = int(s.chains) * table["num_draws"].to_numpy() if "num_draws" in table else int(s.chains) * int(s.draws)
    return flag_failures(table, problems.init_ok, num_transitions), plot_arrays


def audit_summary(problems: AuditProblems, table, timings: dict) -> dict:
    """Stage 5: summary.json's content (per-checkpoint aggregates, settings, timings, notes)."""
    from engine.audit import report

    bs, config = problems.beliefs, problems.config
    s, r = config.sampler, config.runtime
    return {
        "kind": bs.kind,
        "model": problems.model_name,
        "closed_form": problems.exact,
        "source": bs.source,
        "num_checkpoints": bs.num_checkpoints,
        "num_tokens": bs.num_tokens,
        "dim": bs.dim,
        "checkpoints": report.per_checkpoint(table, bs.kind),
        "settings": {
            "sampler": s.name, "chains": int(s.chains), "draws": int(s.draws), "tune": None if s.tune is None else int(s.tune),
            "seed": int(r.seed), "batch_size": r.batch_size, "precision": r.precision,
            "target_accept": float(s.target_accept), "max_tree_depth": int(s.max_tree_depth),
            "dense_mass": bool(s.dense_mass), "devices": r.devices, "interval": problems.interval,
            "target_ess": s.target_ess, "max_draws": s.max_draws_per_chain if s.is_stopping else None,
            "block_draws": int(s.block_draws) if s.is_stopping else None,
            "num_q_draws": problems.num_q_draws, "warm_start": problems.warm_start.applied,
            "dedup": problems.dedup,
        },
        "targets": {"problems": int(problems.targets.num_problems),
                    "distinct_sampled": int(problems.targets.num_targets)},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "notes": report.notes(bs, table, problems.model_name, problems.exact, problems.psis)
        + ([problems.warm_start.reason] if problems.warm_start.reason else []),
        "versions": report.versions(),
    }

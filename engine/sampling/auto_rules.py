"""The ``auto`` sampler's rules: which kernel starts a template, which precision the data allow,
and the settings of the reruns of problems that fail the gate (constants and config builders).

:mod:`engine.sampling.auto` runs them (``run_auto``) and re-exports every name here; its module
docstring explains the rules and the measurements behind them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.sampling.auto_gate import gate_ess_min

__all__ = ["CHEES_MAX_DIM", "FALLBACK_CHUNK_PER_DEVICE", "FALLBACK_MAX_DRAWS_FACTOR", "FALLBACK_MAX_WAIT_S",
           "FALLBACK_SMALL_RUNS", "FALLBACK_TARGET_ACCEPT", "FALLBACK_TUNE_FACTOR", "FLOAT32_MAX_ABS",
           "FLOAT32_MAX_ROWS", "LAST_STAGE_TARGET_ACCEPT", "NUTS_TEMPLATE_FALLBACK_TARGET_ACCEPT", "RETRY_STREAM",
           "choose_kernel", "choose_precision", "fallback_config", "fallback_stages", "is_nuts_template",
           "primary_config", "sampler_names"]

CHEES_MAX_DIM = 16
"""Largest number of unconstrained parameters for which ``auto`` starts with ChEES."""

FALLBACK_TARGET_ACCEPT = 0.95
"""Smallest ``target_accept`` of the NUTS fallback (smaller steps through curved regions)."""

FALLBACK_TUNE_FACTOR = 2
"""The fallback's warmup is this many times the run's ``tune`` (NUTS's own, 1000, when unset)."""

NUTS_TEMPLATE_FALLBACK_TARGET_ACCEPT = 0.99
"""Smallest ``target_accept`` of the fallback for a template ``auto`` starts with NUTS
(:func:`is_nuts_template`: hierarchical, or more than :data:`CHEES_MAX_DIM` parameters). On the
non-centred hierarchical attention workload (w3, 40 parameters) the divergences sit where a
scale is large and the non-centred coordinates are pinned narrowly by the data, a region the
step adapted to the bulk overshoots; at 0.95 they remained in 19 of 20 problems
(``benchmarks/results/w3_reliability.md``)."""

LAST_STAGE_TARGET_ACCEPT = 0.999
"""For a template ``auto`` starts with NUTS, problems still failing after the fallback rerun once
more at this ``target_accept`` (:func:`fallback_stages`). On w3 (20 problems, seed 0) it
certified 3 of the 4 that kept a divergence at 0.99 (``benchmarks/results/w3_reliability.md``);
the window adaptation reaches a realised acceptance of 0.96-0.997, not 0.999. The stage also
pools the step size (``SamplerConfig.pool_step_size``: every chain of a problem samples with the
smallest of its chains' adapted steps): the divergences left sit mostly in ONE chain of a problem,
often the one with the largest step; on w3's four hardest problems (two seeds) pooling certified
8 of 8 against 4 of 8 without, at 1.3x the stage's gradients and 0.65x per certified problem
(``benchmarks/results/w3_reliability.md``)."""

FALLBACK_MAX_DRAWS_FACTOR = 4
"""For a template ``auto`` starts with NUTS, the fallback draws in blocks until each problem
passes the gate (per-problem stopping, :mod:`engine.sampling.stopping`), up to this many times
``draws`` per chain."""

FALLBACK_CHUNK_PER_DEVICE = 8
"""Problems per device in a fallback chunk: failures are few, and one fixed size compiles once."""

FALLBACK_SMALL_RUNS = 2
"""Fallback chunks of the small size (:data:`FALLBACK_CHUNK_PER_DEVICE` per device) a pool of
failures may take before it reruns in chunks of the run's own size."""

RETRY_STREAM = 1 << 30
"""Offset of the key streams of a ChEES retry: problem ``i`` retries from ``fold_in(key, i +
RETRY_STREAM)``, a stream no first run uses (for runs of fewer than 2^30 problems)."""

FALLBACK_MAX_WAIT_S = 60.0
"""Longest a chunk with failing problems waits (seconds since it was sampled) for failures of
later chunks to share its fallback run (:func:`run_auto`)."""

FLOAT32_MAX_ABS = 1e4
"""Largest absolute data value for which ``precision="auto"`` picks float32."""

FLOAT32_MAX_ROWS = 10_000
"""Most elements per problem of any data container for which ``precision="auto"`` picks float32."""


# ------------------------------------------------------------------------------ choices


def is_nuts_template(compiled) -> bool:
    """Whether ``auto`` starts this template with NUTS whatever the settings: it is hierarchical
    (``CompiledModel.is_hierarchical``) or has more than :data:`CHEES_MAX_DIM` parameters."""
    return compiled.dim > CHEES_MAX_DIM or compiled.is_hierarchical


def choose_kernel(compiled, sampler) -> str:
    """The kernel ``auto`` starts with for this compiled template and ``SamplerConfig``."""
    from engine.sampling.kernels.chees_hmc import MIN_CHAINS, MIN_TUNE

    small = not is_nuts_template(compiled)
    tune_ok = sampler.tune is None or int(sampler.tune) >= MIN_TUNE  # None: ChEES's own warmup
    chees_runs = int(sampler.chains) >= MIN_CHAINS and tune_ok and not sampler.dense_mass
    return "chees" if small and chees_runs else "blackjax"


def choose_precision(problem_data) -> str:
    """``"float32"`` unless a floating data value exceeds :data:`FLOAT32_MAX_ABS` in magnitude or
    a container holds more than :data:`FLOAT32_MAX_ROWS` elements per problem: ``"float64"``."""
    for arr in problem_data.arrays.values():
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.floating):
            continue
        if arr.size and np.nanmax(np.abs(arr)) > FLOAT32_MAX_ABS:
            return "float64"
        if arr.shape[0] and arr.size // arr.shape[0] > FLOAT32_MAX_ROWS:
            return "float64"
    return "float32"


def primary_config(config, compiled):
    """``config`` (a ``BatchConfig`` of the ``auto`` sampler) with the chosen kernel;
    ChEES gets its own acceptance target (``CHEES_TARGET_ACCEPT``) unless the run asked for another than NUTS's
    default, and a run that left ``tune`` unset the kernel's own warmup (``Kernel.default_tune``:
    ChEES ``CHEES_DEFAULT_TUNE``, NUTS 1000)."""
    from engine.sampling.kernels import get_kernel
    from engine.sampling.kernels.base import DEFAULT_TARGET_ACCEPT

    s = config.sampler
    name = choose_kernel(compiled, s)
    kernel = get_kernel(name)
    target = float(s.target_accept)
    if target == DEFAULT_TARGET_ACCEPT:  # the run kept NUTS's default: each kernel's own
        target = kernel.target_accept
    tune = kernel.default_tune if s.tune is None else int(s.tune)
    return dataclasses.replace(config, sampler=dataclasses.replace(s, name=name, target_accept=target, tune=tune))


def fallback_config(config, compiled=None, can_stop: bool = True):
    """The careful rerun: BlackJAX NUTS, :data:`FALLBACK_TUNE_FACTOR` x the warmup (NUTS's 1000
    when ``tune`` is unset; at least 100 steps), ``target_accept >= FALLBACK_TARGET_ACCEPT``, trees at least as deep as NUTS's
    default, float64.

    For a ``compiled`` template that ``auto`` starts with NUTS (:func:`is_nuts_template`) also
    ``target_accept >=`` :data:`NUTS_TEMPLATE_FALLBACK_TARGET_ACCEPT` and, unless the run already
    stops per problem, ``can_stop`` is false (a ``summary_fn`` without ``num_draws=``) or the
    settings turn it off (``fallback_stopping=False``), per-problem stopping:
    ``target_ess`` the gate's ESS bar (:func:`gate_ess_min`), ``max_draws``
    :data:`FALLBACK_MAX_DRAWS_FACTOR` x ``draws``, so a problem short of ESS or R-hat draws
    more instead of failing."""
    s, r = config.sampler, config.runtime
    from engine.sampling.kernels.base import DEFAULT_MAX_TREE_DEPTH, DEFAULT_TUNE

    target = max(float(s.target_accept), FALLBACK_TARGET_ACCEPT)
    stopping = {}
    if compiled is not None and is_nuts_template(compiled):
        target = max(target, NUTS_TEMPLATE_FALLBACK_TARGET_ACCEPT)
        if can_stop and s.fallback_stopping and not s.is_stopping and int(s.chains) >= 2:
            stopping = dict(target_ess=int(np.ceil(gate_ess_min(s.chains, s.draws))),
                            max_draws=FALLBACK_MAX_DRAWS_FACTOR * int(s.draws))
    sampler = dataclasses.replace(
        s, name="blackjax", tune=max(FALLBACK_TUNE_FACTOR * int(DEFAULT_TUNE if s.tune is None else s.tune), 100),
        target_accept=target,
        max_tree_depth=max(int(s.max_tree_depth), DEFAULT_MAX_TREE_DEPTH), **stopping,
    )
    return dataclasses.replace(config, sampler=sampler, runtime=dataclasses.replace(r, precision="float64"))


def fallback_stages(config, compiled=None, can_stop: bool = True) -> tuple:
    """The reruns, in order, of the problems still failing the gate: :func:`fallback_config`;
    for a template ``auto`` starts with NUTS (:func:`is_nuts_template`) then the same at
    ``target_accept >=`` :data:`LAST_STAGE_TARGET_ACCEPT` and one step size per problem
    (``pool_step_size``; each rerun from the problem's own key stream, its gradients added to the
    earlier runs')."""
    first = fallback_config(config, compiled, can_stop)
    if compiled is None or not is_nuts_template(compiled):
        return (first,)
    target = max(float(first.sampler.target_accept), LAST_STAGE_TARGET_ACCEPT)
    last = dataclasses.replace(first.sampler, target_accept=target, pool_step_size=True)
    return first, dataclasses.replace(first, sampler=last)


def sampler_names() -> tuple[str, ...]:
    """Kernel names in the order of their codes in a summary's ``sampler_code``."""
    from engine.sampling.kernels import names

    return names()

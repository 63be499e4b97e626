"""One run of one contestant at one setting, and the ArviZ certificate of its posteriors.

A contestant is run at ``(tune, draws)`` per chain on a set of problems and returns its run
seconds, its compile seconds (measured apart) and, per problem, the worst R-hat, the smallest
bulk and tail ESS over all parameter elements and the divergence count, from ArviZ
(``az.rhat``, ``az.ess``: rank-normalised split R-hat and bulk/tail ESS, Vehtari et al. 2021).

- Engine samplers run through the public ``engine.sample_batched``, so they pick up its
  defaults (chunking, devices, kernels) as they change. Compile is timed apart: the PyMC -> JAX
  conversion (``engine.sampling.api.compile_for``, cached per template and padded shape) before
  the call, and JAX's own tracing, lowering and XLA compilation during it (the union of the
  time spans JAX reports through ``jax.monitoring``).
- nutpie is compiled once per template (``compile_pymc_model``) and given each problem's data
  with ``with_data``; its numba backend is tried first and, if it cannot compile the template,
  the JAX backend (the row says which).
- ``pm.sample`` runs with its defaults but ``tune``/``draws``/``chains``; it compiles inside
  every call, which is what its user pays, so its compile is counted in its run time.

A posterior is certified only once its diagnostics are computed, so each run also pays for its
certificate (``Run.certify_s``): nothing more where the run judges its own draws (``auto``'s
on-device gate, per-problem stopping's gate), and otherwise the fastest route on offer, the
engine's batched diagnostics (:func:`certify_seconds`) on the run's draws, for nutpie and
pm.sample as for the engine's other rows. The pass/fail verdict itself is always ArviZ's.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GATE", "Run", "certify_posterior", "certify_seconds", "certify_draws", "certified_mask", "CompileClock",
    "pick_problems", "run_engine", "NutpieLoop", "run_pymc", "stopping_keyword",
]

GATE = {"r_hat_max": 1.01, "ess_bulk_min": 400.0, "ess_tail_min": 400.0, "divergences": 0}
"""A certified posterior: R-hat < 1.01, bulk and tail ESS >= 400 for every parameter element,
and no divergent transition (the audit's ``converged``)."""

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
"""JAX's compile-phase events (``jax._src.dispatch``): tracing, lowering, XLA compilation."""


@dataclass
class Run:
    """One contestant at one setting.

    run_s
        Wall seconds of sampling all ``problems`` (with compile removed where it is measured).
    compile_s
        Wall seconds of compilation measured apart (0 where it is inside every call).
    cert
        Per-problem arrays ``r_hat_max``, ``ess_bulk_min``, ``ess_tail_min``, ``divergences``.
    problems
        Indices of the problems run.
    note
        Anything the row should say (backend fallback, ...).
    certify_s
        Wall seconds of certifying all ``problems`` beyond ``run_s`` (0 where the run judges its
        own draws; :func:`certify_seconds` otherwise); its compile is in ``compile_s``.
    """

    run_s: float
    compile_s: float
    cert: dict
    problems: list
    note: str = ""
    extra: dict = field(default_factory=dict)
    certify_s: float = 0.0


# ------------------------------------------------------------------------------ certificate
def certify_posterior(posterior, diverging, var_names, num_draws=None) -> dict:
    """ArviZ diagnostics per problem of an xarray posterior with dims ``(chain, draw, problem, ...)``.

    ``diverging`` has dims ``(chain, draw, problem)``. Returns ``[problem]`` arrays: worst R-hat,
    smallest bulk and tail ESS over all elements of ``var_names``, and divergence counts.
    ``num_draws`` (``[problem]``, per-problem stopping): problem ``p`` is judged on its first
    ``num_draws[p]`` draws only (the rest are NaN padding), one ArviZ call per distinct count.
    """
    import arviz as az

    if num_draws is not None:
        num_draws = np.asarray(num_draws, dtype=int)
        out = {}
        for n in np.unique(num_draws):
            idx = np.flatnonzero(num_draws == n)
            part = certify_posterior(posterior.isel(problem=idx, draw=slice(0, int(n))),
                                     diverging.isel(problem=idx, draw=slice(0, int(n))), var_names)
            for key, value in part.items():
                out.setdefault(key, np.zeros(len(num_draws), value.dtype))[idx] = value
        return out

    post = posterior[list(var_names)]
    stats = {
        "r_hat_max": (az.rhat(post), np.nanmax, -np.inf),
        "ess_bulk_min": (az.ess(post, method="bulk"), np.nanmin, np.inf),
        "ess_tail_min": (az.ess(post, method="tail"), np.nanmin, np.inf),
    }
    out = {}
    for key, (ds, reduce, _) in stats.items():
        per_var = []
        for name in var_names:
            a = np.asarray(ds[name].transpose("problem", ...).values, dtype=float)
            a = a.reshape(a.shape[0], -1)
            bad = np.isnan(a).any(axis=1)  # a NaN diagnostic fails the problem
            v = reduce(a, axis=1)
            v[bad] = np.inf if key == "r_hat_max" else 0.0
            per_var.append(v)
        out[key] = (np.max if key == "r_hat_max" else np.min)(np.stack(per_var), axis=0)
    out["divergences"] = np.asarray(diverging.transpose("problem", ...).values).reshape(
        out["r_hat_max"].shape[0], -1).sum(axis=1).astype(int)
    return out


def certify_draws(draws: dict, diverging: np.ndarray) -> dict:
    """:func:`certify_posterior` of ``{name: [problem, chain, draw, ...]}`` and ``[problem, chain, draw]``."""
    import xarray as xr

    data = {}
    for name, v in draws.items():
        v = np.moveaxis(np.asarray(v, dtype=float), 0, 2)  # [chain, draw, problem, ...]
        dims = ["chain", "draw", "problem"] + [f"{name}_dim_{i}" for i in range(v.ndim - 3)]
        data[name] = (dims, v)
    div = xr.DataArray(np.moveaxis(np.asarray(diverging), 0, 2), dims=["chain", "draw", "problem"])
    return certify_posterior(xr.Dataset(data), div, list(draws))


def certify_seconds(draws: dict) -> tuple[float, float]:
    """``(seconds, compile seconds)`` of certifying posteriors ``{name: [problem, chain, draw,
    ...]}`` the fastest way on offer: the engine's batched diagnostics (rank-normalised split
    R-hat, bulk and tail ESS of every element: :func:`engine.sampling.gate.masked_diagnostics`,
    what ``auto``'s gate computes on the device) of every problem at once, in float32, sharded
    over the local devices. A first call compiles; the second, from host arrays, is timed."""
    import jax
    from jax.sharding import Mesh, PartitionSpec

    from engine.sampling import gate

    parts = [np.asarray(v, np.float32).reshape(np.shape(v)[:3] + (-1,)) for v in draws.values()]
    x = np.ascontiguousarray(np.moveaxis(np.concatenate(parts, axis=-1), -1, 1))  # [problem, element, chain, draw]
    devices = jax.local_devices()
    pad = -len(x) % len(devices)
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])

    def worst(a):
        d = gate.masked_diagnostics(a, a.shape[-1])
        return d["r_hat"].max(-1), d["ess_bulk"].min(-1), d["ess_tail"].min(-1)

    spec = PartitionSpec("problem")
    fn = jax.jit(jax.shard_map(worst, mesh=Mesh(np.array(devices), ("problem",)), in_specs=spec,
                               out_specs=spec, check_vma=False))
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        seconds.append(time.perf_counter() - t)
    return seconds[1], max(seconds[0] - seconds[1], 0.0)


def certified_mask(cert: dict) -> np.ndarray:
    """``[problem]`` passes :data:`GATE` (NaN fails)."""
    with np.errstate(invalid="ignore"):
        return (
            (np.asarray(cert["r_hat_max"], float) < GATE["r_hat_max"])
            & (np.asarray(cert["ess_bulk_min"], float) >= GATE["ess_bulk_min"])
            & (np.asarray(cert["ess_tail_min"], float) >= GATE["ess_tail_min"])
            & (np.asarray(cert["divergences"]) <= GATE["divergences"])
        )


# ------------------------------------------------------------------------------ timing
class CompileClock:
    """Seconds JAX spends compiling (tracing, lowering, XLA) while the context is open.

    Overlapping spans (a trace nested in another) are counted once: the length of their union.
    """

    def __enter__(self):
        from jax import monitoring

        self._spans = []

        def listener(event, start, end, **kwargs):
            if event in COMPILE_EVENTS:
                self._spans.append((start, end))

        self._listener = listener
        monitoring.register_event_time_span_listener(listener)
        return self

    def __exit__(self, *exc):
        from jax import monitoring

        monitoring.unregister_event_time_span_listener(self._listener)

    @property
    def seconds(self) -> float:
        total, cur_start, cur_end = 0.0, None, None
        for start, end in sorted(self._spans):
            if cur_end is None or start > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_end is not None:
            total += cur_end - cur_start
        return total


def pick_problems(data: dict, problems) -> dict:
    """The workload data of ``problems`` only (arrays indexed, ragged lists picked)."""
    idx = list(problems)
    return {
        k: [v[i] for i in idx] if isinstance(v, (list, tuple)) else np.asarray(v)[idx]
        for k, v in data.items()
    }


# ------------------------------------------------------------------------------ contestants
def stopping_keyword() -> str | None:
    """``"target_ess"`` if ``engine.sample_batched`` stops problems early by ESS, else None."""
    from engine import sample_batched
    from engine.sampling import api

    options = set(inspect.signature(sample_batched).parameters) | set(getattr(api, "_OPTIONS", ()))
    return "target_ess" if "target_ess" in options else None


def run_engine(model, data, problems, *, sampler, precision, tune, draws, chains, seed,
               devices=None, batch_size=None, extra_kw=None, conversion_cache=None, warm_rerun=True,
               fresh_compile=False) -> Run:
    """``sample_batched`` on ``problems`` at one setting; compile timed apart.

    With ``warm_rerun`` (the default) the same call runs twice: the run time is the second,
    warm call's wall time, and the compile is what the first call took beyond it. Without it,
    the run time is the one call's wall time less the union of JAX's compile spans, which
    undercounts the run wherever sampling overlaps a compile (per-problem stopping on several
    devices: one device samples while the other compiles its own programs).

    ``conversion_cache`` (a dict) keeps the PyMC -> JAX conversion time of a template and data
    shape so later settings, which reuse the converted model, still count it in their compile.
    ``fresh_compile`` drops the process's compiled programs first, so a setting another row
    already ran (the defaults row after ``auto``'s climb) pays its compile as a new process would.
    """
    from engine import sample_batched
    from engine.model.compile import prepare_data
    from engine.sampling.api import compile_for

    subset = pick_problems(data, problems)
    key = (id(model), len(problems))
    cache = conversion_cache if conversion_cache is not None else {}
    if key not in cache:
        t = time.perf_counter()
        compile_for(model, prepare_data(model, subset))
        cache[key] = time.perf_counter() - t
    if fresh_compile:
        import jax

        from engine.sampling import programs

        programs._PROGRAMS.clear()
        jax.clear_caches()
    kw = dict(sampler=sampler, chains=chains, draws=draws, tune=tune, seed=seed, precision=precision,
              batch_size=batch_size, progress=False, **(extra_kw or {}))
    if devices is not None:  # None: sample_batched's own (every local device)
        kw["devices"] = devices
    with CompileClock() as clock:
        t = time.perf_counter()
        idata = sample_batched(model, subset, **kw)
        total = time.perf_counter() - t
    extra = {"conversion_s": cache[key], "jax_compile_s": clock.seconds, "cold_s": total}
    if warm_rerun:
        with CompileClock() as again:
            t = time.perf_counter()
            idata = sample_batched(model, subset, **kw)
            warm = time.perf_counter() - t
        run_s, compile_s = warm, cache[key] + max(total - warm, 0.0)
        extra.update(warm_s=warm, warm_compile_s=again.seconds)
    else:
        run_s, compile_s = max(total - clock.seconds, 1e-9), cache[key] + clock.seconds
    names = [rv.name for rv in model.free_RVs]
    num_draws = idata.sample_stats["num_draws"].values if "num_draws" in idata.sample_stats else None
    cert = certify_posterior(idata.posterior, idata.sample_stats["diverging"], names, num_draws)
    certify_s = 0.0
    if sampler != "auto" and (extra_kw or {}).get("target_ess") is None:  # no gate judged it in the run
        certify_s, certify_compile = certify_seconds(
            {n: np.moveaxis(idata.posterior[n].values, 2, 0) for n in names})  # [problem, chain, draw, ...]
        compile_s += certify_compile
    return Run(run_s=run_s, compile_s=compile_s, cert=cert, problems=list(problems), extra=extra,
               certify_s=certify_s)


class NutpieLoop:
    """nutpie compiled once for a template; :meth:`run` samples problems one by one with ``with_data``.

    The numba backend is tried first (nutpie's default, its fastest); where it fails to compile or
    to sample the template, the numba backend on ``equivalent`` (a workload's same posterior in
    another form, ``(model, data -> data)``: w2 with Cholesky factors for nutpie 0.16's numba
    Cholesky, which cannot write to its read-only data), then the JAX backend
    (``gradient_backend="jax"``, ``freeze_model=False`` so the data can be swapped), and
    :attr:`note` says why. Compile time = ``compile_pymc_model`` + one tiny warm-up sample (the
    JAX backend traces and compiles on its first call).
    """

    def __init__(self, model, data, cores=None, equivalent=None, sample_kw=None):
        from engine.model.compile import prepare_data

        self.model, self.cores = model, cores
        self.sample_kw = dict(sample_kw or {})  # nutpie's own settings (target_accept, ...)
        self.note = ""
        tries = [("numba", model, data, "")]
        if equivalent is not None:
            alt_model, to_alt = equivalent()
            tries.append(("numba", alt_model, to_alt(data), " on the workload's equivalent template"))
        tries.append(("jax", model, data, ""))
        errors = []
        for backend, form, form_data, where in tries:
            t = time.perf_counter()
            try:
                self.problem_data = prepare_data(form, form_data)
                self._compile(form, backend)
                self._sample(0, tune=5, draws=5, seed=0)  # warm-up: JIT of the JAX backend
            except Exception as err:  # noqa: BLE001 - any backend failure moves on to the next
                errors.append(f"{backend}{where}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                continue
            self.compile_s = time.perf_counter() - t
            if errors:
                self.note = f"nutpie numba backend failed ({errors[0]}); {backend} backend{where} used"
            return
        raise RuntimeError("nutpie could not compile the template: " + "; ".join(errors))

    def _compile(self, model, backend):
        import nutpie

        kw = {} if backend == "numba" else {"gradient_backend": "jax", "freeze_model": False}
        self.compiled = nutpie.compile_pymc_model(model, backend=backend, **kw)
        self.backend = backend

    def _sample(self, i, *, tune, draws, seed, chains=4):
        import nutpie

        from engine.sampling.kernels.pymc_default import problem_inputs

        kw = dict(self.sample_kw) if self.cores is None else {**self.sample_kw, "cores": self.cores}
        return nutpie.sample(
            self.compiled.with_data(**problem_inputs(self.problem_data, i)), draws=draws, tune=tune,
            chains=chains, seed=seed, progress_bar=False, **kw,
        )

    def run(self, problems, *, tune, draws, chains, seed) -> Run:
        names = [rv.name for rv in self.model.free_RVs]
        collected = {n: [] for n in names}
        div = []
        t = time.perf_counter()
        for i in problems:
            trace = self._sample(i, tune=tune, draws=draws, chains=chains, seed=seed * 1_000_003 + i)
            for n in names:
                collected[n].append(trace.posterior[n].values)
            div.append(trace.sample_stats["diverging"].values)
        run_s = time.perf_counter() - t
        draws = {n: np.stack(v) for n, v in collected.items()}
        cert = certify_draws(draws, np.stack(div))
        certify_s, certify_compile = certify_seconds(draws)
        return Run(run_s=run_s, compile_s=self.compile_s + certify_compile, cert=cert, problems=list(problems),
                   note=self.note, extra={"backend": self.backend}, certify_s=certify_s)


def run_pymc(model, data, problems, *, tune, draws, chains, seed) -> Run:
    """A loop of plain ``pm.sample`` (through ``sample_batched(sampler="pymc")``) on ``problems``."""
    from engine import sample_batched

    subset = pick_problems(data, problems)
    t = time.perf_counter()
    idata = sample_batched(model, subset, sampler="pymc", chains=chains, draws=draws, tune=tune,
                           seed=seed, progress=False)
    run_s = time.perf_counter() - t
    names = [rv.name for rv in model.free_RVs]
    cert = certify_posterior(idata.posterior, idata.sample_stats["diverging"], names)
    certify_s, certify_compile = certify_seconds({n: np.moveaxis(idata.posterior[n].values, 2, 0) for n in names})
    return Run(run_s=run_s, compile_s=certify_compile, cert=cert, problems=list(problems),
               note="compiles inside every call (counted in run time)", certify_s=certify_s)

"""Throughput of the batch engine against a loop of ``pm.sample``, measured side by side.

``python -m benchmarks.throughput [--quick] [options]`` runs, in ONE process, for every workload
(``benchmarks.workloads``) and every problem count N:

- the engine with BlackJAX and with NumPyro NUTS (any of ``blackjax``, ``numpyro``, optionally
  suffixed ``:dense`` and/or ``:f32``), on the realistic audit path: draws stay on the device and
  a per-problem summary (rank-normalised split R-hat, bulk/tail ESS from
  ``engine.sampling.diagnostics.summarize_draws``, divergences, leapfrog-step counts) comes back;
- the user's real alternative, a loop of plain ``pm.sample`` (defaults; draws, tune and chains
  matched), on a stated, evenly spread subset of the problems;
- nutpie in the same loop, when it is importable (the optional ``nutpie`` extra).

Timing rules (STYLE.md item 11): the PyMC -> JAX conversion, JAX tracing and XLA compilation are
timed apart from running (AOT ``.lower().compile()`` of the chunk program that
``engine.sampling.batch.run_batched`` builds), every run ends with the results on the host, run-only times
are medians over repeats, and the machine, versions, settings and load average are written next
to every figure. "End to end" = PyMC->JAX + trace + XLA compile + run; a fresh process pays
exactly that. Only problems that pass the quality gate (R-hat < 1.01 and bulk ESS >= 400 for
every parameter) count in posteriors/s and ESS/s; the pass share is reported.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass

from benchmarks.engine_bench import EngineProgram, bench_auto, bench_engine, lockstep, make_summary_fn  # noqa: F401
from benchmarks.loops import bench_nutpie, bench_pymc, loop_problems, nutpie_available  # noqa: F401
from benchmarks.measure import GATE, gate_mask  # noqa: F401
from benchmarks.workloads import WORKLOADS, get_workload
from engine.sampling.kernels import REGISTRY
from engine.sampling.kernels.base import CHEES_TARGET_ACCEPT

__all__ = ["Contestant", "parse_contestant", "main", "run_benchmark", "GATE"]

LOOP_SAMPLERS = ("pymc", "nutpie")
"""Per-problem loops: the ``pm.sample`` baseline (the engine's host kernel) and nutpie."""
ENGINE_SAMPLERS = tuple(name for name in REGISTRY if name not in LOOP_SAMPLERS)
"""The engine's batched kernels: every registered sampler (``engine.sampling.kernels.REGISTRY``) but the loop."""


@dataclass(frozen=True)
class Contestant:
    """One way of sampling all problems.

    label
        The spec as given, e.g. ``"blackjax:dense:f32"``.
    sampler
        "blackjax", "numpyro" (the engine) or "pymc", "nutpie" (a per-problem loop).
    dense_mass
        Engine only: adapt a dense inverse mass matrix.
    precision
        Engine only: "float64" or "float32".
    nutpie_kw
        nutpie only: ``(name, value)`` pairs passed to ``nutpie.sample`` (its own settings:
        ``lowrank`` -> ``low_rank_modified_mass_matrix=True``, ``ta0.95`` -> ``target_accept=0.95``).
    """

    label: str
    sampler: str
    dense_mass: bool = False
    precision: str = "float64"
    nutpie_kw: tuple = ()

    @property
    def is_engine(self) -> bool:
        return self.sampler in ENGINE_SAMPLERS


def _nutpie_option(spec: str, opt: str) -> tuple:
    if opt == "lowrank":
        return ("low_rank_modified_mass_matrix", True)
    if opt.startswith("ta"):
        try:
            value = float(opt[2:])
        except ValueError:
            value = -1.0
        if 0 < value < 1:
            return ("target_accept", value)
    raise ValueError(f"contestant {spec!r}: unknown nutpie option {opt!r} (lowrank, ta<target_accept>, e.g. ta0.95)")


def parse_contestant(spec: str, default_precision: str = "float64") -> Contestant:
    """``"blackjax"``, ``"numpyro:dense"``, ``"blackjax:f32"``, ``"pymc"``, ``"nutpie"``,
    ``"nutpie:lowrank:ta0.95"`` -> Contestant."""
    base, *opts = spec.strip().split(":")
    if base not in ENGINE_SAMPLERS + LOOP_SAMPLERS:
        raise ValueError(f"unknown contestant {spec!r}; base must be one of {ENGINE_SAMPLERS + LOOP_SAMPLERS}")
    if base == "nutpie":
        return Contestant(spec.strip(), base, nutpie_kw=tuple(_nutpie_option(spec, opt) for opt in opts))
    dense, precision = False, ("auto" if base == "auto" else default_precision)  # auto: the defaults' row
    for opt in opts:
        if opt == "dense":
            dense = True
        elif opt in ("f32", "float32"):
            precision = "float32"
        elif opt in ("f64", "float64"):
            precision = "float64"
        else:
            raise ValueError(f"contestant {spec!r}: unknown option {opt!r} (dense, f32, f64)")
    if base in LOOP_SAMPLERS and opts:
        raise ValueError(f"contestant {spec!r}: {base} runs with its own defaults, no options")
    return Contestant(spec.strip(), base, dense, precision if base in ENGINE_SAMPLERS else "float64")


# ------------------------------------------------------------------------------ driver
FULL = {
    "workloads": "w1,w2,w3,w4", "contestants": ["blackjax,numpyro,pymc,nutpie"], "chains": 4,
    "draws": 1000, "tune": 1000, "batch_size": ["100"], "loop_problems": ["10"], "repeats": 3,
    "n": ["10,100,1000,10000"],
}
"""Defaults of the full benchmark (the issue's target setting: 4 chains x 1000 tune + 1000 draws)."""

QUICK = {
    "workloads": "w1", "contestants": ["blackjax,numpyro,pymc,nutpie"], "draws": 500, "tune": 500,
    "batch_size": ["10"], "loop_problems": ["2"], "repeats": 1, "n": ["10,40"],
}
"""``--quick`` (CI smoke size, < 2 minutes on 2 cores); any option given explicitly wins."""


def parse_contestants_map(values: list[str], default: str, precision: str = "float64") -> dict[str, list[Contestant]]:
    """``["auto,nutpie", "w3=auto,nutpie:ta0.99"]`` -> ``{"*": [...], "w3": [...]}`` (``--contestants``)."""
    out: dict[str, list[Contestant]] = {}
    for value in values:
        name, _, specs = value.rpartition("=")
        if name and name not in WORKLOADS:
            raise ValueError(f"--contestants {value!r}: unknown workload {name!r}")
        out[name or "*"] = [parse_contestant(c, precision) for c in specs.split(",") if c.strip()]
    out.setdefault("*", [parse_contestant(c, precision) for c in default.split(",") if c.strip()])
    return out


def parse_per_workload(option: str, values: list[str], default: str) -> dict[str, int]:
    """``["100", "w2=20"]`` -> ``{"*": 100, "w2": 20}`` for an integer option."""
    out: dict[str, int] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        if name and name not in WORKLOADS:
            raise ValueError(f"{option} {value!r}: unknown workload {name!r}")
        if not number.isdigit():
            raise ValueError(f"{option} {value!r}: give a non-negative integer")
        out[name or "*"] = int(number)
    out.setdefault("*", int(default))
    return out


def parse_n(values: list[str], workloads: list[str]) -> dict[str, list[int]]:
    """``["10,100", "w3=10,50"]`` -> ``{"*": [10, 100], "w3": [10, 50]}``."""
    out: dict[str, list[int]] = {}
    for value in values:
        name, _, nums = value.rpartition("=")
        name = name or "*"
        if name != "*" and name not in WORKLOADS:
            raise ValueError(f"--n {value!r}: unknown workload {name!r}")
        counts = sorted({int(x) for x in nums.split(",") if x})
        if not counts or counts[0] < 1:
            raise ValueError(f"--n {value!r}: give positive problem counts")
        out[name] = counts
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Posteriors per second of the batch engine vs a loop of pm.sample (one run).",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke size: w1, N=10,40, 500+500 draws, < 2 min")
    p.add_argument("--workloads", help="comma list of %s (default all)" % ",".join(WORKLOADS))
    p.add_argument("--n", action="append", metavar="[wX=]N1,N2",
                   help="problem counts (default 10,100,1000,10000); repeat with wX= for one workload's")
    p.add_argument("--contestants", action="append", metavar="[wX=]C1,C2",
                   help="comma list: blackjax|numpyro[:dense][:f32], pymc, nutpie (default "
                   "blackjax,numpyro,pymc,nutpie); repeat with wX= for one workload's")
    p.add_argument("--max-n", action="append", metavar="CONTESTANT=N", default=[],
                   help="largest N a contestant runs (e.g. numpyro=1000 to save time); repeatable")
    p.add_argument("--chains", type=int)
    p.add_argument("--draws", type=int)
    p.add_argument("--tune", type=int)
    p.add_argument("--precision", choices=["float64", "float32"], default="float64",
                   help="engine precision unless a contestant says :f32/:f64")
    p.add_argument("--batch-size", action="append", metavar="[wX=]B",
                   help="problems per compiled chunk (default 100; 0: all at once); repeat with wX= "
                   "for one workload's")
    p.add_argument("--target-accept", type=float, default=0.8, help="NUTS contestants (PyMC's default)")
    p.add_argument("--chees-target-accept", type=float, default=CHEES_TARGET_ACCEPT,
                   help="the chees contestant (conf/sampler/chees.yaml)")
    p.add_argument("--max-tree-depth", type=int, default=10)
    p.add_argument("--loop-problems", action="append", metavar="[wX=]K",
                   help="problems the pm.sample / nutpie loops run (default 10); repeat with wX= for "
                   "one workload's")
    p.add_argument("--repeats", type=int, help="run-only repeats, median reported (default 3)")
    p.add_argument("--repeat-budget-s", type=float, default=60.0,
                   help="no further repeat once the runs of one row took this long")
    p.add_argument("--cpu-eigen", choices=["single", "multi"], default="single",
                   help="XLA:CPU intra-op (Eigen) threads: 'single' (default, as in results/full) "
                   "adds --xla_cpu_multi_thread_eigen=false to XLA_FLAGS")
    p.add_argument("--cpu-scheduler", choices=["safe", "default"], default="safe",
                   help="'safe' (default; the engine's CLI does the same) adds "
                   "--xla_cpu_enable_concurrency_optimized_scheduler=false: jaxlib 0.10.2 otherwise "
                   "can deadlock in batched LAPACK kernels (w2) on few cores")
    p.add_argument("--devices", type=int, default=1,
                   help="devices to shard each chunk over (on CPU: forced host devices, one per "
                   "core with -1); the pm.sample loop is unaffected")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", help="file stem of the results (default: quick or full)")
    p.add_argument("--note", action="append", help="a line of context written into the results (repeatable)")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse ``argv``; unset options take the ``--quick`` or the full defaults."""
    args = build_parser().parse_args(argv)
    preset = {**FULL, **QUICK} if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        get_workload(w)
    args.contestants_map = parse_contestants_map(args.contestants, preset["contestants"][0], args.precision)
    args.max_n_map = {}
    for value in args.max_n:
        label, _, cap = value.rpartition("=")
        if not label or not cap.isdigit():
            raise ValueError(f"--max-n {value!r}: give CONTESTANT=N")
        args.max_n_map[label] = int(cap)
    n_map = parse_n(args.n, args.workloads)
    n_map.setdefault("*", parse_n(preset["n"], args.workloads)["*"])
    args.n_map = n_map
    args.batch_size_map = parse_per_workload("--batch-size", args.batch_size, preset["batch_size"][0])
    args.loop_problems_map = parse_per_workload("--loop-problems", args.loop_problems, preset["loop_problems"][0])
    args.tag = args.tag or ("quick" if args.quick else "full")
    return args


def run_benchmark(args: argparse.Namespace, log=print, on_row=None) -> dict:
    """Run every workload x contestant x N; returns the results dict (also written by ``report``).

    ``on_row(results_so_far)`` is called after every row, so a run that is stopped (or wedged)
    keeps what it measured.
    """
    from benchmarks import report

    meta = report.machine_info()
    meta["load_avg_start"] = list(os.getloadavg())
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    t_start = time.perf_counter()
    rows, notes = [], list(args.note or [])
    settings = {k: v for k, v in vars(args).items() if k not in ("contestants_map", "n")}
    settings["contestants_map"] = {w: [c.label for c in cs] for w, cs in args.contestants_map.items()}
    settings["gate"] = GATE

    def snapshot() -> dict:
        report.add_ratios(rows)
        meta["load_avg_end"] = list(os.getloadavg())
        meta["wall_s"] = time.perf_counter() - t_start
        return {"meta": dict(meta), "settings": settings, "rows": list(rows), "notes": list(notes)}

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(snapshot())

    ok_nutpie, why = nutpie_available()
    for wname in args.workloads:
        workload = get_workload(wname)
        ns = args.n_map.get(wname, args.n_map["*"])
        model = workload.build_model()
        data = workload.make_data(max(ns), args.seed)
        for contestant in args.contestants_map.get(wname, args.contestants_map["*"]):
            base = {"workload": wname, "contestant": contestant.label, "sampler": contestant.sampler,
                    "precision": contestant.precision, "dense_mass": contestant.dense_mass}
            if contestant.sampler == "nutpie" and not ok_nutpie:
                if f"nutpie skipped: {why}" not in notes:
                    notes.append(f"nutpie skipped: {why}")
                log(f"[{wname}] nutpie skipped: {why}")
                continue
            if not contestant.is_engine:
                problems = loop_problems(max(ns), args.loop_problems_map.get(wname, args.loop_problems_map["*"]))
                log(f"[{wname}] {contestant.label}: loop over {len(problems)} of {max(ns)} problems ...")
                if contestant.sampler == "pymc":
                    fn = bench_pymc
                else:
                    fn = functools.partial(bench_nutpie, sample_kw=dict(contestant.nutpie_kw))
                try:
                    row = {**base, **fn(model, data, problems, args)}
                except Exception as err:  # a contestant that fails is recorded, not fatal
                    notes.append(f"{wname} {contestant.label} failed: {type(err).__name__}: {err}")
                    log(notes[-1])
                    continue
                add(row)
                log(f"    {row['ms_per_posterior_e2e']:.0f} ms/posterior, pass {row['pass_share']:.0%}")
                continue
            programs: dict = {}
            cap = args.max_n_map.get(contestant.label)
            for n in ns:
                if cap is not None and n > cap:
                    notes.append(f"{wname} {contestant.label}: N={n} not run (--max-n {contestant.label}={cap})")
                    continue
                log(f"[{wname}] {contestant.label} N={n} ...")
                if contestant.sampler == "auto":  # the defaults: sample_batched end to end
                    row = {**base, **bench_auto(model, data, n, args, log=log, workload_name=wname)}
                else:
                    row = {**base, **bench_engine(model, data, n, contestant, args, programs, log=log,
                                                  workload_name=wname)}
                add(row)
                log(
                    f"    compile {row['compile_s']:.1f}s{' (reused)' if row['compile_reused'] else ''}, "
                    f"run {row['run_s']:.2f}s, {row['ms_per_posterior_run']:.2f} ms/posterior run, "
                    f"pass {row['pass_share']:.1%}, lockstep {row.get('lockstep_efficiency', float('nan')):.2f}"
                )
    return snapshot()


from engine.platform import CPU_XLA_FLAGS, backend_started  # noqa: E402  (imports no JAX)

EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"
SCHEDULER_FLAG = CPU_XLA_FLAGS[0]
"""The engine's own CPU workaround (``engine.platform.CPU_XLA_FLAGS``, set by ``import engine``): with it, w2 in chunks of 100
ran; without it (with or without ``EIGEN_FLAG``) such chunks deadlocked in jaxlib 0.10.2's batched
LAPACK kernels (``lapack_dtrsm_ffi`` -> ``ParallelBatchMap``) on 2 cores."""


def configure_xla(cpu_eigen: str, cpu_scheduler: str = "safe", devices: int = 1) -> None:
    """Add the XLA:CPU workarounds (and host devices) to ``XLA_FLAGS`` before JAX starts."""
    wanted = [EIGEN_FLAG] if cpu_eigen == "single" else []
    if cpu_scheduler != "safe":  # measure without the engine's workaround (set by import engine)
        name = SCHEDULER_FLAG.split("=")[0]
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(name)]
        os.environ["XLA_FLAGS"] = " ".join(kept)
    if devices != 1:
        count = (os.cpu_count() or 1) if devices == -1 else devices
        wanted.append(f"--xla_force_host_platform_device_count={count}")
    if not wanted:
        return
    if backend_started():
        raise RuntimeError("XLA_FLAGS workarounds must be applied before JAX starts its backend")
    from engine.platform import add_xla_flags

    add_xla_flags(*wanted)


def main(argv=None) -> int:
    args = resolve_args(argv)
    configure_xla(args.cpu_eigen, args.cpu_scheduler, args.devices)
    from benchmarks import report

    results = run_benchmark(
        args, log=lambda m: print(m, flush=True),
        on_row=lambda partial: report.write_results(partial, args.out, args.tag),
    )
    paths = report.write_results(results, args.out, args.tag)
    print("\n" + report.markdown_table(results["rows"]))
    print("\nwrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

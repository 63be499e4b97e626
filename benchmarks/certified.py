"""Time to a certified posterior: each contestant at the cheapest settings that certify >= 99%.

``python -m benchmarks.certified [--quick] [options]`` runs, in ONE process, for every workload
(``benchmarks.workloads``) and every contestant:

- the engine's samplers (``blackjax``, ``numpyro``, ``stepwise``, ``chees``; ``:f32`` for
  float32, ``:dense`` for a dense mass matrix) through the public ``engine.sample_batched`` on
  the first N problems; ``auto`` also once as a user runs it, ``defaults``: no flags but
  ``chains`` and ``seed`` (``tune`` unset: each kernel's own warmup; 1000 draws);
- nutpie, compiled once per template and given each problem's data with ``with_data``, on a
  spread subset of the problems;
- a loop of plain ``pm.sample`` on a few problems.

Each contestant climbs a ladder of ``tune x draws`` per chain (4 chains) from the cheapest, goes
``PATIENCE`` (2) settings past the first where at least 99% of its problems are certified and
keeps the fastest certifying one; certified: R-hat < 1.01, bulk
and tail ESS >= 400 for every parameter element (ArviZ), no divergence. Its time to a certified
posterior is

    (run seconds / problems + compile seconds / 10,000) / pass share,

compile measured apart and amortised over N = 10,000 posteriors (``--amortise-n``), so a
contestant's compile counts as it would in an audit of 10^4 tokens. Ratios to nutpie and to
``pm.sample`` are taken within one workload, in the same process run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks.certified_runs import (
    GATE, NutpieLoop, certified_mask, run_engine, run_pymc, stopping_keyword,
)
from benchmarks.loops import loop_problems, nutpie_available
from benchmarks.throughput import configure_xla, parse_contestants_map, parse_per_workload
from benchmarks.workloads import WORKLOADS, get_workload

__all__ = ["LADDER", "PASS_SHARE", "parse_ladder", "resolve_args", "time_to_certified", "run", "main"]

LADDER = ((200, 200), (300, 300), (200, 500), (300, 700), (500, 500), (300, 1000), (1000, 1000), (2000, 2000))
"""``(tune, draws)`` per chain, cheapest first (by ``tune + draws``); every contestant climbs the same
ladder. Warmup and draws are varied apart: ChEES and nutpie settle in a few hundred warmup steps
and then need draws, not warmup, to reach ESS 400."""
DEFAULTS_DRAWS = 1000
"""Draws per chain of the ``defaults`` row (``sample_batched``'s default; its ``tune`` is unset)."""
PASS_SHARE = 0.99
"""Share of problems a setting must certify to be chosen."""
PATIENCE = 2
"""Settings tried past the first that certifies (the fastest certifying one is chosen)."""
AMORTISE_N = 10_000
"""Posteriors a compile is spread over in the time-to-certified figure."""

FULL = dict(workloads="w1,w2,w4", n=200, nutpie_problems=20, pymc_problems=4, chains=4,
            contestants="chees:f32,chees,blackjax:f32,blackjax,stepwise:f32,numpyro:f32,nutpie,pymc",
            ladder=",".join(f"{t}x{d}" for t, d in LADDER), tag="certified")
QUICK = dict(workloads="w1", n=8, nutpie_problems=2, pymc_problems=1,
             contestants="chees:f32,pymc", ladder="150x150,300x300", tag="certified_quick")
"""``--quick``: a smoke run (tens of seconds); any option given explicitly wins."""


def parse_ladder(text: str) -> list[tuple[int, int]]:
    """``"200x200,500x500"`` -> ``[(200, 200), (500, 500)]`` (tune x draws), cheapest first."""
    out = []
    for part in text.split(","):
        tune, sep, draws = part.strip().partition("x")
        if not sep or not tune.isdigit() or not draws.isdigit() or int(draws) < 4:
            raise ValueError(f"--ladder {part!r}: give TUNExDRAWS, e.g. 500x500")
        out.append((int(tune), int(draws)))
    return sorted(out, key=lambda s: s[0] + s[1])


def time_to_certified(run_s: float, n: int, compile_s: float, pass_share: float,
                      amortise_n: int = AMORTISE_N) -> float:
    """Seconds per certified posterior: ``(run_s / n + compile_s / amortise_n) / pass_share``."""
    if pass_share <= 0:
        return float("inf")
    return (run_s / n + compile_s / amortise_n) / pass_share


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.certified", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: w1, N=8, 2 settings")
    p.add_argument("--workloads", help="comma list of %s (default w1,w2,w4)" % ",".join(WORKLOADS))
    p.add_argument("--contestants", action="append", help="comma list: auto, blackjax|numpyro|stepwise|"
                   "chees[:dense][:f32], nutpie[:lowrank][:ta0.95], pymc (default: %s); repeat with wX= for "
                   "one workload's (--contestants w3=auto,nutpie:ta0.99)" % FULL["contestants"])
    p.add_argument("--n", action="append", help="problems the engine samples (default 200); repeat with wX= "
                   "for one workload's (--n w3=8)")
    p.add_argument("--nutpie-problems", action="append", help="problems the nutpie loop samples (default 20; "
                   "wX=N for one workload's)")
    p.add_argument("--pymc-problems", action="append", help="problems the pm.sample loop samples (default 4; "
                   "wX=N for one workload's)")
    p.add_argument("--ladder", action="append", help="settings tried, TUNExDRAWS per chain (default %s); "
                   "repeat with wX= for one workload's (--ladder w3=1000x1000)" % FULL["ladder"])
    p.add_argument("--chains", type=int)
    p.add_argument("--amortise-n", type=int, default=AMORTISE_N, help="posteriors a compile is spread over")
    p.add_argument("--batch-size", type=int, default=None, help="engine problems per chunk (default: "
                   "sample_batched's own)")
    p.add_argument("--devices", type=int, default=None, help="engine devices (default: sample_batched's "
                   "own, every local device: one host device per core on CPU; 1 = one device)")
    p.add_argument("--no-stopping", nargs="?", const="*", default=None, help="skip the per-problem stopping rows "
                   "(of every workload, or of the comma list given: --no-stopping w3) "
                   "(added when sample_batched takes target_ess)")
    p.add_argument("--no-warm-rerun", action="store_true", help="time each engine setting in one call (run = "
                   "wall less compile spans, which undercounts the run where sampling overlaps a compile) "
                   "instead of a cold call then a warm one (run = the warm call, compile = the difference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder of the results (default benchmarks/results)")
    p.add_argument("--tag", help="file stem (default certified, or certified_quick)")
    p.add_argument("--note", action="append", help="a line of context written into the results")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    preset = {**FULL, **QUICK} if args.quick else FULL
    per_workload = ("contestants", "n", "nutpie_problems", "pymc_problems", "ladder")
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, [str(value)] if key in per_workload else value)
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workload_list:
        get_workload(w)
    args.contestants_map = parse_contestants_map(args.contestants, preset["contestants"])
    args.contestant_list = args.contestants_map["*"]
    args.ladder_map = {}
    for value in args.ladder:
        name, _, text = value.rpartition("=")
        if name and name not in WORKLOADS:
            raise ValueError(f"--ladder {value!r}: unknown workload {name!r}")
        args.ladder_map[name or "*"] = parse_ladder(text)
    args.ladder_map.setdefault("*", parse_ladder(preset["ladder"]))
    args.ladder_list = args.ladder_map["*"]
    args.no_stopping_for = set() if args.no_stopping is None else {w.strip() for w in args.no_stopping.split(",")}
    for name in per_workload[1:-1]:
        counts = parse_per_workload(f"--{name.replace('_', '-')}", getattr(args, name), str(preset[name]))
        if min(counts.values()) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        setattr(args, f"{name}_map", counts)
        setattr(args, name, counts["*"])
    if args.chains < 1:
        raise ValueError("--chains must be >= 1")
    return args


def for_workload(args, name: str, wname: str):
    """Option ``name`` (``contestants``, ``n``, ``nutpie_problems``, ``pymc_problems``, ``ladder``) for ``wname``."""
    table = getattr(args, f"{name}_map")
    return table.get(wname, table["*"])


# ------------------------------------------------------------------------------ driver
def _attempt(run, tune, draws, chains, amortise_n) -> dict:
    ok = certified_mask(run.cert)
    n = len(run.problems)
    share = float(ok.mean())
    cert = run.cert
    return {
        "tune": tune, "draws": draws, "chains": chains, "problems_run": n, "n_certified": int(ok.sum()),
        "pass_share": share, "run_s": run.run_s, "compile_s": run.compile_s,
        "run_ms_per_posterior": 1000 * run.run_s / n, "certify_s": run.certify_s,
        "certify_ms_per_posterior": 1000 * run.certify_s / n,
        "ttc_ms": 1000 * time_to_certified(run.run_s + run.certify_s, n, run.compile_s, share, amortise_n),
        "fails": {
            "r_hat": int((np.asarray(cert["r_hat_max"]) >= GATE["r_hat_max"]).sum()),
            "ess_bulk": int((np.asarray(cert["ess_bulk_min"]) < GATE["ess_bulk_min"]).sum()),
            "ess_tail": int((np.asarray(cert["ess_tail_min"]) < GATE["ess_tail_min"]).sum()),
            "divergent": int((np.asarray(cert["divergences"]) > 0).sum()),
        },
        "r_hat_worst": float(np.max(cert["r_hat_max"])),
        "ess_bulk_median": float(np.median(cert["ess_bulk_min"])),
        "ess_tail_median": float(np.median(cert["ess_tail_min"])),
        "note": run.note, **run.extra,
    }


def climb(runner, ladder, chains, amortise_n, log, label, patience: int = PATIENCE) -> dict:
    """Try ``ladder`` cheapest first; after the first setting certifying >= 99%, ``patience``
    more; of those certifying, the one with the least time to certified is chosen (a cheaper
    setting is not always a faster one: a short warmup can leave longer trajectories)."""
    attempts, left = [], None
    for tune, draws in ladder:
        if left == 0:
            break
        t = time.perf_counter()
        a = _attempt(runner(tune, draws), tune, draws, chains, amortise_n)
        attempts.append(a)
        log(f"    {label} {tune}+{draws}: pass {a['pass_share']:.1%}, run {a['run_ms_per_posterior']:.1f} "
            f"+ certify {a['certify_ms_per_posterior']:.2f} ms/posterior, compile {a['compile_s']:.1f}s, fails {a['fails']} ({time.perf_counter() - t:.0f}s)")
        if left is not None:
            left -= 1
        elif a["pass_share"] >= PASS_SHARE:
            left = patience
    passing = [a for a in attempts if a["pass_share"] >= PASS_SHARE]
    if passing:
        return {**min(passing, key=lambda x: x["ttc_ms"]), "certified": True, "attempts": attempts}
    best = max(attempts, key=lambda x: (x["pass_share"], -x["ttc_ms"]))
    return {**best, "certified": False, "attempts": attempts}


def add_ratios(rows: list[dict]) -> None:
    """``x_nutpie`` / ``x_pymc``: the reference's time to certified over the row's, per workload.
    With several rows of one reference (nutpie at several settings of its own), the fastest
    certified one is the reference (the fastest of all when none certified)."""
    for w in {r["workload"] for r in rows}:
        ref = {}
        for r in sorted((r for r in rows if r["workload"] == w and r["sampler"] in ("nutpie", "pymc")),
                        key=lambda r: (not r.get("certified", True), r["ttc_ms"])):
            ref.setdefault(r["sampler"], r["ttc_ms"])
        for r in rows:
            if r["workload"] == w:
                for name in ("nutpie", "pymc"):
                    r[f"x_{name}"] = ref[name] / r["ttc_ms"] if name in ref and np.isfinite(r["ttc_ms"]) else None


def run(args, log=print, on_row=None) -> dict:
    """Every workload x contestant; returns the results (``on_row`` gets them after every row)."""
    from benchmarks import report

    meta = report.machine_info()
    meta["load_avg_start"] = list(os.getloadavg())
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    stop_kw = None if "*" in args.no_stopping_for else stopping_keyword()
    settings = {k: v for k, v in vars(args).items()
                if k not in ("contestant_list", "contestants_map", "contestants", "ladder", "ladder_map",
                             "ladder_list", "no_stopping_for")}
    settings["contestants"] = {w: ",".join(c.label for c in cs) for w, cs in args.contestants_map.items()}
    settings["ladder"] = {w: ",".join(f"{t}x{d}" for t, d in lad) for w, lad in args.ladder_map.items()}
    settings["no_stopping_for"] = sorted(args.no_stopping_for)
    settings.update(gate=GATE, pass_share=PASS_SHARE, patience=PATIENCE, stopping_keyword=stop_kw)
    rows, notes = [], list(args.note or [])
    if stop_kw is None and "*" not in args.no_stopping_for:
        notes.append("sample_batched has no target_ess (per-problem stopping): no stopping rows")
    t_start = time.perf_counter()

    def snapshot():
        add_ratios(rows)
        meta["load_avg_end"] = list(os.getloadavg())
        meta["wall_s"] = time.perf_counter() - t_start
        return {"meta": dict(meta), "settings": settings, "rows": list(rows), "notes": list(notes)}

    ok_nutpie, why = nutpie_available()
    for wname in args.workload_list:
        workload = get_workload(wname)
        model = workload.build_model()
        n, ladder = for_workload(args, "n", wname), for_workload(args, "ladder", wname)
        data = workload.make_data(n, args.seed)
        conversion: dict = {}
        for c in for_workload(args, "contestants", wname):
            base = {"workload": wname, "contestant": c.label, "sampler": c.sampler, "precision": c.precision}
            kw = dict(chains=args.chains, seed=args.seed)
            if c.sampler == "nutpie":
                if not ok_nutpie:
                    notes.append(f"{wname} nutpie skipped: {why}")
                    log(notes[-1])
                    continue
                problems = loop_problems(n, for_workload(args, "nutpie_problems", wname))
                try:
                    loop = NutpieLoop(model, {k: v for k, v in data.items()}, equivalent=workload.equivalent,
                                      sample_kw=dict(c.nutpie_kw))
                except Exception as err:  # a contestant that cannot run is recorded, not fatal
                    notes.append(f"{wname} nutpie failed: {type(err).__name__}: {err}")
                    log(notes[-1])
                    continue
                runner = lambda t, d: loop.run(problems, tune=t, draws=d, **kw)  # noqa: E731
            elif c.sampler == "pymc":
                problems = loop_problems(n, for_workload(args, "pymc_problems", wname))
                runner = lambda t, d: run_pymc(model, data, problems, tune=t, draws=d, **kw)  # noqa: E731
            else:
                problems = list(range(n))
                runner = lambda t, d, c=c, fresh=False: run_engine(  # noqa: E731
                    model, data, problems, sampler=c.sampler, precision=c.precision, tune=t, draws=d,
                    devices=args.devices, batch_size=args.batch_size, conversion_cache=conversion, warm_rerun=not args.no_warm_rerun,
                    extra_kw={"dense_mass": True} if c.dense_mass else None, fresh_compile=fresh, **kw)
            log(f"[{wname}] {c.label} on {len(problems)} problems ...")
            try:
                rows.append({**base, **climb(runner, ladder, args.chains, args.amortise_n, log, c.label)})
            except Exception as err:  # a contestant that fails is recorded, not fatal
                notes.append(f"{wname} {c.label} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                log(notes[-1])
                continue
            if c.sampler == "auto" and c.precision == "auto":  # what a user gets with no flags
                log(f"[{wname}] defaults (sample_batched with tune unset, draws={DEFAULTS_DRAWS}) ...")
                defaults = lambda t, d, run=runner: run(t, d, fresh=True)  # noqa: E731 (compiles as a new process)
                rows.append({**base, "contestant": "defaults",
                             **climb(defaults, [(None, DEFAULTS_DRAWS)], args.chains, args.amortise_n, log, "defaults")})
            if on_row:
                on_row(snapshot())
            if stop_kw and c.sampler not in ("nutpie", "pymc") and wname not in args.no_stopping_for:
                top_draws = ladder[-1][1]
                stop_ladder = sorted({(t, top_draws) for t, _ in ladder})
                stop_runner = lambda t, d, c=c: run_engine(  # noqa: E731
                    model, data, problems, sampler=c.sampler, precision=c.precision, tune=t, draws=d,
                    devices=args.devices, batch_size=args.batch_size, conversion_cache=conversion, warm_rerun=not args.no_warm_rerun,
                    extra_kw={stop_kw: int(GATE["ess_bulk_min"]), **({"dense_mass": True} if c.dense_mass else {})},
                    **kw)
                label = f"{c.label}+stop"
                log(f"[{wname}] {label} ({stop_kw}={int(GATE['ess_bulk_min'])}, draws <= {top_draws}) ...")
                rows.append({**base, "contestant": label,
                             **climb(stop_runner, stop_ladder, args.chains, args.amortise_n, log, label)})
                if on_row:
                    on_row(snapshot())
    return snapshot()


def main(argv=None) -> int:
    try:
        args = resolve_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    configure_xla("single", "safe", 1 if args.devices is None else args.devices)
    from benchmarks import certified_report

    results = run(args, log=lambda m: print(m, flush=True),
                  on_row=lambda partial: certified_report.write_results(partial, args.out, args.tag, plot=False))
    paths = certified_report.write_results(results, args.out, args.tag)
    print("\n" + certified_report.markdown_table(results["rows"]))
    print("\nwrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

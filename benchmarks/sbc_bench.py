"""SBC of eight schools: the engine's one batched call against a simuk-style loop of pm.sample.

simuk (ArviZ's SBC tool) fits every simulation with its own ``pm.sample`` call. Here the loop is
measured on a few simulations (``--loop-sims``) in the same process run and extrapolated to
``M`` (the output says so); the engine runs all ``M`` simulations for real (``engine.sbc``,
prior predictive + one ``sample_batched`` call + ranks, tests and plots), compile included.

    python -m benchmarks.sbc_bench                       # M=1000, 4 chains x (400 + 400)
    python -m benchmarks.sbc_bench --num-simulations 200 --loop-sims 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def simuk_style_loop(model, data: dict, sims: list[int], args) -> list[float]:
    """Seconds per simulation of ``pm.sample`` on simulation ``i``'s data, one call each (as
    simuk's ``SBC.run_simulations``: set the observed data, ``pm.sample``, read the draws)."""
    import pymc as pm

    times = []
    for i in sims:
        t = time.perf_counter()
        with model:
            pm.set_data({name: values[i] for name, values in data.items()})
            pm.sample(draws=args.draws, tune=args.tune, chains=args.chains, random_seed=i,
                      progressbar=False)
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-simulations", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--tune", type=int, default=400)
    parser.add_argument("--sampler", default="blackjax")
    parser.add_argument("--loop-sims", type=int, default=3, help="simulations the pm.sample loop runs")
    parser.add_argument("--out", default=str(RESULTS / "sbc_eight_schools.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")

    import engine
    from benchmarks.measure import cpu_seconds
    from engine.calibration.sbc import simulate
    from engine.calibration.models import eight_schools

    model = eight_schools()
    load_before = os.getloadavg()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = engine.sbc(model, args.num_simulations, sampler=args.sampler, chains=args.chains,
                            draws=args.draws, tune=args.tune, seed=0, out_dir=out)
    engine_s, engine_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0

    _, data = simulate(model, model, args.num_simulations, seed=0)
    sims = [int(i) for i in np.linspace(0, args.num_simulations - 1, args.loop_sims).round()]
    cpu0 = cpu_seconds()
    loop_times = simuk_style_loop(eight_schools(), data, sims, args)
    loop_cpu = (cpu_seconds() - cpu0) / len(sims)
    per_sim = float(np.median(loop_times))
    s = result.summary
    row = {
        "workload": "SBC eight schools (non-centred, J=8)",
        "num_simulations": args.num_simulations, "chains": args.chains, "draws": args.draws,
        "tune": args.tune, "sampler": args.sampler,
        "engine_wall_s": engine_s, "engine_cpu_s": engine_cpu,
        "loop_sims_measured": len(sims), "loop_s_per_sim": loop_times,
        "loop_s_per_sim_median": per_sim, "loop_cpu_s_per_sim": loop_cpu,
        "loop_wall_s_extrapolated": per_sim * args.num_simulations,
        "speedup_extrapolated": per_sim * args.num_simulations / engine_s,
        "all_pass": s["all_pass"], "divergent_share": s["divergent_share"],
        "num_rank_draws": s["num_rank_draws"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_before_after": [load_before[0], os.getloadavg()[0]],
    }
    from engine.analyses._common import versions

    row["versions"] = versions()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()

"""Warm run time of engine contestants, alternated in ONE process: ``sample_batched`` wall time
per posterior after a first (compiling) call, so parallel compiles cannot be subtracted from it.

``python -m benchmarks.warm_pair --workload w4 --n 200 --reps 3 chees:f32:stop auto:stop``

Each contestant is ``SAMPLER[:f32|:f64][:dense][:stop]`` (``stop``: ``target_ess=400``). Round
``r`` calls every contestant once with seed ``r``, so load drifts hit them alike; round 0 compiles
and is reported apart. Per call it prints the wall time, the compile seconds inside it (JAX's
compile events), mean kept draws and gradients per problem and, for ``auto``, how many problems
the NUTS fallback reran. The summary gives each contestant's median warm wall time per posterior
over rounds >= 1 that compiled nothing (a call that compiles, e.g. a new gate window or the
fallback's programs, is listed but left out of the median) and its ratio to the fastest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from benchmarks.certified_runs import CompileClock
from benchmarks.workloads import get_workload

__all__ = ["parse", "main"]


def parse(spec: str) -> tuple[str, dict]:
    """``"chees:f32:stop"`` -> ``("chees", {"precision": "float32", "target_ess": 400})``."""
    sampler, *flags = spec.split(":")
    kw: dict = {}
    for flag in flags:
        if flag == "stop":
            kw["target_ess"] = 400
        elif flag in ("f32", "f64"):
            kw["precision"] = "float32" if flag == "f32" else "float64"
        elif flag == "dense":
            kw["dense_mass"] = True
        else:
            raise ValueError(f"{spec!r}: unknown flag {flag!r} (f32, f64, dense, stop)")
    return sampler, kw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.warm_pair", description=__doc__.split("\n")[0])
    p.add_argument("contestants", nargs="+")
    p.add_argument("--workload", default="w4")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--reps", type=int, default=3, help="rounds (the first compiles)")
    p.add_argument("--tune", type=int, default=300)
    p.add_argument("--draws", type=int, default=1000)
    args = p.parse_args(argv)
    from engine import sample_batched

    workload = get_workload(args.workload)
    model, data = workload.build_model(), workload.make_data(args.n, 0)
    specs = [(c, *parse(c)) for c in args.contestants]
    warm: dict = {c: [] for c in args.contestants}
    print(f"load average {os.getloadavg()}", flush=True)
    for rep in range(args.reps):
        for label, sampler, kw in specs:
            with CompileClock() as clock, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                idata = sample_batched(model, data, sampler=sampler, chains=4, tune=args.tune, draws=args.draws,
                                       seed=rep, progress=False, **kw)
                wall = time.perf_counter() - t
            ss = idata.sample_stats
            line = (f"round {rep} {label}: wall {wall:.2f}s ({1000 * wall / args.n:.1f} ms/posterior), compile "
                    f"{clock.seconds:.1f}s, draws/chain {ss['num_draws'].values.mean():.0f}, "
                    f"grads/problem {ss['num_grads'].values.mean():.0f}")
            if "sampler" in ss:
                line += f", fallback reran {int((ss['sampler'].values == 'blackjax').sum())}"
            print(line, flush=True)
            if rep >= 1 and clock.seconds == 0:
                warm[label].append(1000 * wall / args.n)
    print(f"load average {os.getloadavg()}")
    medians = {c: float(np.median(v)) for c, v in warm.items() if v}
    best = min(medians.values()) if medians else float("nan")
    for c in args.contestants:
        if c in medians:
            print(f"{c}: warm median {medians[c]:.1f} ms/posterior over {len(warm[c])} rounds, x{medians[c] / best:.2f} "
                  "the fastest")
        else:
            print(f"{c}: no warm round without a compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's call before and after the automatic defaults, and with the best flags, one process.

    nice -n 10 .venv/bin/python -m benchmarks.defaults_bench --n 2000

    nice -n 10 .venv/bin/python -m benchmarks.defaults_bench --n 10000 --ways after --pymc-problems 10

Runs ``engine.sample_batched(model, data, chains=4, draws=1000)`` on w1 three ways: ``before``
(the old defaults spelt out: BlackJAX NUTS, float64, one device, one chunk, ``tune=1000``),
``after`` (no options: ``auto`` sampler, precision, chunks, devices and warmup, ChEES's own 300
here) and ``best`` (ChEES, float32, all devices, 100-problem chunks, its own warmup: the fastest
flags of ``benchmarks/results``). Each line:
wall seconds with compile (a fresh program per way), the share of problems passing the gate
(R-hat < 1.01, bulk and tail ESS >= 400, no divergences) and, for ``after``, which kernels ran.
``--pymc-problems K`` adds a loop of plain ``pm.sample`` (same chains and draws, its default
tune 1000) over K
problems spread over the set, its seconds per posterior, and each way's speed-up over it;
``--nutpie-problems K`` the same for a nutpie loop (compiled once, ``with_data`` per problem; its
compile amortised over ``--n``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

WAYS = {
    "before": dict(sampler="blackjax", precision="float64", devices=1, batch_size=None, tune=1000),
    "after": dict(),
    "best": dict(sampler="chees", precision="float32", devices=-1, batch_size=100),
}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--ways", default="after,best,before")
    p.add_argument("--pymc-problems", type=int, default=0, help="problems of a pm.sample loop (0: none)")
    p.add_argument("--nutpie-problems", type=int, default=0, help="problems of a nutpie loop (0: none)")
    a = p.parse_args(argv)
    import jax

    import engine
    from benchmarks.workloads import w1_data, w1_model
    from engine.sampling.diagnostics import summarize_idata

    data = w1_data(a.n, 0)
    loops = {}  # peer -> ms per posterior (compile amortised over --n)
    for peer, k in (("pm.sample", a.pymc_problems), ("nutpie", a.nutpie_problems)):
        if not k:
            continue
        from benchmarks.loops import bench_nutpie, bench_pymc, loop_problems

        loop_args = argparse.Namespace(chains=4, draws=1000, tune=1000, seed=0, target_accept=0.8)
        row = (bench_pymc if peer == "pm.sample" else bench_nutpie)(
            w1_model(), data, loop_problems(a.n, k), loop_args)
        if peer == "nutpie":
            loops[peer] = 1000 * (row["run_s"] / len(row["problems"]) + row["compile_s"] / a.n)
        else:
            loops[peer] = row["ms_per_posterior_e2e"]
        print(json.dumps({"way": f"{peer} loop", "problems": row["problems"], "ms_per_posterior": round(loops[peer], 1),
                          "pass": row["pass_share"]}), flush=True)
    for way in a.ways.split(","):
        model = w1_model()  # a fresh template: nothing compiled is shared between ways
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            idata = engine.sample_batched(model, data, chains=4, draws=1000, progress=False, **WAYS[way])
        wall = time.perf_counter() - t0
        s = summarize_idata(idata)
        ok = ((s["r_hat"].theta.values < 1.01) & (s["ess_bulk"].theta.values >= 400)
              & (s["ess_tail"].theta.values >= 400) & (s["divergences"].values == 0))
        row = {"way": way, "n": a.n, "options": WAYS[way], "wall_s": round(wall, 1),
               "ms_per_posterior": round(1000 * wall / a.n, 2), "pass": round(float(ok.mean()), 4),
               "devices": jax.device_count(), "precision": str(idata.posterior.theta.dtype)}
        for peer, ms in loops.items():
            row[f"speedup_vs_{peer.replace('.', '_')}"] = round(ms / row["ms_per_posterior"], 1)
        if "sampler" in idata.sample_stats:
            names, counts = np.unique(idata.sample_stats.sampler.values, return_counts=True)
            row["kernels"] = dict(zip(names.tolist(), counts.tolist()))
            row["gate_passed"] = round(float(idata.sample_stats.gate_passed.values.mean()), 4)
            row["warnings"] = [str(w.message)[:120] for w in caught if issubclass(w.category, RuntimeWarning)]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

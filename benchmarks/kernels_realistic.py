"""Kernels on realistic templates: gate pass share and ESS per gradient, one row per sampler.

    nice -n 10 .venv/bin/python -m benchmarks.kernels_realistic --workload w2 --n 64 \
        --samplers blackjax chees chees_dense mams --draws 500 --tune 500

The gate of a problem: rank-normalised split R-hat < 1.01 (the engine's batched diagnostics), bulk and tail ESS >= 400 for every
variable of the posterior, and no divergent transition. ESS per gradient is the problem's least
bulk ESS over the gradient evaluations of its sampling draws (``n_steps`` summed over chains and
draws; warmup not counted), median over problems.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.workloads import get_workload


def gate_rows(idata, rhat_max=1.01, ess_min=400.0) -> dict:
    """Per-problem worst diagnostics and gate -> dict of arrays ``[problem]``.

    Diagnostics are the engine's batched ones (rank-normalised split R-hat, bulk and tail ESS;
    tested against ArviZ in the test suite)."""
    import jax
    import jax.numpy as jnp

    from engine.sampling.diagnostics import ess_bulk, ess_tail, rhat as rhat_fn

    post = idata.posterior
    worst = {"r_hat": [], "bulk": [], "tail": []}
    for name in post.data_vars:
        arr = post[name]
        rest = [d for d in arr.dims if d not in ("problem", "chain", "draw")]
        x = arr.transpose("problem", *rest, "chain", "draw").values
        x = x.reshape((x.shape[0], -1) + x.shape[-2:])
        with jax.enable_x64(True):
            xj = jnp.asarray(x, dtype=jnp.float64)
            worst["r_hat"].append(np.nanmax(np.asarray(rhat_fn(xj)), axis=1))
            worst["bulk"].append(np.nanmin(np.asarray(ess_bulk(xj)), axis=1))
            worst["tail"].append(np.nanmin(np.asarray(ess_tail(xj)), axis=1))
    rhat = np.max(worst["r_hat"], axis=0)
    bulk = np.min(worst["bulk"], axis=0)
    tail = np.min(worst["tail"], axis=0)
    stats = idata.sample_stats
    div = stats["diverging"].sum(("chain", "draw")).values
    grads = stats["n_steps"].sum(("chain", "draw")).values
    fails = []
    for r, b, t, d in zip(rhat, bulk, tail, div):
        why = [w for w, bad in (("divergences", d > 0), ("R-hat", r >= rhat_max), ("bulk ESS", b < ess_min),
                                ("tail ESS", t < ess_min)) if bad]
        fails.append(", ".join(why))
    passed = (rhat < rhat_max) & (bulk >= ess_min) & (tail >= ess_min) & (div == 0)
    return {"r_hat": rhat, "ess_bulk": bulk, "ess_tail": tail, "divergences": div, "grads": grads,
            "passed": passed, "why": np.array(fails, dtype=object)}


def run_one(model, data, sampler, args, **kw) -> dict:
    from engine import sample_batched

    t0 = time.perf_counter()
    idata = sample_batched(model, data, sampler=sampler, chains=args.chains, draws=args.draws, tune=args.tune,
                           seed=args.seed, **kw)
    wall = time.perf_counter() - t0
    g = gate_rows(idata)
    return {"sampler": sampler, "options": ", ".join(f"{k}={v}" for k, v in kw.items()),
            "pass": f"{int(g['passed'].sum())}/{len(g['passed'])}",
            "pass_share": float(g["passed"].mean()),
            "ess_per_grad": float(np.median(g["ess_bulk"] / g["grads"])),
            "grads_per_draw": float(np.median(g["grads"] / (args.chains * args.draws))),
            "min_ess_bulk_median": float(np.median(g["ess_bulk"])),
            "div_problems": int((g["divergences"] > 0).sum()),
            "rhat_fail": int((g["r_hat"] >= 1.01).sum()),
            "ess_fail": int(((g["ess_bulk"] < 400) | (g["ess_tail"] < 400)).sum()),
            "wall_s": wall, "gate": g}


def markdown(rows) -> str:
    keys = ["sampler", "options", "pass", "ess_per_grad", "grads_per_draw", "min_ess_bulk_median",
            "div_problems", "rhat_fail", "ess_fail", "wall_s"]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="w2")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--samplers", nargs="+", default=["blackjax", "chees", "chees_dense", "mams"])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--tune", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-accept", type=float, default=None)
    args = p.parse_args(argv)
    w = get_workload(args.workload)
    model, data = w.build_model(), w.make_data(args.n, args.seed)
    rows = []
    for s in args.samplers:
        from engine.sampling.kernels import get_kernel

        kw = {"target_accept": args.target_accept or get_kernel(s).target_accept}
        rows.append(run_one(model, data, s, args, **kw))
        print(markdown(rows[-1:]), flush=True)
    print(f"\n{args.workload}, N={args.n}, {args.chains} chains x {args.tune}+{args.draws}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

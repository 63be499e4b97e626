"""w3 (hierarchical attention) under ``sample_batched``'s defaults: gate pass share per problem.

    nice -n 10 .venv/bin/python -m benchmarks.w3_defaults --n 20 --seed 0

Runs ``engine.sample_batched(w3_model, w3_data(n, seed), seed=seed)`` with the engine's defaults
(``sampler="auto"``, 4 chains, 1000 + 1000), or with the settings given as ``--set key=value``
(e.g. ``--set sampler=blackjax target_accept=0.99 tune=2000``), and checks every problem
independently of the engine's own flag: ArviZ's rank-normalised split R-hat < 1.01, bulk and tail
ESS >= 400 on every free variable over the problem's kept draws (``num_draws``), no divergence.
Prints one line per problem (kernel, gate, worst diagnostics, gradients, step size) and a summary
row; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from benchmarks.workloads import get_workload


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


def recheck(idata, rhat_max: float = 1.01, ess_min: float = 400.0) -> list[dict]:
    """Per problem: worst ArviZ R-hat, least bulk / tail ESS over its kept draws, divergences,
    gradients, kept draws per chain, median step size, mean acceptance rate, and the gate."""
    import arviz as az

    post, stats = idata.posterior, idata.sample_stats
    num_problems = post.sizes["problem"]
    kept = (stats["num_draws"].values if "num_draws" in stats else np.full(num_problems, post.sizes["draw"]))
    rows = []
    for p in range(num_problems):
        n = int(kept[p])
        one = post.isel(problem=p, draw=slice(0, n))
        r = float(max(np.nanmax(az.rhat(one)[v].values) for v in one.data_vars))
        b = float(min(np.nanmin(az.ess(one, method="bulk")[v].values) for v in one.data_vars))
        t = float(min(np.nanmin(az.ess(one, method="tail")[v].values) for v in one.data_vars))
        st = stats.isel(problem=p, draw=slice(0, n))
        div = int(st["diverging"].values.sum())
        row = {"problem": p, "r_hat": r, "ess_bulk": b, "ess_tail": t, "divergences": div, "num_draws": n,
               "num_grads": int(stats["num_grads"].values[p]) if "num_grads" in stats else None,
               "step_size": float(np.nanmedian(st["step_size"].values)),
               "grads_per_draw": float(np.nanmean(st["n_steps"].values)),
               "acceptance": float(np.nanmean(st["acceptance_rate"].values)),
               "sampler": str(stats["sampler"].values[p]) if "sampler" in stats else None,
               "engine_gate": bool(stats["gate_passed"].values[p]) if "gate_passed" in stats else None}
        row["passed"] = bool(r < rhat_max and b >= ess_min and t >= ess_min and div == 0)
        row["why"] = ", ".join(w for w, bad in (("divergences", div > 0), ("R-hat", r >= rhat_max),
                                                 ("bulk ESS", b < ess_min), ("tail ESS", t < ess_min)) if bad)
        rows.append(row)
    return rows


def main(argv=None):
    from engine import sample_batched

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="sample_batched keyword=value pairs")
    p.add_argument("--problems", nargs="*", type=int, default=None,
                   help="run only these problems of the n (they get key streams 0, 1, ... of the subset)")
    p.add_argument("--form", default="nc", choices=["nc", "cn"],
                   help="nc: the workload's template; cn: layers centred, heads non-centred (a diagnostic, "
                        "benchmarks.w3_reliability.w3_centred_layers)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    w = get_workload("w3")
    model, data = w.build_model(), w.make_data(args.n, args.seed)
    if args.form == "cn":
        from benchmarks.w3_reliability import w3_centred_layers

        model = w3_centred_layers()
    if args.problems:
        data = {k: v[args.problems] for k, v in data.items()}
    kw = dict(seed=args.seed, progress=False)
    kw.update({k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = sample_batched(model, data, **kw)
    wall = time.perf_counter() - t0
    rows = recheck(idata)
    for r in rows:
        print(f"{r['problem']:3d} {r['sampler'] or '-':9s} {'ok ' if r['passed'] else 'FAIL'} "
              f"engine={r['engine_gate']} rhat={r['r_hat']:.4f} bulk={r['ess_bulk']:.0f} tail={r['ess_tail']:.0f} "
              f"div={r['divergences']} draws={r['num_draws']} grads={r['num_grads']} "
              f"step={r['step_size']:.4f} accept={r['acceptance']:.3f} grads/draw={r['grads_per_draw']:.1f} {r['why']}")
    passed = np.array([r["passed"] for r in rows])
    grads = np.array([r["num_grads"] or 0 for r in rows], float)
    summary = {"settings": {k: v for k, v in kw.items() if k != "progress"}, "n": args.n,
               "pass": f"{int(passed.sum())}/{len(rows)}", "pass_share": float(passed.mean()),
               "engine_pass": int(sum(bool(r["engine_gate"]) for r in rows)),
               "fallback_problems": int(sum(r["sampler"] not in (None, rows[0]["sampler"]) for r in rows)),
               "grads_total": float(grads.sum()), "grads_median": float(np.median(grads)),
               "wall_s": wall, "warnings": [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "problems": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""ChEES's warmup length: pass share of the gate against ``tune`` at fixed draws, several seeds.

    nice -n 10 .venv/bin/python -m benchmarks.chees_tune --workloads w1,w2,w4 --tunes 150,200,300 \
        --draws 1000 --seeds 0,1

For every workload, seed and ``tune``: ``sample_batched(sampler="chees", precision="float32",
chains=4)`` on N problems (``benchmarks.certified_runs.run_engine``, one cold call: run time is
the call less JAX's compile spans, a rough figure) and ArviZ's certificate of every problem
(R-hat < 1.01, bulk and tail ESS >= 400, no divergence). This is the measurement behind
``CHEES_DEFAULT_TUNE`` (``engine.sampling.kernels.base``); writes ``results/<tag>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.throughput import configure_xla

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="w1,w2,w4")
    p.add_argument("--tunes", default="150,200,300")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--sampler", default="chees")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tag", default="chees_tune")
    args = p.parse_args(argv)
    configure_xla("single", "safe", 2)
    from benchmarks import report
    from benchmarks.certified_runs import certified_mask, run_engine
    from benchmarks.workloads import get_workload

    rows = []
    for w in args.workloads.split(","):
        workload = get_workload(w)
        model = workload.build_model()
        for seed in (int(s) for s in args.seeds.split(",")):
            data, conversion = workload.make_data(args.n, seed), {}
            for tune in (int(t) for t in args.tunes.split(",")):
                r = run_engine(model, data, list(range(args.n)), sampler=args.sampler, precision="float32",
                               tune=tune, draws=args.draws, chains=4, seed=seed, conversion_cache=conversion,
                               warm_rerun=False)
                rows.append(dict(workload=w, seed=seed, tune=tune, draws=args.draws,
                                 pass_share=float(certified_mask(r.cert).mean()),
                                 run_ms=1e3 * r.run_s / args.n, ess_bulk_min=float(r.cert["ess_bulk_min"].min()),
                                 ess_tail_min=float(r.cert["ess_tail_min"].min()),
                                 r_hat_max=float(r.cert["r_hat_max"].max()), divergences=int(r.cert["divergences"].sum())))
                print(rows[-1], flush=True)
    lines = [f"# {args.sampler} float32, 4 chains, N = {args.n} per seed: gate pass share against warmup", "",
             "| workload | seed | tune + draws | certified | run ms/posterior (rough) | least bulk ESS | least tail ESS | "
             "largest R-hat | divergences |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['seed']} | {r['tune']} + {r['draws']} | {r['pass_share']:.1%} | {r['run_ms']:.1f} | "
              f"{r['ess_bulk_min']:.0f} | {r['ess_tail_min']:.0f} | {r['r_hat_max']:.4f} | {r['divergences']} |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"meta": report.machine_info(), "settings": vars(args), "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""nutpie on w4: gradients (n_steps, warmup included) per certified posterior and time per gradient."""
import sys, time, json
import numpy as np
from benchmarks.workloads import get_workload
from benchmarks.certified_runs import NutpieLoop, certify_draws, certified_mask
from benchmarks.loops import loop_problems
N, K = 200, int(sys.argv[1])
w = get_workload("w4"); model = w.build_model(); data = w.make_data(N, 0)
loop = NutpieLoop(model, data)
print("compile_s", loop.compile_s, loop.backend, flush=True)
problems = loop_problems(N, K)
for tune, draws in [tuple(map(int, s.split("x"))) for s in sys.argv[2:]]:
    steps, wsteps, coll, div = [], [], {n: [] for n in ("alpha", "beta", "sigma")}, []
    t = time.perf_counter()
    for i in problems:
        tr = loop._sample(i, tune=tune, draws=draws, seed=1_000_003 * 0 + i)
        steps.append(float(tr.sample_stats["n_steps"].sum()))
        if "warmup_sample_stats" in tr.groups(): wsteps.append(float(tr.warmup_sample_stats["n_steps"].sum()))
        for n in coll: coll[n].append(tr.posterior[n].values)
        div.append(tr.sample_stats["diverging"].values)
    run_s = time.perf_counter() - t
    ok = certified_mask(certify_draws({n: np.stack(v) for n, v in coll.items()}, np.stack(div)))
    g = np.array(steps) + (np.array(wsteps) if wsteps else 0)
    print(json.dumps(dict(tune=tune, draws=draws, problems=len(problems), pass_share=float(ok.mean()),
        run_ms_per_posterior=1e3 * run_s / len(problems), grads_per_problem=float(g.mean()),
        sampling_grads=float(np.mean(steps)), warmup_grads=float(np.mean(wsteps)) if wsteps else None,
        grads_per_certified=float(g.sum() / max(ok.sum(), 1)), ns_per_grad=1e9 * run_s / g.sum(),
        ms_per_certified=1e3 * run_s / max(ok.sum(), 1))), flush=True)

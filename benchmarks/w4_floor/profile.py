"""Where a w4 certified posterior's time goes: grads, lockstep, host; sample_batched runs twice (2nd = warm)."""
import sys, time, json
from benchmarks.throughput import configure_xla
configure_xla("single", "safe", 1)
import numpy as np, jax
from benchmarks.workloads import get_workload
from benchmarks.certified_runs import certify_posterior, certified_mask, CompileClock
import engine.sampling.api as api
from engine import sample_batched

N = int(sys.argv[1]); specs = sys.argv[2:]
w = get_workload("w4"); model = w.build_model(); data = w.make_data(N, 0)
timers = {}
orig_run, orig_idata = api.run_batched, api.to_inference_data
def timed(name, fn):
    def inner(*a, **k):
        t = time.perf_counter(); out = fn(*a, **k); timers[name] = timers.get(name, 0) + time.perf_counter() - t; return out
    return inner
api.run_batched = timed("run_batched", orig_run); api.to_inference_data = timed("to_idata", orig_idata)
out = []
for spec in specs:  # sampler:tune:draws[:target_ess]
    parts = spec.split(":"); sampler, tune, draws = parts[0], int(parts[1]), int(parts[2])
    kw = dict(sampler=sampler, tune=tune, draws=draws, chains=4, seed=0, precision="float32", progress=False)
    if len(parts) > 3: kw["target_ess"] = int(parts[3])
    if sampler == "auto": kw.pop("precision")
    for rep in range(2):
        timers.clear()
        with CompileClock() as clock:
            t = time.perf_counter(); idata = sample_batched(model, data, **kw); total = time.perf_counter() - t
    ss = idata.sample_stats
    nd = ss["num_draws"].values if "num_draws" in ss else None
    t = time.perf_counter()
    cert = certify_posterior(idata.posterior, ss["diverging"], [rv.name for rv in model.free_RVs], nd)
    t_cert = time.perf_counter() - t
    ok = certified_mask(cert)
    grads = ss["num_grads"].values.astype(float)
    nsteps = ss["n_steps"].values  # chain, draw, problem
    # lockstep in the sampling phase, per chunk of 50 problems (auto chunk size on CPU)
    samp_useful = np.nansum(nsteps); samp_exec = 0.0
    for s in range(0, N, 50):
        blk = nsteps[:, :, s:s + 50]
        per_draw_max = np.nanmax(blk, axis=(0, 2))
        if nd is not None:
            last = int(nd[s:s + 50].max()); per_draw_max = per_draw_max[:last]
        samp_exec += np.nansum(per_draw_max) * blk.shape[0] * blk.shape[2]
    row = dict(spec=spec, total_s=total, compile_s=clock.seconds, run_batched_s=timers.get("run_batched", 0),
               to_idata_s=timers.get("to_idata", 0), certify_s=t_cert, pass_share=float(ok.mean()),
               grads_per_problem=float(grads.mean()), grads_per_certified=float(grads.sum() / max(ok.sum(), 1)),
               sampling_grads=float(samp_useful / N), warmup_grads=float(grads.mean() - samp_useful / N),
               lockstep_sampling=float(samp_exec / samp_useful),
               median_draws=float(np.median(nd)) if nd is not None else draws,
               mean_nsteps=float(np.nanmean(nsteps)),
               ns_per_useful_grad=1e9 * timers.get("run_batched", 0) / grads.sum(),
               ms_per_certified=1e3 * (total - clock.seconds) / max(ok.sum(), 1))
    if "sampler" in ss: row["samplers"] = {str(k): int(v) for k, v in zip(*np.unique(ss["sampler"].values, return_counts=True))}
    print(json.dumps(row), flush=True); out.append(row)

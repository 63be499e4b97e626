import sys, time
from benchmarks.throughput import configure_xla
configure_xla("single", "safe", 1)
import numpy as np, jax
from benchmarks.workloads import get_workload
import engine.sampling.stopping as st
st.COMPILE_AHEAD = False  # the wrapped programs run as plain calls
from engine import sample_batched
w = get_workload("w4"); model = w.build_model(); data = w.make_data(50, 0)
log = []
orig = st.run_chunk
def run_chunk(programs, *a, **k):
    def wrap(name, fn):
        def inner(*args):
            t = time.perf_counter(); out = jax.block_until_ready(fn(*args)); log.append((name, time.perf_counter() - t)); return out
        return inner
    p = st.StopPrograms(wrap("warmup", programs.warmup), wrap("block", programs.block), wrap("finish", programs.finish),
                        programs.gate)  # the gate family times its own runs (_run_seconds)
    log.append(("gates", programs.gate))
    return orig(p, *a, **k)
st.run_chunk = run_chunk
import engine.sampling.batch as b
for attr in dir(b):
    if getattr(b, attr) is orig: setattr(b, attr, run_chunk)
kw = dict(sampler=sys.argv[1], tune=int(sys.argv[2]), draws=2000, chains=4, seed=0, precision="float32", progress=False, target_ess=400)
for rep in range(2):
    log.clear(); t = time.perf_counter(); sample_batched(model, data, **kw); print("total", time.perf_counter() - t)
    print([(n, round(s, 3)) if isinstance(s, float) else (n, dict(s._run_seconds)) for n, s in log])

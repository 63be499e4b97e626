import os, time
from benchmarks.throughput import configure_xla
configure_xla("single", "safe", 1)
import numpy as np, jax, jax.numpy as jnp
from benchmarks.workloads import get_workload
from engine.model.compile import prepare_data
from engine.sampling.api import compile_for
from engine.sampling.batch import cast_arrays, precision_scope
w = get_workload("w4"); model = w.build_model(); data = w.make_data(200, 0)
pd = prepare_data(model, data)
cm = compile_for(model, pd)
print("dim", cm.dim, "rows", pd.num_rows.mean(), pd.arrays["X"].shape)
with precision_scope("float32"):
    arrs = cast_arrays(pd.device_arrays(), "float32")
    one = {k: v[0] for k, v in arrs.items()}
    pos = jnp.zeros(cm.dim, jnp.float32)
    f = jax.value_and_grad(cm.logdensity_fn)
    jp = jax.make_jaxpr(f)(pos, one)
    print(jp)

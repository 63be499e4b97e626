"""Cost of one vmapped logdensity+grad per lane, w4, float32, at padded 60 rows vs a fixed 36/60 rows."""
import sys, time
from benchmarks.throughput import configure_xla
configure_xla("single", "safe", 1)
import numpy as np, jax, jax.numpy as jnp
from benchmarks.workloads import get_workload
from engine.model.compile import prepare_data, compile_model
from engine.sampling.batch import cast_arrays, precision_scope

w = get_workload("w4"); model = w.build_model()
P, C, K = int(sys.argv[1]) if len(sys.argv) > 1 else 50, 4, 2000

def bench(pd, label):
    cm = compile_model(model, pd)
    with precision_scope("float32"):
        arrs = {k: jnp.asarray(v) for k, v in cast_arrays(pd.device_arrays(), "float32").items()}
        g = jax.value_and_grad(cm.logdensity_fn)
        lanes = jax.vmap(jax.vmap(g, in_axes=(0, None)), in_axes=(0, 0))
        @jax.jit
        def loop(x, data):
            def body(i, carry):
                x, acc = carry
                lp, gr = lanes(x, data)
                return x + 1e-4 * gr, acc + lp.sum()
            return jax.lax.fori_loop(0, K, body, (x, jnp.float32(0)))
        x0 = jnp.zeros((P, C, cm.dim), jnp.float32) + 0.1
        jax.block_until_ready(loop(x0, arrs))
        best = 1e9
        for _ in range(5):
            t = time.perf_counter(); jax.block_until_ready(loop(x0, arrs)); best = min(best, time.perf_counter() - t)
        ns = best / (K * P * C) * 1e9
        print(f"{label}: {best*1e3:.1f} ms for {K} x {P}x{C} lanes -> {ns:.1f} ns per lane-gradient", flush=True)
        return ns

data = w.make_data(P, 0)
pd = prepare_data(model, {k: v for k, v in data.items()})
print("mean rows", pd.num_rows.mean(), "padded", pd.arrays["X"].shape[1])
a = bench(pd, "padded 60 rows + mask")
for n in (60, 37):
    d = {"X": np.stack([x[:1].repeat(n, 0) for x in data["X"]]), "y": np.stack([y[:1].repeat(n) for y in data["y"]])}
    bench(prepare_data(model, d), f"dense {n} rows, no mask")

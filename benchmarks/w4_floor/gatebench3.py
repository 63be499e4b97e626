import time, sys
from benchmarks.throughput import configure_xla
configure_xla("single", "safe", 1)
import numpy as np, jax, jax.numpy as jnp
from engine.sampling import gate as g
rng = np.random.default_rng(0)
pos = jnp.asarray(rng.normal(size=(50, 4, 2000, 5)), jnp.float32); div = jnp.zeros((50, 4, 2000), bool)
def tm(f, *a):
    jax.block_until_ready(f(*a)); best = 1e9
    for _ in range(5):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); best = min(best, time.perf_counter() - t)
    return best * 1e3
direct = jax.jit(jax.vmap(lambda p, d, n: g._gate(p[:, :256], d[:, :256], n, 400.0), in_axes=(0, 0, None)))
print("_gate window 256 n=200", f"{tm(direct, pos, div, jnp.int32(200)):.0f} ms")
f = jax.jit(jax.vmap(lambda p, d, n: g.gate(p, d, n, 400.0), in_axes=(0, 0, None)))
for n in (200, 300, 700, 1200):
    print("gate n =", n, f"{tm(f, pos, div, jnp.int32(n)):.0f} ms", flush=True)

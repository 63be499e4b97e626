"""Time the stopping gate per block: ``jit(vmap(gate))`` over 97 lanes x 4 chains x a 1000-draw
buffer (1 dim, float32), the demo audit's shape. Compare ``ENGINE_HOST_SORT=0`` and ``1``:

    ENGINE_HOST_SORT=0 nice -n 10 .venv/bin/python -m benchmarks.gate_bench
    nice -n 10 .venv/bin/python -m benchmarks.gate_bench
"""

from __future__ import annotations

import time

import numpy as np


def main():
    import jax
    import jax.numpy as jnp

    from engine.sampling import gate, sorting

    x = jnp.asarray(np.random.default_rng(0).normal(size=(97, 4, 1000, 1)).cumsum(2).astype(np.float32))
    diverging = jnp.zeros((97, 4, 1000), bool)
    fn = jax.jit(lambda p, d, n: jax.vmap(lambda a, b: gate.gate(a, b, n, 400.0))(p, d))
    for n in (200, 1000):
        jax.block_until_ready(fn(x, diverging, jnp.int32(n)))
        times = []
        for _ in range(7):
            t = time.perf_counter()
            jax.block_until_ready(fn(x, diverging, jnp.int32(n)))
            times.append(time.perf_counter() - t)
        print(f"host_sort={sorting.host_sort_enabled()} gate (97 lanes, 4 chains, 1000-draw buffer) "
              f"num_draws={n}: median {np.median(times) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()

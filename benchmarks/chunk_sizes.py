"""Chunk size vs speed on CPU: one workload, N problems, several ``batch_size`` values, one process.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 nice -n 10 .venv/bin/python -m benchmarks.chunk_sizes \
        --workload w1 --sampler chees --n 1000 --sizes 100,250,500,1000 --draws 500

Prints one JSON line per chunk size: wall seconds of the first call (compile included) and of
a second call (compiled program reused), the devices used, and the share of problems passing
R-hat < 1.01 (chunking changes no statistic, only speed).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="w1")
    p.add_argument("--sampler", default="chees")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--sizes", default="100,250,500,1000")
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--precision", default="float32")
    p.add_argument("--devices", type=int, default=-1)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    import jax

    import engine
    from benchmarks.workloads import get_workload

    w = get_workload(a.workload)
    model, data = w.build_model(), w.make_data(a.n, 0)
    for size in [int(s) for s in a.sizes.split(",")]:
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            idata = engine.sample_batched(model, data, sampler=a.sampler, chains=4, draws=a.draws, tune=a.draws,
                                          batch_size=size, precision=a.precision, devices=a.devices, progress=False)
            times.append(time.perf_counter() - t0)
        import arviz as az

        rhat = az.rhat(idata).to_array().max("variable").values.reshape(a.n, -1).max(-1)
        print(json.dumps({"workload": a.workload, "sampler": a.sampler, "n": a.n, "batch_size": size,
                          "devices": jax.device_count(), "draws": a.draws, "precision": a.precision,
                          "first_s": round(times[0], 2), "rerun_s": [round(t, 2) for t in times[1:]],
                          "rhat_ok": float(np.mean(rhat < 1.01))}), flush=True)


if __name__ == "__main__":
    main()

"""Where does float32 change answers? w1 with its data shifted by an offset, float32 vs float64.

    nice -n 10 .venv/bin/python -m benchmarks.precision_check

For each offset, the largest |posterior mean - closed form| over 20 problems in units of the
Monte Carlo standard error (z), and the largest relative error of the posterior sd, with ChEES
(4 chains x 500 + 500). float32 resolves 2^-24 relative to a value: at offset c the spacing of
representable numbers near the data is about c * 6e-8, against posterior sds of 0.1-0.5 here.
"""

from __future__ import annotations

import json

import numpy as np


def main():
    import arviz as az

    import engine
    from benchmarks.workloads import w1_data, w1_model
    from tests.models import normal_normal_posterior

    base = w1_data(20, seed=0)
    for offset in (0.0, 1e3, 1e4, 1e5, 1e6):
        data = {**base, "y": base["y"] + offset, "prior_mu": base["prior_mu"] + offset}
        mean, sd = normal_normal_posterior(data)
        row = {"offset": offset}
        for precision in ("float32", "float64"):
            idata = engine.sample_batched(w1_model(), data, sampler="chees", target_accept=0.651, chains=4,
                                          draws=500, tune=500, precision=precision, progress=False)
            theta = idata.posterior.theta.values.astype(np.float64)
            ess = az.ess(idata).theta.values
            z = np.abs(theta.mean((0, 1)) - mean) / (sd / np.sqrt(ess))
            row[precision] = {"max_z": round(float(np.max(z)), 2),
                              "max_sd_rel_err": round(float(np.max(np.abs(theta.std((0, 1)) / sd - 1))), 3),
                              "rhat_max": round(float(az.rhat(idata).theta.max()), 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

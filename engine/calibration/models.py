"""PyMC templates for simulation-based calibration (``analysis=sbc``; ``analysis.model=<builder>``).

A builder returns a ``pm.Model`` whose observed variables take their data from ``pm.Data``
containers (each simulation is one problem of the batched fit); any builder with that property
works, e.g. ``analysis.model=mypkg.models.build``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EIGHT_SCHOOLS_SIGMA", "eight_schools", "normal_normal"]

EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
"""Standard errors of the eight schools' effects (Rubin 1981; BDA3 §5.5)."""


def eight_schools(prior_tau_scale: float = 5.0):
    """Eight schools, non-centred: ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(prior_tau_scale)``,
    ``theta_tilde ~ N(0, 1)[8]``, ``theta = mu + tau * theta_tilde``, ``y ~ N(theta, sigma)``
    with the schools' known ``sigma`` (simuk's example, non-centred so NUTS has no funnel)."""
    import pymc as pm

    with pm.Model() as model:
        y = pm.Data("y", np.zeros(8))
        sigma = pm.Data("sigma", EIGHT_SCHOOLS_SIGMA)
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfNormal("tau", float(prior_tau_scale))
        theta_tilde = pm.Normal("theta_tilde", 0.0, 1.0, shape=8)
        theta = pm.Deterministic("theta", mu + tau * theta_tilde)
        pm.Normal("obs", theta, sigma, observed=y)
    return model


def normal_normal(prior_sd: float = 1.0, obs_sd: float = 1.0, num_obs: int = 1):
    """``theta ~ N(0, prior_sd)``, ``y_i ~ N(theta, obs_sd)``, ``i < num_obs``: the smallest SBC
    template; a simulator with another ``prior_sd`` or ``obs_sd`` makes a miscalibrated fit."""
    import pymc as pm

    with pm.Model() as model:
        y = pm.Data("y", np.zeros(int(num_obs)))
        theta = pm.Normal("theta", 0.0, float(prior_sd))
        pm.Normal("obs", theta, float(obs_sd), observed=y)
    return model

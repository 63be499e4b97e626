"""The benchmark's four workloads: one PyMC template each, plus a data generator for N problems.

Every template reads its per-problem inputs from ``pm.Data`` containers, so the engine compiles
it once and samples all N posteriors in one program, and the ``pm.sample`` loop swaps the data in
with ``pm.set_data`` - the same model for every contestant.

- ``w1`` 1-D Normal-Normal, 20 observations (conjugate; the audit's univariate belief).
- ``w2`` MvNormal mean, K=8, 20 observations, full per-problem covariance (a correlated posterior).
- ``w3`` hierarchical "attention" model: L=4 layers x H=8 heads x S=50 scores per head, a
  global mean, layer and head effects with half-normal scales, NON-centred (Betancourt &
  Girolami 2015), 40 parameters.
- ``w4`` ragged linear regressions: intercept, 3 slopes and a noise scale; every problem has
  its own number of rows (10 to 60), padded and masked by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pymc as pm

__all__ = ["Workload", "WORKLOADS", "get_workload"]


@dataclass(frozen=True)
class Workload:
    """A benchmark workload.

    name
        Short id ("w1".."w4").
    title
        One line for tables.
    build_model
        ``() -> pm.Model`` with ``pm.Data`` containers.
    make_data
        ``(num_problems, seed) -> {container: array [num_problems, ...] or list of arrays}``.
    dense_mass
        Whether a dense mass matrix is the sensible engine setting (correlated posterior).
    equivalent
        ``None``, or ``() -> (model, data -> data)``: the same posterior written another way, for
        a peer that cannot compile ``build_model``'s form (nutpie's numba backend and w2's
        covariance inputs); the engine always samples ``build_model``.
    """

    name: str
    title: str
    build_model: Callable[[], pm.Model]
    make_data: Callable[[int, int], dict]
    dense_mass: bool = False
    equivalent: Callable[[], tuple[pm.Model, Callable[[dict], dict]]] | None = None


# ---------------------------------------------------------------- w1: Normal-Normal, n = 20
W1_NUM_OBS = 20


def w1_model() -> pm.Model:
    """theta ~ N(prior_mu, prior_sigma); y_j ~ N(theta, obs_sigma), j = 1..20."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(W1_NUM_OBS))
        prior_mu = pm.Data("prior_mu", 0.0)
        prior_sigma = pm.Data("prior_sigma", 1.0)
        obs_sigma = pm.Data("obs_sigma", 1.0)
        theta = pm.Normal("theta", prior_mu, prior_sigma)
        pm.Normal("obs", theta, obs_sigma, observed=y)
    return model


def w1_data(num_problems: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prior_mu = rng.normal(0, 2, num_problems)
    prior_sigma = rng.uniform(0.3, 3.0, num_problems)
    obs_sigma = rng.uniform(0.5, 2.0, num_problems)
    theta = rng.normal(prior_mu, prior_sigma)
    y = theta[:, None] + obs_sigma[:, None] * rng.normal(size=(num_problems, W1_NUM_OBS))
    return {"y": y, "prior_mu": prior_mu, "prior_sigma": prior_sigma, "obs_sigma": obs_sigma}


# ---------------------------------------------------------------- w2: MvNormal K = 8, full cov
W2_DIM = 8
W2_NUM_OBS = 20


def _w2_template(param: str) -> pm.Model:
    """w2's template with its covariances given as ``param`` (``cov`` or ``chol``) inputs."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros((W2_NUM_OBS, W2_DIM)))
        prior_mu = pm.Data("prior_mu", np.zeros(W2_DIM))
        prior = pm.Data(f"prior_{param}", np.eye(W2_DIM))
        obs = pm.Data(f"obs_{param}", np.eye(W2_DIM))
        mu = pm.MvNormal("mu", prior_mu, **{param: prior})
        pm.MvNormal("obs", mu, **{param: obs}, observed=y)
    return model


def w2_model() -> pm.Model:
    """mu ~ MvN(prior_mu, prior_cov); y_j ~ MvN(mu, obs_cov), j = 1..20, K = 8."""
    return _w2_template("cov")


def w2_chol_model() -> pm.Model:
    """w2 with its covariances given as lower Cholesky factors (``MvNormal(chol=...)``): the same
    posterior; no Cholesky decomposition of a data input in the graph."""
    return _w2_template("chol")


def w2_chol_data(data: dict) -> dict:
    """w2's data for :func:`w2_chol_model`: each covariance replaced by its lower Cholesky factor."""
    return {"y": data["y"], "prior_mu": data["prior_mu"], "prior_chol": np.linalg.cholesky(data["prior_cov"]),
            "obs_chol": np.linalg.cholesky(data["obs_cov"])}


def _random_cov(rng, dim: int, scale: float) -> np.ndarray:
    """A random SPD covariance with strong correlations (condition numbers of 10-100)."""
    a = rng.normal(size=(dim, dim))
    q, _ = np.linalg.qr(a)
    eig = np.exp(rng.uniform(np.log(0.1), np.log(2.0), dim))
    return scale * (q * eig) @ q.T


def w2_data(num_problems: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prior_mu = rng.normal(0, 1, (num_problems, W2_DIM))
    prior_cov = np.stack([_random_cov(rng, W2_DIM, 4.0) for _ in range(num_problems)])
    obs_cov = np.stack([_random_cov(rng, W2_DIM, 2.0) for _ in range(num_problems)])
    y = np.empty((num_problems, W2_NUM_OBS, W2_DIM))
    for i in range(num_problems):
        mu = rng.multivariate_normal(prior_mu[i], prior_cov[i])
        y[i] = rng.multivariate_normal(mu, obs_cov[i], W2_NUM_OBS)
    return {"y": y, "prior_mu": prior_mu, "prior_cov": prior_cov, "obs_cov": obs_cov}


# ---------------------------------------------------------------- w3: hierarchical attention
W3_LAYERS, W3_HEADS, W3_SCORES = 4, 8, 50


def w3_model() -> pm.Model:
    """Per-head mean attention score with layer and head effects, non-centred.

    theta[l, h] = mu + tau_layer * z_layer[l] + tau_head * z_head[l, h];
    y[l, h, s] ~ N(theta[l, h], sigma), s = 1..50.
    """
    with pm.Model() as model:
        y = pm.Data("y", np.zeros((W3_LAYERS, W3_HEADS, W3_SCORES)))
        mu = pm.Normal("mu", 0.0, 2.0)
        tau_layer = pm.HalfNormal("tau_layer", 1.0)
        tau_head = pm.HalfNormal("tau_head", 1.0)
        z_layer = pm.Normal("z_layer", 0.0, 1.0, shape=W3_LAYERS)
        z_head = pm.Normal("z_head", 0.0, 1.0, shape=(W3_LAYERS, W3_HEADS))
        sigma = pm.HalfNormal("sigma", 2.0)
        theta = mu + tau_layer * z_layer[:, None] + tau_head * z_head
        pm.Normal("obs", theta[:, :, None], sigma, observed=y)
    return model


def w3_data(num_problems: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = num_problems
    mu = rng.normal(0, 1, n)
    tau_layer = np.abs(rng.normal(0, 0.5, n))
    tau_head = np.abs(rng.normal(0, 0.3, n))
    sigma = rng.uniform(0.5, 1.5, n)
    theta = (
        mu[:, None, None]
        + tau_layer[:, None, None] * rng.normal(size=(n, W3_LAYERS, 1))
        + tau_head[:, None, None] * rng.normal(size=(n, W3_LAYERS, W3_HEADS))
    )
    y = theta[..., None] + sigma[:, None, None, None] * rng.normal(
        size=(n, W3_LAYERS, W3_HEADS, W3_SCORES)
    )
    return {"y": y}


# ---------------------------------------------------------------- w4: ragged regressions
W4_PREDICTORS = 3
W4_MIN_ROWS, W4_MAX_ROWS = 10, 60


def w4_model() -> pm.Model:
    """y_i ~ N(alpha + X_i . beta, sigma) with each problem's own number of rows."""
    with pm.Model() as model:
        X = pm.Data("X", np.zeros((W4_MIN_ROWS, W4_PREDICTORS)))
        y = pm.Data("y", np.zeros(W4_MIN_ROWS))
        alpha = pm.Normal("alpha", 0.0, 5.0)
        beta = pm.Normal("beta", 0.0, 2.5, shape=W4_PREDICTORS)
        sigma = pm.HalfNormal("sigma", 2.0)
        pm.Normal("obs", alpha + pm.math.dot(X, beta), sigma, observed=y)
    return model


def w4_data(num_problems: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(W4_MIN_ROWS, W4_MAX_ROWS + 1, num_problems)
    rows[0] = W4_MIN_ROWS  # every subset of >= 2 problems pads to the same shape
    if num_problems > 1:
        rows[1] = W4_MAX_ROWS
    xs, ys = [], []
    for n in rows:
        x = rng.normal(size=(n, W4_PREDICTORS))
        alpha = rng.normal(0, 2)
        beta = rng.normal(0, 1, W4_PREDICTORS)
        sigma = rng.uniform(0.5, 2.0)
        xs.append(x)
        ys.append(alpha + x @ beta + sigma * rng.normal(size=n))
    return {"X": xs, "y": ys}


WORKLOADS: dict[str, Workload] = {
    "w1": Workload("w1", "1-D Normal-Normal, 20 obs", w1_model, w1_data),
    "w2": Workload("w2", "MvNormal K=8, full covariance, 20 obs", w2_model, w2_data, dense_mass=True,
                   equivalent=lambda: (w2_chol_model(), w2_chol_data)),
    "w3": Workload(
        "w3", "hierarchical attention L=4 H=8 S=50, non-centred (40 params)", w3_model, w3_data
    ),
    "w4": Workload("w4", "ragged regressions, 10-60 rows, 3 predictors", w4_model, w4_data),
}


def get_workload(name: str) -> Workload:
    """The workload called ``name``; ``ValueError`` names the choices otherwise."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}") from None

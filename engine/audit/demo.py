"""The embedded demo: beliefs generated at run time, deterministically, with no download.

Univariate: a tiny PyTorch amortised variational model. Each token has a Normal prior, a few
Normal observations (ragged counts) and a latent ``theta``; an encoder maps the token's
observations (masked mean and count) and its prior to ``(mu_q, log sigma_q)`` and is trained
on the negative ELBO (reparameterised Monte Carlo, Kingma & Welling 2014) for a few seconds on
one CPU thread. Beliefs are saved as ``.pt`` dicts of tensors after several training steps,
so the audit shows them improving over training.

Multivariate: K-dimensional tokens whose beliefs are mean-field (diagonal) Gaussians at three
"checkpoints" that approach the optimal mean-field fit of the exact posterior (variances
``1 / diag(precision)``, the classic VI under-estimate), saved as one ``.npz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["univariate_demo", "multivariate_demo"]


def _token_problems(rng: np.random.Generator, num_tokens: int, max_obs: int):
    prior_mu = rng.normal(0.0, 1.0, num_tokens)
    prior_sigma = rng.uniform(0.5, 2.0, num_tokens)
    obs_sigma = rng.uniform(0.5, 2.0, num_tokens)
    theta = prior_mu + prior_sigma * rng.normal(size=num_tokens)
    n_obs = rng.integers(1, max_obs + 1, num_tokens)
    observed = theta[:, None] + obs_sigma[:, None] * rng.normal(size=(num_tokens, max_obs))
    mask = np.arange(max_obs)[None, :] < n_obs[:, None]
    observed = np.where(mask, observed, 0.0)
    return prior_mu, prior_sigma, obs_sigma, observed, n_obs


def univariate_demo(
    out_dir,
    *,
    num_tokens: int = 128,
    max_obs: int = 12,
    checkpoint_steps: Sequence[int] = (20, 80, 400),
    seed: int = 0,
    lr: float = 0.01,
    num_elbo_draws: int = 8,
) -> list[Path]:
    """Train the amortised encoder and save beliefs at ``checkpoint_steps``; returns the ``.pt`` paths.

    Each file ``beliefs_step{step:05d}.pt`` is a dict of tensors (``mu_q``, ``sigma_q``,
    ``observed`` [T, n], ``n_obs``, ``prior_mu``, ``prior_sigma``, ``obs_sigma``, ``token``) plus
    its ``checkpoint`` label, loadable with ``torch.load(weights_only=True)``;
    ``encoder_step{step:05d}.pt`` holds the encoder's ``state_dict``.
    """
    import torch

    steps = sorted(int(s) for s in checkpoint_steps)
    if len(steps) < 1 or steps[0] < 0:
        raise ValueError(f"checkpoint_steps must be non-negative, got {checkpoint_steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prior_mu, prior_sigma, obs_sigma, observed, n_obs = _token_problems(rng, num_tokens, max_obs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: bitwise reproducible, and quick at this size
    try:
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        y = torch.as_tensor(observed, dtype=f64)
        n = torch.as_tensor(n_obs, dtype=f64)
        mask = torch.arange(max_obs)[None, :] < torch.as_tensor(n_obs)[:, None]
        pm_, ps, os_ = (torch.as_tensor(a, dtype=f64) for a in (prior_mu, prior_sigma, obs_sigma))
        ybar = (y * mask).sum(1) / n
        features = torch.stack([ybar, torch.log(n), pm_, torch.log(ps), torch.log(os_)], dim=1)
        encoder = torch.nn.Sequential(
            torch.nn.Linear(5, 32, dtype=f64), torch.nn.Tanh(), torch.nn.Linear(32, 2, dtype=f64)
        )
        with torch.no_grad():
            for p in encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=f64) * 0.3)
        opt = torch.optim.Adam(encoder.parameters(), lr=lr)

        def beliefs():
            out = encoder(features)
            return out[:, 0], out[:, 1]

        def negative_elbo():
            mu, log_sigma = beliefs()
            eps = torch.randn((num_elbo_draws, num_tokens), generator=gen, dtype=f64)
            theta = mu + torch.exp(log_sigma) * eps  # reparameterised draws from q
            log_prior = torch.distributions.Normal(pm_, ps).log_prob(theta)
            log_lik = (torch.distributions.Normal(theta[..., None], os_[:, None]).log_prob(y) * mask).sum(-1)
            entropy = log_sigma  # + constant
            return -((log_prior + log_lik).mean(0) + entropy).mean()

        paths = []
        step = 0
        for target in steps:
            while step < target:
                opt.zero_grad()
                loss = negative_elbo()
                loss.backward()
                opt.step()
                step += 1
            with torch.no_grad():
                mu, log_sigma = beliefs()
            label = f"step{target:05d}"
            record = {
                "mu_q": mu.detach().clone(),
                "sigma_q": torch.exp(log_sigma).detach().clone(),
                "observed": y.clone(),
                "n_obs": torch.as_tensor(n_obs),
                "prior_mu": pm_.clone(),
                "prior_sigma": ps.clone(),
                "obs_sigma": os_.clone(),
                "token": torch.arange(num_tokens),
                "checkpoint": label,
            }
            path = out_dir / f"beliefs_{label}.pt"
            torch.save(record, path)
            torch.save(encoder.state_dict(), out_dir / f"encoder_{label}.pt")
            paths.append(path)
    finally:
        torch.set_num_threads(threads)
    return paths


def _random_spd(rng: np.random.Generator, dim: int, scale: float) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    q, _ = np.linalg.qr(a)
    vals = scale * rng.uniform(0.5, 2.0, dim)
    return (q * vals) @ q.T


def multivariate_demo(
    out_dir,
    *,
    num_tokens: int = 64,
    dim: int = 3,
    max_obs: int = 10,
    num_checkpoints: int = 3,
    seed: int = 0,
) -> Path:
    """Mean-field beliefs of K-dimensional tokens at ``num_checkpoints`` stages; one ``.npz``.

    Stage ``c`` has mean error ``0.8 * 0.35**c`` posterior sds and variances inflated by
    ``1 + 1.5 * 0.15**c`` over the optimal mean-field ones, so it improves towards, but never
    reaches, the exact posterior: mean-field cannot represent its correlations and ends up
    over-confident in the correlated directions.
    """
    from engine.audit.references import mvnormal_known_cov

    rng = np.random.default_rng(seed + 1)
    K = int(dim)
    prior_mu = rng.normal(0.0, 1.0, (num_tokens, K))
    prior_cov = _random_spd(rng, K, 1.5)
    base = _random_spd(rng, K, 1.0)
    obs_scale = rng.uniform(0.5, 2.0, num_tokens)
    obs_cov = obs_scale[:, None, None] * base
    theta = prior_mu + rng.normal(size=(num_tokens, K)) @ np.linalg.cholesky(prior_cov).T
    n_obs = rng.integers(1, max_obs + 1, num_tokens)
    noise = rng.normal(size=(num_tokens, max_obs, K)) @ np.linalg.cholesky(base).T
    observed = theta[:, None, :] + np.sqrt(obs_scale)[:, None, None] * noise
    mask = np.arange(max_obs)[None, :] < n_obs[:, None]
    observed = np.where(mask[..., None], observed, 0.0)
    mean, cov = mvnormal_known_cov(prior_mu, prior_cov, obs_cov, observed, n_obs)
    mf_var = 1.0 / np.diagonal(np.linalg.inv(cov), axis1=-2, axis2=-1)  # optimal mean-field
    sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    mus, covs = [], []
    for c in range(num_checkpoints):
        err = 0.8 * 0.35**c * sd * rng.normal(size=(num_tokens, K))
        mus.append(mean + err)
        covs.append(np.eye(K) * (mf_var * (1.0 + 1.5 * 0.15**c))[..., None, :])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "beliefs_multivariate.npz"
    np.savez(
        path,
        mu_q=np.stack(mus),
        cov_q=np.stack(covs),
        observed=observed,
        n_obs=n_obs,
        prior_mu=prior_mu,
        prior_cov=prior_cov,
        obs_cov=obs_cov,
        checkpoint=np.array([f"stage{c}" for c in range(num_checkpoints)]),
        token=np.arange(num_tokens),
    )
    return path

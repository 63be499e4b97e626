"""Warm starts for audits: every token's chains start from its belief q, dispersed.

An audit already holds a Gaussian guess q = N(mu_q, Sigma_q) of every posterior it samples.
Where that is valid, :func:`warm_start_arrays` turns it into the batch driver's optional
per-problem start data (``engine.sampling.batch``):

- ``START_MEAN``, ``START_SCALE``: the first ``chains // 2`` chains start from draws of q with its
  scale inflated ``INFLATION`` times (``mu_q + 2 * L_q * eps``, ``L_q`` q's standard deviations or
  Cholesky factor); the other chains keep the engine's usual jittered start around the
  template's initial point, which knows nothing of q.
- ``START_INVERSE_MASS``: every chain's kernel starts its adaptation from q's variances
  (``sigma_q**2``; multivariate: ``diag(cov_q)``, or ``cov_q`` itself with ``dense_mass``).

Warmup then has little to find: the chains start in or around the typical set and the step size
is tuned for the right scale from the first transition, so a much shorter warmup certifies the
same posteriors (``WARM_START_TUNE``, measured on the demo audits: see the configs and README).

Why R-hat still means something. Split R-hat (Gelman & Rubin 1992; Vehtari et al. 2021) compares
the spread between chains with the spread within them; it can reveal chains that have not
forgotten their starts only when those starts are overdispersed relative to the target. Starting
every chain at q's mean would defeat it exactly when q is wrong. Here half the chains start from
q with twice its scale, which covers the posterior whenever q's scale is at least half the
posterior's, and half start independently of q. If q is biased or overconfident the two halves
begin in different places, and R-hat flags the disagreement unless the chains have truly mixed.
The starts and the warmup transitions are discarded, the starting metric only sets the
adaptation's first guess, and sampling uses the adapted kernel, which leaves the posterior
invariant: q changes how fast the certificate is reached, not what is certified.

Where it is valid. The draws of q are positions on the sampler's unconstrained space only when
``theta`` is the template's sole latent and untransformed (the built-in templates); for anything
else (a transformed or extra latent) the audit falls back to the default starts and says so in
its notes. The host sampler (``sampler=pymc``) has its own initialisation and gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["INFLATION", "WARM_START_TUNE", "WarmStart", "warm_start_supported", "warm_start_arrays"]

INFLATION = 2.0
"""Factor on q's standard deviations of the warm starts' draws (overdispersion for R-hat)."""

WARM_START_TUNE = 200
"""Audits' warmup transitions per chain when warm-started (``analysis.warm_start_tune``): the
shortest that kept >= 99% of the demo audits' tokens converged with KL within MCSE of the
1000-step warmup (measurements in ``conf/analysis/vfe_univariate.yaml`` and README)."""


@dataclass(frozen=True)
class WarmStart:
    """Whether an audit's chains start from q, and why not when they do not.

    applied
        The start arrays are in the sampled problems' data.
    reason
        ``None`` when applied or not asked for; otherwise one line for the report's notes.
    """

    applied: bool
    reason: str | None = None


def warm_start_supported(compiled, kernel) -> WarmStart:
    """Whether chains may start from q: ``theta`` is the only, untransformed latent and the
    kernel is a batched JAX kernel."""
    if kernel.runs_on_host:
        return WarmStart(False, f"warm start not available with sampler={kernel.name}: default starts used")
    latents = sorted(compiled.value_slices)
    if latents != ["theta"]:
        return WarmStart(
            False,
            f"warm start not valid for latents {latents} (needs theta as the only, untransformed "
            "latent): default jittered starts used",
        )
    return WarmStart(True)


def warm_start_arrays(beliefs, problems: np.ndarray, dense_mass: bool) -> dict[str, np.ndarray]:
    """Start data of the problems sampled, each from the belief of flat problem ``problems[d]``.

    Parameters
    ----------
    beliefs
        The audit's :class:`~engine.audit.beliefs.BeliefSet`.
    problems
        ``[D]`` flat problem indices (``checkpoint * T + token``) whose q starts sampled problem
        ``d`` (with deduplication, the latest checkpoint of the group).
    dense_mass
        Whether the kernel adapts a dense metric: the starting inverse mass matrix is then
        ``cov_q`` (multivariate), otherwise its diagonal.

    Returns
    -------
    dict
        ``{START_MEAN: [D, dim], START_SCALE: [D, dim] or [D, dim, dim], START_INVERSE_MASS:
        [D, dim] or [D, dim, dim]}`` as host float64 arrays.
    """
    from engine.sampling.batch import START_INVERSE_MASS, START_MEAN, START_SCALE

    problems = np.asarray(problems)
    mu = np.asarray(beliefs.host("mu_q"), np.float64)[problems]
    if beliefs.kind == "univariate":
        sd = np.asarray(beliefs.host("sigma_q"), np.float64)[problems]
        mean, scale, imm = mu[:, None], INFLATION * sd[:, None], (sd**2)[:, None]
        if dense_mass:
            imm = imm[:, :, None]
        return {START_MEAN: mean, START_SCALE: scale, START_INVERSE_MASS: imm}
    cov = np.asarray(beliefs.host("cov_q"), np.float64)[problems]
    chol = np.linalg.cholesky(cov)
    imm = cov if dense_mass else np.diagonal(cov, axis1=-2, axis2=-1).copy()
    return {START_MEAN: mu, START_SCALE: INFLATION * chol, START_INVERSE_MASS: imm}

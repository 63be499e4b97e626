"""The data an audit samples: the template's inputs filled from the beliefs, and each sampled
target's members' q (the per-member part of the on-device summary, ``engine.audit.summary``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.audit.beliefs import BeliefSet, array_namespace
from engine.errors import InputError

__all__ = ["model_inputs", "member_data", "make_problem_data"]


def model_inputs(model, bs: BeliefSet) -> dict[str, Any]:
    """The model's ``pm.Data`` containers filled from the beliefs, flat over problems."""
    names = [v.name for v in model.data_vars]
    if bs.kind == "univariate":
        source = {n: bs.flat(n) for n in ("observed", "prior_mu", "prior_sigma", "obs_sigma")}
    else:
        source = {
            "observed": bs.flat("observed"),
            "prior_mu": bs.flat("prior_mu"),
            "prior_chol": cholesky(bs.flat("prior_cov")),
            "obs_chol": cholesky(bs.flat("obs_cov")),
        }
    unknown = [n for n in names if n not in source]
    if unknown:
        raise InputError(
            f"field 'model': pm.Data container {unknown[0]!r} is not a beliefs field; "
            f"templates may read {sorted(source)}"
        )
    if "observed" not in names:
        raise InputError("field 'model': the template has no pm.Data container named 'observed'")
    if "theta" not in [rv.name for rv in model.free_RVs]:
        raise InputError("field 'model': the template has no free variable named 'theta'")
    return {n: source[n] for n in names}


def cholesky(cov):
    return array_namespace(cov).linalg.cholesky(cov)


def make_problem_data(inputs: dict, num_obs: np.ndarray, extras: dict | None = None):
    from engine.model.compile import ProblemData

    n = inputs["observed"].shape[1]
    ragged = bool((num_obs != n).any())
    arrays = dict(inputs)
    if extras:
        arrays.update(extras)
    return ProblemData(
        arrays=arrays,
        num_rows=num_obs if ragged else None,
        ragged_names=("observed",) if ragged else (),
    )


def member_data(bs: BeliefSet, targets) -> dict:
    """Each target's members' q, true latents and flat problem indices (``__index__``, for q's
    random stream), ``[D, M, ...]`` (``engine.audit.summary.MEMBER_FIELDS``)."""
    members = targets.members
    extras = {"mu_q": bs.flat("mu_q")[members], "__index__": members.astype(np.int32)}
    if bs.kind == "univariate":
        extras["sigma_q"] = bs.flat("sigma_q")[members]
    else:
        extras["chol_q"] = cholesky(bs.flat("cov_q"))[members]
    if "z_true" in bs.fields:
        extras["z_true"] = bs.flat("z_true")[members]
    return extras

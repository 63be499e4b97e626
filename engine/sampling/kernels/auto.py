"""``auto``: the default sampler, a choice of kernel per template with a per-problem NUTS fallback.

It has no one-problem kernel of its own: ``engine.sampling.batch.run_batched`` hands a run named
``auto`` to :func:`engine.sampling.auto.run_auto`, which picks ChEES HMC or BlackJAX NUTS for the
template, checks every problem against the convergence gate and reruns the failures with a
careful NUTS (see :mod:`engine.sampling.auto` for the rules).
"""

from __future__ import annotations

from engine.sampling.kernels.base import Kernel


def _drive(compiled, problem_data, config, **kw):
    from engine.sampling.auto import run_auto

    return run_auto(compiled, problem_data, config, **kw)


KERNEL = Kernel(
    name="auto",
    description="auto (ChEES HMC or NUTS per template, NUTS fallback per problem)",
    build=None,
    driver=_drive,
)

"""The kernel protocol: what every sampler module provides, and the constants they share.

A sampler is ONE posterior's Markov kernel, written for one chain (or, with ``chains_inside``,
for all of one problem's chains together). ``engine.sampling.batch`` is its only driver: it owns every
loop (``lax.scan`` over draws, ``lax.while_loop`` over leapfrog steps) and every ``vmap`` (over
chains and problems). This follows BlackJAX's ``SamplingAlgorithm(init, step)``
(``blackjax/base.py``) and NumPyro's ``MCMCKernel`` (``numpyro/infer/mcmc.py``): pure functions
of an explicit state, so a run can stop after any step and resume from the state it returned
(sampling in blocks relies on this).

Adding a sampler is one module that defines ``KERNEL = Kernel(...)`` and one line in
``engine.sampling.kernels.REGISTRY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Optional

if TYPE_CHECKING:  # no JAX import here: the registry and the settings schema import this module
    import jax

DEFAULT_TARGET_ACCEPT = 0.8
"""Target mean acceptance probability of NUTS step-size adaptation: PyMC's and the engine's
default (Stan uses 0.8 too; Hoffman & Gelman 2014, section 3.2, dual averaging)."""

OPTIMAL_HMC_TARGET_ACCEPT = 0.651
"""Asymptotically optimal acceptance rate of HMC with a fixed trajectory length (Beskos, Pillai,
Roberts, Sanz-Serna & Stuart 2013, "Optimal tuning of the hybrid Monte Carlo algorithm",
Bernoulli 19(5A)); BlackJAX's ``OPTIMAL_TARGET_ACCEPTANCE_RATE`` for ChEES. The ``chees_dense``
config uses it."""

DEFAULT_TUNE = 1000
"""Warmup transitions per chain when a run leaves ``tune`` unset (``None``): NUTS's (PyMC's
default), MAMS's and every kernel's but ChEES's (:data:`CHEES_DEFAULT_TUNE`)."""

CHEES_DEFAULT_TUNE = 300
"""Warmup transitions per chain of the ``chees`` kernel when a run leaves ``tune`` unset (also
the ``auto`` sampler's ChEES first run). ChEES adapts one step size, one trajectory length and a
diagonal metric per problem, pooled across its chains, so it settles in far fewer transitions
than NUTS's windowed per-chain adaptation: at 4 x (tune + 1000), float32, N = 200, two seeds,
tune 150, 200, 300 and 1000 each certified (R-hat < 1.01, bulk and tail ESS >= 400, no
divergence) every problem of w1, w2 and w4; 300 keeps a margin above the shortest that passed
and runs in 0.55-0.85x the time of 1000 (``benchmarks/results/chees_tune.md``,
``python -m benchmarks.chees_tune``)."""

CHEES_TARGET_ACCEPT = 0.8
"""``target_accept`` of the ``chees`` kernel (its config and the ``auto`` sampler's first run).
:data:`OPTIMAL_HMC_TARGET_ACCEPT` is the optimum as the dimension grows; on this project's
low-dimensional templates ChEES at 0.8 spends the same gradients (ChEES adapts the trajectory's
length, not its number of steps) and fails R-hat < 1.01 less often at 4 x (500 + 500), float32:
1-D conjugate w1 1 of 1000 problems vs 21 at 0.651 (0 at 0.9); ragged regressions w4 23 of
1000 at 0.8, 29 at 0.9, 14 of 300 at 0.651."""

DEFAULT_MAX_TREE_DEPTH = 10
"""Maximum number of trajectory doublings (Stan's and PyMC's default): at most
``2**10 - 1`` leapfrog steps per transition."""

MAX_DELTA_ENERGY = 1000.0
"""Energy error above which a leapfrog step counts as divergent (Stan's and PyMC's value)."""

LogDensityFn = Callable[[Any], Any]
"""``position [dim] -> scalar`` log density of ONE problem on the unconstrained space."""


class KernelSettings(NamedTuple):
    """The sampler settings a kernel's program depends on (static: part of the compile key).

    target_accept
        Target mean acceptance probability of the step-size adaptation.
    max_tree_depth
        Maximum number of trajectory doublings (``2**max_tree_depth - 1`` leapfrog steps); HMC
        kernels cap their trajectory length with it too.
    dense_mass
        Adapt a dense inverse mass matrix (correlated posteriors) instead of a diagonal one.
    initial_step_size
        Step size at the start of warmup.
    pool_step_size
        After warmup, every chain of a problem samples with the smallest of its chains' adapted
        step sizes (:func:`pool_step_sizes`; kernels whose state has a per-chain ``step_size``).
    """

    target_accept: float = DEFAULT_TARGET_ACCEPT
    max_tree_depth: int = DEFAULT_MAX_TREE_DEPTH
    dense_mass: bool = False
    initial_step_size: float = 1.0
    pool_step_size: bool = False


class Schedule(NamedTuple):
    """How many transitions a run makes (static Python ints)."""

    num_tune: int
    num_draws: int

    @property
    def num_total(self) -> int:
        return self.num_tune + self.num_draws


class SampleStats(NamedTuple):
    """Per-draw statistics; each field ``[num_draws]`` for one chain (``[]`` for one transition).

    diverging
        Whether the transition hit a divergence.
    tree_depth
        Number of trajectory doublings (0 for HMC, which builds no tree).
    n_steps
        Number of leapfrog steps (gradient evaluations).
    energy
        Hamiltonian at the accepted state.
    lp
        Log density (unconstrained space) at the accepted state.
    acceptance_rate
        Mean Metropolis acceptance probability over the trajectory.
    step_size
        Adapted step size (constant over draws).
    """

    diverging: jax.Array
    tree_depth: jax.Array
    n_steps: jax.Array
    energy: jax.Array
    lp: jax.Array
    acceptance_rate: jax.Array
    step_size: jax.Array


class Transition(NamedTuple):
    """What one draw-sized ``step`` reports: ``position [dim]`` (``[chains, dim]`` for a
    ``chains_inside`` kernel) and its :class:`SampleStats` (fields ``[]`` or ``[chains]``)."""

    position: jax.Array
    stats: SampleStats


class SamplingAlgorithm(NamedTuple):
    """One kernel bound to one problem's log density, settings and schedule (``Kernel.build``).

    init
        ``(rng_key, position, inverse_mass_matrix=None) -> state``: a state at ``position``
        (one chain: key ``[2]``, position ``[dim]``; ``chains_inside``: keys ``[chains, 2]``,
        positions ``[chains, dim]``). ``inverse_mass_matrix`` (``[dim]`` diagonal or ``[dim,
        dim]`` dense, either accepted whatever ``dense_mass`` asks; see
        :func:`initial_inverse_mass_matrix`) is the metric the kernel starts from, e.g. a
        belief's variances: each kernel uses it as its adaptation's starting point where its
        library allows (its module says how); ``None`` is the identity.
    warmup
        ``state -> state``: the whole adaptation when a library runs it as one call (BlackJAX's
        window adaptation, ChEES), or ``None`` when warmup transitions are ordinary ``step``s
        that adapt as they go (the driver then runs ``num_tune`` steps and drops their output).
    step
        ``state -> (state, Transition | None)``: one transition (``loop="draws"``) or one
        leapfrog step (``loop="leapfrog"``, which reports ``None`` and records draws in its state).
    outputs
        ``loop="leapfrog"`` only: ``state -> (positions [num_draws, dim], SampleStats)``.
    is_done
        ``loop="leapfrog"`` only: ``state -> bool``, whether every transition is made.
    num_grads
        ``state -> int``: gradient evaluations made since ``init``, warmup included, for kernels
        that count them in their state (those with a ``warmup``, whose transitions the driver
        does not see). ``None``: the driver sums ``SampleStats.n_steps`` of every ``step`` it
        runs, warmup steps included.
    """

    init: Callable[..., Any]
    warmup: Optional[Callable[[Any], Any]]
    step: Callable[[Any], tuple[Any, Optional[Transition]]]
    outputs: Optional[Callable[[Any], tuple[Any, SampleStats]]] = None
    is_done: Optional[Callable[[Any], Any]] = None
    num_grads: Optional[Callable[[Any], Any]] = None


def initial_inverse_mass_matrix(inverse_mass_matrix, dim: int, dense: bool, dtype):
    """The inverse mass matrix a kernel starts from: the identity when ``None``; a diagonal
    ``[dim]`` made ``[dim, dim]`` for a dense metric, a dense one reduced to its diagonal for a
    diagonal metric; cast to ``dtype``."""
    import jax.numpy as jnp

    if inverse_mass_matrix is None:
        return jnp.eye(dim, dtype=dtype) if dense else jnp.ones(dim, dtype)
    imm = jnp.asarray(inverse_mass_matrix, dtype)
    if imm.shape not in ((dim,), (dim, dim)):
        raise ValueError(f"inverse_mass_matrix: expected shape ({dim},) or ({dim}, {dim}), got {imm.shape}")
    if dense and imm.ndim == 1:
        return jnp.diag(imm)
    if not dense and imm.ndim == 2:
        return jnp.diagonal(imm)
    return imm


def pool_step_sizes(states):
    """One problem's chain states (``[chains]`` leading axis) with every chain's ``step_size``
    set to the smallest of them: the step adapted where the posterior is hardest to integrate
    serves every chain (``KernelSettings.pool_step_size``)."""
    import jax.numpy as jnp

    if not hasattr(states, "step_size"):
        from engine.errors import InputError

        raise InputError(f"pool_step_size: this sampler's chain state ({type(states).__name__}) has no "
                         "per-chain step_size; set pool_step_size=False or use blackjax")
    return states._replace(step_size=jnp.full_like(states.step_size, jnp.min(states.step_size)))


class Kernel(NamedTuple):
    """A sampler as the registry knows it.

    name
        Its name in Python (``sample_batched(sampler=name)``) and in ``sampler.name``.
    description
        How reports name it ("blackjax NUTS").
    build
        ``(logdensity_fn, settings: KernelSettings, schedule: Schedule) -> SamplingAlgorithm``;
        ``None`` for a host kernel.
    chains_inside
        ``init``/``step`` take all of a problem's chains at once (cross-chain adaptation);
        otherwise the driver ``vmap``s one chain over chains.
    loop
        ``"draws"``: ``step`` makes one transition and the driver scans it over draws;
        ``"leapfrog"``: ``step`` makes one leapfrog step and the driver runs ONE while loop for
        the whole chunk until every lane ``is_done``, so vmapped chains never wait for each
        other's trees.
    check
        ``(chains, tune, settings) -> None``: raises ``ValueError`` for settings the kernel
        cannot run (checked when a run is configured, before anything compiles).
    target_accept
        The acceptance target its adaptation is meant for (its ``conf/sampler`` value, what
        benchmarks use); ``KernelSettings.target_accept`` is what a run asks for.
    default_tune
        Warmup transitions per chain of a run that leaves ``tune`` unset (``None``).
    host_loop
        A host kernel (``pymc``): ``(model, problem_data, *, chains, draws, tune, seed,
        settings, progress) -> (draws {name: [problem, chain, draw, ...]}, SampleStats)``
        instead of a JAX program. ``None`` for JAX kernels.
    driver
        A sampler that runs other kernels (``auto``): ``(compiled, problem_data, config, *,
        summary_fn, chunks, on_chunk, progress, keep_chunks) -> BatchResult``, called by
        ``engine.sampling.batch.run_batched`` in place of its own loop. ``None`` otherwise.
    """

    name: str
    description: str
    build: Optional[Callable[[LogDensityFn, KernelSettings, Schedule], SamplingAlgorithm]]
    chains_inside: bool = False
    loop: Literal["draws", "leapfrog"] = "draws"
    check: Optional[Callable[[int, int, KernelSettings], None]] = None
    target_accept: float = DEFAULT_TARGET_ACCEPT
    default_tune: int = DEFAULT_TUNE
    host_loop: Optional[Callable[..., tuple[dict, SampleStats]]] = None
    driver: Optional[Callable[..., Any]] = None

    @property
    def runs_on_host(self) -> bool:
        return self.host_loop is not None

"""One schema for the sampling settings: Python API, audits and the CLI share it.

:class:`SamplerConfig` is what to run for every problem, :class:`RuntimeConfig` where and how.
``sample_batched`` and ``audit_vfe`` build them from their keyword arguments
(:func:`from_kwargs`), the CLI from ``cfg.sampler`` / ``cfg.runtime`` (:func:`from_config`).
Both dataclasses are registered as Hydra structured configs (``sampler/schema``,
``runtime/schema``), which every ``conf/sampler/*.yaml`` and ``conf/runtime/*.yaml`` extends,
so a misspelt key or a value of the wrong type is refused when the config is composed.
"""

from __future__ import annotations

from engine.errors import InputError

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from engine.sampling.kernels.base import DEFAULT_MAX_TREE_DEPTH, DEFAULT_TARGET_ACCEPT, KernelSettings

__all__ = ["SamplerConfig", "RuntimeConfig", "from_kwargs", "from_config", "register_configs", "AUTO"]

AUTO = "auto"
"""The value that lets the engine choose: ``sampler.name`` (:mod:`engine.sampling.auto`) and
``runtime.precision`` (:func:`engine.sampling.auto.choose_precision`)."""

PRECISIONS = ("float64", "float32", AUTO)

DEFAULT_MAX_DRAWS = 4000
"""Most draws per chain of a problem that stops at ``target_ess`` when ``max_draws`` is not set."""


@dataclass(frozen=True)
class SamplerConfig:
    """What to run for every problem (``conf/sampler/*.yaml``).

    name
        A registered sampler (``engine.sampling.kernels.REGISTRY``; the CLI's option names are
        accepted); ``"auto"`` (default): ChEES HMC or NUTS per template with a per-problem NUTS
        fallback (:mod:`engine.sampling.auto`).
    chains, draws, tune
        Chains per problem; kept draws and warmup transitions per chain. ``tune=None``
        (default): the kernel's own warmup (``Kernel.default_tune``: 1000, ChEES 300), resolved
        by :meth:`checked`; ``auto`` resolves it per kernel it runs (its NUTS fallback: 2 x
        1000).
    target_accept, max_tree_depth, dense_mass, initial_step_size, pool_step_size
        The kernel's settings (:class:`~engine.sampling.kernels.base.KernelSettings`).
    init_tries
        Jittered initial points tried per chain before a problem is declared unstartable.
    jitter
        Half-width of the uniform jitter added to the model's initial point (PyMC's
        ``jitter+adapt_diag`` uses 1).
    target_ess
        Per-problem stopping (``None``: off, every problem keeps ``draws``). After warmup, draws
        run in blocks of ``block_draws`` per chain; a problem retires as soon as its kept draws
        pass the gate (R-hat < 1.01, bulk and tail ESS >= ``target_ess``, no divergences,
        :func:`engine.sampling.gate.gate`); one stops unconverged at once when its kept draws
        hold a divergence (the gate can then never pass), or at ``max_draws``.
    max_draws
        With ``target_ess``: most draws per chain (default ``max(DEFAULT_MAX_DRAWS, draws)``,
        rounded up to a multiple of ``block_draws``); must be >= ``draws``.
    block_draws
        With ``target_ess``: draws per chain between two gate checks.
    fallback_stopping
        ``name="auto"`` only: whether the fallback of a template ``auto`` starts with NUTS stops
        per problem (draws in blocks of ``block_draws`` until the gate passes, up to 4 x
        ``draws``; :func:`engine.sampling.auto.fallback_config`), so those problems keep
        ``num_draws`` draws each and the draw axis is padded past them. ``False``: every
        problem keeps ``draws`` (what simulation-based calibration needs).
    """

    name: str = AUTO
    chains: int = 4
    draws: int = 1000
    tune: Optional[int] = None
    target_accept: float = DEFAULT_TARGET_ACCEPT
    max_tree_depth: int = DEFAULT_MAX_TREE_DEPTH
    dense_mass: bool = False
    initial_step_size: float = 1.0
    pool_step_size: bool = False
    init_tries: int = 20
    jitter: float = 1.0
    target_ess: Optional[int] = None
    max_draws: Optional[int] = None
    block_draws: int = 100
    fallback_stopping: bool = True

    @property
    def is_stopping(self) -> bool:
        """Whether problems stop at ``target_ess`` (sampling in blocks)."""
        return self.target_ess is not None

    @property
    def max_draws_per_chain(self) -> int:
        """Draws per chain a problem can reach: ``draws`` without stopping, else ``max_draws``
        (default ``max(DEFAULT_MAX_DRAWS, draws)``) rounded up to whole blocks."""
        if not self.is_stopping:
            return int(self.draws)
        cap = max(DEFAULT_MAX_DRAWS, int(self.draws)) if self.max_draws is None else int(self.max_draws)
        block = int(self.block_draws)
        return -(-cap // block) * block

    @property
    def kernel_settings(self) -> KernelSettings:
        return KernelSettings(
            target_accept=float(self.target_accept), max_tree_depth=int(self.max_tree_depth),
            dense_mass=bool(self.dense_mass), initial_step_size=float(self.initial_step_size),
            pool_step_size=bool(self.pool_step_size),
        )

    def checked(self) -> "SamplerConfig":
        """This config with its sampler name made canonical; ``ValueError`` naming the field
        of a value no kernel can run (and the kernel's own checks, e.g. ChEES's chains >= 2)."""
        from engine.sampling.kernels import canonical_name, get_kernel

        config = dataclasses.replace(self, name=canonical_name(self.name))
        kernel = get_kernel(config.name)
        for field in ("chains", "draws"):
            if int(getattr(config, field)) < 1:
                raise InputError(f"{field} must be >= 1, got {getattr(config, field)}")
        if config.tune is None and kernel.driver is None:  # auto resolves it per kernel it runs
            config = dataclasses.replace(config, tune=kernel.default_tune)
        if config.tune is not None and int(config.tune) < 0:
            raise InputError(f"tune must be >= 0, got {config.tune}")
        if not 0.0 < float(config.target_accept) < 1.0:
            raise InputError(f"target_accept must be in (0, 1), got {config.target_accept}")
        if int(config.max_tree_depth) < 1:
            raise InputError(f"max_tree_depth must be >= 1, got {config.max_tree_depth}")
        if int(config.init_tries) < 1:
            raise InputError(f"init_tries must be >= 1, got {config.init_tries}")
        if int(config.block_draws) < 4:
            raise InputError(f"block_draws must be >= 4, got {config.block_draws}")
        if config.target_ess is not None:
            if int(config.target_ess) < 1:
                raise InputError(f"target_ess must be >= 1 or None, got {config.target_ess}")
            if int(config.chains) < 2:
                raise InputError(f"target_ess: the gate's R-hat needs chains >= 2, got {config.chains}")
            if config.max_draws is not None and int(config.max_draws) < int(config.draws):
                raise InputError(f"max_draws must be >= draws ({config.draws}), got {config.max_draws}")
        if config.target_ess is not None and kernel.runs_on_host:
            raise InputError(f"sampler {kernel.name!r} cannot stop at target_ess (pm.sample runs a fixed "
                             "number of draws); set target_ess=None or use a JAX sampler")
        if config.target_ess is not None and kernel.loop != "draws":
            raise InputError(f"sampler {kernel.name!r} runs its whole chunk in one leapfrog loop and cannot "
                             "stop at target_ess; set target_ess=None or use blackjax, numpyro or chees")
        if config.pool_step_size and kernel.loop != "draws":
            raise InputError(f"sampler {kernel.name!r} runs its whole chunk in one leapfrog loop and cannot "
                             "pool its chains' step sizes; set pool_step_size=False or use blackjax")
        if kernel.check is not None:  # every kernel with checks has its tune resolved above
            kernel.check(int(config.chains), int(config.tune), config.kernel_settings)
        return config


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the batched programs run (``conf/runtime/*.yaml``).

    platform
        "cpu" or "gpu" (the CLI sets ``JAX_PLATFORMS`` before JAX starts).
    precision
        "float64", "float32" (JAX's x64 mode for the run; float32 is ~1.5x faster on CPU) or
        "auto" (default): float32 unless the data's magnitudes or sizes make it unsafe
        (:func:`engine.sampling.auto.choose_precision`).
    batch_size
        Problems per compiled chunk (``None``: chosen for speed within a memory budget,
        :func:`engine.sampling.chunking.auto_batch_size`).
    seed
        Root seed; problem ``i`` uses ``fold_in(PRNGKey(seed), i)``.
    progress
        Progress bar (``None``: only when stderr is a terminal).
    devices
        Local devices to shard each chunk's problem axis over; 1 (or ``None``) one device, -1
        (default) all (on CPU one host device per core, made when ``engine`` is imported).
    overwrite
        Audits: a run directory holding another configuration's results is refused unless true.
    isolate_failures
        Audits: a token with no finite log density is flagged in its row instead of exit 2.
    """

    platform: str = "cpu"
    precision: str = AUTO
    batch_size: Optional[int] = None
    seed: int = 0
    progress: Optional[bool] = None
    devices: Optional[int] = -1
    overwrite: bool = False
    isolate_failures: bool = False

    def checked(self) -> "RuntimeConfig":
        """``ValueError`` naming the field of a value that cannot run."""
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be 'float32', 'float64' or 'auto', got {self.precision!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise InputError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.platform not in ("cpu", "gpu"):
            raise InputError(f"platform must be 'cpu' or 'gpu', got {self.platform!r}")
        return self


_SAMPLER_KEYS = {f.name for f in dataclasses.fields(SamplerConfig)}
_RUNTIME_KEYS = {f.name for f in dataclasses.fields(RuntimeConfig)}
_ALIASES = {"sampler": "name", "target_accept_prob": "target_accept", "max_treedepth": "max_tree_depth"}


def from_kwargs(kw: dict[str, Any]) -> tuple[SamplerConfig, RuntimeConfig]:
    """Pop the sampler and runtime settings out of keyword arguments (``sampler=`` is the name;
    ``target_accept_prob`` and ``max_treedepth`` are accepted as NumPyro/PyMC spell them).
    What is left in ``kw`` belongs to the caller."""
    sampler, runtime = {}, {}
    for key in list(kw):
        name = _ALIASES.get(key, key)
        if name in _SAMPLER_KEYS:
            sampler[name] = kw.pop(key)
        elif name in _RUNTIME_KEYS:
            runtime[name] = kw.pop(key)
    return SamplerConfig(**sampler), RuntimeConfig(**runtime)


def from_config(cfg) -> tuple[SamplerConfig, RuntimeConfig]:
    """``cfg.sampler`` and ``cfg.runtime`` of a composed Hydra config as the two dataclasses."""
    from omegaconf import OmegaConf

    def as_dataclass(node, cls):
        values = OmegaConf.to_container(node, resolve=True)
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})

    return as_dataclass(cfg.sampler, SamplerConfig), as_dataclass(cfg.runtime, RuntimeConfig)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore as ``sampler/schema`` and ``runtime/schema``
    (each ``conf/sampler/*.yaml`` and ``conf/runtime/*.yaml`` lists its group's schema first in
    its defaults); idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for group, cls in (("sampler", SamplerConfig), ("runtime", RuntimeConfig)):
        node = OmegaConf.structured(cls)
        OmegaConf.set_readonly(node, False)  # frozen in Python (hashable); YAML and overrides set it
        store.store(group=group, name="schema", node=node)

"""The sampler registry: name -> :class:`~engine.sampling.kernels.base.Kernel`.

Every sampler is one module of this package that defines ``KERNEL`` (see
:mod:`engine.sampling.kernels.base` for the protocol) and one line in :data:`REGISTRY`. Settings
validation, the CLI's errors, reports, benchmarks and the docs all read the names from here.
Modules are imported on first use, so reading the names imports no JAX.
"""

from __future__ import annotations

import importlib

from engine.errors import InputError

from engine.sampling.kernels.base import Kernel, KernelSettings, SampleStats

__all__ = ["REGISTRY", "ALIASES", "Kernel", "KernelSettings", "SampleStats", "get_kernel", "canonical_name",
           "describe", "names"]

REGISTRY = {
    "auto": "engine.sampling.kernels.auto",
    "blackjax": "engine.sampling.kernels.blackjax_nuts",
    "numpyro": "engine.sampling.kernels.numpyro_nuts",
    "stepwise": "engine.sampling.kernels.stepwise_nuts",
    "chees": "engine.sampling.kernels.chees_hmc",
    "chees_dense": "engine.sampling.kernels.chees_dense",
    "mams": "engine.sampling.kernels.mams",
    "pymc": "engine.sampling.kernels.pymc_default",
}
"""Sampler name (Python's ``sampler=`` and the config's ``sampler.name``) -> its module."""

ALIASES = {"blackjax_nuts": "blackjax", "numpyro_nuts": "numpyro", "stepwise_nuts": "stepwise",
           "pymc_default": "pymc"}
"""The CLI's ``sampler=<option>`` names, accepted wherever a sampler name is."""


def names() -> tuple[str, ...]:
    """Every registered sampler name."""
    return tuple(REGISTRY)


def canonical_name(name: str) -> str:
    """``name`` or its alias -> the registry name; ``ValueError`` naming the choices otherwise."""
    name = ALIASES.get(str(name), str(name))
    if name not in REGISTRY:
        choices = ", ".join(repr(n) for n in REGISTRY)
        raise InputError(f"unknown sampler {name!r}; choose one of {choices}")
    return name


def get_kernel(name: str) -> Kernel:
    """The :class:`Kernel` registered as ``name`` (or an alias)."""
    return importlib.import_module(REGISTRY[canonical_name(name)]).KERNEL


def describe(name: str) -> str:
    """How reports name sampler ``name``: "blackjax NUTS", "ChEES jittered HMC", ..."""
    return get_kernel(name).description

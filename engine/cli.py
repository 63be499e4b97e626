"""Pick the analysis a Hydra config names and run it in the Hydra run directory.

Thin on purpose: every analysis is ``engine.analyses.<name>.run(cfg, run_dir) -> Result`` with no
Hydra globals inside, so it is callable from Python and tests with a composed config.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("engine")


@dataclass
class Result:
    """What an analysis hands back: a short printable summary and the files it wrote."""

    summary: str
    outputs: dict[str, Path] = field(default_factory=dict)
    data: Any = None
    exit_code: int = 0


def configure_runtime(cfg: DictConfig) -> None:
    """Apply ``cfg.runtime`` before JAX initialises its backend (``engine.platform.configure``)."""
    from engine.platform import configure

    configure(cfg.runtime.get("platform", "cpu"), cfg.runtime.get("devices", 1))


def run_analysis(cfg: DictConfig, run_dir: Path) -> Result:
    """Import ``engine.analyses.<cfg.analysis.name>`` and call its ``run``."""
    name = cfg.analysis.name
    module = importlib.import_module(f"engine.analyses.{name}")
    return module.run(cfg, Path(run_dir))


def run_cli(cfg: DictConfig) -> int:
    """Run the configured analysis; bad input -> one line on stderr, status 2."""
    from engine.errors import CheckFailed, InputError

    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        run_dir = Path.cwd()
    configure_runtime(cfg)
    try:
        result = run_analysis(cfg, run_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"check failed: {err}", file=sys.stderr)
        return 1
    print(result.summary)
    if result.outputs:
        print(f"outputs in {run_dir}:")
        for label, path in result.outputs.items():
            print(f"  {label}: {path}")
    return result.exit_code


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain-dict copy of a config (for summary.json)."""
    return OmegaConf.to_container(cfg, resolve=True)


def sampling_kwargs(cfg: DictConfig) -> dict:
    """``sample_batched`` keyword arguments from ``cfg.sampler`` and ``cfg.runtime`` (the
    :mod:`engine.settings` schema); a host kernel (``pymc``) gets no precision or devices."""
    from engine.sampling.kernels import get_kernel
    from engine.settings import from_config

    s, r = from_config(cfg)
    kw = dict(
        sampler=s.name,
        chains=int(s.chains),
        draws=int(s.draws),
        tune=int(s.tune),
        seed=int(r.seed),
        batch_size=None if r.batch_size is None else int(r.batch_size),
        target_accept=float(s.target_accept),
        max_tree_depth=int(s.max_tree_depth),
        dense_mass=bool(s.dense_mass),
        progress=r.progress,
    )
    if not get_kernel(s.name).runs_on_host:
        kw["precision"] = str(r.precision)
        kw["devices"] = None if r.devices in (None, 1) else int(r.devices)
    return kw

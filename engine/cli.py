"""Pick the analysis a Hydra config names and run it in the Hydra run directory.

Thin on purpose: every analysis is ``engine.analyses.<name>.run(cfg, run_dir) -> Result`` with no
Hydra globals inside, so it is callable from Python and tests with a composed config.
"""

from __future__ import annotations

import importlib
import logging
import os
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


def _log_traceback(err: BaseException, run_dir: Path) -> str:
    """Write ``err``'s traceback to the job's log file(s) only (not the terminal) -> where.

    Hydra's job logging has a file handler (``<run dir>/<job name>.log``); without one (a
    composed config run from Python) the traceback goes to ``<run dir>/engine_error.log``.
    """
    import traceback

    files = [h for h in logging.getLogger().handlers
             if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]
    record = logging.LogRecord("engine", logging.ERROR, __file__, 0, "internal error:\n%s", (
        "".join(traceback.format_exception(err)),), None)
    for handler in files:
        handler.handle(record)
    if files:
        return ", ".join(h.baseFilename for h in files)
    path = Path(run_dir) / "engine_error.log"
    with open(path, "a") as handle:
        handle.write("".join(traceback.format_exception(err)))
    return str(path)


def run_cli(cfg: DictConfig) -> int:
    """Run the configured analysis.

    Bad input (the engine's own :class:`InputError`) -> one line on stderr, status 2. A failed
    write of the run directory (:class:`StorageError`, e.g. a full disk) or a failed strict
    check -> one line, status 1. Anything else is an internal error: status 1, the traceback in
    the job log, and one line on the terminal pointing at it.
    """
    from engine.errors import CheckFailed, InputError, StorageError

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
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - internal: traceback to the log, one line here
        where = _log_traceback(err, run_dir)
        first = (str(err).splitlines() or [""])[0][:200]
        print(f"internal error: {type(err).__name__}: {first} (traceback in {where})", file=sys.stderr)
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
        tune=None if s.tune is None else int(s.tune),
        seed=int(r.seed),
        batch_size=None if r.batch_size is None else int(r.batch_size),
        target_accept=float(s.target_accept),
        max_tree_depth=int(s.max_tree_depth),
        dense_mass=bool(s.dense_mass),
        progress=r.progress,
    )
    if s.target_ess is not None:  # per-problem stopping, only when asked (sampler.target_ess)
        kw.update(target_ess=int(s.target_ess), block_draws=int(s.block_draws))
        if s.max_draws is not None:
            kw["max_draws"] = int(s.max_draws)
    if not s.fallback_stopping:  # sampler=auto: its fallback keeps `draws` per problem
        kw["fallback_stopping"] = False
    if not get_kernel(s.name).runs_on_host:
        kw["precision"] = str(r.precision)
        kw["devices"] = None if r.devices in (None, 1) else int(r.devices)
    return kw

"""``analysis=sbc``: simulation-based calibration of a PyMC template (see :mod:`engine.calibration.sbc`).

``analysis.model`` names a builder (``_target_``) of the fitted template, bare: eight schools,
non-centred (:func:`engine.calibration.models.eight_schools`); ``analysis.simulator`` optionally names a
different data-generating template. All ``analysis.num_simulations`` simulated data sets are
fitted in one batched call of the configured sampler; the run directory gets ``summary.json``
(the :attr:`SBCResult.summary` dict plus the settings), ``ranks.parquet``, ``report.md`` and the
rank-histogram and ECDF-difference plots.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from engine.analyses import _common as common
from engine.errors import InputError
from engine.cli import Result

DEFAULT_MODEL = "engine.calibration.models.eight_schools"


def build_template(spec, field: str):
    """A ``pm.Model`` from a builder spec: a dotted path, or a mapping with ``_target_`` and the
    builder's keyword arguments (Hydra's ``instantiate``)."""
    import pymc as pm

    spec = common.plain(spec)
    try:
        if isinstance(spec, str):
            module, _, name = spec.rpartition(".")
            model = getattr(importlib.import_module(module), name)()
        elif isinstance(spec, dict) and "_target_" in spec:
            from hydra.utils import instantiate

            model = instantiate(spec)
        else:
            raise InputError(f"analysis.{field}: expected a builder's dotted path or {{_target_: ...}}, got {spec!r}")
    except InputError:
        raise
    except Exception as err:  # import errors, bad keyword arguments: one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"analysis.{field}: could not build {spec!r}: {first}") from err
    if not isinstance(model, pm.Model):
        raise InputError(f"analysis.{field}: {spec!r} returned {type(model).__name__}, not a pm.Model")
    return model


def run(cfg, run_dir: Path) -> Result:
    """SBC of ``analysis.model`` against ``analysis.simulator``; writes the outputs in ``run_dir``."""
    from engine.calibration.sbc import sbc
    from engine.calibration.report import write_outputs

    run_dir = common.prepare_run_dir(run_dir)
    opt = functools.partial(common.analysis_option, cfg)
    model = build_template(opt("model", DEFAULT_MODEL), "model")
    simulator = None if opt("simulator") is None else build_template(opt("simulator"), "simulator")
    num_simulations = int(opt("num_simulations", 1000))
    if num_simulations < 2:
        raise InputError(f"analysis.num_simulations: must be >= 2, got {num_simulations}")
    kw = common.sample_kwargs(cfg)
    for key in ("chains", "draws", "tune"):
        value = opt(key, kw[key])
        kw[key] = None if value is None else int(value)  # tune None: each kernel's own warmup
    try:
        result = sbc(model, num_simulations, simulator=simulator, alpha=float(opt("alpha", 0.05)), **kw)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
    result.summary["config"] = _settings(cfg)
    result.summary["versions"] = common.versions()
    outputs = write_outputs(result, run_dir)
    s = result.summary
    failed = [n for n, v in s["parameters"].items() if not v["pass"]]
    lines = [
        f"sbc: {s['num_simulations']} simulations x {len(s['parameters'])} parameters, "
        f"{s['num_rank_draws']} thinned draws each; "
        + ("all pass" if not failed else f"{len(failed)} FAIL: {', '.join(failed[:8])}"
           + (" ..." if len(failed) > 8 else "")),
        f"  divergent share {s['divergent_share']:.1%}, converged share {s['converged_share']:.1%}",
    ]
    return Result("\n".join(lines), outputs, data=result)


def _settings(cfg) -> dict:
    from engine.cli import to_container

    settings = to_container(cfg)
    return {k: settings[k] for k in ("analysis", "sampler", "runtime") if k in settings}

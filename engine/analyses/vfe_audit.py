"""``analysis=vfe_univariate``: audit 1-D Gaussian beliefs N(mu_q, sigma_q) over tokens x checkpoints.

The generative model is ``cfg.model`` (default Normal-Normal, closed form; ``student_t`` and
``bernoulli_logit`` have none). See :func:`engine.audit.audit_vfe`. This module also holds the
config plumbing both VFE analyses share (``vfe_multivariate`` calls :func:`run_from_config`).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from engine.audit.vfe import audit_vfe, cached_template
from engine.audit.beliefs import BeliefSet
from engine.audit.beliefs_files import load_beliefs
from engine.errors import InputError


def beliefs_from_config(cfg, run_dir: Path, kind: str) -> BeliefSet:
    """The beliefs ``cfg.data`` names: the embedded demo (generated into ``run_dir/demo``) or files."""
    data = cfg.data
    shard, num_shards = int(data.get("shard", 0)), int(data.get("num_shards", 1))
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise InputError(f"field 'data.shard': need 0 <= shard < num_shards, got {shard}/{num_shards}")
    if data.name == "demo":
        from engine.audit import demo

        where = Path(run_dir) / "demo"
        if kind == "univariate":
            paths = demo.univariate_demo(
                where, num_tokens=int(data.num_tokens), max_obs=int(data.max_obs),
                checkpoint_steps=list(data.checkpoint_steps), seed=int(data.seed),
            )
        else:
            paths = demo.multivariate_demo(
                where, num_tokens=int(data.num_tokens_multivariate), dim=int(data.dim),
                max_obs=int(data.max_obs), seed=int(data.seed),
            )
        return load_beliefs(paths)
    path = data.get("path")
    if path is None or str(path) in ("", "???"):
        raise InputError("field 'data.path': missing; run with data=file data.path=<beliefs file>")
    from omegaconf import ListConfig

    paths = [str(p) for p in path] if isinstance(path, (list, tuple, ListConfig)) else str(path)
    bs = load_beliefs(paths)
    if bs.kind != kind:
        other = "vfe_multivariate" if bs.kind == "multivariate" else "vfe_univariate"
        raise InputError(
            f"field 'data.path': holds {bs.kind} beliefs but this analysis audits {kind} ones; "
            f"use analysis={other}"
        )
    return bs


def model_from_config(cfg):
    """``cfg.model`` -> ``(pm.Model, closed_form, name)``: instantiate its ``_target_`` builder once."""
    import json

    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
    if not spec:
        return None, None, None
    closed_form = bool(spec.pop("closed_form", False))
    spec.pop("name", None)
    if "_target_" not in spec:
        raise InputError("field 'model._target_': missing; point it at a template builder")

    def build():
        from hydra.utils import instantiate

        try:
            model = instantiate(spec)
        except Exception as err:  # noqa: BLE001 - Hydra wraps any import/call error
            msg = " ".join(str(err).split())[:200]
            raise InputError(f"field 'model._target_': could not build {spec['_target_']!r} ({msg})") from None
        if not hasattr(model, "free_RVs"):
            raise InputError(f"field 'model._target_': {spec['_target_']!r} did not return a pm.Model")
        return model

    model = cached_template(("config", json.dumps(spec, sort_keys=True, default=str)), build)
    name = str(cfg.model.get("name") or spec["_target_"].rsplit(".", 1)[-1])
    return model, closed_form, name


def _keep_draws(value):
    """``analysis.keep_draws`` (null, "all", a token label or a list of them) -> audit_vfe's argument."""
    from omegaconf import ListConfig, OmegaConf

    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value)
    return value


def _flag(opts, name: str, default: bool) -> bool:
    """A true/false ``analysis.<name>``; anything else is refused naming the field."""
    value = opts.get(name, default)
    if not isinstance(value, bool):
        raise InputError(f"field 'analysis.{name}': must be true or false, got {value!r}")
    return value


def _warm_start_tune(opts):
    """``analysis.warm_start_tune``: a non-negative integer, or null for ``sampler.tune``."""
    from engine.audit.warm_start import WARM_START_TUNE

    value = opts.get("warm_start_tune", WARM_START_TUNE)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"field 'analysis.warm_start_tune': must be a non-negative integer or null, got {value!r}")
    return value


def run_from_config(cfg, run_dir: Path, kind: str):
    """Body of the ``vfe_univariate``/``vfe_multivariate`` analyses -> ``engine.cli.Result``."""
    from engine.audit.report import summary_text
    from engine.cli import Result, sampling_kwargs, to_container

    # arviz logs optional-package notices at INFO, which Hydra's job logging would print
    logging.getLogger("arviz.preview").setLevel(logging.WARNING)
    run_dir = Path(run_dir)
    from engine.audit.store import lock_directory

    lock_directory(run_dir / "store")  # before anything is written: a run directory in use exits 2
    beliefs = beliefs_from_config(cfg, run_dir, kind)
    model, closed_form, name = (None, None, None) if kind == "multivariate" else model_from_config(cfg)
    opts = cfg.analysis
    audit_options = dict(warm_start=_flag(opts, "warm_start", True), dedup=_flag(opts, "dedup", True),
                         warm_start_tune=_warm_start_tune(opts))
    accepted = inspect.signature(audit_vfe).parameters
    kw = sampling_kwargs(cfg)
    _audit_stopping(cfg, kw)
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        logging.getLogger("engine").warning("audit ignores sampling options %s", unknown)
    audit = audit_vfe(
        beliefs, model=model, closed_form=closed_form, model_name=name,
        model_config=to_container(cfg.model) if cfg.get("model") is not None else None,
        interval=float(opts.get("interval", 0.9)), num_q_draws=int(opts.get("num_q_draws", 1000)),
        store_dir=run_dir / "store", overwrite=bool(cfg.runtime.get("overwrite", False)),
        shard=(int(cfg.data.get("shard", 0)), int(cfg.data.get("num_shards", 1))),
        isolate_failures=bool(cfg.runtime.get("isolate_failures", False)),
        keep_draws=_keep_draws(opts.get("keep_draws")), log_file=run_dir / "progress.jsonl",
        **audit_options, **{k: v for k, v in kw.items() if k in accepted},
    )
    if audit is None:
        shard, num_shards = int(cfg.data.shard), int(cfg.data.num_shards)
        return Result(
            summary=f"shard {shard}/{num_shards}: its chunks are stored in {run_dir / 'store'}; "
            f"join the shards with: python -m engine analysis=merge analysis.inputs=<sweep dir>",
            outputs={"store": run_dir / "store"},
        )
    audit.summary["config"] = to_container(cfg)
    paths = audit.write(run_dir, plots=bool(opts.get("plots", True)),
                        worst_tokens=int(opts.get("worst_tokens", 10)))
    outputs = {k: paths[k] for k in ("report", "metrics", "summary", "draws") if k in paths}
    outputs["progress"] = run_dir / "progress.jsonl"
    return Result(summary=summary_text(audit.summary), outputs=outputs, data=audit)


def _audit_stopping(cfg, kw: dict) -> None:
    """Audits stop each problem at ``analysis.target_ess`` (default 400) unless
    ``sampler.target_ess`` says otherwise; a sampler that cannot stop (``pymc``, ``stepwise``)
    runs its fixed draws, with a warning, when the target came from the analysis default."""
    from engine.sampling.kernels import get_kernel

    target = cfg.analysis.get("target_ess")
    if kw.get("target_ess") is not None or target is None:
        return
    kernel = get_kernel(kw["sampler"])
    why = None
    if kernel.runs_on_host or kernel.loop != "draws":
        why = f"sampler {kernel.name} cannot stop"
    elif int(kw.get("chains", 4)) < 2:
        why = "R-hat needs 2 chains or more"
    if why is not None:
        logging.getLogger("engine").warning(
            "%s: analysis.target_ess=%s ignored, every token keeps sampler.draws per chain", why, target)
        return
    kw["target_ess"] = int(target)
    kw["block_draws"] = int(cfg.sampler.get("block_draws", 100))
    if cfg.sampler.get("max_draws") is not None:
        kw["max_draws"] = int(cfg.sampler.max_draws)

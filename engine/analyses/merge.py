"""``analysis=merge``: join the chunk stores of a sharded audit sweep into one table and report.

Each shard job (``data.shard=i data.num_shards=k``) stored whole chunks of the single run's chunk
grid under ``<job dir>/store``. Joining the stores is a store operation
(:func:`engine.audit.store.merge_shard_stores`: same configuration hash, every chunk present,
copied into this run's store); this module finds the jobs and reruns the audit from the first
shard's config: nothing is left to sample, so the table is built from the stored summaries and
equals a single run's bitwise. The shards' own results are never modified.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from engine.errors import InputError
from engine.audit.store import merge_shard_stores


def _job_dirs(inputs: Path) -> list[Path]:
    if not inputs.is_dir():
        raise InputError(f"field 'analysis.inputs': {inputs} is not a directory")
    jobs = [d for d in inputs.iterdir() if (d / ".hydra" / "config.yaml").exists()]
    if not jobs:
        raise InputError(f"field 'analysis.inputs': no Hydra job directories in {inputs}")
    return sorted(jobs, key=lambda d: (len(d.name), d.name))


def run(cfg, run_dir: Path):
    from engine.analyses.vfe_audit import run_from_config

    if not cfg.analysis.get("inputs"):
        raise InputError("field 'analysis.inputs': give the sweep directory of the shard jobs")
    jobs = _job_dirs(Path(str(cfg.analysis.inputs)))
    configs = [OmegaConf.load(j / ".hydra" / "config.yaml") for j in jobs]
    base = configs[0]
    kind = {"vfe_univariate": "univariate", "vfe_multivariate": "multivariate"}.get(base.analysis.name)
    if kind is None:
        raise InputError(f"field 'analysis.inputs': {jobs[0]} ran {base.analysis.name!r}, not a VFE audit")
    shards = {job.name: (job / "store", jcfg.data.get("shard")) for job, jcfg in zip(jobs, configs)}
    merge_shard_stores(shards, Path(run_dir) / "store", num_shards=int(base.data.get("num_shards", 1)))
    merged = OmegaConf.merge(base, {"data": {"shard": 0, "num_shards": 1}, "runtime": {"overwrite": False}})
    OmegaConf.set_struct(merged, False)
    merged.analysis.merged_from = str(cfg.analysis.inputs)
    result = run_from_config(merged, Path(run_dir), kind)
    result.summary = f"merged {len(jobs)} shards of {cfg.analysis.inputs}\n" + result.summary
    return result

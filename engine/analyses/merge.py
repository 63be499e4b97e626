"""``analysis=merge``: join the chunk stores of a sharded audit sweep into one table and report.

Each shard job (``data.shard=i data.num_shards=k``) stored whole chunks of the single run's chunk
grid under ``<job dir>/store``. The merge checks that every shard ran the same configuration
(the stores' config hashes), copies the chunk files into this run's store, and reruns the audit
from the first shard's config: nothing is left to sample, so the table is built from the stored
summaries and equals a single run's bitwise. A missing chunk names the shard that should have
written it; the shards' own results are never modified.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from engine.errors import InputError
from engine.store import CHUNK_DIR, MANIFEST, atomic_write_bytes


def _job_dirs(inputs: Path) -> list[Path]:
    if not inputs.is_dir():
        raise InputError(f"field 'analysis.inputs': {inputs} is not a directory")
    jobs = [d for d in inputs.iterdir() if (d / ".hydra" / "config.yaml").exists()]
    if not jobs:
        raise InputError(f"field 'analysis.inputs': no Hydra job directories in {inputs}")
    return sorted(jobs, key=lambda d: (len(d.name), d.name))


def run(cfg, run_dir: Path):
    from engine.analyses.vfe_univariate import run_from_config

    if not cfg.analysis.get("inputs"):
        raise InputError("field 'analysis.inputs': give the sweep directory of the shard jobs")
    jobs = _job_dirs(Path(str(cfg.analysis.inputs)))
    configs = [OmegaConf.load(j / ".hydra" / "config.yaml") for j in jobs]
    base = configs[0]
    kind = {"vfe_univariate": "univariate", "vfe_multivariate": "multivariate"}.get(base.analysis.name)
    if kind is None:
        raise InputError(f"field 'analysis.inputs': {jobs[0]} ran {base.analysis.name!r}, not a VFE audit")
    hashes, grid, owner, checksums = {}, None, {}, {}
    for job, jcfg in zip(jobs, configs):
        manifest = job / "store" / MANIFEST
        if not manifest.exists():
            raise InputError(f"shard {job.name} (data.shard={jcfg.data.get('shard')}): no store; it did not start")
        info = json.loads(manifest.read_text())
        hashes[job.name] = info["config_hash"]
        grid = grid or [tuple(c) for c in info["grid"]]
        stored = info.get("checksums", {})
        for c in (job / "store" / CHUNK_DIR).glob("*.npz"):
            if c.name not in owner and c.name in stored:  # unconfirmed files are not results
                owner[c.name], checksums[c.name] = c, stored[c.name]
    if len(set(hashes.values())) > 1:
        first = next(iter(hashes))
        other = next(n for n, h in hashes.items() if h != hashes[first])
        raise InputError(f"shard {other} ran another configuration than shard {first}; they cannot be merged")
    num_shards = int(base.data.get("num_shards", 1))
    for index, (start, stop) in enumerate(grid):
        name = f"chunk_{start:010d}_{stop:010d}.npz"
        if name not in owner:
            raise InputError(
                f"chunk {start}:{stop} is missing: shard data.shard={index % num_shards} did not "
                "finish; rerun that job (its finished chunks are kept) and merge again"
            )
    store = Path(run_dir) / "store"
    (store / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    manifest = json.loads((jobs[0] / "store" / MANIFEST).read_text())
    manifest["checksums"] = checksums  # each shard's chunk files are verified again on reading
    atomic_write_bytes(store / MANIFEST, json.dumps(manifest, indent=2).encode())
    for name, path in owner.items():
        shutil.copyfile(path, store / CHUNK_DIR / name)
    merged = OmegaConf.merge(base, {"data": {"shard": 0, "num_shards": 1}, "runtime": {"overwrite": False}})
    OmegaConf.set_struct(merged, False)
    merged.analysis.merged_from = str(cfg.analysis.inputs)
    result = run_from_config(merged, Path(run_dir), kind)
    result.summary = f"merged {len(jobs)} shards of {cfg.analysis.inputs}\n" + result.summary
    return result

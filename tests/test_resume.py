"""Kill-and-resume of a real CLI audit: SIGKILL midway, rerun, identical metrics.parquet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _beliefs(path: Path, checkpoints=2, tokens=60, n=12, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(checkpoints, tokens))
    observed = theta[..., None] + rng.normal(size=(checkpoints, tokens, n))
    np.savez(
        path,
        mu_q=observed.mean(-1) + 0.1 * rng.normal(size=theta.shape),
        sigma_q=np.full(theta.shape, 0.3),
        observed=observed,
        prior_mu=np.zeros(theta.shape),
        prior_sigma=np.ones(theta.shape),
    )


def _cmd(beliefs: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "engine", "data=file", f"data.path={beliefs}",
        "runtime.batch_size=5", "sampler.draws=400", "sampler.tune=400", "analysis.plots=false",
        f"hydra.run.dir={run_dir}", *extra,
    ]


def test_sigkill_midway_then_rerun_equals_uninterrupted_run(tmp_path):
    beliefs = tmp_path / "beliefs.npz"
    _beliefs(beliefs)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_cmd(beliefs, whole), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(_cmd(beliefs, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = killed / "store" / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if chunks.exists() and len(list(chunks.glob("chunk_*.npz"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the audit finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list(chunks.glob("chunk_*.npz")))
    assert 2 <= finished_before < 24
    assert not (killed / "metrics.parquet").exists()

    rerun = subprocess.run(_cmd(beliefs, killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a = pd.read_parquet(whole / "metrics.parquet")
    b = pd.read_parquet(killed / "metrics.parquet")
    pd.testing.assert_frame_equal(a, b)  # bitwise: same seed, same chunk grid

    # the run directory's progress log tells the whole story: killed session, resumed session
    from engine.audit.progress import read_events

    events = read_events(killed / "progress.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    # a kill between a chunk file's rename and the manifest update leaves one file the manifest
    # does not list (the store's documented window): the rerun redoes that chunk
    recorded = starts[1]["done"] // 5
    assert len(starts) == 2 and starts[0]["done"] == 0 and finished_before - 1 <= recorded <= finished_before
    assert starts[1]["done"] == 5 * recorded and starts[1]["chunks_pending"] == 24 - recorded
    chunk_events = [e for e in events if e["event"] == "chunk"]
    # every chunk logs once when it is stored, except those the kill caught between the store's
    # write and the log line (one per device thread, chunks running side by side); the chunk in
    # flight at the kill may also have logged before dying
    assert len(chunk_events) >= 24 - len(jax.local_devices())
    last = chunk_events[-1]
    assert last["done"] == last["total"] == 120 and last["eta_s"] == 0
    assert all(e["rate_per_s"] > 0 and e["rss_mb"] > 0 for e in chunk_events)
    assert events[-1]["event"] == "finish"

    changed = subprocess.run(
        _cmd(beliefs, killed, "runtime.seed=1"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert changed.returncode == 2
    assert "different configuration" in changed.stderr and "Traceback" not in changed.stderr
    pd.testing.assert_frame_equal(b, pd.read_parquet(killed / "metrics.parquet"))  # untouched


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The beliefs of the shard tests and the table of one unsharded run of them."""
    tmp = tmp_path_factory.mktemp("single")
    beliefs = tmp / "beliefs.npz"
    _beliefs(beliefs, tokens=20)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(_cmd(beliefs, tmp / "single"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return beliefs, pd.read_parquet(tmp / "single" / "metrics.parquet")


def _sweep_then_merge(beliefs, tmp_path, launcher: list[str]):
    """Shards 0,1 of 2 through ``launcher``, then ``analysis=merge`` -> (sweep dir, merged table)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    sweep = tmp_path / "sweep"
    sharded = subprocess.run(
        _cmd(beliefs, tmp_path / "unused", "data.num_shards=2", "data.shard=0,1", *launcher,
             f"hydra.sweep.dir={sweep}") + ["-m"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert not (sweep / "0" / "metrics.parquet").exists()
    chunks = [len(list((sweep / j / "store" / "chunks").glob("*.npz"))) for j in ("0", "1")]
    assert chunks == [4, 4]  # 40 problems in chunks of 5, alternating between the shards
    merge = [sys.executable, "-m", "engine", "analysis=merge", f"analysis.inputs={sweep}"]
    merged = subprocess.run(merge + [f"hydra.run.dir={tmp_path / 'merged'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-2000:]
    return sweep, pd.read_parquet(tmp_path / "merged" / "metrics.parquet")


def test_joblib_sharded_sweep_merges_into_the_single_run_table(tmp_path, single_run):
    beliefs, single = single_run
    sweep, merged = _sweep_then_merge(beliefs, tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    pd.testing.assert_frame_equal(single, merged)

    # a failed shard is named; the other shard's results stay as they were
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for c in (sweep / "1" / "store" / "chunks").glob("*.npz"):
        c.unlink()
    merge = [sys.executable, "-m", "engine", "analysis=merge", f"analysis.inputs={sweep}"]
    failed = subprocess.run(merge + [f"hydra.run.dir={tmp_path / 'merged2'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2
    assert "shard data.shard=1 did not finish" in failed.stderr and "Traceback" not in failed.stderr
    assert len(list((sweep / "0" / "store" / "chunks").glob("*.npz"))) == 4


@pytest.mark.slow  # 28 s: the joblib sweep keeps shard-and-merge in the fast tier
def test_submitit_local_sweep_merges_into_the_single_run_table(tmp_path, single_run):
    """The cluster path (submitit pickles each Hydra job and runs it in its own process) in
    submitit's local mode: ``hydra/launcher=cluster_local``."""
    beliefs, single = single_run
    sweep, merged = _sweep_then_merge(beliefs, tmp_path, ["hydra/launcher=cluster_local"])
    pd.testing.assert_frame_equal(single, merged)
    logs = list((sweep / ".submitit").rglob("*_log.err"))
    assert len(logs) == 2  # one submitit job per shard
    results = list((sweep / ".submitit").rglob("*_result.pkl"))
    assert len(results) == 2


def test_slurm_launcher_config_renders_an_sbatch_script(tmp_path):
    """``hydra/launcher=cluster`` composes into submitit's SLURM launcher, and its settings are
    valid sbatch options (rendered by submitit itself; no SLURM cluster here to submit to)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=cluster", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher" and launcher._EXECUTOR == "slurm"
    equivalent = SlurmExecutor._equivalence_dict()
    params = {equivalent.get(k, k): v for k, v in launcher.params.items()
              if k not in ("submitit_folder", "max_num_timeout")}
    params["mem"] = _convert_mem(params["mem"])
    assert set(params) <= SlurmExecutor._valid_parameters()
    script = _make_sbatch_string(command="python -m engine", folder=tmp_path, **params)
    for line in ("--gpus-per-node=1", "--cpus-per-task=8", "--time=240", "--partition=gpu", "--mem=64GB"):
        assert f"#SBATCH {line}" in script, script


def test_poisoned_token_is_flagged_and_others_are_unchanged():
    from engine import audit_vfe

    observed = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    arrays = {"mu_q": np.zeros(4), "sigma_q": np.ones(4), "observed": observed,
              "prior_mu": 0.0, "prior_sigma": 1.0}
    poisoned = dict(arrays, observed=observed.copy())
    poisoned["observed"][2, 1] = 2.0  # no Bernoulli outcome: log density -inf for token 2
    kw = dict(model="bernoulli_logit", chains=2, draws=100, tune=100, seed=3, num_q_draws=50)
    clean = audit_vfe(arrays, **kw).table
    flagged = audit_vfe(poisoned, isolate_failures=True, **kw).table
    assert flagged.status[2] == "no finite log density at any jittered start"
    assert not flagged.converged[2] and np.isnan(flagged.mcmc_mean[2])
    others = [0, 1, 3]
    pd.testing.assert_frame_equal(
        clean.iloc[others][["mcmc_mean", "mcmc_std", "r_hat", "ess_bulk", "status"]],
        flagged.iloc[others][["mcmc_mean", "mcmc_std", "r_hat", "ess_bulk", "status"]],
    )

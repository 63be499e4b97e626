"""Kill-and-resume of a real CLI audit: SIGKILL midway, rerun, identical metrics.parquet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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

    changed = subprocess.run(
        _cmd(beliefs, killed, "runtime.seed=1"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert changed.returncode == 2
    assert "different configuration" in changed.stderr and "Traceback" not in changed.stderr
    pd.testing.assert_frame_equal(b, pd.read_parquet(killed / "metrics.parquet"))  # untouched


def test_joblib_sharded_sweep_merges_into_the_single_run_table(tmp_path):
    beliefs = tmp_path / "beliefs.npz"
    _beliefs(beliefs, tokens=20)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.run(_cmd(beliefs, tmp_path / "single"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    sweep = tmp_path / "sweep"
    sharded = subprocess.run(
        _cmd(beliefs, tmp_path / "unused", "data.num_shards=2", "data.shard=0,1", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}") + ["-m"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert not (sweep / "0" / "metrics.parquet").exists()
    chunks = [len(list((sweep / j / "store" / "chunks").glob("*.npz"))) for j in ("0", "1")]
    assert chunks == [4, 4]  # 40 problems in chunks of 5, alternating between the shards

    merge = [sys.executable, "-m", "engine", "analysis=merge", f"analysis.inputs={sweep}"]
    merged = subprocess.run(merge + [f"hydra.run.dir={tmp_path / 'merged'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-2000:]
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "single" / "metrics.parquet"),
        pd.read_parquet(tmp_path / "merged" / "metrics.parquet"),
    )

    # a failed shard is named; the other shard's results stay as they were
    for c in (sweep / "1" / "store" / "chunks").glob("*.npz"):
        c.unlink()
    failed = subprocess.run(merge + [f"hydra.run.dir={tmp_path / 'merged2'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2
    assert "shard data.shard=1 did not finish" in failed.stderr and "Traceback" not in failed.stderr
    assert len(list((sweep / "0" / "store" / "chunks").glob("*.npz"))) == 4


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

"""Memory of a large audit is bounded by the chunk, not by the number of tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# the CLI in this process, reporting its own peak RSS as it exits: VmHWM of /proc/self/status,
# the high-water mark of this process image (ru_maxrss would carry over the forking parent's peak,
# here the whole pytest process, through exec)
PEAK_RSS = """
import runpy, sys
sys.argv = ["engine"] + sys.argv[1:]
try:
    runpy.run_module("engine", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("peak_rss_kib", hwm, file=sys.stderr)
"""


@pytest.mark.slow  # 35 s: the scale run; the fast tier keeps chunking, stores and resume
def test_200k_token_audit_runs_in_bounded_memory(tmp_path):
    """200,000 tokens (10 observations each) in 5 chunks: peak RSS < 4 GiB, and RSS after the last
    chunk within 300 MB of RSS after the first. Sized to run in under a minute: 1 chain, 10+10
    iterations (the warm start's own warmup set to 10 too), 25 draws from q per token."""
    tokens, n = 200_000, 10
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(1, tokens))
    observed = (theta[..., None] + rng.normal(size=(1, tokens, n))).astype(np.float32)
    beliefs = tmp_path / "beliefs.npz"
    np.savez(beliefs, mu_q=observed.mean(-1), sigma_q=np.full((1, tokens), 0.3, np.float32),
             observed=observed, prior_mu=np.zeros((1, tokens), np.float32),
             prior_sigma=np.ones((1, tokens), np.float32))
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-c", PEAK_RSS, "data=file", f"data.path={beliefs}", "sampler.chains=1",
        "sampler.draws=10", "sampler.tune=10", "analysis.warm_start_tune=10", "analysis.num_q_draws=25", "analysis.plots=false",
        "runtime.batch_size=40000", "runtime.precision=float32", f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_gib = int(done.stderr.rsplit("peak_rss_kib", 1)[1].split()[0]) / 2**20
    assert peak_gib < 4.0, f"peak RSS {peak_gib:.2f} GiB"

    import pandas as pd

    from engine.audit.progress import read_events

    assert len(pd.read_parquet(run_dir / "metrics.parquet", columns=["token"])) == tokens
    rss = [e["rss_mb"] for e in read_events(run_dir / "progress.jsonl") if e["event"] == "chunk"]
    assert len(rss) == 5
    assert rss[-1] - rss[0] < 300, f"RSS grew with the chunks: {rss} MB"

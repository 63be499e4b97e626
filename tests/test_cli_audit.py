"""``python -m engine`` audits end to end, in subprocesses (contracts 1, 4 and 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_beliefs import multivariate_arrays, save, univariate_arrays

REPO = Path(__file__).resolve().parents[1]
TINY = ["sampler.chains=2", "sampler.draws=300", "sampler.tune=300", "analysis.num_q_draws=200"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: CPU, and a JAX compilation cache shared by this module's runs."""
    cache = tmp_path_factory.mktemp("jax-cache")
    out = dict(os.environ)
    out.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONWARNINGS="ignore",
    )
    return out


def engine(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- bad input


def _write_bad(kind: str, tmp: Path) -> Path:
    uni = univariate_arrays()
    if kind == "nan":
        uni["observed"][1, 2, 0] = np.nan
        return Path(save(uni, tmp / "b.npz"))
    if kind == "inf":
        uni["mu_q"][0, 3] = np.inf
        return Path(save(uni, tmp / "b.pt"))
    if kind == "sigma":
        uni["sigma_q"][1, 4] = 0.0
        return Path(save(uni, tmp / "b.nc"))
    if kind == "cov":
        mv = multivariate_arrays()
        mv["cov_q"][0, 1] = [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # symmetric, not PD
        return Path(save(mv, tmp / "b.npz"))
    if kind == "shape":
        uni["prior_sigma"] = np.ones(7)
        return Path(save(uni, tmp / "b.npz"))
    if kind == "missing_key":
        del uni["observed"]
        return Path(save(uni, tmp / "b.npz"))
    if kind == "unknown_key":
        uni["learning_rate"] = np.ones(3)
        return Path(save(uni, tmp / "b.npz"))
    if kind == "missing_file":
        return tmp / "nowhere.npz"
    if kind == "extension":
        (tmp / "b.csv").write_text("mu_q,sigma_q\n0,1\n")
        return tmp / "b.csv"
    if kind == "corrupt":
        good = Path(save(uni, tmp / "good.npz")).read_bytes()
        (tmp / "b.npz").write_bytes(good[: len(good) // 2])
        return tmp / "b.npz"
    if kind == "pickle":
        import torch

        from tests.test_beliefs import _Exploit

        arrays = {k: torch.as_tensor(np.asarray(v)) for k, v in uni.items() if k != "checkpoint"}
        arrays["payload"] = _Exploit(str(tmp / "executed"))
        torch.save(arrays, tmp / "b.pt")
        return tmp / "b.pt"
    raise AssertionError(kind)


BAD = {
    "nan": ("'observed'", "[1, 2, 0]"),
    "inf": ("'mu_q'", "[0, 3]"),
    "sigma": ("'sigma_q'", "[1, 4]"),
    "cov": ("'cov_q'", "[0, 1]"),
    "shape": ("'prior_sigma'", "broadcast"),
    "missing_key": ("'observed'", "missing"),
    "unknown_key": ("'learning_rate'", "unknown"),
    "missing_file": ("'data.path'", "not found"),
    "extension": ("'data.path'", "'.csv'"),
    "corrupt": ("'data.path'", "could not read"),
    "pickle": ("'data.path'", "pickled objects"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_exits_2_with_one_line(kind, tmp_path, env):
    path = _write_bad(kind, tmp_path)
    analysis = "vfe_multivariate" if kind == "cov" else "vfe_univariate"
    run_dir = tmp_path / "run"
    proc = engine([f"analysis={analysis}", "data=file", f"data.path={path}", f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: field "), lines[0]
    for piece in BAD[kind]:
        assert piece in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (run_dir / "metrics.parquet").exists()
    assert not (tmp_path / "executed").exists()


# --------------------------------------------------------------------------- runs


def test_small_univariate_demo_via_cli(tmp_path, env):
    run = tmp_path / "run"
    proc = engine(["data.num_tokens=6", "data.checkpoint_steps=[5,30,300]", *TINY, "runtime.batch_size=4",
                   "sampler.max_draws=1000", "analysis.keep_draws=[1,4]", f"hydra.run.dir={run}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KL(q|mcmc)" in proc.stdout and f"report: {run / 'report.md'}" in proc.stdout
    # draws of the chosen tokens at every checkpoint, as InferenceData
    import arviz as az

    draws = az.from_netcdf(run / "draws.nc")
    assert draws.posterior.theta.dims == ("chain", "draw", "checkpoint", "token")
    # audits stop each target at ESS 400: the draw axis is max_draws, each target keeps whole
    # blocks of 100 draws per chain and the rest is NaN padding
    assert draws.posterior.theta.shape == (2, 1000, 3, 2) and draws.posterior.token.values.tolist() == [1, 4]
    kept = np.isfinite(draws.posterior.theta.values).all(axis=0).sum(axis=0)  # [checkpoint, token]
    assert (kept >= 100).all() and (kept % 100 == 0).all()
    assert np.isnan(draws.posterior.theta.values[:, kept.max():]).all()
    # structured progress: one JSON line per chunk of 4 sampled targets (the 6 tokens' inputs are
    # the same at the 3 checkpoints: 6 distinct targets), and a rate/ETA line in the job log
    from engine.audit.progress import read_events

    events = read_events(run / "progress.jsonl")
    assert [e["event"] for e in events] == ["start"] + ["chunk"] * 2 + ["finish"]
    assert events[-2]["done"] == events[-2]["total"] == 6
    assert "tokens/s, ETA" in (run / "__main__.log").read_text()
    t = pd.read_parquet(run / "metrics.parquet")
    assert len(t) == 18 and (t.status == "ok").all()
    assert t.checkpoint.unique().tolist() == ["step00005", "step00030", "step00300"]
    for name in ("summary.json", "report.md", "kl_by_checkpoint.png", "diagnostics.png"):
        assert (run / name).stat().st_size > 0, name
    assert not list(run.glob(".*.tmp-*"))  # atomic writes leave no temporaries


@pytest.mark.slow
def test_npz_pt_nc_give_identical_tables_via_cli(tmp_path, env):
    arrays = univariate_arrays(C=2, T=4, n=5)
    paths = [save(arrays, tmp_path / f"beliefs{ext}") for ext in (".npz", ".pt", ".nc")]
    sweep = tmp_path / "sweep"
    proc = engine(["-m", "data=file", f"data.path={','.join(paths)}", *TINY, f"hydra.sweep.dir={sweep}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = [pd.read_parquet(sweep / str(i) / "metrics.parquet") for i in range(3)]
    for other in tables[1:]:
        pd.testing.assert_frame_equal(other, tables[0])
    t = tables[0]
    assert len(t) == 8 and t.checkpoint.tolist()[:4] == ["early"] * 4 and t.token.tolist()[:4] == [10, 11, 12, 13]
    assert (t.status == "ok").all() and np.isfinite(t.kl_q_exact).all()


@pytest.mark.slow
def test_small_demos_via_multirun(tmp_path, env):
    sweep = tmp_path / "sweep"
    proc = engine(
        ["-m", "analysis=vfe_univariate,vfe_multivariate", "data.num_tokens=10",
         "data.num_tokens_multivariate=4", "data.checkpoint_steps=[5,30,300]", *TINY,
         f"hydra.sweep.dir={sweep}"],
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for d in sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists()):
        s = json.loads((d / "summary.json").read_text())
        runs[s["kind"]] = (d, s)
    assert set(runs) == {"univariate", "multivariate"}
    # univariate demo: torch checkpoints on disk, beliefs improve over training
    d, s = runs["univariate"]
    assert sorted(p.name for p in (d / "demo").glob("beliefs_*.pt")) == [
        "beliefs_step00005.pt", "beliefs_step00030.pt", "beliefs_step00300.pt"]
    kl = [c["kl_q_exact_mean"] for c in s["checkpoints"]]
    assert kl[-1] < kl[0]
    for name in ("metrics.parquet", "report.md", "kl_by_checkpoint.png", "mean_vs_mcmc.png",
                 "std_ratio_hist.png", "diagnostics.png"):
        assert (d / name).stat().st_size > 0, name
    assert "Worst" in (d / "report.md").read_text()
    assert {"jax", "pymc", "blackjax"} <= set(s["versions"])
    # multivariate demo (K=3): contract columns
    d, s = runs["multivariate"]
    t = pd.read_parquet(d / "metrics.parquet")
    assert {"mean_l2_error", "kl_q_mcmc", "kl_q_exact", "r_hat", "ess_bulk", "converged"} <= set(t.columns)
    assert len(t) == 12 and set(t.dim) == {3}
    # the printed summary table names the report
    assert "KL(q|mcmc)" in proc.stdout and "report.md" in proc.stdout


@pytest.mark.slow
def test_custom_student_t_model_via_cli(tmp_path, env):
    path = save(univariate_arrays(C=2, T=4, n=5), tmp_path / "beliefs.npz")
    proc = engine(["data=file", f"data.path={path}", "model=student_t", *TINY,
                   f"hydra.run.dir={tmp_path / 'run'}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert t.kl_q_exact.isna().all() and np.isfinite(t.kl_q_mcmc).all() and np.isfinite(t.pareto_k).all()
    assert "no closed-form posterior" in (tmp_path / "run" / "report.md").read_text()
    assert "no closed-form posterior" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("analysis", ["vfe_univariate", "vfe_multivariate"])
def test_bare_demo_runs_within_budget(analysis, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    start = time.perf_counter()
    args = [] if analysis == "vfe_univariate" else [f"analysis={analysis}"]
    proc = engine([*args, f"hydra.run.dir={tmp_path}"], env)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report.md" in proc.stdout and (tmp_path / "metrics.parquet").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(c["frac_converged"] > 0.95 for c in summary["checkpoints"])
    # 90 s on an idle 2-core CPU; allow for a shared machine
    assert elapsed < 180, elapsed


def test_every_audit_config_option_composes():
    from hydra import compose, initialize_config_dir

    from engine.analyses.vfe_audit import model_from_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for analysis in ("vfe_univariate", "vfe_multivariate"):
            for data in ("demo", "file"):
                for model in ("normal_normal", "student_t", "bernoulli_logit"):
                    cfg = compose("config", overrides=[f"analysis={analysis}", f"data={data}", f"model={model}"])
                    assert cfg.analysis.name == analysis and cfg.data.name == data
                    assert (cfg.data.shard, cfg.data.num_shards) == (0, 1)
                    built, closed_form, name = model_from_config(cfg)
                    assert name == model and closed_form == (model == "normal_normal")
                    assert "theta" in [rv.name for rv in built.free_RVs]


def test_help_lists_audit_groups(env):
    proc = engine(["--help"], env)
    assert proc.returncode == 0
    for option in ("vfe_univariate", "vfe_multivariate", "student_t", "bernoulli_logit", "file"):
        assert option in proc.stdout

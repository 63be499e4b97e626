"""Reliability: store identity, damage, locking, full disk; failure isolation; error classes."""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.errors import InputError, StorageError
from engine.audit.store import ChunkStore

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- store identity
def _identity_inputs(nu=4.0, precision="float64", target_accept=0.8, shift=0.0):
    from engine.audit import vfe_models
    from engine.audit.vfe import make_problem_data
    from engine.sampling.batch import BatchConfig
    from engine.settings import RuntimeConfig, SamplerConfig

    rng = np.random.default_rng(0)
    inputs = {"observed": rng.normal(size=(6, 5)) + shift, "prior_mu": np.zeros(6),
              "prior_sigma": np.ones(6), "obs_sigma": np.ones(6)}
    data = make_problem_data(inputs, np.full(6, 5))
    config = BatchConfig(sampler=SamplerConfig(chains=2, draws=10, tune=10, target_accept=target_accept),
                         runtime=RuntimeConfig(batch_size=3, precision=precision), keep_draws=False)
    return data, config, vfe_models.student_t(nu)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(nu=5.0), "graph"),
        (dict(precision="float32"), "precision"),
        (dict(target_accept=0.9), "sampler"),
        (dict(shift=1e-9), "data"),
        (dict(model_config={"nu": 5.0}), "model"),
    ],
)
def test_changed_identity_component_is_named_and_chunks_untouched(tmp_path, change, named):
    from engine.audit.chunks import open_store

    def store(overwrite=False, model_config=None, **kw):
        data, config, model = _identity_inputs(**kw)
        extra = {"model": {"name": "student_t", "config": model_config or {"nu": 4.0}}}
        return open_store(tmp_path, overwrite, data, config, model, extra)

    first = store()
    first.write(0, 3, {"x": np.arange(3.0)})
    chunk = tmp_path / "chunks" / "chunk_0000000000_0000000003.npz"
    before = chunk.read_bytes()
    assert store().completed() == [(0, 3)]  # same identity (a freshly built template): resumes
    with pytest.raises(InputError, match=f"changed: {named}\\)"):
        store(**change)
    assert chunk.read_bytes() == before
    fresh = store(overwrite=True, **change)
    assert fresh.completed() == []  # recomputes
    aside = list(tmp_path.glob("replaced_*/chunks/chunk_0000000000_0000000003.npz"))
    assert len(aside) == 1 and aside[0].read_bytes() == before


@pytest.mark.slow
def test_cli_rerun_with_changed_model_parameter_exits_2_naming_it(tmp_path):
    beliefs = tmp_path / "beliefs.npz"
    rng = np.random.default_rng(1)
    np.savez(beliefs, mu_q=np.zeros((1, 3)), sigma_q=np.ones((1, 3)),
             observed=rng.normal(size=(1, 3, 4)), prior_mu=0.0, prior_sigma=1.0)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine", "data=file", f"data.path={beliefs}", "model=student_t",
           "sampler.chains=2", "sampler.draws=30", "sampler.tune=30", "analysis.plots=false",
           "analysis.num_q_draws=50", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    stored = {p.name: p.read_bytes() for p in (run_dir / "store" / "chunks").iterdir()}
    changed = subprocess.run(cmd + ["model.nu=7.0"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "changed: graph, model" in lines[0], changed.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "store" / "chunks").iterdir()} == stored


# --------------------------------------------------------------------------- damage, lock, disk
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_chunk_is_detected_logged_and_recomputed(tmp_path, caplog, damage):
    grid = [(0, 2), (2, 4)]
    store = ChunkStore(tmp_path, {"a": 1}, grid)
    store.write(0, 2, {"x": np.array([1.0, 2.0])})
    store.write(2, 4, {"x": np.array([3.0, 4.0])})
    path = tmp_path / "chunks" / "chunk_0000000002_0000000004.npz"
    payload = bytearray(path.read_bytes())
    if damage == "truncate":
        payload = payload[: len(payload) // 2]
    else:
        payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    with caplog.at_level(logging.WARNING, logger="engine"):
        again = ChunkStore(tmp_path, {"a": 1}, grid)
        assert again.pending() == [(2, 4)]
    assert "corrupted" in caplog.text and path.name in caplog.text
    with pytest.raises(InputError, match="chunk 2:4 has no results"):
        again.gather()
    again.write(2, 4, {"x": np.array([3.0, 4.0])})
    assert np.array_equal(ChunkStore(tmp_path, {"a": 1}, grid).gather()["x"], [1.0, 2.0, 3.0, 4.0])


def test_chunk_without_checksum_is_not_a_result(tmp_path):
    """A kill between the chunk file's rename and the manifest update leaves an unconfirmed file."""
    grid = [(0, 2)]
    store = ChunkStore(tmp_path, {"a": 1}, grid)
    store.write(0, 2, {"x": np.zeros(2)})
    manifest = (tmp_path / "manifest.json")
    import json

    info = json.loads(manifest.read_text())
    info["checksums"] = {}
    manifest.write_text(json.dumps(info))
    from engine.audit.store import release_lock

    release_lock(tmp_path)
    assert ChunkStore(tmp_path, {"a": 1}, grid).pending() == grid


def test_second_process_on_a_store_in_use_exits_2_and_first_is_unharmed(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from engine.audit.store import ChunkStore; import numpy as np\n"
            f"s = ChunkStore({str(run_dir / 'store')!r}, {{'a': 1}}, [(0, 2)])\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "s.write(0, 2, {'x': np.ones(2)}); print(s.gather()['x'].sum(), flush=True)\n")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        manifest = (run_dir / "store" / "manifest.json").read_bytes()
        second = subprocess.run(
            [sys.executable, "-m", "engine", "sampler.draws=20", "sampler.tune=20",
             f"hydra.run.dir={run_dir}"],
            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
            capture_output=True, text=True, timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another process" in lines[0], second.stderr
        assert (run_dir / "store" / "manifest.json").read_bytes() == manifest
        out, _ = holder.communicate("go\n", timeout=60)
        assert holder.returncode == 0 and out.strip() == "2.0"
    finally:
        if holder.poll() is None:
            holder.kill()


def _fill_disk_at_chunk_write(monkeypatch, which: int):
    """Make the ``which``-th chunk file write hit ENOSPC half way (a full disk)."""
    import engine.audit.store as store_module

    real_fdopen = os.fdopen
    writes = {"chunks": 0}

    class FullDisk(io.RawIOBase):
        """A file whose disk fills up half way through the write."""

        def __init__(self, handle):
            self.handle = handle

        def write(self, payload):
            self.handle.write(bytes(payload)[: len(payload) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.handle.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".chunk_" in name:
            writes["chunks"] += 1
            if writes["chunks"] == which:
                return FullDisk(handle)
        return handle

    monkeypatch.setattr(store_module.os, "fdopen", fdopen)
    return real_fdopen


def test_full_disk_during_a_chunk_write_keeps_no_partial_chunk(tmp_path, monkeypatch):
    grid = [(0, 2), (2, 4)]
    store = ChunkStore(tmp_path, {"a": 1}, grid)
    real_fdopen = _fill_disk_at_chunk_write(monkeypatch, 2)
    store.write(0, 2, {"x": np.array([1.0, 2.0])})
    with pytest.raises(StorageError, match="no space left on device.*rerun the same command"):
        store.write(2, 4, {"x": np.array([3.0, 4.0])})
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["chunk_0000000000_0000000002.npz"]
    resumed = ChunkStore(tmp_path, {"a": 1}, grid)
    assert resumed.pending() == [(2, 4)]
    resumed.write(2, 4, {"x": np.array([3.0, 4.0])})
    assert np.array_equal(resumed.gather()["x"], [1.0, 2.0, 3.0, 4.0])


@pytest.mark.slow
def test_full_disk_during_an_audit_then_resume_equals_a_clean_run(tmp_path, monkeypatch):
    from engine import audit_vfe

    rng = np.random.default_rng(2)
    arrays = {"mu_q": np.zeros(6), "sigma_q": np.ones(6), "observed": rng.normal(size=(6, 5)),
              "prior_mu": 0.0, "prior_sigma": 1.0}
    kw = dict(chains=2, draws=40, tune=40, seed=1, batch_size=2, num_q_draws=50)
    clean = audit_vfe(arrays, **kw).table
    real_fdopen = _fill_disk_at_chunk_write(monkeypatch, 2)
    with pytest.raises(StorageError, match="no space left on device"):
        audit_vfe(arrays, store_dir=tmp_path, **kw)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    chunk_files = sorted(p.name for p in (tmp_path / "chunks").iterdir())
    assert chunk_files == ["chunk_0000000000_0000000002.npz"]  # no partial chunk, no temp file
    resumed = audit_vfe(arrays, store_dir=tmp_path, **kw).table
    pd.testing.assert_frame_equal(resumed, clean)


# --------------------------------------------------------------------------- failure isolation
def test_multivariate_bad_covariance_rows_are_flagged_others_identical():
    from engine.audit.beliefs import beliefs_from_arrays
    from engine.audit.table import build_table

    rng = np.random.default_rng(3)
    P, K = 5, 2
    bs = beliefs_from_arrays({
        "mu_q": rng.normal(size=(P, K)), "cov_q": np.tile(np.eye(K), (P, 1, 1)),
        "observed": rng.normal(size=(P, 4, K)), "prior_mu": np.zeros(K), "prior_cov": np.eye(K),
    })
    summaries = {
        "mean": rng.normal(size=(P, K)), "cov": np.tile(np.eye(K) * 0.5, (P, 1, 1)),
        "mcse_mean": np.full(P, 0.01), "r_hat": np.ones(P), "ess_bulk": np.full(P, 900.0),
        "ess_tail": np.full(P, 900.0), "coverage": np.full(P, 0.9), "divergences": np.zeros(P),
        "mean_n_steps": np.full(P, 3.0),
    }
    clean, _ = build_table(bs, summaries, "mvnormal", True, 0.9, 100, False)
    broken = {k: v.copy() for k, v in summaries.items()}
    broken["cov"][1] = np.nan
    broken["cov"][3] = 0.0  # every draw identical: singular
    with np.errstate(all="ignore"):
        table, _ = build_table(bs, broken, "mvnormal", True, 0.9, 100, False)
    assert list(table.status[[1, 3]]) == ["MCMC covariance not finite or not positive definite"] * 2
    assert not table.converged[1] and np.isnan(table.kl_q_mcmc[[1, 3]]).all()
    others = [0, 2, 4]
    pd.testing.assert_frame_equal(table.iloc[others], clean.iloc[others])


# --------------------------------------------------------------------------- ragged templates
def _ragged_rows(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n) for n in (3, 6, 4)]


def _refusal(build) -> str:
    from engine.sampling.api import sample_batched

    with pytest.raises(InputError) as info:
        sample_batched(build(), {"y": _ragged_rows()}, chains=1, draws=5, tune=5)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_ragged_potential_and_joint_row_likelihoods_are_refused():
    import pymc as pm
    import pytensor.tensor as pt

    def potential():
        with pm.Model() as m:
            y = pm.Data("y", np.zeros(3))
            mu = pm.Normal("mu")
            pm.Normal("obs", mu, 1.0, observed=y)
            pm.Potential("ll_y", -((y - mu) ** 2).sum())
        return m

    def mvnormal_rows():
        with pm.Model() as m:
            y = pm.Data("y", np.zeros(3))
            mu = pm.Normal("mu")
            cov = 0.5 * pt.eye(y.shape[0]) + 0.5
            pm.MvNormal("obs", mu * pm.math.ones(y.shape[0]), cov=cov, observed=y)
        return m

    def random_walk():
        with pm.Model() as m:
            y = pm.Data("y", np.zeros(3))
            s = pm.HalfNormal("s")
            pm.GaussianRandomWalk("obs", sigma=s, init_dist=pm.Normal.dist(0, 1), observed=y)
        return m

    def ar():
        with pm.Model() as m:
            y = pm.Data("y", np.zeros(3))
            rho = pm.Normal("rho", 0, 0.5)
            pm.AR("obs", rho=[rho], sigma=1.0, init_dist=pm.Normal.dist(0, 1), observed=y)
        return m

    assert _refusal(potential) == "Potential 'll_y' reads ragged data 'y'; the engine cannot mask it"
    for build in (mvnormal_rows, random_walk, ar):
        message = _refusal(build)
        assert message.startswith("observed variable 'obs'") and "one joint draw" in message, message


def test_ragged_elementwise_template_matches_pymc_on_unpadded_rows():
    """Per problem, the engine's padded-and-masked log density equals PyMC's own model built on
    that problem's rows alone, at random points (regression with a ragged covariate, and an
    observed MvNormal whose rows are iid K-vectors)."""
    import jax
    import pymc as pm

    from engine.sampling.api import compile_for
    from engine.model.compile import prepare_data

    rng = np.random.default_rng(4)
    rows = (3, 7, 5)
    xs = [rng.normal(size=n) for n in rows]
    ys = [rng.normal(size=n) for n in rows]
    zs = [rng.normal(size=(n, 2)) for n in rows]

    def build(x, y, z):
        with pm.Model() as m:
            xd, yd, zd = pm.Data("x", x), pm.Data("y", y), pm.Data("z", z)
            a = pm.Normal("a")
            b = pm.Normal("b")
            s = pm.HalfNormal("s")
            pm.Normal("obs", a + b * xd, s, observed=yd)
            pm.MvNormal("obs_z", mu=pm.math.stack([a, b]), cov=np.eye(2), observed=zd)
        return m

    template = build(xs[0], ys[0], zs[0])
    data = prepare_data(template, {"x": xs, "y": ys, "z": zs})
    compiled = compile_for(template, data)
    assert compiled.row_indexed_names == ("obs", "obs_z")
    arrays = data.device_arrays()
    with jax.enable_x64(True):
        for i in range(len(rows)):
            own = build(xs[i], ys[i], zs[i])
            logp = own.compile_logp()
            for _ in range(3):
                position = rng.normal(size=compiled.dim)
                point = {name: position[sl].reshape(shape) for name, (sl, shape) in compiled.value_slices.items()}
                engine_value = float(compiled.logdensity_fn(position, {k: v[i] for k, v in arrays.items()}))
                assert engine_value == pytest.approx(float(logp(point)), rel=1e-10, abs=1e-10)


def test_pointwise_loglik_masks_only_row_indexed_observed():
    """An observed variable that is not ragged but happens to have as many entries as the
    padded rows keeps all of its log-likelihood."""
    import pymc as pm

    from engine.sampling.api import sample_batched

    with pm.Model() as model:
        y = pm.Data("y", np.zeros(3))
        w = pm.Data("w", np.zeros(4))
        mu = pm.Normal("mu")
        pm.Normal("obs", mu, 1.0, observed=y)
        pm.Normal("other", mu, 1.0, observed=w)
    rng = np.random.default_rng(5)
    ys = [rng.normal(size=n) for n in (2, 4)]  # padded to 4 rows, like w's 4 entries
    idata = sample_batched(model, {"y": ys, "w": rng.normal(size=(2, 4))}, chains=1, draws=5,
                           tune=5, log_likelihood=True)
    obs = idata.log_likelihood["obs"].values  # (chain, draw, problem, row)
    assert np.isnan(obs[:, :, 0, 2:]).all() and np.isfinite(obs[:, :, 0, :2]).all()
    assert np.isfinite(idata.log_likelihood["other"].values).all()


# --------------------------------------------------------------------------- error classes
def test_internal_error_exits_1_with_a_pointer_and_the_traceback_in_the_log(tmp_path, monkeypatch, capsys):
    from hydra import compose, initialize_config_dir

    import engine.cli as run_module

    def broken(cfg, run_dir):
        raise ValueError("shapes (3,) and (4,) not aligned")  # e.g. a JAX/PyTensor failure

    monkeypatch.setattr(run_module, "run_analysis", broken)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")
    assert run_module.run_cli(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("internal error: ValueError: shapes") and "traceback in" in err[0]
    where = err[0].rsplit("traceback in ", 1)[1].rstrip(")")
    log_text = Path(where.split(", ")[0]).read_text()
    assert "Traceback" in log_text and "not aligned" in log_text


def test_shard_without_store_raises():
    from engine import audit_vfe

    arrays = {"mu_q": np.zeros(2), "sigma_q": np.ones(2), "observed": np.zeros((2, 3)),
              "prior_mu": 0.0, "prior_sigma": 1.0}
    with pytest.raises(InputError, match="shard"):
        audit_vfe(arrays, shard=(0, 2))


def test_plain_list_of_per_problem_scalars_is_data():
    from tests.models import normal_normal_model

    from engine.model.compile import prepare_data

    model = normal_normal_model(num_obs=3)
    names = {v.name for v in model.data_vars}
    scalar = next(n for n in sorted(names) if np.ndim(model[n].get_value()) == 0)
    data = prepare_data(model, {scalar: [0.5, 1.0, 2.0]})
    assert data.arrays[scalar].shape == (3,) and data.num_rows is None


# --------------------------------------------------------------------------- tune=0
@pytest.mark.parametrize("sampler", [
    "blackjax", "chees", *(pytest.param(s, marks=pytest.mark.slow) for s in ("numpyro", "stepwise", "pymc"))
])
def test_tune_zero_for_every_sampler(sampler):
    """No warmup: the NUTS kernels and pm.sample start from the jittered point with the initial
    step size and return every draw; ChEES, which adapts its trajectory length during warmup,
    refuses with one line before sampling."""
    from engine.sampling.api import sample_batched
    from tests.models import normal_normal_data, normal_normal_model

    data = normal_normal_data(2, num_obs=5, seed=9)
    kw = dict(sampler=sampler, chains=2, draws=30, tune=0, seed=0, progress=False)
    if sampler == "chees":
        with pytest.raises(InputError, match="tune >= 50"):
            sample_batched(normal_normal_model(5), data, **kw)
        return
    idata = sample_batched(normal_normal_model(5), data, **kw)
    theta = idata.posterior.theta.values
    assert theta.shape == (2, 30, 2) and np.isfinite(theta).all()
    # the chains moved: no warmup is not no sampling
    assert (np.ptp(theta, axis=1) > 0).all()


# --------------------------------------------------------------------------- fault injection
@pytest.mark.slow
def test_audit_killed_at_five_random_moments_resumes_to_the_uninterrupted_table(tmp_path):
    """SIGKILL a CLI audit at 5 random moments in a row, rerunning the same command each time:
    two during start-up and compilation (a random time), three while chunks are being sampled
    and written (a random delay after 1-3 more chunk files appear, so a kill can land between a
    chunk file's rename and its manifest update). The last run finishes and its metrics.parquet
    equals an uninterrupted run's."""
    import signal

    rng = np.random.default_rng(13)
    beliefs = tmp_path / "beliefs.npz"
    theta = rng.normal(size=(2, 30))
    observed = theta[..., None] + rng.normal(size=(2, 30, 8))
    np.savez(beliefs, mu_q=observed.mean(-1), sigma_q=np.full(theta.shape, 0.3), observed=observed,
             prior_mu=np.zeros(theta.shape), prior_sigma=np.ones(theta.shape))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    num_chunks = 15

    def cmd(run_dir):  # ChEES: auto's pooled reruns hold chunks back and store them in a burst,
        # which leaves no moment to kill between chunk files (seen: [3, 3, 15, 15, 15])
        return [sys.executable, "-m", "engine", "data=file", f"data.path={beliefs}", "sampler=chees",
                "runtime.batch_size=4", "sampler.chains=2", "sampler.draws=400", "sampler.tune=400",
                "analysis.plots=false", "analysis.num_q_draws=100", f"hydra.run.dir={run_dir}"]

    start = time.time()
    whole = subprocess.run(cmd(tmp_path / "whole"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    duration = time.time() - start
    killed = tmp_path / "killed"
    chunk_dir = killed / "store" / "chunks"

    def count():
        return len(list(chunk_dir.glob("chunk_*.npz"))) if chunk_dir.exists() else 0

    seen = []
    for attempt in range(5):
        before = count()
        proc = subprocess.Popen(cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if attempt < 2:
            deadline = time.time() + rng.uniform(0.1, 0.5) * duration
            wanted = num_chunks + 1  # never reached: stop at the deadline
        else:
            deadline = time.time() + 600
            wanted = min(before + int(rng.integers(1, 4)), num_chunks - 1)
        while time.time() < deadline and proc.poll() is None and count() < wanted:
            time.sleep(0.005)
        if attempt >= 2:
            time.sleep(rng.uniform(0.0, 0.03))
        assert proc.poll() is None, f"kill {attempt} came too late: the audit had finished"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.append(count())
    # killed mid-sampling at least once: with a warm compile cache chunks land milliseconds apart,
    # so a later kill can find every chunk file written (and the table not yet): seen [0, 0, 1, 11, 15]
    assert any(0 < c < num_chunks for c in seen[2:]), seen
    final = subprocess.run(cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "metrics.parquet"),
                                  pd.read_parquet(tmp_path / "whole" / "metrics.parquet"))


@pytest.mark.slow
def test_a_finished_audit_releases_its_run_directory(tmp_path):
    """The lock lives as long as the chunks are being written: after audit_vfe returns, another
    process may open the same store (e.g. a notebook's audit, then a CLI rerun)."""
    from engine import audit_vfe

    arrays = {"mu_q": np.zeros(2), "sigma_q": np.ones(2), "observed": np.zeros((2, 3)),
              "prior_mu": 0.0, "prior_sigma": 1.0}
    audit_vfe(arrays, chains=2, draws=20, tune=20, num_q_draws=50, store_dir=tmp_path)
    other = subprocess.run(
        [sys.executable, "-c", "from engine.audit.store import lock_directory; import sys; "
         f"lock_directory({str(tmp_path)!r}); print('locked')"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )
    assert other.returncode == 0 and other.stdout.strip() == "locked", other.stderr[-2000:]

"""The six experiment analyses through the Hydra CLI: composition, exit codes, smoke runs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.test_analyses_convergence import synthetic_trace

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ["sensitivity", "hierarchical_attention", "model_comparison", "convergence", "ppc", "loo"]
TINY = ["sampler.chains=2", "sampler.draws=150", "sampler.tune=150"]
PLOTS = {
    "sensitivity": ["sensitivity_forest.png"],
    "hierarchical_attention": ["attention_forest.png", "attention_shrinkage.png"],
    "model_comparison": ["best_posterior.png", "best_forest.png"],
    "convergence": ["convergence_trace.png", "convergence_rank.png"],
    "ppc": ["ppc_hierarchical_attention.png", "ppc_model_comparison.png", "ppc_sensitivity.png"],
    "loo": ["loo_compare.png", "loo_khat.png"],
}


def cli(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sampler", ["blackjax_nuts", "numpyro_nuts", "pymc_default"])
@pytest.mark.parametrize("name", ANALYSES)
def test_every_option_composes(name, sampler):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"analysis={name}", f"sampler={sampler}"])
    assert cfg.analysis.name == name
    assert callable(importlib.import_module(f"engine.analyses.{name}").run)


def test_cli_convergence_strict_exits_1_and_bad_input_exits_2(tmp_path):
    """Fast CLI path (no sampling): a saved trace with a failing problem, checked strictly."""
    trace = tmp_path / "trace.nc"
    synthetic_trace().to_netcdf(str(trace))
    run_dir = tmp_path / "run"
    proc = cli("analysis=convergence", f"analysis.input={trace}", "analysis.strict=true",
               f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "check failed: 1 of 2 problem(s) failed" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["results"]["num_failed"] == 1
    for plot in PLOTS["convergence"]:
        assert (run_dir / plot).stat().st_size > 0
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    proc = cli("analysis=sensitivity", f"analysis.input={empty}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: multirun {str(empty)!r}: no Hydra job directories (none holds "
                      ".hydra/overrides.yaml)"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ANALYSES)
def test_cli_smoke_runs_bare(name, tmp_path):
    """Every analysis runs on its embedded demo with no analysis option (tiny sampler sizes)."""
    proc = cli(f"analysis={name}", f"hydra.run.dir={tmp_path}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"outputs in {tmp_path}" in proc.stdout
    for name_ in ["summary.json", "report.md", *PLOTS[name]]:
        assert (tmp_path / name_).stat().st_size > 0, name_
    report = (tmp_path / "report.md").read_text()
    assert all(f"]({plot})" in report for plot in PLOTS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model_comparison", "loo"])
def test_cli_pymc_default_sampler(name, tmp_path):
    """The pm.sample loop baseline also drives the analyses (LOO falls back to the draws'
    log-likelihood, which the loop does not return)."""
    proc = cli(f"analysis={name}", "sampler=pymc_default", f"hydra.run.dir={tmp_path}",
               "sampler.chains=2", "sampler.draws=100", "sampler.tune=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "summary.json").exists()

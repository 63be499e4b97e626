"""Stopping programs compiled ahead of time (engine.sampling.ahead): the same results, bitwise,
as the plain jitted programs, in both precisions, reused across calls, and one executable per
device when chunks run side by side on two host devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.model.compile import prepare_data
from engine.sampling import stopping
from engine.sampling.api import compile_for
from engine.sampling.batch import BatchConfig, resolve_config, run_batched
from engine.settings import RuntimeConfig, SamplerConfig
from tests.conftest import two_host_devices
from tests.models import normal_normal_data, normal_normal_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = normal_normal_model(8)
SAMPLER = dict(name="chees", tune=100, draws=100, target_ess=100, max_draws=300, block_draws=50)


def _leaves(result):
    """Every array of a BatchResult, by name (None fields left out)."""
    out = {"init_ok": result.init_ok, "num_draws": result.num_draws, "num_grads": result.num_grads,
           "converged": result.converged}
    out.update({f"draw_{k}": v for k, v in result.draws.items()})
    out.update({f"stat_{k}": v for k, v in result.stats._asdict().items()})
    return out


def _assert_bitwise(a, b):
    a, b = _leaves(a), _leaves(b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name, strict=True)


@pytest.mark.parametrize("precision", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_compiled_ahead_matches_plain_jit_bitwise(monkeypatch, precision):
    problem_data = prepare_data(MODEL, normal_normal_data(6, num_obs=8, seed=5))
    compiled = compile_for(MODEL, problem_data)
    config = BatchConfig(sampler=SamplerConfig(**SAMPLER), runtime=RuntimeConfig(seed=7, batch_size=4, precision=precision))
    ahead = run_batched(compiled, problem_data, config, progress=False)
    built = stopping.build_stop_programs(compiled, resolve_config(compiled, problem_data, config), None, None)
    programs = (built.warmup, built.block, built.finish)  # the gate programs are plain jit, one per window
    for program in programs:
        assert program.jitted._cache_size() == 0  # every call ran an executable compiled ahead
    entries = [len(program._entries) for program in programs]
    assert min(entries) >= 1

    monkeypatch.setattr(stopping, "COMPILE_AHEAD", False)
    plain = run_batched(compiled, problem_data, config, progress=False)
    assert ahead.draws["theta"].dtype == np.dtype(precision)
    assert len(set(ahead.num_draws.tolist())) > 1  # problems retired at different counts
    _assert_bitwise(ahead, plain)

    monkeypatch.setattr(stopping, "COMPILE_AHEAD", True)
    again = run_batched(compiled, problem_data, config, progress=False)
    assert [len(program._entries) for program in programs] == entries  # reused, not compiled again
    _assert_bitwise(again, plain)


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    import engine
    from engine.model.compile import prepare_data
    from engine.sampling import stopping
    from engine.sampling.api import compile_for
    from engine.sampling.batch import BatchConfig, resolve_config, run_batched
    from engine.settings import RuntimeConfig, SamplerConfig
    from tests.models import normal_normal_data, normal_normal_model

    model = normal_normal_model(8)
    problem_data = prepare_data(model, normal_normal_data(6, num_obs=8, seed=5))
    compiled = compile_for(model, problem_data)
    sampler = SamplerConfig(name="chees", tune=100, draws=100, target_ess=100, max_draws=300, block_draws=50)
    def run(devices):
        config = BatchConfig(sampler=sampler, runtime=RuntimeConfig(seed=7, batch_size=3, devices=devices,
                                                                  precision="float32"))
        result = run_batched(compiled, problem_data, config, progress=False)
        programs = stopping.build_stop_programs(compiled, resolve_config(compiled, problem_data, config), None, None)
        return result, programs
    two, programs = run(2)
    fallbacks = [p.jitted._cache_size() for p in programs[:3]]  # warmup, block, finish (gates: plain jit)
    stopping.COMPILE_AHEAD = False
    plain, _ = run(1)
    leaves = lambda r: [r.draws["theta"], r.num_draws, r.num_grads, r.converged, r.stats.energy]
    out = {"device_count": jax.device_count(), "fallbacks": fallbacks, "dtype": str(two.draws["theta"].dtype),
           "equal": all(np.array_equal(a, b, equal_nan=True) for a, b in zip(leaves(two), leaves(plain)))}
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # 34 s: tests/test_devices.py keeps two host devices agreeing with one in the fast tier
def test_two_host_devices_each_get_their_executables():
    """Chunks side by side on two devices: each device runs executables compiled ahead for it
    (no plain-jit fallback), in the run's precision, with the draws of the plain jitted
    programs on one device, bitwise."""
    env = dict(os.environ, XLA_FLAGS=two_host_devices(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device_count"] == 2
    assert out["fallbacks"] == [0, 0, 0]
    assert out["dtype"] == "float32"
    assert out["equal"]

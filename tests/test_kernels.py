"""The kernel protocol: registry, settings schema, and steps that resume from their state."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.sampling import batch
from engine.sampling.kernels import ALIASES, REGISTRY, canonical_name, get_kernel
from engine.sampling.kernels.base import Kernel, KernelSettings, Schedule
from engine.settings import RuntimeConfig, SamplerConfig

ROOT = Path(__file__).resolve().parents[1]
JAX_KERNELS = [n for n in REGISTRY if get_kernel(n).build is not None]


def test_registry_names_modules_and_aliases():
    for name in REGISTRY:
        kernel = get_kernel(name)
        assert isinstance(kernel, Kernel) and kernel.name == name
        assert (kernel.build is None) == (kernel.runs_on_host or kernel.driver is not None)
    for alias, name in ALIASES.items():
        assert canonical_name(alias) == name
        assert (ROOT / "conf" / "sampler" / f"{alias}.yaml").exists()
    with pytest.raises(ValueError, match="unknown sampler 'stan'; choose one of 'auto', 'blackjax', 'numpyro'"):
        canonical_name("stan")


def test_sampler_config_names_the_bad_field():
    assert SamplerConfig(name="blackjax_nuts").checked().name == "blackjax"
    for bad, match in [(dict(chains=0), "chains must be >= 1"), (dict(tune=-1), "tune must be >= 0"),
                       (dict(target_accept=1.5), "target_accept must be in"),
                       (dict(name="chees", chains=1), "needs chains >= 2"),
                       (dict(name="chees", dense_mass=True), "dense_mass is not available")]:
        with pytest.raises(ValueError, match=match):
            SamplerConfig(**bad).checked()
    with pytest.raises(ValueError, match="precision must be"):
        RuntimeConfig(precision="float16").checked()


def _normal_logdensity(x):
    return -0.5 * jnp.sum((x - 1.5) ** 2 / 0.25)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("numpyro", "chees") else n
                                  for n in JAX_KERNELS])
def test_steps_resume_from_their_state(name):
    """Sampling in two blocks, the second by a freshly built kernel from the state the first
    returned (as a later program would), equals sampling in one block, bitwise."""
    kernel = get_kernel(name)
    schedule = Schedule(num_tune=60, num_draws=40)
    algorithm = kernel.build(_normal_logdensity, KernelSettings(), schedule)
    resumed = kernel.build(_normal_logdensity, KernelSettings(), schedule)
    chains = 2 if kernel.chains_inside else None
    key = jax.random.split(jax.random.PRNGKey(0), chains) if chains else jax.random.PRNGKey(0)
    position = jnp.zeros((chains, 1) if chains else (1,))

    def run_draws(state, n, algorithm=algorithm):  # the driver's loop, for a block of n steps
        if kernel.loop == "draws":
            return jax.lax.scan(lambda s, _: algorithm.step(s), state, None, length=n)
        return jax.lax.fori_loop(0, n, lambda i, s: algorithm.step(s)[0], state), None

    @jax.jit
    def whole():
        state = algorithm.init(key, position)
        if algorithm.warmup is not None:
            state = algorithm.warmup(state)
        return state

    start = whole()
    if kernel.loop == "draws":
        one = jax.jit(lambda s: run_draws(s, 40))(start)[1]
        state, first = jax.jit(lambda s: run_draws(s, 25))(start)
        _, second = jax.jit(lambda s: run_draws(s, 15, resumed))(state)
        two = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)
    else:  # leapfrog kernels: the warmup is inside the steps; stop anywhere, then finish
        def finish(algorithm):
            return jax.jit(lambda s: jax.lax.while_loop(lambda t: ~algorithm.is_done(t), lambda t: algorithm.step(t)[0], s))

        one = algorithm.outputs(finish(algorithm)(start))
        partial, _ = jax.jit(lambda s: run_draws(s, 333))(start)
        two = resumed.outputs(finish(resumed)(partial))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_program_cache_is_bounded():
    from engine.caching import LRUCache

    assert batch.MAX_CACHED_PROGRAMS >= 4
    cache = LRUCache(2)
    owner = object()
    built = [cache.get_or_build(k, lambda k=k: [k], owner=owner) for k in "abc"]
    assert len(cache) == 2 and cache.get_or_build("c", lambda: None, owner=owner) is built[2]
    assert cache.get_or_build("c", lambda: "rebuilt", owner=object()) == "rebuilt"  # another owner


@pytest.mark.parametrize("override, key", [("sampler.drawz=10", "sampler.drawz"),
                                           ("sampler.draws=many", "sampler.draws")])
def test_cli_refuses_a_config_outside_the_schema(override, key, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", override, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{key}'" in lines[0], proc.stderr


def test_no_sampler_name_checks_outside_the_registry():
    """Only the registry and each kernel's own module know sampler names; the engine reads Kernel
    fields (benchmarks name their contestants, the pm.sample baseline among them)."""
    pattern = re.compile(r"""[=!]= ?["'](?:%s)["']|in \(["'](?:%s)["']""" % (("|".join(REGISTRY),) * 2))
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        if "kernels" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders

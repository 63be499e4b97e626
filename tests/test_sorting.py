"""Host sorting (engine.sampling.sorting): bitwise equal to lax's sorts under jit and vmap, never
in a program lowered for a GPU, off with ENGINE_HOST_SORT=0, and its programs go to the
persistent compilation cache (engine.sampling.host_ffi)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from engine.sampling import diagnostics, gate, host_ffi, sorting

HOST_CALL = "engine_host_"  # the custom calls' names


@pytest.fixture
def lax_sorts(monkeypatch):
    """Trace with ENGINE_HOST_SORT=0 (lax.sort on CPU too): the reference."""
    def lax(fn):
        def traced(*args):
            monkeypatch.setenv(sorting.ENV_VAR, "0")
            try:
                return fn(*args)
            finally:
                monkeypatch.delenv(sorting.ENV_VAR)
        return traced
    return lax


def _data(dtype, shape=(3, 5, 240), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    x[..., ::3] = np.round(x[..., ::3])  # ties
    x = x.astype(dtype)
    x[0, 0, :6] = [np.nan, np.inf, -np.inf, -0.0, 0.0, np.nan]
    x[0, 1, 10:14] = [0.0, -0.0, 0.0, -0.0]
    x[1, 2, :3] = [np.inf, -np.inf, np.inf]
    return x


def _bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


CASES = {
    "sort": (sorting.sort, jnp.sort),
    "sort_axis0": (lambda a: sorting.sort(a, axis=0), lambda a: jnp.sort(a, axis=0)),
    "argsort": (sorting.argsort, lambda a: jnp.argsort(a, stable=True)),
    "median": (sorting.median, lambda a: jnp.median(a, axis=-1)),
    "quantile": (lambda a: sorting.quantile(a, 0.05), lambda a: jnp.quantile(a, 0.05, axis=-1)),
    "quantile_pair": (lambda a: jnp.stack(sorting.quantile(a, (0.05, 0.95))),
                      lambda a: jnp.stack([jnp.quantile(a, p, axis=-1) for p in (0.05, 0.95)])),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_host_equals_lax_bitwise_under_jit_and_vmap(name, dtype):
    assert sorting.host_sort_enabled()
    ours, ref = CASES[name]
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(_data(dtype))
        assert x.dtype == np.dtype(dtype)
        runs = {
            "jit": (jax.jit(ours), jax.jit(ref)),
            "vmap": (jax.jit(jax.vmap(ours)), jax.jit(jax.vmap(ref))),
            "nested vmap": (jax.jit(jax.vmap(jax.vmap(ours))), jax.jit(jax.vmap(jax.vmap(ref)))),
            "vmap, clean rows": (jax.jit(jax.vmap(ours)), jax.jit(jax.vmap(ref))),
        }
        for how, (f, g) in runs.items():
            data = x[1:] if how == "vmap, clean rows" else x  # no NaN or -0.0: numpy's fast sort
            if name == "sort_axis0" and how == "nested vmap":
                data = data[..., :4]
            assert _bitwise_equal(f(data), g(data)), how
        assert HOST_CALL in jax.jit(ours).lower(x).as_text()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_average_ranks_equal_lax_and_scipy(dtype, lax_sorts):
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(_data(dtype).reshape(-1, 240))
        host = jax.jit(jax.vmap(sorting.average_ranks))(x)
        device = jax.jit(lax_sorts(jax.vmap(sorting.average_ranks)))(x)
        assert host.dtype == jnp.result_type(float)
        assert _bitwise_equal(host, device)
        clean = np.asarray(x[3:])
        np.testing.assert_array_equal(np.asarray(host[3:]), scipy.stats.rankdata(clean, axis=-1, method="average"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ranks_and_sort_from_one_sort_equal_the_two_calls(dtype, lax_sorts):
    """One sort for both (one host call on CPU, one argsort elsewhere), bitwise as two calls."""
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(_data(dtype).reshape(-1, 240))
        both = jax.jit(jax.vmap(sorting.average_ranks_and_sort))
        ranks, ordered = both(x)
        assert _bitwise_equal(ranks, jax.jit(jax.vmap(sorting.average_ranks))(x))
        assert _bitwise_equal(ordered, jnp.sort(x, axis=-1))
        lax_ranks, lax_ordered = jax.jit(lax_sorts(jax.vmap(sorting.average_ranks_and_sort)))(x)
        assert _bitwise_equal(lax_ranks, ranks) and _bitwise_equal(lax_ordered, ordered)
        assert jax.jit(jax.vmap(sorting.average_ranks_and_sort)).lower(x).as_text().count(HOST_CALL) == 1


def test_argsort_is_stable_and_sorts_integers():
    x = jnp.asarray(np.random.default_rng(1).integers(0, 4, size=(6, 500)).astype(np.int32))
    order = jax.jit(jax.vmap(sorting.argsort))(x)
    np.testing.assert_array_equal(order, np.argsort(np.asarray(x), axis=-1, kind="stable"))
    assert order.dtype == jnp.argsort(x).dtype
    assert _bitwise_equal(jax.jit(sorting.sort)(x), jnp.sort(x))


def test_diagnostics_with_host_sorts_equal_lax_bitwise(lax_sorts):
    """The stopping gate and masked_summary / summarize_draws give the same bits either way."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 300)).cumsum(-1).astype(np.float32)
    x[1] = np.round(x[1])
    n = jnp.int32(173)
    for fn in (diagnostics.summarize_draws, lambda v: gate.masked_summary(v, n)):
        host, device = jax.jit(fn)(x), jax.jit(lax_sorts(fn))(x)
        for key in device:
            assert _bitwise_equal(host[key], device[key]), key
    positions = jnp.asarray(np.moveaxis(x, 0, -1))[None]  # [lane, chain, draw, dim]
    diverging = jnp.zeros(positions.shape[:-1], bool)
    one = jax.vmap(lambda p, d: gate.gate(p, d, n, 100.0))
    (p_host, d_host), (p_dev, d_dev) = jax.jit(one)(positions, diverging), jax.jit(lax_sorts(one))(positions, diverging)
    assert bool(p_host) == bool(p_dev)
    for key in d_dev:
        assert _bitwise_equal(d_host[key], d_dev[key]), key


def test_env_switch_turns_host_sorting_off(monkeypatch):
    x = jnp.asarray(_data("float32"))
    assert HOST_CALL in jax.jit(sorting.sort).lower(x).as_text()
    assert HOST_CALL in jax.jit(lambda v: diagnostics.rhat(v)).lower(x).as_text()
    monkeypatch.setenv(sorting.ENV_VAR, "0")  # read at trace time: fresh functions, not cached traces
    assert not sorting.host_sort_enabled()
    assert HOST_CALL not in jax.jit(lambda v: sorting.sort(v)).lower(x).as_text()
    assert HOST_CALL not in jax.jit(lambda v: diagnostics.rhat(v)).lower(x).as_text()
    assert _bitwise_equal(jax.jit(lambda v: sorting.sort(v))(x), jnp.sort(x))


def test_program_lowered_for_gpu_holds_no_custom_call():
    x = jax.ShapeDtypeStruct((4, 240), jnp.float32)
    fn = jax.jit(lambda a: (sorting.sort(a), sorting.argsort(a), jax.vmap(sorting.average_ranks)(a)))
    gpu = jax.export.export(fn, platforms=["cuda"])(x).mlir_module()
    assert HOST_CALL not in gpu and "sort" in gpu
    with pytest.raises(ValueError, match="custom calls"):  # jax.export refuses the CPU version
        jax.export.export(fn, platforms=["cpu"])(x)


def test_handler_errors_are_raised_not_swallowed():
    def failing(a):
        raise ValueError("no such thing")

    host_ffi.register("engine_test_failing", failing)
    call = jax.jit(lambda a: host_ffi.ffi_call("engine_test_failing", jax.ShapeDtypeStruct(a.shape, a.dtype), a))
    with pytest.raises(Exception, match="no such thing"):
        jax.block_until_ready(call(jnp.ones(3)))


def test_programs_with_host_sorts_enter_the_persistent_cache(tmp_path):
    """A second process loads the program from the compilation cache (a pure_callback program
    would never be written there) and gets the same result."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from engine.sampling import diagnostics  # the engine keeps the user's JAX_COMPILATION_CACHE_DIR
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        from jax._src import monitoring
        events = []
        monitoring.register_event_listener(lambda name, **kw: events.append(name))
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 200)).astype(np.float32))
        out = jax.jit(diagnostics.summarize_draws)(x)
        hits = sum(e.endswith("cache_hits") for e in events)
        print(hits, np.asarray(out["ess_tail"]).tobytes().hex())
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_COMPILE_CACHE", sorting.ENV_VAR)}
    env.update(PYTHONPATH=root, JAX_COMPILATION_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == "0" and int(runs[1][0]) >= 1
    assert runs[0][1] == runs[1][1]
    assert any("summarize_draws" in name for name in os.listdir(tmp_path))


def test_bad_axis_is_refused():
    with pytest.raises(ValueError, match="axis 2"):
        sorting.sort(jnp.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="1-D"):
        sorting.average_ranks(jnp.zeros((2, 3)))

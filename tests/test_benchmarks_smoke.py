"""Smoke tests of the throughput benchmark: it runs, and its outputs are well formed.

No timing assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import throughput
from benchmarks.workloads import WORKLOADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_KEYS = {
    "workload", "contestant", "sampler", "n", "n_pass", "pass_share", "e2e_s", "posteriors_per_s_e2e",
    "ms_per_posterior_e2e", "min_bulk_ess_per_s", "ratio_e2e", "peak_rss_mb", "load_avg_1m",
}
ENGINE_KEYS = {
    "run_s", "posteriors_per_s_run", "ms_per_posterior_run", "compile_s", "trace_s", "xla_compile_s",
    "lockstep_efficiency", "mean_steps", "mean_max_steps", "ratio_run", "batch_size", "num_chunks",
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow  # a whole benchmark run (100 s); the certified benchmark's smoke test stays in the fast tier
def test_quick_mode_writes_well_formed_results(quick_results):
    out, proc = quick_results
    for name in ("quick.json", "quick.md", "quick_scaling.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "quick_scaling.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "quick.json").read_text())
    meta = results["meta"]
    for key in ("date_utc", "cpu", "jax_backend", "versions", "load_avg_start", "load_avg_end", "wall_s"):
        assert key in meta, key
    assert meta["versions"]["jax"] and meta["versions"]["pymc"]
    assert results["settings"]["gate"] == throughput.GATE
    rows = results["rows"]
    samplers = {r["sampler"] for r in rows}
    assert {"blackjax", "numpyro", "pymc"} <= samplers
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert 0 <= r["n_pass"] <= r["n"] and 0.0 <= r["pass_share"] <= 1.0
        assert r["e2e_s"] > 0 and r["peak_rss_mb"] > 0
        if r["sampler"] in ("blackjax", "numpyro"):
            assert ENGINE_KEYS <= set(r), ENGINE_KEYS - set(r)
            assert 0.0 < r["lockstep_efficiency"] <= 1.0
            assert r["mean_steps"] <= r["mean_max_steps"]
            assert r["compile_s"] > 0 and r["run_s"] > 0
            assert r["e2e_s"] == pytest.approx(r["compile_s"] + r["run_s"])
    assert sorted({r["n"] for r in rows if r["sampler"] == "blackjax"}) == [10, 40]
    if "nutpie" not in samplers:  # skipped cleanly, with a note
        assert any("nutpie" in n for n in results["notes"])
    md = (out / "quick.md").read_text()
    assert "| workload | contestant | N |" in md and "quick_scaling.png" in md
    all_rows = md[md.index("## All rows"):]
    assert all_rows.count("\n| w1 |") == len(rows)
    assert "## Summary" in md and "## Targets" in md


def test_every_workload_compiles_for_the_engine():
    import jax

    from engine.model.compile import compile_model, prepare_data

    for name, workload in WORKLOADS.items():
        model = workload.build_model()
        data = workload.make_data(3, 0)
        problem_data = prepare_data(model, data)
        compiled = compile_model(model, problem_data)
        assert problem_data.num_problems == 3
        assert compiled.dim >= 1 and compiled.free_var_names, name
        one_problem = {k: v[1] for k, v in problem_data.device_arrays().items()}
        lp = jax.jit(compiled.logdensity_fn)(compiled.initial_position, one_problem)
        assert np.isfinite(lp), name
    assert prepare_data(WORKLOADS["w4"].build_model(), WORKLOADS["w4"].make_data(5, 0)).is_ragged


def test_lockstep_efficiency_is_mean_over_max():
    # one chunk, 2 problems x 2 chains, 2 draws: steps (1, 3 | 3, 3) and (7, 1 | 1, 7)
    chunk = {
        "steps_sum": np.array([[4, 8], [6, 8]]),  # per problem: sum over chains, per draw
        "steps_max": np.array([[3, 7], [3, 7]]),
        "steps_total_sum": np.array([12, 14]),  # per problem: all chains' steps
        "steps_total_max": np.array([8, 10]),  # per problem: the busiest chain's total
    }
    out = throughput.lockstep([chunk], chains=2)
    assert out["lockstep_efficiency"] == pytest.approx(np.mean([10 / 4 / 3, 16 / 4 / 7]))
    assert out["mean_max_steps"] == pytest.approx(5.0)
    assert out["lockstep_efficiency_total"] == pytest.approx(26 / 4 / 10)
    assert throughput.lockstep([chunk], chains=2, stepwise=True)["lockstep_efficiency"] == pytest.approx(0.65)


def test_gate_and_argument_parsing():
    passed = throughput.gate_mask([1.0, 1.02, np.nan, 1.005], [500, 500, 500, 399])
    assert passed.tolist() == [True, False, False, False]
    c = throughput.parse_contestant("blackjax:dense:f32")
    assert (c.sampler, c.dense_mass, c.precision, c.is_engine) == ("blackjax", True, "float32", True)
    with pytest.raises(ValueError):
        throughput.parse_contestant("stan")
    c = throughput.parse_contestant("nutpie:lowrank:ta0.95")  # nutpie at settings of its own
    assert (c.sampler, c.is_engine, dict(c.nutpie_kw)) == (
        "nutpie", False, {"low_rank_modified_mass_matrix": True, "target_accept": 0.95})
    for bad in ("nutpie:ta1.5", "nutpie:dense", "pymc:f32"):
        with pytest.raises(ValueError, match="contestant"):
            throughput.parse_contestant(bad)
    args = throughput.resolve_args(
        ["--quick", "--n", "w2=5,7", "--draws", "50", "--contestants", "w2=pymc", "--max-n", "numpyro=20"]
    )
    assert args.draws == 50 and args.tune == 500 and args.workloads == ["w1"]
    assert args.n_map == {"w2": [5, 7], "*": [10, 40]}
    assert [c.label for c in args.contestants_map["w2"]] == ["pymc"]
    assert [c.label for c in args.contestants_map["*"]] == ["blackjax", "numpyro", "pymc", "nutpie"]
    assert args.max_n_map == {"numpyro": 20}
    assert args.batch_size_map == {"*": 10} and args.loop_problems_map == {"*": 2}
    args = throughput.resolve_args(["--batch-size", "w2=20", "--loop-problems", "w3=2"])
    assert args.batch_size_map == {"w2": 20, "*": 100} and args.loop_problems_map == {"w3": 2, "*": 10}
    full = throughput.resolve_args([])
    assert (full.chains, full.draws, full.tune) == (4, 1000, 1000)
    assert full.n_map["*"] == [10, 100, 1000, 10000]
    assert throughput.loop_problems(100, 3) == [0, 50, 99]


# ------------------------------------------------------------------ time to a certified posterior
def test_certified_quick_mode_writes_well_formed_results(tmp_path):
    from benchmarks import certified

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.certified", "--quick", "--n", "4", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("certified_quick.json", "certified_quick.md", "certified_quick.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "certified_quick.json").read_text())
    rows = results["rows"]
    assert [r["contestant"] for r in rows] == ["chees:f32", "chees:f32+stop", "pymc"]  # +stop: target_ess=400
    for r in rows:
        assert r["tune"] in (150, 300) and r["chains"] == 4
        assert r["certified"] == (r["pass_share"] >= 0.99)
        assert 1 <= len(r["attempts"]) <= 2
        # a certified row is the fastest of the settings that certified; the ladder stops
        # PATIENCE settings past the first that did
        passing = [i for i, a in enumerate(r["attempts"]) if a["pass_share"] >= 0.99]
        assert (not passing) or len(r["attempts"]) <= passing[0] + 1 + certified.PATIENCE
        if r["certified"]:
            assert r["ttc_ms"] == min(r["attempts"][i]["ttc_ms"] for i in passing)
            assert r["ttc_ms"] == pytest.approx(
                1000 * ((r["run_s"] + r["certify_s"]) / r["problems_run"] + r["compile_s"] / 10_000) / r["pass_share"])
    engine_row, stop_row, pymc_row = rows
    assert engine_row["problems_run"] == 4 and stop_row["problems_run"] == 4 and pymc_row["problems_run"] == 1
    assert engine_row["compile_s"] > 0
    # the stopping gate judged its own draws; the others pay for the engine's batched diagnostics
    assert stop_row["certify_s"] == 0 and engine_row["certify_s"] > 0 and pymc_row["certify_s"] > 0
    assert pymc_row["x_pymc"] == pytest.approx(1.0)
    md = (tmp_path / "certified_quick.md").read_text()
    assert "time to certified ms" in md and "certified_quick.png" in md and "## Every setting tried" in md


def test_certificate_is_arviz_and_fails_what_it_should():
    import arviz as az

    from benchmarks.certified_runs import certified_mask, certify_draws

    rng = np.random.default_rng(0)
    good = rng.normal(size=(4, 1000))  # [chain, draw]: ESS ~ 4000, R-hat ~ 1
    shifted = good + np.array([0.0, 0.0, 0.0, 1.0])[:, None]  # one chain off: R-hat >> 1.01
    sticky = np.zeros_like(good)  # AR(1), rho = 0.95: ESS ~ 4000 x 0.05 / 1.95 ~ 100 < 400
    for t in range(1, good.shape[1]):
        sticky[:, t] = 0.95 * sticky[:, t - 1] + np.sqrt(1 - 0.95**2) * good[:, t]
    x = np.stack([good, shifted, sticky, good])  # [problem, chain, draw]
    div = np.zeros(x.shape, bool)
    div[3, 2, 10] = True  # one divergence fails problem 3
    cert = certify_draws({"theta": x}, div)
    for p in range(4):
        assert cert["r_hat_max"][p] == pytest.approx(float(az.rhat(x[p])))
        assert cert["ess_bulk_min"][p] == pytest.approx(float(az.ess(x[p], method="bulk")))
        assert cert["ess_tail_min"][p] == pytest.approx(float(az.ess(x[p], method="tail")))
    assert cert["divergences"].tolist() == [0, 0, 0, 1]
    assert certified_mask(cert).tolist() == [True, False, False, False]


def test_certify_seconds_times_every_element_of_ragged_variables_on_every_device():
    import jax

    from benchmarks.certified_runs import certify_seconds
    from engine.sampling import gate

    rng = np.random.default_rng(0)
    num_problems = 2 * len(jax.local_devices()) + 1  # not a multiple of the devices: padded
    draws = {"a": rng.normal(size=(num_problems, 4, 200)), "b": rng.normal(size=(num_problems, 4, 200, 3))}
    seconds, compile_s = certify_seconds(draws)
    assert 0 < seconds < 60 and compile_s >= 0
    # what it times is the auto gate's own computation of R-hat and ESS, on the same elements
    x = np.concatenate([draws["a"][..., None], draws["b"]], axis=-1).astype(np.float32)
    d = gate.masked_diagnostics(np.moveaxis(x, -1, 1), 200)
    assert d["r_hat"].shape == (num_problems, 4) and bool(np.all(np.isfinite(d["ess_tail"])))


def test_certificate_of_stopped_problems_reads_only_their_kept_draws():
    import arviz as az
    import xarray as xr

    from benchmarks.certified_runs import certify_posterior

    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 600, 3))  # [chain, draw, problem]
    kept = np.array([200, 600, 400])
    padded = x.copy()
    for p, n in enumerate(kept):
        padded[:, n:, p] = np.nan
    posterior = xr.Dataset({"theta": (("chain", "draw", "problem"), padded)})
    diverging = xr.DataArray(np.zeros(x.shape, bool), dims=("chain", "draw", "problem"))
    cert = certify_posterior(posterior, diverging, ["theta"], kept)
    for p, n in enumerate(kept):
        assert cert["r_hat_max"][p] == pytest.approx(float(az.rhat(x[:, :n, p])))
        assert cert["ess_bulk_min"][p] == pytest.approx(float(az.ess(x[:, :n, p], method="bulk")))
        assert cert["ess_tail_min"][p] == pytest.approx(float(az.ess(x[:, :n, p], method="tail")))
    unmasked = certify_posterior(posterior, diverging, ["theta"])  # NaN padding read as draws fails
    assert np.isinf(unmasked["r_hat_max"][[0, 2]]).all()


def test_climb_keeps_the_fastest_certifying_setting_within_patience():
    from benchmarks import certified
    from benchmarks.certified_runs import Run

    # pass share and seconds per setting: 200x200 fails, 200x500 certifies slowly, 500x500 faster
    table = {(200, 200): (0.5, 1.0), (200, 500): (1.0, 4.0), (300, 700): (1.0, 5.0), (500, 500): (1.0, 3.0),
             (1000, 1000): (1.0, 0.1)}
    calls = []

    def runner(tune, draws):
        calls.append((tune, draws))
        share, seconds = table[(tune, draws)]
        ok = int(round(10 * share))
        cert = {"r_hat_max": np.r_[np.full(ok, 1.0), np.full(10 - ok, 1.1)], "ess_bulk_min": np.full(10, 900.0),
                "ess_tail_min": np.full(10, 900.0), "divergences": np.zeros(10, int)}
        return Run(run_s=seconds, compile_s=0.0, cert=cert, problems=list(range(10)))

    row = certified.climb(runner, list(table), 4, 10_000, lambda _m: None, "x", patience=2)
    assert calls == [(200, 200), (200, 500), (300, 700), (500, 500)]  # 1000x1000 is past the patience
    assert row["certified"] and (row["tune"], row["draws"]) == (500, 500)
    calls.clear()
    row = certified.climb(runner, list(table), 4, 10_000, lambda _m: None, "x", patience=0)
    assert calls == [(200, 200), (200, 500)] and (row["tune"], row["draws"]) == (200, 500)


def test_time_to_certified_ladder_and_compile_clock():
    import jax
    import jax.numpy as jnp

    from benchmarks import certified
    from benchmarks.certified_runs import CompileClock

    assert certified.time_to_certified(2.0, 100, 30.0, 1.0) == pytest.approx(0.02 + 0.003)
    assert certified.time_to_certified(2.0, 100, 0.0, 0.5) == pytest.approx(0.04)
    assert certified.time_to_certified(2.0, 100, 0.0, 0.0) == float("inf")
    assert certified.parse_ladder("500x500,200x300") == [(200, 300), (500, 500)]
    for bad in ("500", "ax5", "5x2"):
        with pytest.raises(ValueError):
            certified.parse_ladder(bad)
    args = certified.resolve_args(["--quick", "--workloads", "w4", "--contestants", "blackjax:f32,nutpie"])
    assert args.workload_list == ["w4"] and args.n == 8 and args.ladder_list == [(150, 150), (300, 300)]
    assert [c.label for c in args.contestant_list] == ["blackjax:f32", "nutpie"]
    assert args.devices is None  # sample_batched's own devices unless --devices is given
    args = certified.resolve_args(["--contestants", "auto,nutpie", "--contestants", "w3=auto,nutpie:ta0.99",
                                   "--n", "100", "--n", "w3=8", "--nutpie-problems", "w3=4"])
    assert [c.label for c in certified.for_workload(args, "contestants", "w3")] == ["auto", "nutpie:ta0.99"]
    assert [c.label for c in certified.for_workload(args, "contestants", "w1")] == ["auto", "nutpie"]
    assert (certified.for_workload(args, "n", "w3"), certified.for_workload(args, "n", "w1"), args.n) == (8, 100, 100)
    assert (certified.for_workload(args, "nutpie_problems", "w3"), args.nutpie_problems) == (4, 20)
    args = certified.resolve_args(["--ladder", "w3=1000x1000", "--no-stopping", "w3"])
    assert certified.for_workload(args, "ladder", "w3") == [(1000, 1000)]
    assert certified.for_workload(args, "ladder", "w1") == list(certified.LADDER) and args.no_stopping_for == {"w3"}
    assert certified.resolve_args(["--no-stopping"]).no_stopping_for == {"*"}
    for bad in (["--n", "w9=3"], ["--n", "0"], ["--contestants", "w3=stan"]):
        with pytest.raises(ValueError):
            certified.resolve_args(bad)
    assert certified.main(["--workloads", "w9"]) == 2
    fn = jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)
    with CompileClock() as clock:
        fn(jnp.arange(7.0)).block_until_ready()
    assert clock.seconds > 0
    with CompileClock() as clock:  # cached: nothing compiles
        fn(jnp.arange(7.0)).block_until_ready()
    assert clock.seconds == 0.0
    rows = [{"workload": "w1", "sampler": "nutpie", "ttc_ms": 100.0}, {"workload": "w1", "sampler": "pymc", "ttc_ms": 1000.0},
            {"workload": "w1", "sampler": "chees", "ttc_ms": 10.0}]
    certified.add_ratios(rows)
    assert (rows[2]["x_nutpie"], rows[2]["x_pymc"], rows[0]["x_pymc"]) == (10.0, 100.0, 10.0)
    # nutpie at several settings: the fastest that certified is the reference
    rows = [{"workload": "w3", "sampler": "nutpie", "ttc_ms": 50.0, "certified": False},
            {"workload": "w3", "sampler": "nutpie", "ttc_ms": 400.0, "certified": True},
            {"workload": "w3", "sampler": "nutpie", "ttc_ms": 800.0, "certified": True},
            {"workload": "w3", "sampler": "auto", "ttc_ms": 100.0, "certified": True}]
    certified.add_ratios(rows)
    assert rows[3]["x_nutpie"] == 4.0 and rows[0]["x_nutpie"] == 8.0


@pytest.mark.slow
def test_nutpie_loop_certifies_w1_and_falls_back_on_w2():
    pytest.importorskip("nutpie")
    from benchmarks.certified_runs import NutpieLoop, certified_mask
    from benchmarks.workloads import get_workload

    w1 = get_workload("w1")
    loop = NutpieLoop(w1.build_model(), w1.make_data(3, 0))
    assert loop.backend == "numba" and loop.note == "" and loop.compile_s > 0
    run = loop.run([0, 2], tune=500, draws=500, chains=4, seed=0)
    assert run.problems == [0, 2] and run.run_s > 0
    assert certified_mask(run.cert).all(), run.cert
    w2 = get_workload("w2")  # nutpie 0.16's numba Cholesky cannot write to w2's read-only covariances
    data = w2.make_data(2, 0)
    loop = NutpieLoop(w2.build_model(), data, equivalent=w2.equivalent)
    assert loop.backend == "numba" and "equivalent template used" in loop.note, loop.note
    run = loop.run([1], tune=500, draws=500, chains=4, seed=0)
    assert certified_mask(run.cert).all(), run.cert
    # the equivalent template is the same posterior: the engine on w2's own form agrees
    import arviz as az

    import engine

    ours = engine.sample_batched(w2.build_model(), {k: v[1:] for k, v in data.items()}, sampler="blackjax",
                                 seed=1, progress=False).posterior["mu"].values[:, :, 0]  # [chain, draw, 8]
    theirs = loop._sample(1, tune=1000, draws=1000, seed=3).posterior["mu"].values
    mcse = np.hypot(*(np.asarray([az.mcse(x[..., k]) for k in range(x.shape[-1])]) for x in (ours, theirs)))
    z = (ours.mean((0, 1)) - theirs.mean((0, 1))) / mcse
    assert np.all(np.abs(z) < 4.5), z


def test_warm_pair_reads_contestant_flags():
    from benchmarks.warm_pair import parse

    assert parse("chees:f32:stop") == ("chees", {"precision": "float32", "target_ess": 400})
    assert parse("auto") == ("auto", {})
    assert parse("blackjax:f64:dense") == ("blackjax", {"precision": "float64", "dense_mass": True})
    with pytest.raises(ValueError, match="unknown flag"):
        parse("chees:fast")


def test_w3_defaults_recheck_reads_only_kept_draws():
    """``benchmarks.w3_defaults.recheck``: ArviZ's gate over each problem's first ``num_draws``
    draws; NaN padding past them is never read, and a divergence fails the gate."""
    import arviz as az

    from benchmarks.w3_defaults import _value, recheck

    rng = np.random.default_rng(0)
    chains, length = 4, 600
    mu = rng.normal(size=(chains, length, 2))
    mu[:, 500:, 0] = np.nan  # problem 0 kept 500 draws
    diverging = np.zeros((chains, length, 2), bool)
    diverging[1, 550, 0] = True  # past problem 0's kept draws: not counted
    diverging[2, 10, 1] = True
    stats = {"diverging": diverging, "n_steps": np.full((chains, length, 2), 7.0),
             "step_size": np.full((chains, length, 2), 0.5), "acceptance_rate": np.full((chains, length, 2), 0.8)}
    idata = az.from_dict(posterior={"mu": mu}, sample_stats=stats, coords={"problem": [0, 1]},
                         dims={"mu": ["problem"], **{k: ["problem"] for k in stats}})
    idata.sample_stats["num_draws"] = ("problem", np.array([500, 600]))
    idata.sample_stats["num_grads"] = ("problem", np.array([10, 20]))
    rows = recheck(idata)
    kept = az.convert_to_dataset({"m": mu[:, :500, 0]})
    assert rows[0]["ess_bulk"] == pytest.approx(float(az.ess(kept)["m"]))
    assert rows[0]["r_hat"] == pytest.approx(float(az.rhat(kept)["m"]))
    assert (rows[0]["divergences"], rows[0]["passed"], rows[0]["num_draws"]) == (0, True, 500)
    assert (rows[1]["divergences"], rows[1]["passed"], rows[1]["why"]) == (1, False, "divergences")
    assert (_value("0.99"), _value("400"), _value("None"), _value("blackjax")) == (0.99, 400, None, "blackjax")


@pytest.mark.slow  # a sample_batched run with the auto sampler (~20 s)
def test_auto_contestant_is_timed_end_to_end(tmp_path):
    """``auto`` has no chunk program: its row times ``sample_batched`` at the defaults."""
    args = throughput.resolve_args(["--workloads", "w1", "--n", "8", "--contestants", "auto", "--draws", "300",
                                    "--tune", "300", "--repeats", "1", "--out", str(tmp_path)])
    results = throughput.run_benchmark(args)
    (row,) = results["rows"]
    assert row["sampler"] == "auto" and row["n"] == 8
    assert sum(row["kernels"].values()) == 8  # each problem names the kernel that certified it
    assert 0 < row["compile_s"] < row["e2e_s"] and row["run_s"] == pytest.approx(row["e2e_s"] - row["compile_s"])
    assert row["pass_share"] >= 7 / 8


def test_certified_defaults_row_runs_auto_with_tune_unset():
    """``auto`` in the certified benchmark adds a ``defaults`` row: ``sample_batched`` with no flags
    but chains and seed (tune unset, 1000 draws), certified and timed like every row."""
    from benchmarks import certified

    args = certified.resolve_args(["--quick", "--contestants", "auto", "--n", "4", "--no-stopping",
                                   "--no-warm-rerun", "--ladder", "150x150"])
    rows = certified.run(args, log=lambda _m: None)["rows"]
    assert [r["contestant"] for r in rows] == ["auto", "defaults"]
    auto_row, defaults = rows
    assert (auto_row["tune"], auto_row["draws"]) == (150, 150)
    assert (defaults["tune"], defaults["draws"], defaults["problems_run"]) == (None, 1000, 4)
    assert len(defaults["attempts"]) == 1 and defaults["certified"] == (defaults["pass_share"] >= 0.99)
    assert defaults["pass_share"] == 1.0  # w1 at ChEES's own 300 warmup + 1000 draws certifies every problem
    from benchmarks import certified_report

    assert "4 x (default+1000)" in certified_report.markdown_table(rows)

"""Ragged engine traces: with per-problem stopping (``target_ess``, or ``sampler="auto"``'s
fallback for NUTS templates) problem ``p`` keeps ``num_draws[p]`` draws per chain and the draw
axis is padded past them (NaN, False or 0). Every consumer of a trace must read the kept draws
only: its answer on a ragged trace equals its answer on the trace cut to that problem's count.

The ragged traces here are real fixed-length fits with one problem's tail padded as a stopping
run pads it (:func:`engine.sampling.stopping.pad_kept`), so the truncated-trace answer is exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from engine.analyses import _common as C
from engine.analyses import convergence as cv
from engine.analyses import hierarchical_attention as ha
from engine.analyses import loo
from engine.analyses import model_comparison as mc
from engine.analyses import sensitivity as se
from engine.analyses import sensitivity_report as ser
from engine.analyses.hierarchical_reliability import merge_traces
from engine.errors import InputError

DRAWS = 120
SHORT = 70                       # problem 1 keeps 70 draws per chain, the others all 120
COUNTS = np.array([DRAWS, SHORT, DRAWS])
KW = dict(sampler="blackjax", chains=2, draws=DRAWS, tune=150, seed=0, precision="float64")


def pad_trace(idata, counts):
    """``idata`` with every draw of problem ``p`` past ``counts[p]`` blanked as a stopping run
    blanks it (NaN floats, False / 0 otherwise) and ``num_draws = counts``."""
    out = idata.copy()
    for group in ("posterior", "sample_stats", "log_likelihood"):
        ds = getattr(out, group, None)
        for name, arr in ({} if ds is None else ds.data_vars).items():
            if "draw" not in arr.dims:
                continue
            shape = [1] * arr.ndim
            shape[arr.dims.index("draw")] = arr.sizes["draw"]
            past = np.arange(arr.sizes["draw"]).reshape(shape)
            limit = np.asarray(counts).reshape([-1 if d == "problem" else 1 for d in arr.dims])
            values = arr.values.copy()
            values[np.broadcast_to(past >= limit, values.shape)] = (
                np.nan if np.issubdtype(values.dtype, np.floating) else 0)
            ds[name] = (arr.dims, values)
    out.sample_stats["num_draws"] = ("problem", np.asarray(counts))
    return out


def pad_array(x, counts, draw_axis=-1):
    """``x[problem, ...]`` with the draw axis past ``counts[p]`` NaN."""
    x = np.array(x, dtype=float)
    for p, n in enumerate(counts):
        index = [slice(None)] * x.ndim
        index[0], index[draw_axis] = p, slice(int(n), None)
        x[tuple(index)] = np.nan
    return x


def cut_trace(idata, n):
    out = idata.isel(draw=slice(0, n))
    out.sample_stats["num_draws"] = ("problem", np.full(out.posterior.sizes["problem"], n))
    return out


def assert_rows_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], (float, np.floating)):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-9, err_msg=k)
        else:
            assert got[k] == want[k], k


@pytest.fixture(scope="module")
def attention():
    """A real hierarchical attention fit (3 checkpoints, fixed draws), its ragged twin and the
    trace cut to the short count."""
    rng = np.random.default_rng(4)
    entropies = 2.0 + 0.4 * rng.standard_normal((3, 2, 3, 1)) + 0.3 * rng.standard_normal((3, 2, 3, 6))
    idata, draws, loglik = ha.fit(entropies, KW, log_likelihood=True, labels=[0, 1, 2])
    ragged = {"idata": pad_trace(idata, COUNTS), "loglik": pad_array(loglik, COUNTS, 2),
              "draws": {k: pad_array(v, COUNTS) for k, v in draws.items()}}
    cut = {"idata": cut_trace(idata, SHORT), "loglik": loglik[:, :, :SHORT],
           "draws": {k: v[..., :SHORT] for k, v in draws.items()}}
    full = {"idata": idata, "loglik": loglik, "draws": draws}
    return entropies, full, ragged, cut


def reference(full, cut, p):
    """The truncated-trace answer's source for problem ``p``."""
    return cut if COUNTS[p] == SHORT else full


def test_draw_summary_of_a_ragged_trace_equals_the_truncated_trace(attention):
    _, full, ragged, cut = attention
    theta = ragged["draws"]["theta"]                                   # [C, L, H, chain, draw]
    np.testing.assert_array_equal(C.num_kept(theta), np.broadcast_to(COUNTS[:, None, None], theta.shape[:3]))
    got = C.draw_summary(theta)
    explicit = C.draw_summary(theta, num_draws=COUNTS[:, None, None])
    want = {p: C.draw_summary(reference(full, cut, p)["draws"]["theta"]) for p in range(3)}
    for k in C.SUMMARY_FIELDS:
        assert np.isfinite(got[k]).all(), k
        np.testing.assert_array_equal(explicit[k], got[k])
        for p in range(3):
            np.testing.assert_allclose(got[k][p], want[p][k][p], rtol=1e-12, err_msg=k)
    # the summary over the padded axis would be NaN: the padding is what the grouping removes
    assert np.isnan(C._draw_summary(theta, 0.94)["mean"][1]).all()


def test_kept_counts_and_select_problem(attention):
    _, full, ragged, cut = attention
    np.testing.assert_array_equal(C.kept_counts(ragged["idata"]), COUNTS)
    no_counts = ragged["idata"].copy()
    del no_counts.sample_stats["num_draws"]
    np.testing.assert_array_equal(C.kept_counts(no_counts), COUNTS)     # read off the padding
    np.testing.assert_array_equal(C.kept_counts(full["idata"]), [DRAWS] * 3)
    one = C.select_problem(ragged["idata"], 1)
    assert one.posterior.sizes["draw"] == SHORT and one.log_likelihood.sizes["draw"] == SHORT
    np.testing.assert_array_equal(one.posterior["theta"].values, cut["idata"].posterior["theta"].values[:, :, 1])
    assert C.select_problem(ragged["idata"], 0).posterior.sizes["draw"] == DRAWS


def test_merge_traces_pads_draw_axes_and_keeps_num_draws(attention):
    """Checkpoints fitted in two runs whose draw axes differ (one stopped early): one trace,
    the short run padded, every checkpoint's num_draws kept, summaries as the runs' own."""
    _, full, _, cut = attention
    long_part, short_part = full["idata"].isel(problem=[0, 2]), cut["idata"].isel(problem=[1])
    merged = merge_traces([long_part, short_part], [[0, 2], [1]])
    assert merged.posterior.sizes["draw"] == DRAWS and list(merged.posterior["problem"].values) == [0, 1, 2]
    np.testing.assert_array_equal(C.kept_counts(merged), COUNTS)
    assert merged.sample_stats["diverging"].dtype == bool
    assert np.isnan(merged.posterior["theta"].values[:, SHORT:, 1]).all()
    got = C.draw_summary(C.var_draws(merged, "theta"))
    want = C.draw_summary(C.var_draws(cut["idata"], "theta"))["mean"][1]
    np.testing.assert_allclose(got["mean"][1], want, rtol=1e-12)
    np.testing.assert_allclose(got["mean"][[0, 2]], C.draw_summary(C.var_draws(long_part, "theta"))["mean"], rtol=1e-12)
    # a run without num_draws gets its draw axis' length
    del short_part.sample_stats["num_draws"]
    np.testing.assert_array_equal(C.kept_counts(merge_traces([long_part, short_part], [[0, 2], [1]])), COUNTS)


def test_hierarchical_attention_tables_and_predictive_read_kept_draws(attention, tmp_path):
    entropies, full, ragged, cut = attention
    labels = [0, 1, 2]
    heads = ha.head_table(entropies, ragged["draws"], labels, 0.94)
    rows = ha.checkpoint_table(ragged["idata"], ragged["draws"], labels, 0.94)
    for p in range(3):
        ref = reference(full, cut, p)
        want_heads = [h for h in ha.head_table(entropies, ref["draws"], labels, 0.94) if h["checkpoint"] == p]
        for got, want in zip([h for h in heads if h["checkpoint"] == p], want_heads):
            assert_rows_equal(got, want)
        assert_rows_equal(rows[p], ha.checkpoint_table(ref["idata"], ref["draws"], labels, 0.94)[p])
        assert np.isfinite(rows[p]["max_r_hat"]) and np.isfinite(rows[p]["min_ess_tail"])
        one = lambda src: {k: v[p:p + 1] for k, v in src["draws"].items()}  # noqa: E731
        (got,) = ha.posterior_predictive(entropies[p:p + 1], one(ragged), [p], np.random.default_rng(0), 100)
        (want,) = ha.posterior_predictive(entropies[p:p + 1], one(ref), [p], np.random.default_rng(0), 100)
        assert np.isfinite(got[2]).all()
        np.testing.assert_array_equal(got[2], want[2])
    ha.plot_shrinkage(entropies, ragged["draws"], labels, tmp_path / "shrinkage.png")
    ha.plot_forest(entropies, ragged["draws"], labels, 0.94, tmp_path / "forest.png")


def test_loo_reads_each_problems_kept_draws(attention):
    _, full, ragged, cut = attention
    for p in range(3):
        ref = reference(full, cut, p)
        for loglik in ("loglik", None):  # the raw-unit loglik, and the trace's own group
            got = loo.per_problem_idata(ragged["idata"], None if loglik is None else ragged[loglik], p)
            want = loo.per_problem_idata(ref["idata"], None if loglik is None else ref[loglik], p)
            assert got.posterior.sizes["draw"] == COUNTS[p]
            (g,), _, _ = loo.information_criteria({"m": got})
            (w,), _, _ = loo.information_criteria({"m": want})
            assert np.isfinite(g["elpd_loo"]) and np.isfinite(g["p_waic"])
            assert_rows_equal(g, w)
        assert_rows_equal(loo.fit_diagnostics(ragged["idata"], p), loo.fit_diagnostics(ref["idata"], p))


def test_convergence_checks_read_each_problems_kept_draws(attention):
    _, full, ragged, cut = attention
    problems, elements = cv.check(ragged["idata"])
    for p in range(3):
        ref_problems, ref_elements = cv.check(reference(full, cut, p)["idata"])
        assert np.isfinite(problems[p]["max_r_hat"]) and np.isfinite(problems[p]["min_e_bfmi"])
        assert_rows_equal(problems[p], ref_problems[p])
        for got, want in zip([e for e in elements if e["problem"] == p], [e for e in ref_elements if e["problem"] == p]):
            assert_rows_equal(got, want)


@pytest.fixture(scope="module")
def best():
    """A real BEST fit of three metric pairs (fixed draws) and its ragged twin."""
    rng = np.random.default_rng(5)
    pairs = mc.PairData(["p0", "p1", "p2"], [rng.normal(10.0 + d, 1.0, 10) for d in (0.0, 1.0, -1.0)],
                        [rng.normal(10.0, 1.0, 10) for _ in range(3)])
    idata, draws = mc.fit(pairs, KW, likelihood="student_t")
    return pairs, idata, draws, {k: pad_array(v, COUNTS) for k, v in draws.items()}


def test_model_comparison_reads_kept_draws(best):
    pairs, _, draws, ragged = best
    rows = mc.summarize(pairs, ragged)
    full_rows = mc.summarize(pairs, draws)
    cut_rows = mc.summarize(pairs, {k: v[..., :SHORT] for k, v in draws.items()})
    for p in range(3):
        assert np.isfinite(rows[p]["p_a_better"]) and np.isfinite(rows[p]["r_hat"])
        assert_rows_equal(rows[p], (cut_rows if COUNTS[p] == SHORT else full_rows)[p])
        one = mc.PairData([pairs.labels[p]], [pairs.a[p]], [pairs.b[p]])
        ref = draws if COUNTS[p] == DRAWS else {k: v[..., :SHORT] for k, v in draws.items()}
        got = mc.posterior_predictive(one, None, {k: v[p:p + 1] for k, v in ragged.items()}, np.random.default_rng(1), 50)
        want = mc.posterior_predictive(one, None, {k: v[p:p + 1] for k, v in ref.items()}, np.random.default_rng(1), 50)
        for (_, _, g), (_, _, w) in zip(got, want):
            assert np.isfinite(g).all()
            np.testing.assert_array_equal(g, w)
    C.pyplot().close(mc.posterior_figure(pairs, ragged, rows, (-0.1, 0.1), "effect_size"))


def test_sensitivity_reads_kept_draws():
    rng = np.random.default_rng(6)
    frame = pd.DataFrame({"lr": rng.uniform(0, 1, 12), "width": rng.normal(5, 1, 12)})
    design = se.build_design(frame, [])
    y = 1.0 + 0.5 * design.x[:, 0] + 0.2 * rng.standard_normal((3, 12))
    idata, per_sd, per_unit = se.fit(design, y, KW, labels=["m0", "m1", "m2"])
    metrics = ["m0", "m1", "m2"]
    ragged = pad_trace(idata, COUNTS)
    cut = cut_trace(idata, SHORT)
    rows = se.effect_table(design, metrics, pad_array(per_sd, COUNTS), pad_array(per_unit, COUNTS), 0.94)
    want = {DRAWS: se.effect_table(design, metrics, per_sd, per_unit, 0.94),
            SHORT: se.effect_table(design, metrics, per_sd[..., :SHORT], per_unit[..., :SHORT], 0.94)}
    fit_rows = ser.model_table(ragged, y, design.x, metrics, 0.94)
    fit_want = {DRAWS: ser.model_table(idata, y, design.x, metrics, 0.94),
                SHORT: ser.model_table(cut, y, design.x, metrics, 0.94)}
    for got, ref in ((rows, want), (fit_rows, fit_want)):
        for i, row in enumerate(got):
            p = metrics.index(row["metric"])
            assert np.isfinite(row["r_hat"])
            assert_rows_equal(row, ref[int(COUNTS[p])][i])
    for p in range(3):
        src = cut if COUNTS[p] == SHORT else idata
        (got,) = se.posterior_predictive(design, metrics[p:p + 1], y[p:p + 1], ragged.isel(problem=[p]),
                                         np.random.default_rng(2), 50)
        (want,) = se.posterior_predictive(design, metrics[p:p + 1], y[p:p + 1], src.isel(problem=[p]),
                                          np.random.default_rng(2), 50)
        assert np.isfinite(got[2]).all()
        np.testing.assert_array_equal(got[2], want[2])


def test_sbc_ranks_among_fixed_draws_only():
    """SBC ranks each truth among the same number of draws: a fallback that stops per problem is
    refused, and ``sampler="auto"`` runs its fallback with ``fallback_stopping=False``."""
    from engine.calibration.models import eight_schools
    from engine.calibration.sbc import sbc

    with pytest.raises(InputError, match="fallback_stopping"):
        sbc(eight_schools(), 4, sampler="auto", fallback_stopping=True)
    with pytest.raises(InputError, match="target_ess"):
        sbc(eight_schools(), 4, target_ess=100)


def test_sbc_with_the_auto_sampler_keeps_every_simulations_draws():
    """Eight schools (hierarchical: ``auto`` starts it with NUTS, and short runs fail the gate, so
    problems rerun): every simulation is ranked among ``chains * (draws // stride)`` draws."""
    from engine.calibration.models import eight_schools
    from engine.calibration.sbc import sbc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # problems failing the gate after the reruns
        result = sbc(eight_schools(), 8, sampler="auto", chains=2, draws=60, tune=60, seed=1)
    stride = result.summary["thinning_stride"]
    assert result.num_rank_draws == 2 * (60 // stride)
    for ranks in result.ranks.values():
        assert ranks.shape == (8,) and ((0 <= ranks) & (ranks <= result.num_rank_draws)).all()

"""Hierarchical attention: the funnel (centered diverges, non-centered does not), truth recovery."""

from __future__ import annotations

import numpy as np
import pytest

from engine.analyses import _common as C
from engine.analyses import hierarchical_attention as ha
from engine.errors import InputError


@pytest.mark.slow
def test_funnel_centered_diverges_noncentered_does_not():
    """No between-head spread and two noisy samples per head: the centered posterior of
    (tau_head, theta) is Neal's funnel. Four data sets, one batched run per parameterisation,
    the same sampler settings for both."""
    rng = np.random.default_rng(0)
    entropies = 2.0 + rng.standard_normal((4, 1, 8, 2))
    kw = dict(sampler="blackjax", chains=4, draws=500, tune=300, seed=0, target_accept=0.9)  # no auto reruns
    centered, _, _ = ha.fit(entropies, kw, parameterization="centered")
    noncentered, _, _ = ha.fit(entropies, kw, parameterization="noncentered")
    div_c, div_nc = C.divergences(centered), C.divergences(noncentered)
    assert (div_c > 0).all(), div_c
    assert (div_nc == 0).all(), div_nc


def test_model_is_vectorised_and_inputs_are_checked(tmp_path):
    model = ha.build_model(3, 4, 5)
    (obs,) = model.observed_RVs
    assert tuple(obs.shape.eval()) == (3, 4, 5)          # one likelihood term for every head
    assert {"theta", "tau_layer", "tau_head", "sigma"} <= set(model.named_vars)
    assert "tau_layer" not in ha.build_model(1, 4, 5).named_vars
    with pytest.raises(InputError, match=r"got shape \(2, 3\)"):
        ha.check_entropies(np.zeros((2, 3)))
    bad = np.ones((2, 2, 3, 4))
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"non-finite entropy at index \(1, 0, 2, 3\)"):
        ha.check_entropies(bad)
    np.savez(tmp_path / "e.npz", other=np.ones((2, 3, 4)))
    with pytest.raises(InputError, match="no array 'entropies'"):
        ha.load_entropies(tmp_path / "e.npz")
    with pytest.raises(InputError, match="analysis.parameterization"):
        ha.build_model(2, 2, 2, parameterization="sideways")


@pytest.mark.slow
def test_recovers_head_means_at_nominal_rate():
    """Data simulated from the model (8 repeats as problems): true head means inside the 94% HDI
    at about the nominal rate, within a binomial 3-sigma band over 8 x 12 intervals."""
    rng = np.random.default_rng(1)
    repeats, layers, heads, samples = 8, 3, 4, 5
    layer_mean = 2.0 + 0.5 * rng.standard_normal((repeats, layers, 1))
    theta = layer_mean + 0.3 * rng.standard_normal((repeats, layers, heads))
    entropies = theta[..., None] + 0.4 * rng.standard_normal((repeats, layers, heads, samples))
    idata, draws, _ = ha.fit(entropies, dict(chains=2, draws=400, tune=400, seed=1, target_accept=0.9))
    stats = C.draw_summary(draws["theta"])
    covered = int(((stats["hdi_low"] <= theta) & (theta <= stats["hdi_high"])).sum())
    n = theta.size
    sd = np.sqrt(n * 0.94 * 0.06)
    assert n * 0.94 - 3 * sd <= covered <= n, covered
    assert np.nanmax(stats["r_hat"]) < 1.05


def test_divergence_advice_names_settings_that_act_and_are_not_set():
    """The analysis overrides sampler.target_accept with analysis.target_accept, and a
    non-centred run needs no advice to go non-centred."""
    advice = ha.divergence_advice(12, "noncentered", 0.9)
    assert "analysis.target_accept=0.95" in advice and "sampler.target_accept=" not in advice
    assert "parameterization=noncentered" not in advice
    centred = ha.divergence_advice(3, "centered", 0.95)
    assert "analysis.parameterization=noncentered" in centred and "analysis.target_accept=0.99" in centred
    assert "target_accept=" not in ha.divergence_advice(3, "noncentered", 0.99)
    assert ha.divergence_advice(0, "centered", 0.8) == "No divergent transitions.\n"


def test_forest_panels_share_x_in_nats_with_a_layer_legend():
    rng = np.random.default_rng(0)
    entropies = rng.standard_normal((2, 3, 2, 4))
    draws = {"theta": rng.standard_normal((2, 3, 2, 2, 50)) + np.arange(2)[:, None, None, None, None]}
    fig = ha.forest_figure(entropies, draws, [0, 1], 0.94)
    first, second = fig.axes[:2]
    assert first.get_shared_x_axes().joined(first, second)
    assert first.get_xlim() == second.get_xlim()
    assert "(nats)" in first.get_xlabel()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["layer 0", "layer 1", "layer 2"]
    C.pyplot().close(fig)


def test_choose_parameterization_follows_how_informative_the_heads_are():
    """Heads far apart relative to their standard error -> centred; no spread -> non-centred."""
    from engine.analyses.hierarchical_reliability import choose_parameterization

    rng = np.random.default_rng(0)
    spread = 2.0 + 1.0 * rng.standard_normal((3, 8, 1)) + 0.5 * rng.standard_normal((3, 8, 50))
    flat = 2.0 + 1.0 * rng.standard_normal((3, 8, 4))
    assert choose_parameterization(spread) == "centered"
    assert choose_parameterization(flat) == "noncentered"
    assert choose_parameterization(spread[:, :1]) == "noncentered"  # one head: no head spread to estimate
    assert choose_parameterization(3.0 * spread + 7.0) == "centered"  # scale-free
    assert ha.parameterizations(np.stack([spread, spread]), "pooled", "auto") == ["noncentered"] * 2
    with pytest.raises(InputError, match="analysis.parameterization must be one of"):
        ha.parameterizations(spread[None], "hierarchical", "sideways")


def test_gate_verdict_says_why_and_what_to_try():
    from engine.analyses.hierarchical_reliability import gate_verdict

    assert gate_verdict(1.005, 800.0, 700.0, 0, "noncentered", 0.9) == ("ok", "")
    why, hint = gate_verdict(1.03, 250.0, 500.0, 7, "noncentered", 0.9)
    assert why == "divergences 7; R-hat 1.030; bulk ESS 250"
    assert hint == ("analysis.target_accept=0.95; analysis.parameterization=centered; "
                    "a longer warmup (sampler.tune); more draws (sampler.draws)")
    why, hint = gate_verdict(float("nan"), 800.0, 100.0, 0, "centered", 0.99)
    assert why == "R-hat nan; tail ESS 100" and "target_accept" not in hint


@pytest.mark.slow  # 34 s: fits both forms; the choice rule and the verdicts stay in the fast tier
def test_auto_fits_each_checkpoint_in_its_own_form_and_keeps_their_order():
    """Two checkpoints that want different forms: two batched runs, one merged trace whose
    checkpoints keep the input's order, and rows that name each form and the gate's verdict."""
    rng = np.random.default_rng(2)
    informative = 2.0 + rng.standard_normal((2, 4, 1)) + 0.3 * rng.standard_normal((2, 4, 30))
    flat = 5.0 + 0.3 * rng.standard_normal((2, 4, 30))
    entropies = np.stack([flat, informative])
    assert ha.parameterizations(entropies) == ["noncentered", "centered"]
    # NUTS without auto's fallback: the ragged traces that fallback makes are test_ragged_traces'
    idata, draws, _ = ha.fit(entropies, dict(sampler="blackjax", chains=2, draws=100, tune=100, seed=0),
                             parameterization="auto", labels=["a", "b"])
    assert list(idata.posterior["problem"].values) == ["a", "b"]
    assert "z_head" not in idata.posterior and idata.sample_stats["diverging"].sizes["problem"] == 2
    # merged per-form runs keep each checkpoint's draws (all of them without stopping)
    kept = C.kept_counts(idata)
    np.testing.assert_array_equal(C.num_kept(draws["theta"]).max((1, 2)), kept)
    assert np.isfinite(draws["theta"][0, ..., : kept[0]]).all() and np.isfinite(draws["theta"][1, ..., : kept[1]]).all()
    means = C.draw_summary(draws["theta"])["mean"]
    np.testing.assert_allclose(means, entropies.mean(-1), atol=0.6)
    rows = ha.checkpoint_table(idata, draws, ["a", "b"], 0.94, ha.parameterizations(entropies), 0.9)
    assert [r["parameterization"] for r in rows] == ["noncentered", "centered"]
    assert all(("ok" == r["gate"]) == (r["try"] == "") for r in rows)
    assert all(r["gate"] == "ok" or "ESS" in r["gate"] or "R-hat" in r["gate"] or "divergences" in r["gate"]
               for r in rows)

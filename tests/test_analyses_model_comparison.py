"""BEST: table parsing, the decision rule, truth recovery over many pairs in one batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.analyses import _common as C
from engine.analyses import model_comparison as mc
from engine.errors import InputError


def test_table_parsing_and_bad_input():
    frame = pd.DataFrame({
        "metric": ["ppl"] * 6 + ["acc"] * 4,
        "group": ["g", "g", "g", "s", "s", "s", "g", "g", "s", "s"],
        "value": [1.0, 2.0, 3.0, 2.0, 3.0, 4.0, 0.5, 0.6, 0.4, 0.5],
    })
    pairs = mc.pairs_from_table(frame, value_column="value", group_column="group", pair_column="metric",
                                group_a="g", group_b="s", source="t.csv")
    assert pairs.labels == ["ppl", "acc"]
    np.testing.assert_array_equal(pairs.b[0], [2.0, 3.0, 4.0])
    kw = dict(value_column="value", group_column="group", pair_column="metric", source="t.csv")
    with pytest.raises(InputError, match="no rows of group 'x'"):
        mc.pairs_from_table(frame, group_a="g", group_b="x", **kw)
    with pytest.raises(InputError, match="missing column 'metric'"):
        mc.pairs_from_table(frame.drop(columns="metric"), group_a="g", group_b="s", **kw)
    bad = frame.assign(value=frame["value"].astype(object))
    bad.loc[4, "value"] = "n/a"
    with pytest.raises(InputError, match="column 'value' must be numeric and finite; row 4 is 'n/a'"):
        mc.pairs_from_table(bad, group_a="g", group_b="s", **kw)
    with pytest.raises(InputError, match="pair 'acc' has 1 value"):
        mc.pairs_from_table(frame.drop(index=9), group_a="g", group_b="s", **kw)
    with pytest.raises(InputError, match="analysis.better"):
        mc.check_options("smaller", [-0.1, 0.1], "effect_size")
    with pytest.raises(InputError, match="low <= high"):
        mc.check_options("lower", [0.1, -0.1], "effect_size")


def test_decision_rule_and_direction():
    assert mc.decide(0.2, 0.5, (-0.1, 0.1)) == "credible difference"
    assert mc.decide(-0.05, 0.05, (-0.1, 0.1)) == "practically equivalent"
    assert mc.decide(-0.05, 0.5, (-0.1, 0.1)) == "undecided"
    pairs = mc.PairData(["m"], [np.zeros(3)], [np.zeros(3)])
    diff = np.concatenate([np.full(300, -1.0), np.full(100, 1.0)]).reshape(1, 2, 200)
    draws = {k: np.ones((1, 2, 200)) for k in ("mu_a", "mu_b", "sigma_a", "sigma_b")}
    draws.update(diff=diff, effect_size=diff)
    lower = mc.summarize(pairs, draws, better="lower")[0]
    higher = mc.summarize(pairs, draws, better="higher")[0]
    assert lower["p_a_better"] == pytest.approx(0.75) and higher["p_a_better"] == pytest.approx(0.25)
    assert (lower["better"], higher["better"]) == ("lower", "higher")


def test_direction_per_metric():
    """One ``better`` per metric: accuracy (higher is better) must not be read as lower-is-better
    next to perplexity; the demo's null ``better`` means its own directions."""
    from omegaconf import OmegaConf

    pairs = mc.PairData(["ppl", "acc"], [np.zeros(3)] * 2, [np.zeros(3)] * 2)
    diff = np.concatenate([np.full(300, -1.0), np.full(100, 1.0)]).reshape(1, 2, 200).repeat(2, 0)
    draws = {k: np.ones((2, 2, 200)) for k in ("mu_a", "mu_b", "sigma_a", "sigma_b", "nu")}
    draws.update(diff=diff, effect_size=diff)
    rows = mc.summarize(pairs, draws, better={"ppl": "lower", "acc": "higher"})
    assert [r["better"] for r in rows] == ["lower", "higher"]
    assert [r["p_a_better"] for r in rows] == pytest.approx([0.75, 0.25])
    assert rows[0]["nu"] == pytest.approx(1.0) and rows[0]["sigma_a"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="no direction for metric 'acc'"):
        mc.summarize(pairs, draws, better={"ppl": "lower"})
    with pytest.raises(InputError, match="'loss' is not a metric"):
        mc.summarize(pairs, draws, better={"ppl": "lower", "acc": "higher", "loss": "lower"})
    with pytest.raises(InputError, match="analysis.better"):
        mc.check_options({"ppl": "smaller"}, [-0.1, 0.1], "effect_size")
    demo = mc.demo_pairs()
    cfg = OmegaConf.load("conf/analysis/model_comparison.yaml")
    assert mc.resolve_better(OmegaConf.create({"analysis": cfg}), demo)["accuracy"] == "higher"
    cfg.input = "runs.csv"
    assert set(mc.resolve_better(OmegaConf.create({"analysis": cfg}), demo).values()) == {"lower"}


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["student_t", "normal"])
def test_recovers_true_difference_at_nominal_rate(likelihood):
    """24 simulated pairs (ragged group sizes) as problems of ONE batched run: the true
    difference of means lies in the 94% HDI at about the nominal rate."""
    rng = np.random.default_rng(7)
    num_pairs = 24
    truth = rng.normal(0.0, 1.0, num_pairs)
    sizes = rng.integers(8, 16, (num_pairs, 2))
    a = [rng.normal(10.0 + d, 1.0, n) for d, n in zip(truth, sizes[:, 0])]
    b = [rng.normal(10.0, 1.5, n) for n in sizes[:, 1]]
    pairs = mc.PairData([f"p{i}" for i in range(num_pairs)], a, b)
    idata, draws = mc.fit(pairs, dict(chains=2, draws=400, tune=400, seed=7), likelihood=likelihood)
    rows = mc.summarize(pairs, draws)
    covered = sum(r["diff_hdi_low"] <= t <= r["diff_hdi_high"] for r, t in zip(rows, truth))
    sd = np.sqrt(num_pairs * 0.94 * 0.06)
    assert num_pairs * 0.94 - 3 * sd <= covered <= num_pairs, covered
    assert max(r["r_hat"] for r in rows) < 1.05
    # P(A better) follows the sign of the truth where the evidence is strong
    strong = [r for r, t in zip(rows, truth) if abs(t) > 1.5]
    assert all((r["p_a_better"] > 0.9) == (t < 0) for r, t in zip(rows, truth) if abs(t) > 1.5) and strong


def test_run_on_a_table_writes_outputs(tmp_path):
    """End to end on a small CSV (the one sampling test of the default tier: tiny sizes)."""
    from omegaconf import OmegaConf

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"metric": ["ppl"] * 16, "group": ["gauge"] * 8 + ["std"] * 8,
                          "value": np.concatenate([rng.normal(20, 1, 8), rng.normal(25, 1, 8)])})
    path = tmp_path / "runs.csv"
    frame.to_csv(path, index=False)
    cfg = OmegaConf.create({
        "analysis": {"name": "model_comparison", "input": str(path), "group_a": "gauge", "group_b": "std",
                     "likelihood": "normal"},
        "sampler": {"name": "blackjax", "chains": 2, "draws": 150, "tune": 150, "target_accept": 0.8,
                    "max_tree_depth": 10, "dense_mass": False},
        "runtime": {"seed": 0, "batch_size": None, "precision": "float64"},
    })
    result = mc.run(cfg, tmp_path / "out")
    (row,) = result.data["rows"]
    assert row["p_a_better"] > 0.99 and row["decision"] == "credible difference"
    observed = frame["value"][:8].mean() - frame["value"][8:].mean()      # flat-ish priors: around it
    assert row["diff_hdi_low"] < observed < row["diff_hdi_high"], row
    assert row["diff"] == pytest.approx(observed, abs=0.3)
    for name in ("summary.json", "report.md", "best_posterior.png", "best_forest.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| pair | better |" in report and "sigma_a | sigma_b |" in report
    assert "`ppl`: lower is better" in report and "pooled-SD units" in report


def test_plots_state_mean_hdi_sides_units_rope_and_better_side():
    rng = np.random.default_rng(0)
    pairs = mc.PairData(["ppl", "acc"], [np.zeros(3)] * 2, [np.zeros(3)] * 2, "gauge", "std")
    diff = rng.normal(-1.0, 1.0, (2, 2, 500))                          # 84% of the mass below 0
    draws = {k: np.ones((2, 2, 500)) for k in ("mu_a", "mu_b", "sigma_a", "sigma_b")}
    draws.update(diff=diff, effect_size=diff)
    rows = mc.summarize(pairs, draws, better={"ppl": "lower", "acc": "higher"}, rope=[-0.2, 0.2],
                        rope_on="diff")
    fig = mc.posterior_figure(pairs, draws, rows, [-0.2, 0.2], "diff")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    below = 100 * (diff[0] < 0).mean()
    assert any(f"{below:.1f}% < 0 < {100 - below:.1f}%" in t and "mean" in t and "94% HDI" in t for t in texts)
    assert C.fmt(rows[0]["diff_hdi_low"]) in texts and C.fmt(rows[0]["diff_hdi_high"]) in texts
    assert fig.axes[0].get_xlabel() == "mean gauge - std (ppl units)"
    assert "ROPE" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig = mc.forest_figure(pairs, rows, [-0.2, 0.2], "diff")
    (ax,) = fig.axes
    assert "each metric's own units" in ax.get_xlabel()
    assert [t.get_text() for t in ax.texts] == ["<- gauge better (lower is better)",
                                                "gauge better -> (higher is better)"]
    assert ax.get_legend().get_texts()[0].get_text() == "ROPE [-0.2, 0.2]"
    C.pyplot().close("all")

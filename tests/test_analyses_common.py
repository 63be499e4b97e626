"""Shared analysis helpers: HDI against ArviZ, table reading errors, report writers."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pandas as pd
import pytest

from engine.analyses import _common as C
from engine.errors import InputError


def test_hdi_matches_arviz():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=(3, 2000))
    ours = C.hdi(x, 0.94)
    for i in range(3):
        np.testing.assert_allclose(ours[i], az.hdi(x[i], hdi_prob=0.94), rtol=0, atol=1e-12)


def test_draw_summary_matches_arviz():
    rng = np.random.default_rng(1)
    draws = rng.standard_normal((2, 4, 300)).cumsum(-1) * 0.1 + rng.standard_normal((2, 4, 300))
    ours = C.draw_summary(draws)
    for p in range(2):
        np.testing.assert_allclose(ours["r_hat"][p], az.rhat(draws[p]), rtol=1e-6)
        np.testing.assert_allclose(ours["ess_bulk"][p], az.ess(draws[p], method="bulk"), rtol=1e-6)
        np.testing.assert_allclose(ours["ess_tail"][p], az.ess(draws[p], method="tail"), rtol=1e-6)


def test_draw_summary_of_kept_draws_matches_arviz():
    """Per-slice kept counts (odd, even, too few, none): each slice's diagnostics are ArviZ's on
    its first ``count`` draws; fewer than 4 draws per chain give NaN, as in ArviZ."""
    rng = np.random.default_rng(2)
    draws = rng.standard_normal((5, 4, 200)).cumsum(-1) * 0.1 + rng.standard_normal((5, 4, 200))
    counts = np.array([200, 151, 64, 3, 0])
    ours = C.draw_summary(draws, num_draws=counts)
    for p, n in enumerate(counts[:3]):
        kept = draws[p, :, :n]
        np.testing.assert_allclose(ours["mean"][p], kept.mean(), rtol=1e-12)
        np.testing.assert_allclose(ours["r_hat"][p], az.rhat(kept), rtol=1e-6)
        np.testing.assert_allclose(ours["ess_bulk"][p], az.ess(kept, method="bulk"), rtol=1e-6)
        np.testing.assert_allclose(ours["ess_tail"][p], az.ess(kept, method="tail"), rtol=1e-6)
    for k in ("r_hat", "ess_bulk", "ess_tail"):
        assert np.isnan(ours[k][3:]).all(), k
    assert np.isnan(ours["mean"][4]) and np.isfinite(ours["mean"][3])


def test_read_table_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        C.read_table(tmp_path / "missing.csv")
    (tmp_path / "t.txt").write_text("a\n1\n")
    with pytest.raises(InputError, match="expected a .csv or .parquet"):
        C.read_table(tmp_path / "t.txt")
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="no rows"):
        C.read_table(tmp_path / "empty.csv")
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": ["3", "oops"]})
    frame.to_parquet(tmp_path / "t.parquet")
    read = C.read_table(tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"column 'y' must be numeric and finite; row 1 is 'oops'"):
        C.numeric_column(read, "y", "t.parquet")
    with pytest.raises(InputError, match="missing column 'z'"):
        C.require_columns(read, ["x", "z"], "t.parquet")


def test_outputs_are_plain_json_and_markdown(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"analysis": {"name": "x"}, "sampler": {"name": "blackjax"}, "runtime": {"seed": 0}})
    path = C.write_summary(tmp_path, cfg, {"a": np.float64(1.5), "b": np.arange(2), "c": float("nan")})
    payload = json.loads(path.read_text())
    assert payload["results"] == {"a": 1.5, "b": [0, 1], "c": None}
    assert payload["versions"]["arviz"] == az.__version__
    table = C.markdown_table([{"a": 1, "b": 0.123456, "c": True}])
    assert table.splitlines()[2] == "| 1 | 0.123 | yes |"


def test_percent_rounds_and_r_hat_shows_four_decimals():
    assert C.percent(0.57) == "57%" and C.percent(0.94) == "94%" and C.percent(0.945) == "94.5%"
    table = C.markdown_table([{"max_r_hat": 1.0105, "mean": 1.0105}])
    assert "| 1.0105 | 1.010 |" in table        # 1.0105 fails R-hat < 1.01; 1.010 would hide it

"""Convergence checks on synthetic traces whose failures are known (no sampling: fast)."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

from engine.analyses import _common as C
from engine.analyses import convergence as cv
from engine.errors import CheckFailed, InputError


def synthetic_trace(seed: int = 0):
    """Two problems: 0 is iid (passes every check); 1 has shifted chains, divergences,
    saturated trees and random-walk energy (fails r_hat, divergences, tree_depth, e_bfmi)."""
    rng = np.random.default_rng(seed)
    chains, draws = 4, 500
    x = rng.standard_normal((chains, draws, 2, 3))
    x[:, :, 1, :] += np.arange(chains)[:, None, None]          # chains disagree
    diverging = np.zeros((chains, draws, 2), bool)
    diverging[0, :5, 1] = True
    depth = np.full((chains, draws, 2), 3)
    depth[:, :50, 1] = 10
    energy = rng.standard_normal((chains, draws, 2))
    energy[:, :, 1] = np.cumsum(energy[:, :, 1], axis=1)      # E-BFMI near 0
    return az.from_dict(
        posterior={"x": x},
        sample_stats={"diverging": diverging, "tree_depth": depth, "energy": energy},
        coords={"problem": [0, 1]},
        dims={"x": ["problem", "x_dim_0"], "diverging": ["problem"], "tree_depth": ["problem"],
              "energy": ["problem"]},
    )


def test_checks_find_known_failures():
    idata = synthetic_trace()
    problems, elements = cv.check(idata, max_tree_depth=10)
    good, bad = problems
    assert good["passed"], good
    assert set(bad["failed"].split(",")) == {"r_hat", "ess_bulk", "ess_tail", "divergences", "tree_depth", "e_bfmi"}
    assert bad["divergences"] == 5
    assert bad["treedepth_saturation"] == pytest.approx(50 / 500)
    assert len(elements) == 2 * 3
    one = idata.isel(problem=0)
    np.testing.assert_allclose(good["max_r_hat"], float(az.rhat(one)["x"].max()), rtol=1e-6)
    np.testing.assert_allclose(good["min_e_bfmi"], az.bfmi(one).min(), rtol=1e-10)


def test_trace_without_problem_dim_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    plain = az.from_dict(posterior={"mu": rng.standard_normal((2, 300))})
    problems, _ = cv.check(plain)
    assert len(problems) == 1 and problems[0]["divergences"] == 0
    with pytest.raises(InputError, match="no posterior group"):
        cv.check_trace(az.from_dict(observed_data={"y": np.zeros(3)}), "t.nc")
    with pytest.raises(InputError, match="not a readable InferenceData"):
        (tmp_path / "bad.nc").write_text("not netcdf")
        cv.load_trace(tmp_path / "bad.nc")
    with pytest.raises(InputError, match="'nope' is not in the posterior"):
        cv.check(plain, var_names=["nope"])


def test_run_writes_outputs_and_strict_fails(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "trace.nc"
    synthetic_trace().to_netcdf(str(path))
    cfg = OmegaConf.create({"analysis": {"name": "convergence", "input": str(path), "strict": False},
                            "sampler": {"max_tree_depth": 10}, "runtime": {}})
    result = cv.run(cfg, tmp_path / "out")
    assert "1 of 2 problem(s) failed" in result.summary
    for name in ("summary.json", "report.md", "convergence_trace.png", "convergence_rank.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    cfg.analysis.strict = True
    with pytest.raises(CheckFailed, match="1 of 2 problem"):
        cv.run(cfg, tmp_path / "out2")
    assert (tmp_path / "out2" / "report.md").exists()  # outputs written before failing


def test_rank_plot_panels_do_not_overlap():
    """Every element gets its own panel, titled ``name[index]``, and no title or axis label
    overlaps another panel's (ArviZ's default figure stacked titles onto x labels)."""
    rng = np.random.default_rng(0)
    idata = az.from_dict(posterior={"a": rng.standard_normal((4, 200)), "b": rng.standard_normal((4, 200)),
                                    "c": rng.standard_normal((4, 200)), "v": rng.standard_normal((4, 200, 2))})
    fig = cv.rank_figure(idata, ["a", "b", "c", "v"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["a", "b", "c", "v[0]", "v[1]"]
    boxes = [box for ax in panels for box in (ax.title.get_window_extent(renderer),
                                              ax.xaxis.label.get_window_extent(renderer))]
    for i, first in enumerate(boxes):
        for second in boxes[i + 1:]:
            assert not first.overlaps(second), (first, second)
    C.pyplot().close(fig)

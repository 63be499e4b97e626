"""Outputs of :func:`engine.calibration.sbc.sbc`: ``summary.json``, ``ranks.parquet``, plots, ``report.md``.

The plots follow simuk and the SBC R package: rank histograms with the pointwise 99% binomial
band of each bin's count (Talts et al. 2018, fig. 2), and ECDF-difference plots (ECDF of the
scaled ranks minus the uniform CDF) with the simultaneous 95% band of Säilynoja, Bürkner &
Vehtari (2022), computed by ArviZ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.analyses import _common as common
from engine.calibration.sbc import ecdf_band, rank_bins, write_summary_json

__all__ = ["write_outputs", "plot_rank_histograms", "plot_ecdf_differences", "report_markdown"]

MAX_PANELS = 30
"""Parameters shown per figure; with more, the ones with the smallest p-values."""

HISTOGRAM_BAND = 0.99
"""Pointwise mass of the binomial band drawn on rank histograms (Talts et al. 2018)."""


def _shown(summary: dict) -> list[str]:
    params = summary["parameters"]
    names = list(params)
    if len(names) <= MAX_PANELS:
        return names
    return sorted(names, key=lambda n: params[n]["p_value"])[:MAX_PANELS]


def _grid(plt, count: int):
    ncols = min(5, count)
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.1 * nrows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat


def _panel_title(ax, name: str, info: dict) -> None:
    verdict = "pass" if info["pass"] else "FAIL"
    ax.set_title(f"{name}: p={info['p_adjusted']:.2g} {verdict}", fontsize=8,
                 color="k" if info["pass"] else "C3")
    ax.tick_params(labelsize=7)


def plot_rank_histograms(ranks: dict, summary: dict, path: Path) -> Path:
    """One rank histogram per parameter, with the binomial band of a bin's count under
    uniformity (grey) and its expected count (line)."""
    from scipy import stats

    plt = common.pyplot()
    num_rank_draws, num_sims = summary["num_rank_draws"], summary["num_simulations"]
    edges = rank_bins(num_rank_draws, num_sims)
    names = _shown(summary)
    fig, axes = _grid(plt, len(names))
    for ax, name in zip(axes, names):
        counts = np.histogram(ranks[name], bins=edges - 0.5)[0]
        prob = np.diff(edges) / (num_rank_draws + 1)
        low, high = stats.binom.interval(HISTOGRAM_BAND, num_sims, prob)
        ax.fill_between(edges - 0.5, np.append(low, low[-1]), np.append(high, high[-1]), step="post",
                        color="0.85", lw=0)
        ax.stairs(counts, edges - 0.5, baseline=None, lw=1.5,
                  color="C0" if summary["parameters"][name]["pass"] else "C3")
        ax.step(edges - 0.5, np.append(num_sims * prob, num_sims * prob[-1]), where="post",
                color="0.4", lw=0.8)
        ax.set_xlim(-0.5, num_rank_draws + 0.5)
        ax.set_ylim(0, max(high.max(), counts.max()) * 1.1)
        _panel_title(ax, name, summary["parameters"][name])
    fig.suptitle(f"SBC rank histograms: {num_sims} simulations, ranks 0..{num_rank_draws}; "
                 f"grey: {HISTOGRAM_BAND:.0%} binomial band per bin (p: Holm-adjusted)", fontsize=9)
    fig.supxlabel("rank of the true value among the thinned posterior draws", fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, path)


def plot_ecdf_differences(ranks: dict, summary: dict, path: Path) -> Path:
    """ECDF of the scaled ranks minus the uniform CDF, with the simultaneous band (grey)."""
    plt = common.pyplot()
    num_rank_draws, num_sims = summary["num_rank_draws"], summary["num_simulations"]
    band_prob = 1 - summary["alpha"]
    cdf, lower, upper = ecdf_band(num_sims, num_rank_draws, band_prob)
    names = _shown(summary)
    fig, axes = _grid(plt, len(names))
    grid = np.arange(num_rank_draws + 1)
    for ax, name in zip(axes, names):
        ecdf = np.mean(ranks[name][:, None] <= grid[None, :], axis=0)
        ax.fill_between(cdf, lower - cdf, upper - cdf, step="post", color="0.85", lw=0)
        ax.step(cdf, ecdf - cdf, where="post",
                color="C0" if summary["parameters"][name]["pass"] else "C3",
                lw=1.3)
        ax.axhline(0, color="0.4", lw=0.6)
        ax.set_xlim(0, 1)
        _panel_title(ax, name, summary["parameters"][name])
    fig.suptitle(f"SBC ECDF difference (ECDF - uniform CDF of rank / {num_rank_draws + 1}); grey: "
                 f"simultaneous {band_prob:.0%} band per parameter (Säilynoja et al. 2022); red: test fails",
                 fontsize=9)
    fig.supxlabel("fractional rank", fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, path)


def report_markdown(summary: dict, title: str, images: dict[str, Path], out_dir: Path) -> Path:
    """``report.md``: setup, verdict, the per-parameter table and the plots."""
    params = summary["parameters"]
    rows = [{"parameter": n, **{k: v[k] for k in ("p_value", "p_adjusted", "pass", "ecdf_in_band",
                                                    "mean_rank", "sd_rank")}}
            for n, v in params.items()]
    s = summary.get("settings", {})
    setup = (
        f"{summary['num_simulations']} simulations from the prior predictive"
        f"{' of a separate simulator' if s.get('simulator') == 'separate' else ''}, all fitted in "
        f"one batched call (sampler `{s.get('sampler')}`, {s.get('chains')} chains x "
        f"({s.get('tune')} tune + {s.get('draws')} draws)). Draws thinned by {summary.get('thinning_stride')} "
        f"(median smallest bulk ESS {common.fmt(summary.get('median_min_ess_bulk'), 1)}), leaving "
        f"{summary['num_rank_draws']} per simulation; ranks 0..{summary['num_rank_draws']}.\n\n"
        f"Test: Pearson chi-square of uniformity over {summary['num_bins']} rank bins per parameter, "
        f"Holm-corrected over {len(params)} parameters at family-wise alpha = {summary['alpha']}. "
        "Under calibration the scaled mean rank is 0.5 and its SD 0.289; a smaller SD (ranks "
        "piled in the middle) means posteriors too wide, a larger one (U shape) too narrow, a "
        "shifted mean a biased posterior. `ecdf_in_band`: the rank ECDF stays inside its "
        f"simultaneous {1 - summary['alpha']:.0%} band (Säilynoja et al. 2022); this band is per "
        "parameter, not corrected across parameters, so with many parameters a few leave it by "
        "chance.\n"
    )
    verdict = ("all parameters pass" if summary["all_pass"] else
               f"{summary['num_failed']} of {len(params)} parameters FAIL: "
               + ", ".join(n for n, v in params.items() if not v["pass"]))
    fit = (f"Simulations with a divergence: {summary.get('divergent_share', 0):.1%}; converged "
           f"(R-hat < 1.01, bulk and tail ESS >= 400, no divergence): "
           f"{summary.get('converged_share', 0):.1%} (R-hat < 1.01 alone: "
           f"{summary.get('r_hat_ok_share', 0):.1%}; the ESS threshold suits 4 x 1000 draws).\n")
    sections = [("Setup", setup), ("Verdict", verdict + "\n\n" + fit),
                ("Parameters", common.markdown_table(rows))]
    parts = [f"# {title}\n"] + [f"## {h}\n\n{b.rstrip()}\n" for h, b in sections]
    parts.append("## Plots\n")
    parts += [f"![{label}]({Path(p).name})\n" for label, p in images.items()]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def write_outputs(result, out_dir: Path, title: str = "Simulation-based calibration") -> dict[str, Path]:
    """Write every output of ``result`` under ``out_dir``; returns label -> path."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    ranks = pd.DataFrame({n: np.asarray(r) for n, r in result.ranks.items()})
    ranks.index.name = "simulation"
    ranks.to_parquet(out_dir / "ranks.parquet")
    outputs["ranks"] = out_dir / "ranks.parquet"
    with common.quiet_plots():
        images = {
            "rank histograms": plot_rank_histograms(result.ranks, result.summary, out_dir / "sbc_ranks.png"),
            "ECDF differences": plot_ecdf_differences(result.ranks, result.summary, out_dir / "sbc_ecdf.png"),
        }
    outputs.update(images)
    outputs["summary"] = write_summary_json(result.summary, out_dir / "summary.json")
    outputs["report"] = report_markdown(result.summary, title, images, out_dir)
    return outputs

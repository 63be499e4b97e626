"""Variational calibration in audits: where the true latent ``z_true`` falls under q and under MCMC.

A beliefs file may carry ``z_true`` (``[C,T]`` univariate, ``[C,T,K]`` multivariate): the latent
values that generated each token's data. Then each token gets the probability integral transform
(PIT, the normalised rank) of ``z_true`` under its belief q (closed form: ``Phi((z - mu_q) /
sigma_q)``, per dimension with q's marginal sd) and under the MCMC posterior (the share of draws
below ``z_true``, computed on the device), and whether ``z_true`` lies in the central 50% and
90% intervals. Over tokens whose ``z_true`` was drawn from the prior, a calibrated posterior
gives uniform PITs and coverage 50% / 90% (Cook, Gelman & Rubin 2006; Talts et al. 2018): this
shows whether q is calibrated, not only whether it is close to p.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LEVELS", "z_true_columns", "calibration_summary", "plot_pit_histograms"]

LEVELS = (0.5, 0.9)
"""Central interval masses whose coverage of ``z_true`` is reported."""


def _covered(pit: np.ndarray, level: float) -> np.ndarray:
    return np.abs(pit - 0.5) <= level / 2.0


def z_true_columns(beliefs, summaries) -> dict[str, np.ndarray]:
    """Table columns ``[P]`` from ``beliefs.fields["z_true"]`` and the on-device ``z_pit_mcmc``.

    Univariate: ``z_true``, ``z_pit_q``, ``z_pit_mcmc`` and ``z_in50_q``, ``z_in90_q``,
    ``z_in50_mcmc``, ``z_in90_mcmc`` (booleans). Multivariate (``K`` dims): ``z_pit_q_k``,
    ``z_pit_mcmc_k`` per dimension and the coverage columns as the share of the ``K``
    marginal intervals holding ``z_true``. Empty when the beliefs carry no ``z_true``.
    """
    from scipy.special import ndtr

    if "z_true" not in beliefs.fields:
        return {}
    z = beliefs.host("z_true").reshape(beliefs.num_problems, -1)           # [P, K]
    mu = beliefs.host("mu_q").reshape(z.shape)
    if beliefs.kind == "univariate":
        sd = beliefs.host("sigma_q").reshape(z.shape)
    else:
        cov = beliefs.host("cov_q").reshape(z.shape + (z.shape[1],))
        sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    pits = {"q": ndtr((z - mu) / sd), "mcmc": np.asarray(summaries["z_pit_mcmc"]).reshape(z.shape)}
    cols: dict[str, np.ndarray] = {}
    if beliefs.kind == "univariate":
        cols["z_true"] = z[:, 0]
        cols.update({f"z_pit_{who}": pit[:, 0] for who, pit in pits.items()})
    else:
        for who, pit in pits.items():
            cols.update({f"z_pit_{who}_{k}": pit[:, k] for k in range(pit.shape[1])})
    for level in LEVELS:
        for who, pit in pits.items():
            inside = _covered(pit, level)
            cols[f"z_in{round(100 * level)}_{who}"] = inside[:, 0] if beliefs.kind == "univariate" else inside.mean(1)
    return cols


def _pits(table, who: str) -> np.ndarray:
    names = [c for c in table.columns if c == f"z_pit_{who}" or c.startswith(f"z_pit_{who}_")]
    return table[names].to_numpy(dtype=float).reshape(-1)


def _stats(table, who: str) -> dict:
    from scipy import stats

    pit = _pits(table, who)
    pit = pit[np.isfinite(pit)]
    counts = np.histogram(pit, bins=10, range=(0.0, 1.0))[0]
    return {
        **{f"coverage_{round(100 * level)}": float(np.mean(_covered(pit, level))) for level in LEVELS},
        "pit_uniformity_p_value": float(stats.chisquare(counts).pvalue) if pit.size else None,
        "num_values": int(pit.size),
    }


def calibration_summary(table) -> dict | None:
    """Coverage of ``z_true`` at 50% and 90% under q and MCMC and a chi-square uniformity
    p-value of the PITs (10 bins), over tokens (and dimensions) of each checkpoint:
    ``{checkpoint label: {"q": {...}, "mcmc": {...}}}``; None without ``z_true``."""
    if not any(c.startswith("z_pit_") for c in table.columns):
        return None
    out = {}
    for label in dict.fromkeys(table.checkpoint.tolist()):
        rows = table[table.checkpoint == label]
        out[str(label)] = {who: _stats(rows, who) for who in ("q", "mcmc")}
    return out


def plot_pit_histograms(table, ax_pair, max_checkpoints: int = 6) -> None:
    """Histograms of the PITs of ``z_true`` under q and MCMC on two axes, one line per checkpoint
    (the first ``max_checkpoints``), with the 99% binomial band of a bin's count under uniformity."""
    from scipy import stats

    labels = list(dict.fromkeys(table.checkpoint.tolist()))[:max_checkpoints]
    edges = np.linspace(0.0, 1.0, 11)
    for ax, who, name in zip(ax_pair, ("q", "mcmc"), ("belief q", "MCMC posterior")):
        for i, label in enumerate(labels):
            pit = _pits(table[table.checkpoint == label], who)
            pit = pit[np.isfinite(pit)]
            if i == 0:
                low, high = stats.binom.interval(0.99, pit.size, 0.1)
                ax.axhspan(low, high, color="0.85", lw=0)
                ax.axhline(pit.size / 10, color="0.4", lw=0.8)
            cover = {round(100 * lv): np.mean(_covered(pit, lv)) for lv in LEVELS}
            ax.stairs(np.histogram(pit, bins=edges)[0], edges, baseline=None, lw=1.5, color=f"C{i}",
                      label=f"{label}: coverage 50% {cover[50]:.0%}, 90% {cover[90]:.0%}")
        ax.set_title(f"z_true under {name}", fontsize=9)
        ax.set_xlabel("PIT (normalised rank) of z_true")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, title="checkpoint", title_fontsize=7)
    ax_pair[0].set_ylabel("tokens per checkpoint")

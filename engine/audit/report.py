"""Audit outputs: metrics.parquet, summary.json, report.md and PNG plots, each written atomically.

Every file goes to a temporary name beside its target and is renamed into place
(``os.replace``), so a reader never sees a half-written file and a failed run leaves no
``metrics.parquet`` behind. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["write_outputs", "per_checkpoint", "notes", "versions", "summary_text", "atomic_write"]


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path`` (same directory, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _clean(value):
    """JSON-ready: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# --------------------------------------------------------------------------- aggregates


def _stat(x, fn):
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else float("nan")


def per_checkpoint(table, kind: str) -> list[dict]:
    """Per-checkpoint aggregates of a metrics table (order of first appearance)."""
    out = []
    for label, group in table.groupby("checkpoint", sort=False):
        row = {
            "checkpoint": label,
            "tokens": int(len(group)),
            "kl_q_mcmc_mean": _stat(group.kl_q_mcmc, np.mean),
            "kl_q_mcmc_median": _stat(group.kl_q_mcmc, np.median),
            "kl_q_mcmc_p90": _stat(group.kl_q_mcmc, lambda x: np.quantile(x, 0.9)),
            "kl_q_exact_mean": _stat(group.kl_q_exact, np.mean),
            "kl_q_exact_median": _stat(group.kl_q_exact, np.median),
            "w2_median": _stat(group.w2, np.median),
            "coverage_mean": _stat(group.coverage, np.mean),
            "pareto_k_median": _stat(group.pareto_k, np.median),
            "frac_pareto_k_gt_0.7": _stat(group.pareto_k > 0.7, np.mean) if group.pareto_k.notna().any() else float("nan"),
            "frac_converged": float(group.converged.mean()),
            "r_hat_max": _stat(group.r_hat, np.max),
            "ess_bulk_min": _stat(group.ess_bulk, np.min),
            "divergences": int(group.divergences.sum()),
        }
        if kind == "univariate":
            row.update(
                abs_z_error_mean=_stat(np.abs(group.z_error), np.mean),
                std_ratio_median=_stat(group.std_ratio, np.median),
                frac_overconfident=float((group.std_ratio < 1.0).mean()),
            )
        else:
            row.update(
                mean_l2_error_mean=_stat(group.mean_l2_error, np.mean),
                std_ratio_min_median=_stat(group.std_ratio_min, np.median),
            )
        out.append(row)
    return out


def notes(beliefs, table, model_name: str, exact: bool, psis: bool) -> list[str]:
    """Plain-language caveats for the report and summary."""
    out = []
    if not exact:
        out.append(
            f"model {model_name!r} has no closed-form posterior: kl_q_exact and the other *_exact "
            "columns are NaN; MCMC is the only reference."
        )
    if not psis:
        out.append("pareto_k is NaN: theta is not the model's only unconstrained latent.")
    bad = int((~table.converged).sum())
    if bad:
        out.append(
            f"{bad} of {len(table)} tokens did not meet the convergence rule (R-hat < 1.01, bulk "
            "and tail ESS >= 400, no divergences); treat their MCMC columns with care."
        )
    if psis:
        high = int((table.pareto_k > 0.7).sum())
        if high:
            out.append(
                f"{high} tokens have pareto_k > 0.7: q misses posterior mass in the tails "
                "(Yao et al. 2018), whatever its KL."
            )
    return out


def versions() -> dict[str, str]:
    """Versions of the stack and the JAX device, for summary.json."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("engine", "jax", "jaxlib", "pymc", "pytensor", "blackjax", "numpyro", "arviz",
                 "numpy", "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import jax

        out["device"] = str(jax.devices()[0])
    except RuntimeError:  # pragma: no cover
        pass
    return out


# --------------------------------------------------------------------------- text


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"
    return str(v)


def _markdown(header: list[str], rows: list[list]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(_fmt(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _plain(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def _checkpoint_rows(summary: dict) -> tuple[list[str], list[list]]:
    kind = summary["kind"]
    if kind == "univariate":
        header = ["checkpoint", "tokens", "KL(q|mcmc) med", "KL(q|exact) med", "|z| mean",
                  "std ratio med", "k>0.7", "converged"]
        rows = [[c["checkpoint"], c["tokens"], c["kl_q_mcmc_median"], c["kl_q_exact_median"],
                 c["abs_z_error_mean"], c["std_ratio_median"], c["frac_pareto_k_gt_0.7"],
                 c["frac_converged"]] for c in summary["checkpoints"]]
    else:
        header = ["checkpoint", "tokens", "KL(q|mcmc) med", "KL(q|exact) med", "L2 err mean",
                  "std ratio min med", "k>0.7", "converged"]
        rows = [[c["checkpoint"], c["tokens"], c["kl_q_mcmc_median"], c["kl_q_exact_median"],
                 c["mean_l2_error_mean"], c["std_ratio_min_median"], c["frac_pareto_k_gt_0.7"],
                 c["frac_converged"]] for c in summary["checkpoints"]]
    return header, rows


def _targets_line(summary: dict) -> str | None:
    """How many distinct targets were sampled for how many problems, and how chains started."""
    targets, st = summary.get("targets"), summary["settings"]
    if targets is None:
        return None
    start = "chains warm-started from q" if st.get("warm_start") else "default chain starts"
    return (f"{targets['distinct_sampled']} distinct targets sampled for {targets['problems']} "
            f"(checkpoint, token) problems; {start}")


def tune_text(settings: dict) -> str:
    """The run's warmup per chain as reports print it (``None``: each kernel's own)."""
    tune = settings.get("tune")
    return "each kernel's own" if tune is None else str(tune)


def summary_text(summary: dict) -> str:
    """The short table the CLI prints."""
    from engine.sampling.kernels import describe
    st = summary["settings"]
    t = summary["timings_s"]
    head = (
        f"VFE audit ({summary['kind']}, model {summary['model']}): {summary['num_checkpoints']} "
        f"checkpoints x {summary['num_tokens']} tokens, {describe(st['sampler'])} {st['chains']} chains x "
        f"{draws_text(st)} (+{tune_text(st)} tune), sampling {t['sampling']:.1f} s"
    )
    if (targets := _targets_line(summary)) is not None:
        head += f"\n{targets}"
    header, rows = _checkpoint_rows(summary)
    lines = [head, _plain(header, rows)]
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _plots(audit, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table, kind = audit.table, audit.kind
    labels = list(dict.fromkeys(table.checkpoint.tolist()))
    paths = {}

    def save(fig, name):
        def write(tmp):
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")

        paths[name] = atomic_write(out_dir / f"{name}.png", write)
        plt.close(fig)

    # KL by checkpoint
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [table.kl_q_mcmc[table.checkpoint == c].to_numpy() for c in labels]
    floor = 1e-6
    ax.boxplot([np.clip(g, floor, None) for g in groups], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), [str(c) for c in labels])
    if table.kl_q_exact.notna().any():
        med = [np.median(np.clip(table.kl_q_exact[table.checkpoint == c], floor, None)) for c in labels]
        ax.plot(range(1, len(labels) + 1), med, "o--", color="C3", label="median KL(q || exact)")
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("KL(q || MCMC posterior)")
    ax.set_title("Belief quality over training")
    save(fig, "kl_by_checkpoint")

    # q mean vs MCMC mean
    fig, ax = plt.subplots(figsize=(5, 5))
    if kind == "univariate":
        for i, c in enumerate(labels):
            sel = table.checkpoint == c
            ax.scatter(table.mcmc_mean[sel], table.vfe_mean[sel], s=8, alpha=0.6, label=str(c), color=f"C{i}")
        lo, hi = np.nanmin(table[["mcmc_mean", "vfe_mean"]].to_numpy()), np.nanmax(table[["mcmc_mean", "vfe_mean"]].to_numpy())
    else:
        ckpt = np.repeat(np.arange(len(labels)), len(table) // len(labels))
        q, m = audit.extras["vfe_mean"], audit.extras["mcmc_mean"]
        for i, c in enumerate(labels):
            ax.scatter(m[ckpt == i].ravel(), q[ckpt == i].ravel(), s=8, alpha=0.6, label=str(c), color=f"C{i}")
        lo, hi = float(min(q.min(), m.min())), float(max(q.max(), m.max()))
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("MCMC posterior mean")
    ax.set_ylabel("belief mean (mu_q)")
    ax.legend(title="checkpoint", fontsize=8)
    save(fig, "mean_vs_mcmc")

    # std-ratio histogram (last checkpoint highlighted)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, c in enumerate(labels):
        sel = (table.checkpoint == c).to_numpy()
        ratio = table.std_ratio[sel].to_numpy() if kind == "univariate" else audit.extras["std_ratio"][sel].ravel()
        ax.hist(np.log2(ratio[np.isfinite(ratio) & (ratio > 0)]), bins=30, alpha=0.5, label=str(c), color=f"C{i}")
    ax.axvline(0.0, color="k", lw=1)
    ax.set_xlabel("log2(sigma_q / sigma_MCMC)   < 0 over-confident | under-confident > 0")
    ax.set_ylabel("tokens")
    ax.legend(title="checkpoint", fontsize=8)
    save(fig, "std_ratio_hist")

    # R-hat / ESS overview
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.hist(table.r_hat.dropna(), bins=30, color="C0")
    a1.axvline(1.01, color="C3", ls="--", label="1.01")
    a1.set_xlabel("R-hat (worst over dims)" if kind != "univariate" else "R-hat")
    a1.legend()
    a2.hist(table.ess_bulk.dropna(), bins=30, alpha=0.6, label="bulk", color="C0")
    a2.hist(table.ess_tail.dropna(), bins=30, alpha=0.6, label="tail", color="C1")
    a2.axvline(400, color="C3", ls="--", label="400")
    a2.set_xlabel("ESS")
    a2.legend()
    fig.suptitle(f"Convergence: {int(table.converged.sum())}/{len(table)} tokens converged")
    save(fig, "diagnostics")
    if "z_true_calibration" in audit.summary:
        from engine.audit.calibration import plot_pit_histograms

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        plot_pit_histograms(table, axes)
        fig.suptitle("Calibration: PIT of the true latent (uniform if calibrated; grey: 99% band per bin)")
        fig.tight_layout()
        save(fig, "z_true_pit")
    return paths


# --------------------------------------------------------------------------- report


def _report_md(audit, plot_paths: dict[str, Path], worst_tokens: int) -> str:
    from engine.sampling.kernels import describe
    s, table = audit.summary, audit.table
    st = s["settings"]
    header, rows = _checkpoint_rows(s)
    lines = [
        f"# VFE audit: {s['kind']} beliefs",
        "",
        f"- beliefs: `{s['source']}`",
        f"- model: `{s['model']}` (closed form: {'yes' if s['closed_form'] else 'no'})",
        f"- {s['num_checkpoints']} checkpoints x {s['num_tokens']} tokens"
        + (f", dimension {s['dim']}" if s["kind"] == "multivariate" else ""),
        f"- MCMC: {describe(st['sampler'])}, {st['chains']} chains x {st['draws']} draws after "
        f"{tune_text(st)} tuning steps, {st['precision']}, seed {st['seed']}",
        *([f"- {line}"] if (line := _targets_line(s)) is not None else []),
        f"- time: {s['timings_s']['prepare_compile']:.1f} s prepare + compile, "
        f"{s['timings_s']['sampling']:.1f} s sampling, {s['timings_s']['metrics']:.1f} s metrics",
        "",
        "KL is KL(q || p) with p the MCMC posterior moment-matched to a Gaussian (`kl_q_mcmc`) or "
        "the exact posterior (`kl_q_exact`). `k>0.7`: share of tokens whose PSIS Pareto k-hat of q as "
        "a proposal exceeds 0.7 (Yao et al. 2018). Converged: R-hat < 1.01, bulk and tail ESS >= 400, "
        "no divergences.",
        "",
        "## Per checkpoint",
        "",
        _markdown(header, rows),
        "",
    ]
    if s.get("z_true_calibration"):
        cal = s["z_true_calibration"]
        lines += ["## Calibration against z_true", "",
                  "PIT (normalised rank) of the true latent under q and under the MCMC posterior, "
                  "over each checkpoint's tokens; calibrated: coverage 50% / 90%, uniform PITs.", "",
                  _markdown(["checkpoint", "posterior", "coverage 50%", "coverage 90%", "PIT uniformity p"],
                            [[c, who, v[who]["coverage_50"], v[who]["coverage_90"],
                              v[who]["pit_uniformity_p_value"]] for c, v in cal.items()
                             for who in ("q", "mcmc")]), ""]
    if s.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in s["notes"]] + [""]
    captions = {
        "kl_by_checkpoint": "KL(q || posterior) by checkpoint",
        "mean_vs_mcmc": "Belief mean vs MCMC posterior mean",
        "std_ratio_hist": "Std ratio: over- vs under-confident tokens",
        "diagnostics": "R-hat and ESS overview",
        "z_true_pit": "Calibration: PIT of z_true under q and MCMC",
    }
    if plot_paths:
        lines += ["## Plots", ""]
        for name, path in plot_paths.items():
            lines += [f"### {captions.get(name, name)}", "", f"![{name}]({path.name})", ""]
    worst = table.sort_values("kl_q_mcmc", ascending=False).head(int(worst_tokens))
    if s["kind"] == "univariate":
        cols = ["checkpoint", "token", "n_obs", "vfe_mean", "mcmc_mean", "vfe_std", "mcmc_std",
                "kl_q_mcmc", "kl_q_exact", "pareto_k", "r_hat", "converged"]
    else:
        cols = ["checkpoint", "token", "n_obs", "mean_l2_error", "std_ratio_min", "kl_q_mcmc",
                "kl_q_exact", "pareto_k", "r_hat", "converged"]
    lines += [
        f"## Worst {len(worst)} tokens by KL(q || MCMC)",
        "",
        _markdown(cols, worst[cols].to_numpy().tolist()),
        "",
        "Full per-token table: `metrics.parquet`; aggregates and settings: `summary.json`.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(audit, out_dir: Path, *, plots: bool = True, worst_tokens: int = 10) -> dict[str, Path]:
    """Write an audit's files into ``out_dir``; returns ``{label: path}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["metrics"] = atomic_write(out_dir / "metrics.parquet", lambda p: audit.table.to_parquet(p, index=False))
    plot_paths = _plots(audit, out_dir) if plots else {}
    text = _report_md(audit, plot_paths, worst_tokens)
    paths["report"] = atomic_write(out_dir / "report.md", lambda p: p.write_text(text))
    paths.update({f"plot:{k}": v for k, v in plot_paths.items()})
    if getattr(audit, "draws", None) is not None:
        draws = audit.draws
        paths["draws"] = atomic_write(out_dir / "draws.nc", lambda p: draws.to_netcdf(str(p)))
    payload = json.dumps(_clean(audit.summary), indent=2)
    paths["summary"] = atomic_write(out_dir / "summary.json", lambda p: p.write_text(payload))
    return paths


def draws_text(settings: dict) -> str:
    """"1000 draws", or with per-problem stopping "draws to ESS 400 (max 4000)"."""
    if settings.get("target_ess") is not None:
        return f"draws to ESS {settings['target_ess']} (max {settings['max_draws']})"
    return f"{settings['draws']} draws"

"""The demo audits (``python -m engine``'s data) with and without warm starts, deduplication and
shorter warmups: wall and CPU time (compile apart from running), the share of tokens passing the
gate, and whether the KL columns stay within Monte Carlo error of the 1000-step warmup and of
the exact posterior.

    python -m benchmarks.demo_audit                                    # univariate, every config
    python -m benchmarks.demo_audit --kind multivariate --configs warm1000,warm500,warm300,warm200
    python -m benchmarks.demo_audit --configs base,warm300 --timing    # + a second, compiled run

Configs: ``base`` (default starts, every problem sampled, tune 1000: the engine before warm
starts and deduplication), ``dedup`` (dedup only, tune 1000), ``warmT`` (dedup and warm start,
tune T), ``coldT`` (dedup, default starts, tune T). ``--timing`` runs each config twice in this process: the second run reuses the compiled
program, so ``compile = first - second``. Results go to ``--out`` (JSON, one row per config).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _beliefs(kind: str, where: Path):
    from engine.audit import demo
    from engine.audit.beliefs_files import load_beliefs

    if kind == "univariate":  # conf/data/demo.yaml's sizes
        paths = demo.univariate_demo(where, num_tokens=96, max_obs=12, checkpoint_steps=[20, 80, 400], seed=0)
    else:
        paths = demo.multivariate_demo(where, num_tokens=48, dim=3, max_obs=12, seed=0)
    return load_beliefs(paths)


def _options(name: str) -> dict:
    if name == "base":
        return dict(warm_start=False, dedup=False, tune=1000)
    if name == "dedup":
        return dict(warm_start=False, dedup=True, tune=1000)
    if name.startswith("warm"):
        return dict(warm_start=True, dedup=True, tune=1000, warm_start_tune=int(name[4:]))
    if name.startswith("cold"):
        return dict(warm_start=False, dedup=True, tune=int(name[4:]))
    raise SystemExit(f"unknown config {name!r}")


def kl_mcse(table) -> np.ndarray:
    """Delta-method MCSE of the univariate ``kl_q_mcmc``: KL(q || N(m, s)) moves with the MCMC
    mean (MCSE ``mcmc_mcse``) and sd (MCSE ~ s / sqrt(2 ess_bulk), Gaussian draws)."""
    m, s = table.mcmc_mean.to_numpy(), table.mcmc_std.to_numpy()
    mu, sd = table.vfe_mean.to_numpy(), table.vfe_std.to_numpy()
    d_m = (m - mu) / s**2
    d_s = 1 / s - (sd**2 + (mu - m) ** 2) / s**3
    mcse_s = s / np.sqrt(2 * table.ess_bulk.to_numpy())
    return np.sqrt((d_m * table.mcmc_mcse.to_numpy()) ** 2 + (d_s * mcse_s) ** 2)


def _row(name: str, audit, wall: float, cpu: float) -> dict:
    t = audit.table
    per_ckpt = {}
    for ckpt, g in t.groupby("checkpoint", sort=False):
        diff = g.kl_q_mcmc - g.kl_q_exact
        per_ckpt[str(ckpt)] = {
            "kl_q_mcmc_median": float(g.kl_q_mcmc.median()), "kl_q_mcmc_mean": float(g.kl_q_mcmc.mean()),
            "kl_q_exact_mean": float(g.kl_q_exact.mean()),
            "kl_minus_exact_mean": float(diff.mean()), "kl_minus_exact_se": float(diff.std(ddof=1) / np.sqrt(len(g))),
            "frac_converged": float(g.converged.mean()),
        }
    row = {
        "config": name, "settings": {k: audit.summary["settings"][k] for k in ("tune", "draws", "chains", "warm_start", "dedup")},
        "targets": audit.summary["targets"], "timings_s": audit.summary["timings_s"], "wall_s": wall, "cpu_s": cpu,
        "frac_converged": float(t.converged.mean()), "r_hat_max": float(t.r_hat.max()),
        "ess_bulk_min": float(t.ess_bulk.min()), "ess_tail_min": float(t.ess_tail.min()),
        "divergences": int(t.divergences.sum()), "mean_n_steps": float(t.mean_n_steps.mean()),
        "checkpoints": per_ckpt,
    }
    if audit.kind == "univariate":
        z = (t.kl_q_mcmc - t.kl_q_exact).to_numpy() / kl_mcse(t)
        row["kl_vs_exact_abs_z_max"] = float(np.abs(z).max())
        row["kl_vs_exact_frac_abs_z_lt_3"] = float((np.abs(z) < 3).mean())
    return row, t


def _compare(row: dict, table, ref_table) -> None:
    """KL of this run against the reference run, token by token (univariate) or per checkpoint."""
    if "mcmc_std" in table:
        z = (table.kl_q_mcmc - ref_table.kl_q_mcmc).to_numpy() / np.sqrt(kl_mcse(table) ** 2 + kl_mcse(ref_table) ** 2)
        row["kl_vs_ref_abs_z_max"] = float(np.abs(z).max())
        row["kl_vs_ref_frac_abs_z_lt_3"] = float((np.abs(z) < 3).mean())
    d = (table.kl_q_mcmc - ref_table.kl_q_mcmc).groupby(table.checkpoint, sort=False)
    row["kl_vs_ref_per_checkpoint"] = {str(k): {"mean_diff": float(g.mean()), "se": float(g.std(ddof=1) / np.sqrt(len(g)))}
                                       for k, g in d}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="univariate", choices=["univariate", "multivariate"])
    parser.add_argument("--configs", default="base,dedup,warm1000,warm500,warm300,warm200")
    parser.add_argument("--timing", action="store_true", help="run each config twice (compile = first - second)")
    parser.add_argument("--sampler", default="blackjax")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from engine import audit_vfe

    out = Path(args.out or f"benchmarks/results/demo_audit_{args.kind}.json")
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        bs = _beliefs(args.kind, Path(tmp))
        for name in args.configs.split(","):
            runs = []
            for _ in range(2 if args.timing else 1):
                t0, c0 = time.perf_counter(), time.process_time()
                audit = audit_vfe(bs, sampler=args.sampler, seed=0, progress=False, **_options(name))
                runs.append((audit, time.perf_counter() - t0, time.process_time() - c0))
            row, table = _row(name, *runs[0])
            if args.timing:
                row["second_run"] = {"wall_s": runs[1][1], "cpu_s": runs[1][2], "timings_s": runs[1][0].summary["timings_s"]}
                row["compile_s"] = runs[0][0].summary["timings_s"]["sampling"] - runs[1][0].summary["timings_s"]["sampling"]
            if ref is None:
                ref = table
            else:
                _compare(row, table, ref)
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in ("checkpoints", "kl_vs_ref_per_checkpoint")}), flush=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "kind": args.kind, "sampler": args.sampler, "reference": rows[0]["config"] if rows else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

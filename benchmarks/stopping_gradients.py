"""Gradients and time per certified posterior: per-problem stopping vs fixed 1000 + 1000 draws.

For each workload (w1, w2, w4 of ``benchmarks.workloads``), sampler (blackjax, chees) and
setting, N problems are sampled once with ``engine.sample_batched`` and every problem is checked
against the same gate over its kept draws: worst R-hat < 1.01, smallest bulk and tail ESS >= 400
over every element of every posterior variable, no divergence. Reported per setting: the pass
share, total gradient evaluations (all chains, warmup included) divided by the number of
certified problems, and wall time (compile included: one fresh process-level cache per setting
is not possible, so later settings may reuse compiled pieces) divided by it.

Run::

    python -m benchmarks.stopping_gradients [--num-problems 200] [--out benchmarks/results]

Writes ``stopping_gradients.json`` and ``stopping_gradients.md`` (rewritten after every setting,
so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

SETTINGS = (
    {"label": "fixed 1000+1000", "tune": 1000, "draws": 1000, "target_ess": None},
    {"label": "stop, tune 1000", "tune": 1000, "draws": 1000, "target_ess": 400},
    {"label": "stop, tune 300", "tune": 300, "draws": 1000, "target_ess": 400},
    {"label": "stop, tune 200", "tune": 200, "draws": 1000, "target_ess": 400},
)
TARGET_ESS = 400


def certified(idata) -> np.ndarray:
    """``[problem]`` whether the problem's kept draws pass the gate (every variable element)."""
    import jax
    import jax.numpy as jnp

    from engine.sampling.gate import masked_summary

    num_draws = idata.sample_stats["num_draws"].values
    ok = np.ones(num_draws.shape[0], bool)
    with jax.enable_x64(True):
        for name in idata.posterior.data_vars:
            arr = idata.posterior[name].values  # [chain, draw, problem, ...]
            x = np.moveaxis(np.moveaxis(arr, 2, 0), (1, 2), (-2, -1))  # [problem, ..., chain, draw]
            x = np.nan_to_num(x.reshape(x.shape[0], -1, *x.shape[-2:]))
            s = jax.jit(jax.vmap(lambda v, n: masked_summary(v, n)))(jnp.asarray(x), jnp.asarray(num_draws))
            ok &= (np.asarray(s["r_hat"]).max(-1) < 1.01) & (np.asarray(s["ess_bulk"]).min(-1) >= TARGET_ESS)
            ok &= np.asarray(s["ess_tail"]).min(-1) >= TARGET_ESS
    diverging = np.nan_to_num(idata.sample_stats["diverging"].values.astype(float))
    ok &= diverging.sum((0, 1)) == 0
    return ok & (num_draws > 0)


def run_one(workload, sampler: str, setting: dict, num_problems: int, seed: int) -> dict:
    import engine

    model = workload.build_model()
    data = workload.make_data(num_problems, seed)
    kw = dict(sampler=sampler, chains=4, tune=setting["tune"], draws=setting["draws"], seed=seed,
              dense_mass=workload.dense_mass and sampler != "chees")
    if sampler == "chees":
        kw["target_accept"] = 0.651
    if setting["target_ess"] is not None:
        kw["target_ess"] = setting["target_ess"]
    start = time.perf_counter()
    idata = engine.sample_batched(model, data, **kw)
    wall = time.perf_counter() - start
    ok = certified(idata)
    grads = idata.sample_stats["num_grads"].values.astype(float)
    num_draws = idata.sample_stats["num_draws"].values
    n_ok = max(int(ok.sum()), 1)
    return {
        "workload": workload.name, "sampler": sampler, "setting": setting["label"], "tune": setting["tune"],
        "target_ess": setting["target_ess"], "num_problems": num_problems, "pass_share": float(ok.mean()),
        "grads_total": float(grads.sum()), "grads_per_certified": float(grads.sum() / n_ok),
        "median_num_draws": float(np.median(num_draws)), "max_num_draws": int(num_draws.max()),
        "wall_s_incl_compile": round(wall, 2), "wall_s_per_certified": wall / n_ok,
    }


def write(rows: list, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stopping_gradients.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Gradients per certified posterior: per-problem stopping vs fixed 1000+1000",
        "",
        f"N = {meta['num_problems']} problems, 4 chains, gate: R-hat < 1.01, bulk/tail ESS >= {TARGET_ESS}, "
        "no divergences (every variable element, over each problem's kept draws). Wall time includes "
        f"compilation; machine: {meta['machine']}; command: `{meta['command']}`.",
        "",
        "| workload | sampler | setting | pass share | grads / certified | saving vs fixed | median draws | wall s | wall s / certified |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fixed = {(r["workload"], r["sampler"]): r["grads_per_certified"] for r in rows if r["target_ess"] is None}
    for r in rows:
        base = fixed.get((r["workload"], r["sampler"]))
        saving = f"{base / r['grads_per_certified']:.2f}x" if base else "-"
        lines.append(
            f"| {r['workload']} | {r['sampler']} | {r['setting']} | {r['pass_share']:.1%} | "
            f"{r['grads_per_certified']:.0f} | {saving} | {r['median_num_draws']:.0f} | "
            f"{r['wall_s_incl_compile']:.1f} | {r['wall_s_per_certified']:.3f} |"
        )
    (out / "stopping_gradients.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--workloads", default="w1,w4,w2")
    parser.add_argument("--samplers", default="blackjax,chees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    from benchmarks.workloads import get_workload

    meta = {"num_problems": args.num_problems, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "command": f"python -m benchmarks.stopping_gradients --num-problems {args.num_problems}"}
    rows = []
    for name in args.workloads.split(","):
        workload = get_workload(name)
        for sampler in args.samplers.split(","):
            for setting in SETTINGS:
                row = run_one(workload, sampler, setting, args.num_problems, args.seed)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(rows, Path(args.out), meta)


if __name__ == "__main__":
    main()

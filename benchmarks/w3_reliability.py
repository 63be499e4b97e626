"""Why w3 (hierarchical attention) problems fail the gate, and which option fixes them.

    nice -n 10 .venv/bin/python -m benchmarks.w3_reliability --n 32 --draws 500 --tune 500

Runs the w3 data under the workload's non-centred template and under a template whose head level
is centred (layer level non-centred), with NUTS at several ``target_accept`` and warmup lengths,
and prints per option the gate's pass share and why problems fail (divergences, R-hat, ESS). The
``rule`` rows pick, per problem, the parameterisation that
:func:`engine.analyses.hierarchical_attention.choose_parameterization` picks from the data alone;
``either`` counts a problem as passing when one of the two forms certifies it (fit both, keep the
one that certifies).
"""

from __future__ import annotations

import argparse

import numpy as np
import pymc as pm

from benchmarks.kernels_realistic import run_one
from benchmarks.workloads import W3_HEADS, W3_LAYERS, W3_SCORES, get_workload


def w3_centred_heads() -> pm.Model:
    """The w3 template with the head level centred: theta ~ N(mu + tau_layer z_layer, tau_head)."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros((W3_LAYERS, W3_HEADS, W3_SCORES)))
        mu = pm.Normal("mu", 0.0, 2.0)
        tau_layer = pm.HalfNormal("tau_layer", 1.0)
        tau_head = pm.HalfNormal("tau_head", 1.0)
        z_layer = pm.Normal("z_layer", 0.0, 1.0, shape=W3_LAYERS)
        layer_mean = mu + tau_layer * z_layer
        theta = pm.Normal("theta", layer_mean[:, None], tau_head, shape=(W3_LAYERS, W3_HEADS))
        sigma = pm.HalfNormal("sigma", 2.0)
        pm.Normal("obs", theta[:, :, None], sigma, observed=y)
    return model


def w3_centred_layers() -> pm.Model:
    """The w3 template with the layer level centred, heads non-centred:
    layer_mean ~ N(mu, tau_layer), theta = layer_mean + tau_head z_head."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros((W3_LAYERS, W3_HEADS, W3_SCORES)))
        mu = pm.Normal("mu", 0.0, 2.0)
        tau_layer = pm.HalfNormal("tau_layer", 1.0)
        tau_head = pm.HalfNormal("tau_head", 1.0)
        layer_mean = pm.Normal("layer_mean", mu, tau_layer, shape=W3_LAYERS)
        z_head = pm.Normal("z_head", 0.0, 1.0, shape=(W3_LAYERS, W3_HEADS))
        sigma = pm.HalfNormal("sigma", 2.0)
        theta = layer_mean[:, None] + tau_head * z_head
        pm.Normal("obs", theta[:, :, None], sigma, observed=y)
    return model


def w3_centred() -> pm.Model:
    """The w3 template centred at both levels: layer_mean ~ N(mu, tau_layer), theta ~ N(layer_mean, tau_head)."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros((W3_LAYERS, W3_HEADS, W3_SCORES)))
        mu = pm.Normal("mu", 0.0, 2.0)
        tau_layer = pm.HalfNormal("tau_layer", 1.0)
        tau_head = pm.HalfNormal("tau_head", 1.0)
        layer_mean = pm.Normal("layer_mean", mu, tau_layer, shape=W3_LAYERS)
        theta = pm.Normal("theta", layer_mean[:, None], tau_head, shape=(W3_LAYERS, W3_HEADS))
        sigma = pm.HalfNormal("sigma", 2.0)
        pm.Normal("obs", theta[:, :, None], sigma, observed=y)
    return model


def main(argv=None):
    from engine.analyses.hierarchical_attention import choose_parameterization

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--tune", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every option's per-problem gate here (JSON)")
    p.add_argument("--options", nargs="+", default=["nc:blackjax:0.8", "c:blackjax:0.8", "nc:blackjax:0.95",
                                                      "c:blackjax:0.95"],
                   help="form:sampler:target_accept[:tune], form nc (non-centred), c (centred heads), cn (centred "
                        "layers, non-centred heads) or cc (centred)")
    args = p.parse_args(argv)
    data = get_workload("w3").make_data(args.n, args.seed)
    rule = np.array([choose_parameterization(y) == "centered" for y in data["y"]])
    print(f"rule picks centred heads for {int(rule.sum())}/{args.n} problems")
    models = {"nc": get_workload("w3").build_model(), "c": w3_centred_heads(), "cc": w3_centred(),
              "cn": w3_centred_layers()}
    rows, gates = [], {}
    for option in args.options:
        form, sampler, ta, *tune = option.split(":")
        a = argparse.Namespace(**vars(args))
        a.tune = int(tune[0]) if tune else args.tune
        row = run_one(models[form], data, sampler, a, target_accept=float(ta))
        row["sampler"] = f"{form} {sampler}"
        row["options"] += f", tune={a.tune}"
        gates[(sampler, ta, a.tune, form)] = row["gate"]
        rows.append(row)
        fails = [f"{i}: {w}" for i, w in enumerate(row["gate"]["why"]) if w]
        print(row["sampler"], row["options"], row["pass"], "fails:", "; ".join(fails), flush=True)
    for (sampler, ta, tune, form), g in list(gates.items()):
        other = gates.get((sampler, ta, tune, "c" if form == "nc" else "nc"))
        if form != "nc" or other is None:
            continue
        chosen = np.where(rule, other["passed"], g["passed"])
        either = g["passed"] | other["passed"]
        print(f"{sampler} ta={ta} tune={tune}: rule {int(chosen.sum())}/{args.n}, either {int(either.sum())}/{args.n}")
    from benchmarks.kernels_realistic import markdown

    print(markdown(rows))
    if args.out:
        import json

        dump = {"rule_centred": rule.tolist(), "options": {
            f"{r['sampler']} | {r['options']}": {k: np.asarray(v).tolist() for k, v in r["gate"].items()}
            for r in rows}}
        with open(args.out, "w") as f:
            json.dump(dump, f, default=float)


if __name__ == "__main__":
    main()

"""Writing the time-to-certified results: JSON (everything), markdown (tables) and a bar chart.

``python -m benchmarks.certified_report results/certified.json`` re-renders markdown and PNG.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from benchmarks.report import _jsonable

__all__ = ["markdown_table", "write_results", "plot_bars", "merge"]


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _loads(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _settings(r: dict) -> str:
    tune = "default" if r["tune"] is None else r["tune"]  # the defaults row: each kernel's own warmup
    return f"{r['chains']} x ({tune}+{r['draws']})"


def _per(settings: dict, name: str) -> str:
    """A per-workload option as run: ``"200"``, or ``"200 (w3: 8)"`` with overrides."""
    table = settings.get(f"{name}_map") or {"*": settings[name]}
    if isinstance(settings.get(name), dict):  # contestants: {workload: "a,b"}
        table = settings[name]
    rest = ", ".join(f"{w}: {v}" for w, v in table.items() if w != "*")
    return f"{table['*']}" + (f" ({rest})" if rest else "")


def _devices(settings: dict, meta: dict) -> str:
    """The engine's devices as run: ``--devices`` when given, else sample_batched's own (all)."""
    if settings.get("devices") is not None:
        return str(settings["devices"])
    return f"all {len(meta['jax_devices'])}" if meta.get("jax_devices") else "all"


def _certify(r: dict) -> str:
    """Certification ms per posterior; "in run" where the run judged its own draws, "-" in
    results from before certification was counted."""
    if "certify_ms_per_posterior" not in r:
        return "-"
    return "in run" if r["certify_ms_per_posterior"] == 0 else _fmt(r["certify_ms_per_posterior"])


def markdown_table(rows: list[dict]) -> str:
    """One line per workload and contestant: the chosen setting and its time to certified."""
    head = ("| workload | contestant | settings | problems | certified | run ms/posterior | certify ms/posterior | "
            "compile s | **time to certified ms** | x nutpie | x pm.sample | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        share = f"{r['pass_share']:.1%}" + ("" if r["certified"] else " (**not certified**)")
        note = r.get("note") or ""
        if r["sampler"] == "nutpie":
            note = f"{r.get('backend', '?')} backend" + (f"; {note}" if note else "")
        lines.append(
            f"| {r['workload']} | {r['contestant']} | {_settings(r)} | {r['problems_run']} | {share} | "
            f"{_fmt(r['run_ms_per_posterior'])} | {_certify(r)} | {_fmt(r['compile_s'])} | **{_fmt(r['ttc_ms'])}** | "
            f"{_fmt(r.get('x_nutpie'))} | {_fmt(r.get('x_pymc'))} | {note} |"
        )
    return "\n".join(lines)


def attempts_table(rows: list[dict]) -> str:
    """Every setting tried, with the reasons problems failed."""
    head = ("| workload | contestant | settings | pass | run ms/posterior | certify ms/posterior | compile s | "
            "time to certified ms | "
            "fail R-hat | fail bulk ESS | fail tail ESS | divergent | median min bulk ESS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for a in r["attempts"]:
            f = a["fails"]
            lines.append(
                f"| {r['workload']} | {r['contestant']} | {_settings(a)} | {a['pass_share']:.1%} | "
                f"{_fmt(a['run_ms_per_posterior'])} | {_certify(a)} | {_fmt(a['compile_s'])} | {_fmt(a['ttc_ms'])} | "
                f"{f['r_hat']} | {f['ess_bulk']} | {f['ess_tail']} | {f['divergent']} | {_fmt(a['ess_bulk_median'])} |"
            )
    return "\n".join(lines)


def _markdown(results: dict, png: str | None) -> str:
    meta, s = results["meta"], results["settings"]
    out = [
        "# Time to a certified posterior",
        "",
        f"{meta.get('date_utc')}, {meta.get('cpu')} ({meta.get('cpu_affinity')} cores), JAX backend "
        f"{meta.get('jax_backend')}, load average (1/5/15 min) {_loads(meta.get('load_avg_start'))} -> {_loads(meta.get('load_avg_end'))}, "
        f"wall {meta.get('wall_s', 0):.0f} s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items() if v) + ".",
        "",
        f"Certified: R-hat < {s['gate']['r_hat_max']}, bulk and tail ESS >= {s['gate']['ess_bulk_min']:.0f} "
        f"(ArviZ) for every parameter element, no divergence. Each contestant climbs the ladder "
        f"{_per(s, 'ladder')} (tune x draws per chain, {s['chains']} chains) and "
        + (f"tries {s['patience']} more past the first setting certifying >= {s['pass_share']:.0%} of its problems, "
           "keeping the fastest certifying one" if s.get("patience") else
           f"stops at the first setting certifying >= {s['pass_share']:.0%} of its problems")
        + f". Time to certified = ((run s + certify s) / problems + "
        f"compile s / {s['amortise_n']:,}) / pass share, where certify s is what knowing the verdict costs: "
        "nothing more for a run that judges its own draws (`auto`'s on-device gate, per-problem stopping), "
        "else the engine's batched diagnostics (R-hat, bulk and tail ESS of every element, all problems at once, "
        "float32, every device) on the run's draws, nutpie's and pm.sample's included. "
        f"Engine: first {_per(s, 'n')} problems through "
        f"`sample_batched` (batch_size {s['batch_size']}, devices {_devices(s, meta)}); nutpie: "
        f"{_per(s, 'nutpie_problems')} problems, pm.sample: {_per(s, 'pymc_problems')}, spread over the same set. "
        + ("Engine run time: a second, warm call of the same setting; compile: what the first call took beyond it."
           if s.get("no_warm_rerun") is False else
           "Engine run time: one call's wall time less the union of JAX's compile spans (undercounts the run "
           "where sampling overlaps a compile, as with per-problem stopping on two devices)."),
        "",
    ]
    for run in results.get("runs", []):
        rs, rm = run["settings"], run["meta"]
        out.append(f"- run {rm.get('date_utc', '')[:19]}: {rs['workloads']}, engine N={_per(rs, 'n')}, nutpie "
                   f"{_per(rs, 'nutpie_problems')}, pm.sample {_per(rs, 'pymc_problems')}, contestants {_per(rs, 'contestants')}, "
                   f"load {_fmt(rm['load_avg_start'][0])} -> {_fmt(rm['load_avg_end'][0])}, wall {rm.get('wall_s', 0):.0f} s")
    out += ["", markdown_table(results["rows"]), ""]
    if png:
        out += [f"![time to certified]({png})", ""]
    out += ["## Every setting tried", "", attempts_table(results["rows"]), ""]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def plot_bars(rows: list[dict], path: str, title: str = "") -> None:
    """Time to certified (ms, log scale) per contestant, grouped by workload; hatched = not certified."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    contestants = list(dict.fromkeys(r["contestant"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(contestants) <= 10 else "tab20")
    colour = {c: cmap(j) for j, c in enumerate(contestants)}
    n_bars = sum(1 for r in rows if np.isfinite(r["ttc_ms"]))
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.45 * n_bars + 3)), 4.5))
    labelled = set()
    for i, w in enumerate(workloads):  # only the contestants a workload ran: no gaps
        present = [r for c in contestants for r in rows
                   if r["workload"] == w and r["contestant"] == c and np.isfinite(r["ttc_ms"])]
        width = 0.8 / max(len(present), 1)
        for j, r in enumerate(present):
            c = r["contestant"]
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, r["ttc_ms"], width, color=colour[c], hatch=None if r["certified"] else "//",
                   edgecolor="black", linewidth=0.5, label=None if c in labelled else c)
            labelled.add(c)
            ax.text(x, r["ttc_ms"] * 1.08, _fmt(r["ttc_ms"], 2), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads)
    ax.set_ylabel("ms per certified posterior (log)")
    ax.set_title(title or "time to a certified posterior (hatched: < 99% certified)", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    ymin, ymax = ax.get_ylim()
    ax.set_ylim(ymin, ymax * 3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_results(results: dict, out_dir: str, tag: str, plot: bool = True) -> list[str]:
    """``<tag>.json``, ``<tag>.md`` and ``<tag>.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, tag)
    results = {**results, "notes": list(dict.fromkeys(results.get("notes", [])))}
    png = f"{stem}.png"
    paths = [f"{stem}.json", f"{stem}.md"]
    if plot and results["rows"]:
        meta = results["meta"]
        plot_bars(results["rows"], png, title=f"time to a certified posterior (hatched: < 99% certified)\n"
                  f"compile amortised at N={results['settings']['amortise_n']:,}; {meta.get('cpu')}, "
                  f"{meta.get('jax_backend')}, {meta.get('date_utc', '')[:10]}")
        paths.append(png)
    tmp = f"{stem}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(results), f, indent=1)
    os.replace(tmp, f"{stem}.json")
    with open(f"{stem}.md", "w") as f:
        f.write(_markdown(results, os.path.basename(png) if plot else None))
    return paths


def merge(paths: list[str]) -> dict:
    """Results of several runs (e.g. one per workload) as one: rows and notes joined, ratios
    recomputed within each workload; ``runs`` keeps each run's machine, load and settings."""
    from benchmarks.certified import add_ratios

    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    rows = [r for p in parts for r in p["rows"]]
    add_ratios(rows)
    return {
        "meta": parts[0]["meta"], "settings": parts[0]["settings"], "rows": rows,
        "notes": [n for p in parts for n in p.get("notes", [])],
        "runs": [{"meta": p["meta"], "settings": p["settings"]} for p in parts],
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m benchmarks.certified_report RESULTS.json [...] | --merge OUT.json A.json B.json ...",
              file=sys.stderr)
        return 2
    if argv[0] == "--merge":
        target, sources = argv[1], argv[2:]
        out = write_results(merge(sources), os.path.dirname(target) or ".",
                            os.path.splitext(os.path.basename(target))[0])
        print("wrote " + ", ".join(out))
        return 0
    for path in argv:
        with open(path) as f:
            results = json.load(f)
        out = write_results(results, os.path.dirname(path) or ".", os.path.splitext(os.path.basename(path))[0])
        print("wrote " + ", ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

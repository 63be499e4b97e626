"""Helpers shared by the experiment analyses: sampling settings, tables, reports, plots.

Kept free of any one analysis' model: reading user tables (with one-line :class:`InputError`
messages), per-problem posterior summaries with HDIs, the ``summary.json`` / ``report.md`` writers
and a headless matplotlib.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engine.errors import InputError

HDI_PROB = 0.94
"""Default credible mass of the reported highest-density intervals (ArviZ's default)."""


# --------------------------------------------------------------------------- sampling settings
def sample_kwargs(cfg, **overrides) -> dict:
    """``sample_batched`` keyword arguments from ``cfg.sampler``/``cfg.runtime`` plus overrides.

    ``log_likelihood`` is dropped for a host sampler (``pymc``: the loop returns no log-likelihood; the
    analyses that need it compute it from the draws, see :func:`pointwise_normal_loglik`).
    """
    from engine.cli import sampling_kwargs
    from engine.sampling.kernels import get_kernel

    kw = sampling_kwargs(cfg)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if get_kernel(kw["sampler"]).runs_on_host:
        kw.pop("log_likelihood", None)
        kw.pop("precision", None)
    return kw


def sample(model, data, **kw):
    """``engine.sample_batched``: its :class:`InputError` for bad data or settings is exit status
    2 at the CLI; any other error is internal (exit status 1, traceback in the job log)."""
    from engine.sampling.api import sample_batched

    return sample_batched(model, data, **kw)


def analysis_option(cfg, key: str, default=None):
    """``cfg.analysis.<key>`` or ``default`` when absent or null."""
    value = cfg.analysis.get(key, default)
    return default if value is None else value


def plain(value):
    """OmegaConf containers -> plain Python (lists, dicts) so they can be inspected freely."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


DIRECTIONS = ("lower", "higher")


def metric_directions(better, names: Sequence[str], option: str = "analysis.better") -> dict[str, str]:
    """Which way is better for each metric: ``{name: "lower" | "higher"}``.

    ``better`` is one direction for every metric, or a ``{metric: direction}`` map (perplexity
    and calibration error: lower; accuracy: higher). A map must name every metric in ``names``;
    :class:`InputError` names the first bad or missing entry.
    """
    better = plain(better)
    if isinstance(better, Mapping):
        unknown = [k for k in better if k not in names]
        if unknown:
            raise InputError(f"{option}: {unknown[0]!r} is not a metric; metrics are {list(names)}")
        missing = [n for n in names if n not in better]
        if missing:
            raise InputError(f"{option}: no direction for metric {missing[0]!r}; give lower or higher")
        out = {n: str(better[n]) for n in names}
    else:
        out = {n: str(better) for n in names}
    for name, direction in out.items():
        if direction not in DIRECTIONS:
            raise InputError(f"{option} must be 'lower' or 'higher' (or a map of them), got {direction!r}"
                             + (f" for {name!r}" if isinstance(better, Mapping) else ""))
    return out


# --------------------------------------------------------------------------- inputs
def resolve_path(path) -> Path:
    """A user path (``~`` expanded); :class:`InputError` when it does not exist."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise InputError(f"input {str(path)!r}: no such file or directory")
    return p


def read_table(path) -> "pd.DataFrame":  # noqa: F821
    """A CSV or parquet file as a DataFrame; one-line :class:`InputError` on failure."""
    import pandas as pd

    p = resolve_path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(p)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(p)
        elif suffix == ".tsv":
            frame = pd.read_csv(p, sep="\t")
        else:
            raise InputError(f"input {str(path)!r}: expected a .csv or .parquet table, got {suffix!r}")
    except InputError:
        raise
    except Exception as err:  # parser errors differ by format; report one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"input {str(path)!r}: could not read table: {first}") from err
    if frame.empty:
        raise InputError(f"input {str(path)!r}: the table has no rows")
    return frame


def require_columns(frame, columns: Iterable[str], source: str) -> None:
    """:class:`InputError` naming the first of ``columns`` missing from ``frame``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            f"{source}: missing column {missing[0]!r}; columns are {list(map(str, frame.columns))}"
        )


def numeric_column(frame, column: str, source: str) -> np.ndarray:
    """``frame[column]`` as float; :class:`InputError` naming the first non-numeric row."""
    import pandas as pd

    values = pd.to_numeric(frame[column], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() | ~np.isfinite(values.to_numpy(dtype=float)))
    if bad.size:
        raw = frame[column].iloc[bad[0]]
        raise InputError(
            f"{source}: column {column!r} must be numeric and finite; row {int(bad[0])} is {raw!r}"
        )
    return values.to_numpy(dtype=float)


# --------------------------------------------------------------------------- summaries
def hdi(samples: np.ndarray, prob: float = HDI_PROB) -> np.ndarray:
    """Highest-density interval of ``samples[..., n]`` along the last axis -> ``[..., 2]``.

    The narrowest window ``[x_(i), x_(i + k)]`` of the sorted draws with ``k = floor(prob * n)``,
    i.e. spanning ``k + 1`` draws (ArviZ's ``hdi`` for unimodal posteriors, equal to it draw for
    draw), vectorised over leading axes.
    """
    x = np.sort(np.asarray(samples, dtype=float), axis=-1)
    n = x.shape[-1]
    keep = int(math.floor(prob * n))
    if keep < 1 or keep >= n:
        return np.stack([x[..., 0], x[..., -1]], axis=-1)
    widths = x[..., keep:] - x[..., : n - keep]
    start = np.argmin(widths, axis=-1)[..., None]
    low = np.take_along_axis(x, start, -1)[..., 0]
    high = np.take_along_axis(x, start + keep, -1)[..., 0]
    return np.stack([low, high], axis=-1)


def draw_summary(draws: np.ndarray, prob: float = HDI_PROB, num_draws=None) -> dict[str, np.ndarray]:
    """Posterior summary of ``draws[..., chain, draw]`` (any leading axes, e.g. problems) over
    each slice's kept draws.

    Returns ``mean``, ``sd``, ``hdi_low``, ``hdi_high`` and the engine's rank-normalised split
    ``r_hat``, ``ess_bulk``, ``ess_tail`` (Vehtari et al. 2021), each ``[...]``.

    ``num_draws`` (broadcastable to ``[...]``) gives each slice's kept draws per chain; by
    default they are read off the padding (:func:`num_kept`): a per-problem stopping run
    (``target_ess``, or ``sampler="auto"``'s fallback) keeps ``num_draws[p]`` draws of problem
    ``p`` and pads the rest of the draw axis with NaN. Every slice is summarised over its first
    ``count`` draws, so the result equals the summary of the truncated trace (to rounding); a
    slice with no kept draw gives NaN (R-hat and the ESS need 4 kept draws per chain, R-hat
    also 2 chains, as in ArviZ).

    Mean, sd and HDI are numpy, per group of equal counts. R-hat and the ESS are ONE jitted
    program over every slice at once with a count per slice (the arithmetic of
    :func:`engine.sampling.gate.masked_diagnostics`, in float64), compiled once per
    ``(rows, chain, largest count)`` shape, the rows padded to a power of two (see
    :func:`_diagnostics`).
    """
    x = np.asarray(draws, dtype=float)
    lead, (chains, length) = x.shape[:-2], x.shape[-2:]
    kept = num_kept(x) if num_draws is None else np.broadcast_to(np.asarray(num_draws, dtype=int), lead)
    kept = np.minimum(kept, length)
    if np.all(kept == length):
        return _draw_summary(x, prob)
    flat, counts = x.reshape((-1, chains, length)), kept.reshape(-1)
    out = {k: np.full(counts.shape, np.nan) for k in _MOMENT_FIELDS}
    for count in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == count)
        part = _moments(flat[rows, :, :count], prob)
        for k in _MOMENT_FIELDS:
            out[k][rows] = part[k]
    out.update(_diagnostics(flat, counts))
    return {k: out[k].reshape(lead) for k in SUMMARY_FIELDS}


SUMMARY_FIELDS = ("mean", "sd", "hdi_low", "hdi_high", "r_hat", "ess_bulk", "ess_tail")
"""What :func:`draw_summary` returns, per slice."""

_MOMENT_FIELDS = SUMMARY_FIELDS[:4]
_DIAGNOSTIC_FIELDS = SUMMARY_FIELDS[4:]


def _draw_summary(x: np.ndarray, prob: float) -> dict[str, np.ndarray]:
    """:func:`draw_summary` of ``x[..., chain, draw]``, every draw kept."""
    lead, (chains, length) = x.shape[:-2], x.shape[-2:]
    counts = np.full(math.prod(lead), length, dtype=int)
    diag = _diagnostics(x.reshape((-1, chains, length)), counts)
    return {**_moments(x, prob), **{k: v.reshape(lead) for k, v in diag.items()}}


def _moments(x: np.ndarray, prob: float) -> dict[str, np.ndarray]:
    """Mean, sd and HDI of ``x[..., chain, draw]`` over all its draws (numpy)."""
    flat = x.reshape(x.shape[:-2] + (-1,))
    interval = hdi(flat, prob)
    return {"mean": flat.mean(-1), "sd": flat.std(-1, ddof=1), "hdi_low": interval[..., 0],
            "hdi_high": interval[..., 1]}


_DIAGNOSTIC_ELEMENTS = 1 << 22
"""At most this many draws (rows x chains x draws) go into one call of the diagnostics program
(more rows are split into equal chunks), bounding its memory."""


def _diagnostics(x: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """R-hat, bulk and tail ESS of the first ``counts[r]`` draws of every row of
    ``x[rows, chain, draw]`` -> ``{key: [rows]}``; NaN, as ArviZ gives, for fewer than 4 draws
    per chain (a count of 0 included) and, for R-hat, for fewer than 2 chains.

    The draw axis is cut to the largest count; the rows are padded (count 0) to a power of two,
    or split into chunks of a power of two when there are many, so one compiled program serves
    every row count of a ``(chain, draw)`` shape."""
    import jax

    rows = x.shape[0]
    length = int(counts.max(initial=0))
    out = {k: np.full(rows, np.nan) for k in _DIAGNOSTIC_FIELDS}
    if rows == 0 or length == 0:
        return out
    x = x[:, :, :length]
    cap = max(1, _DIAGNOSTIC_ELEMENTS // (x.shape[1] * length))
    size = min(1 << (rows - 1).bit_length(), 1 << (cap.bit_length() - 1))
    program = _diagnostics_program()
    with jax.enable_x64(True):
        for start in range(0, rows, size):
            block, n = x[start : start + size], counts[start : start + size]
            pad = size - block.shape[0]
            if pad:
                block = np.concatenate([block, np.zeros((pad,) + block.shape[1:])])
                n = np.concatenate([n, np.zeros(pad, dtype=n.dtype)])
            got = program(block, n.astype(np.int64))
            for k in _DIAGNOSTIC_FIELDS:
                out[k][start : start + size] = np.asarray(got[k], dtype=float)[: size - pad]
    return out


@functools.cache
def _diagnostics_program():
    """The jitted diagnostics of :func:`_diagnostics`: ``(x[rows, C, L], counts[rows])`` ->
    ``{r_hat, ess_bulk, ess_tail: [rows]}``, the gate's computation
    (:func:`engine.sampling.gate.masked_diagnostics`) with a count per row."""
    import jax
    import jax.numpy as jnp

    from engine.sampling.gate import masked_diagnostics

    def run(x, counts):
        d = masked_diagnostics(x, counts)                               # NaN R-hat for one chain
        empty = counts < 4                                              # ArviZ's minimum draws
        no_rhat = jnp.ones_like(empty) if x.shape[-2] < 2 else empty
        return {k: jnp.where(no_rhat if k == "r_hat" else empty, jnp.nan, d[k]) for k in _DIAGNOSTIC_FIELDS}

    return jax.jit(run)


# --------------------------------------------------------------------------- kept draws
def kept_counts(idata) -> np.ndarray:
    """Kept draws per chain of every problem of an engine trace, ``[problem]`` int.

    ``sample_stats.num_draws`` where the trace has it (a per-problem stopping run keeps problem
    ``p``'s first ``num_draws[p]`` draws and pads the rest of the draw axis: NaN, False or 0),
    else read off the posterior's padding (:func:`num_kept`, the longest of each problem's
    variables and elements; the draw axis' length for a trace without padding). A trace without
    a problem axis has one problem.
    """
    post = idata.posterior
    length = int(post.sizes["draw"])
    num_problems = int(post.sizes.get("problem", 1))
    stats = getattr(idata, "sample_stats", None)
    if stats is not None and "num_draws" in stats and stats["num_draws"].size == num_problems:
        return np.minimum(np.asarray(stats["num_draws"].values, dtype=int).reshape(-1), length)
    counts = np.zeros(num_problems, dtype=int)
    for name in post.data_vars:
        arr = var_draws(idata, name)
        if np.issubdtype(arr.dtype, np.floating):
            counts = np.maximum(counts, num_kept(arr).reshape(num_problems, -1).max(-1, initial=0))
        else:
            counts[:] = length
    return counts


def num_kept(draws: np.ndarray) -> np.ndarray:
    """Kept draws per chain of each slice of ``draws[..., chain, draw]``, ``[...]`` int, read off
    the padding of a per-problem stopping run: the draws past the kept ones are NaN in every
    chain. The count is one past the last draw that is not NaN in some chain (0 for a slice of
    NaN only), so a NaN inside the kept draws still counts (and shows in the summaries)."""
    x = np.asarray(draws, dtype=float)
    present = ~np.isnan(x).all(axis=-2)                                # [..., draw]
    last = present.shape[-1] - np.argmax(present[..., ::-1], axis=-1)
    return np.where(present.any(-1), last, 0)


def trim_padding(draws: np.ndarray) -> np.ndarray:
    """``draws[..., chain, draw]`` of ONE problem without the padding past its kept draws (the
    draw axis cut to the longest kept count of its slices, :func:`num_kept`), e.g. before
    flattening ``[chain, draw]`` to pick posterior predictive draws among the kept ones."""
    x = np.asarray(draws)
    if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
        return x
    return x[..., : int(np.max(num_kept(x)))]


def kept_share(condition: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Share of the kept draws where ``condition`` holds: ``condition`` and ``draws`` are
    ``[..., n]`` (chains and draws flattened), padding NaN in ``draws``; ``[...]``."""
    kept = ~np.isnan(np.asarray(draws, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(np.asarray(condition, bool) & kept, -1) / np.sum(kept, -1)


def var_draws(idata, name: str, group: str = "posterior") -> np.ndarray:
    """``idata.<group>[name]`` as ``[problem, *var_dims, chain, draw]`` (a problem axis is added
    when the trace has none)."""
    arr = getattr(idata, group)[name]
    other = [d for d in arr.dims if d not in ("chain", "draw", "problem")]
    if "problem" in arr.dims:
        return arr.transpose("problem", *other, "chain", "draw").values
    return arr.transpose(*other, "chain", "draw").values[None]


def divergences(idata) -> np.ndarray:
    """Divergent transitions per problem, ``[problem]`` (zeros without sample stats)."""
    ss = getattr(idata, "sample_stats", None)
    if ss is None or "diverging" not in ss:
        return np.zeros(idata.posterior.sizes.get("problem", 1), dtype=int)
    div = ss["diverging"]
    if "problem" not in div.dims:
        return np.array([int(div.values.sum())])
    return div.sum(("chain", "draw")).values.astype(int)


def select_problem(idata, index: int):
    """Problem ``index`` of an engine trace as an ordinary single-posterior InferenceData, its
    draw axis cut to the problem's kept draws (:func:`kept_counts`: a per-problem stopping run
    pads the rest), so ArviZ and every reduction over draws see kept draws only."""
    count = int(kept_counts(idata)[int(index) if "problem" in idata.posterior.dims else 0])
    one = idata.isel(problem=int(index)) if "problem" in idata.posterior.dims else idata
    if count < one.posterior.sizes["draw"]:
        one = one.isel(draw=slice(0, count))
    return one


def pointwise_normal_loglik(y: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Elementwise Normal log density, broadcast (used when a sampler returns no log-likelihood)."""
    z = (y - mean) / sd
    return -0.5 * z * z - np.log(sd) - 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- outputs
def versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    import importlib.metadata as md

    out = {}
    for pkg in ("engine", "jax", "pymc", "arviz", "blackjax", "numpyro"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def jsonable(value):
    """``value`` with numpy arrays and scalars as plain lists and numbers (for ``json.dumps``)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary(run_dir: Path, cfg, results: Mapping[str, Any]) -> Path:
    """``summary.json``: the analysis results, the resolved settings and package versions."""
    from engine.cli import to_container

    settings = to_container(cfg)
    settings = {k: settings[k] for k in ("analysis", "sampler", "runtime") if k in settings}
    payload = {"analysis": cfg.analysis.name, "results": results, "settings": settings,
               "versions": versions()}
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    return path


def percent(prob: float) -> str:
    """A probability as a percentage for labels, rounded (``0.57 -> "57%"``, ``0.945 -> "94.5%"``);
    ``int(prob * 100)`` would truncate ``0.57`` to 56."""
    return f"{round(100.0 * float(prob), 1):g}%"


R_HAT_DIGITS = 4
"""Decimals of R-hat in tables: 1.0105 fails ``< 1.01`` but prints as 1.010 with three."""


def fmt(value, digits: int = 3) -> str:
    """Compact number formatting for tables."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** (-digits)):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A list of row dicts as a GitHub markdown table (R-hat columns to :data:`R_HAT_DIGITS`)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), R_HAT_DIGITS if "r_hat" in c else 3)
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, title: str, sections: Sequence[tuple[str, str]],
                 images: Mapping[str, Path] | None = None) -> Path:
    """``report.md``: a title, ``(heading, markdown body)`` sections and the PNG plots beside it."""
    parts = [f"# {title}\n"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.rstrip()}\n")
    if images:
        parts.append("## Plots\n")
        for label, path in images.items():
            parts.append(f"![{label}]({Path(path).name})\n")
    path = Path(run_dir) / "report.md"
    path.write_text("\n".join(parts))
    return path


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def quiet_plots():
    """Silence matplotlib's deprecation chatter from ArviZ's plotting backend."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*alias_mapping.*")
        warnings.filterwarnings("ignore", module="arviz")
        yield


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG and close it."""
    plt = pyplot()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def forest_plot(ax, labels: Sequence[str], means, lows, highs, *, reference: float | None = 0.0,
                xlabel: str = "", color: str = "C0") -> None:
    """Horizontal forest plot: a point per row with its interval, top row first."""
    y = np.arange(len(labels))[::-1]
    means, lows, highs = (np.asarray(a, dtype=float) for a in (means, lows, highs))
    ax.hlines(y, lows, highs, color=color, lw=2)
    ax.plot(means, y, "o", color=color)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    if reference is not None:
        ax.axvline(reference, color="0.5", ls="--", lw=1)
    ax.set_xlabel(xlabel)


def prepare_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir

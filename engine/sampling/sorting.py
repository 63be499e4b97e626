"""Sorting for the on-device diagnostics: numpy on the host on CPU, ``lax.sort`` elsewhere.

XLA:CPU sorts about 20x slower than numpy (a ``(100, 4000)`` float32 sort: 64 ms against 3.6 ms),
and rank-normalised R-hat and ESS (Vehtari et al. 2021) sort every coordinate's draws several
times, so on CPU the convergence gate spent most of its time sorting. Here every sort of the
diagnostics goes through :func:`sort` / :func:`argsort`, which, when the program is lowered for
the CPU platform, hand the array to ``numpy`` through :func:`jax.pure_callback` (the host IS the
device there, so nothing is copied across a bus), and lower to ``lax.sort`` on any other platform
(:func:`jax.lax.platform_dependent`, so a program lowered ahead of time for a GPU never holds a
host callback). The results are bitwise those of ``jnp.sort`` / ``jnp.argsort`` (stable, NaN
last, ``-0.0`` equal to ``0.0``; tested).

A host callback has a cost beyond the call: JAX never writes an executable holding one to the
persistent compilation cache, so such a program compiles again in every process. Host sorting is
therefore opt-in per program, at trace time: only code traced inside :func:`host_sorts` (the
stopping gate's program, the ``auto`` sampler's gate program: small programs that compile in
about a second) sorts on the host; everywhere else (the kernels' programs with their summaries,
which take tens of seconds to compile and are cached) these functions are ``lax.sort``.

``ENGINE_HOST_SORT=0`` turns host sorting off everywhere (read when a program is traced).
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["host_sorts", "host_sort_allowed", "host_sort_enabled", "sort", "argsort", "average_ranks", "quantile", "median", "ENV_VAR"]

ENV_VAR = "ENGINE_HOST_SORT"
"""Environment variable: ``0`` (or ``false``, ``no``, ``off``) sorts with ``lax.sort`` on CPU too."""


_MODE = threading.local()


@contextlib.contextmanager
def host_sorts(enabled: bool = True):
    """Within this context (of the tracing thread), :func:`sort` and the others sort on the host
    when the program runs on CPU, unless :data:`ENV_VAR` turns host sorting off."""
    before = getattr(_MODE, "host", False)
    _MODE.host = bool(enabled)
    try:
        yield
    finally:
        _MODE.host = before


def host_sort_allowed() -> bool:
    """Whether :data:`ENV_VAR` allows host sorting (it does unless set to ``0``/``off``)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def host_sort_enabled() -> bool:
    """Whether code traced now sorts on the host when it runs on CPU: inside :func:`host_sorts`
    and allowed by :data:`ENV_VAR`."""
    return bool(getattr(_MODE, "host", False)) and host_sort_allowed()


def _on_host(np_fn, lax_fn, x, out_dtype):
    """``lax_fn(x)`` on non-CPU platforms; ``np_fn`` on the host on CPU (same shape as ``x``)."""
    if not host_sort_enabled() or x.size == 0:
        return lax_fn(x)
    out_dtype = np.dtype(out_dtype)
    wide = out_dtype.itemsize == 8

    def host(a):
        out = np.ascontiguousarray(np_fn(np.asarray(a)), dtype=out_dtype)
        # JAX checks a callback's results against dtypes canonicalised under the x64 setting of
        # the thread the callback runs on, which need not be the tracing thread's
        # (``jax.enable_x64`` is thread-local): 64-bit results travel as pairs of uint32
        return out.view(np.uint32).reshape(out.shape + (2,)) if wide else out

    def on_cpu(a):
        # vmap_method="expand_dims": a batched call gets the batch axes in front, so the host
        # function (written for negative axes) sorts every batch member in ONE numpy call
        shape = a.shape + (2,) if wide else a.shape
        result = jax.ShapeDtypeStruct(shape, np.uint32 if wide else out_dtype)
        out = jax.pure_callback(host, result, a, vmap_method="expand_dims")
        return jax.lax.bitcast_convert_type(out, out_dtype) if wide else out

    return jax.lax.platform_dependent(x, cpu=on_cpu, default=lax_fn)


def _negative_axis(x, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of {x.ndim} dimensions")
    return axis - x.ndim if axis >= 0 else axis


def _needs_stable(a) -> bool:
    """Whether entries that compare equal can differ in bits (``-0.0`` and ``0.0``, NaNs): only
    then does the order among ties show in sorted values, and numpy's fast (SIMD, unstable)
    sort could differ from ``lax.sort``'s stable one."""
    if a.dtype.kind != "f":
        return False
    return bool(np.isnan(a).any() or (np.signbit(a) & (a == 0)).any())


def _np_sort(a, axis):
    return np.sort(a, axis=axis, kind="stable" if _needs_stable(a) else "quicksort")


def sort(x, axis: int = -1):
    """``jnp.sort(x, axis=axis)`` (stable; NaN last), on the host on CPU."""
    x = jnp.asarray(x)
    axis = _negative_axis(x, axis)
    return _on_host(lambda a: _np_sort(a, axis), lambda a: jnp.sort(a, axis=axis), x, x.dtype)


def argsort(x, axis: int = -1):
    """``jnp.argsort(x, axis=axis, stable=True)`` (ties keep their order; NaN last), on the
    host on CPU; indices in ``jnp.argsort``'s integer dtype."""
    x = jnp.asarray(x)
    axis = _negative_axis(x, axis)
    lax_fn = lambda a: jnp.argsort(a, axis=axis, stable=True)  # noqa: E731
    out_dtype = jax.eval_shape(lax_fn, x).dtype
    return _on_host(lambda a: np.argsort(a, axis=axis, kind="stable"), lax_fn, x, out_dtype)


def _np_average_ranks(a):
    """:func:`average_ranks` in numpy along the last axis (any leading axes)."""
    size = a.shape[-1]
    # the order among ties does not change their (shared) rank, so the fast unstable sort serves
    # unless NaNs (each its own tie group) are present
    order = np.argsort(a, axis=-1, kind="stable" if a.dtype.kind == "f" and np.isnan(a).any() else "quicksort")
    ordered = np.take_along_axis(a, order, axis=-1)
    differ = ordered[..., 1:] != ordered[..., :-1]
    edge = np.ones(a.shape[:-1] + (1,), bool)
    position = np.broadcast_to(np.arange(size), a.shape)
    first = np.maximum.accumulate(np.where(np.concatenate([edge, differ], -1), position, 0), axis=-1)
    ends = np.concatenate([differ, edge], -1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, size - 1), -1), axis=-1), -1)
    ranks = np.empty(a.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def average_ranks(flat):
    """1-based average ranks of a 1-D array (ties share their mean rank, like scipy's
    'average'), from one stable argsort: a tie group's first and last sorted positions come from
    running max / min scans, so no search is needed. Result in the default float dtype; on CPU
    the whole computation runs in numpy on the host."""
    flat = jnp.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"average_ranks takes a 1-D array (vmap it), got shape {flat.shape}")
    out_dtype = jnp.result_type(float)
    return _on_host(_np_average_ranks, _lax_average_ranks, flat, out_dtype)


def _lax_average_ranks(flat):
    size = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    ordered = flat[order]
    position = jnp.arange(size)
    starts = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
    ends = jnp.concatenate([ordered[1:] != ordered[:-1], jnp.ones(1, bool)])
    first = jax.lax.cummax(jnp.where(starts, position, 0))
    last = jax.lax.cummin(jnp.where(ends, position, size - 1), reverse=True)
    return jnp.zeros(size, jnp.result_type(float)).at[order].set((first + last) / 2.0 + 1.0)


def _static_positions(prob: float, n: int, dtype):
    """``jnp.quantile``'s interpolation positions for ``prob`` over ``n`` sorted entries."""
    q = np.asarray(prob, dtype) * np.asarray(n - 1, dtype)
    low, high = np.floor(q), np.ceil(q)
    high_weight = np.asarray(q - low, dtype)
    low_weight = np.asarray(np.asarray(1, dtype) - high_weight, dtype)
    clip = lambda v: int(min(max(v, 0), n - 1))  # noqa: E731
    return clip(low), clip(high), low_weight, high_weight


def quantile(x, prob, method: str = "linear"):
    """``jnp.quantile(x, prob, axis=-1, method=method)`` for a static ``prob`` (a float, or a
    tuple of floats: a tuple of results from ONE sort) and ``method`` ``"linear"`` or
    ``"midpoint"``, with the same arithmetic (bitwise equal; tested): any NaN along the axis
    gives NaN."""
    if method not in ("linear", "midpoint"):
        raise ValueError(f"quantile method must be 'linear' or 'midpoint', got {method!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    n = x.shape[-1]
    x = jnp.where(jnp.any(jnp.isnan(x), axis=-1, keepdims=True), jnp.nan, x)
    ordered = sort(x, axis=-1)
    out = []
    for p in (prob if isinstance(prob, tuple) else (prob,)):
        q_dtype = jnp.asarray(p).dtype  # a weak default float, as in jnp.quantile
        low, high, low_weight, high_weight = _static_positions(p, n, q_dtype)
        low_value, high_value = ordered[..., low], ordered[..., high]
        if method == "linear":
            out.append(low_value.astype(q_dtype) * low_weight + high_value.astype(q_dtype) * high_weight)
        else:
            out.append((low_value + high_value) * jnp.asarray(0.5, low_value.dtype))
    return tuple(out) if isinstance(prob, tuple) else out[0]


def median(x):
    """``jnp.median(x, axis=-1)`` (bitwise equal; tested), on the host on CPU."""
    return quantile(x, 0.5, method="midpoint")

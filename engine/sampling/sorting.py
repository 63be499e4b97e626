"""Sorting for the on-device diagnostics: numpy on the host on CPU, ``lax.sort`` elsewhere.

XLA:CPU sorts about 20x slower than numpy (a ``(100, 4000)`` float32 sort: 64 ms against 3.6 ms),
and rank-normalised R-hat and ESS (Vehtari et al. 2021) sort every coordinate's draws several
times, so on CPU the convergence gate spent most of its time sorting. Here every sort of the
diagnostics goes through :func:`sort`, :func:`argsort`, :func:`average_ranks` or
:func:`quantile`, which, when the program is lowered for the CPU platform, run numpy on the
host as an XLA custom call (:mod:`engine.sampling.host_ffi`; the host IS the device there, so
nothing is copied), and lower to ``lax.sort`` on any other platform
(:func:`jax.lax.platform_dependent`, so a program lowered ahead of time for a GPU holds no
custom call). The results are bitwise those of ``jnp.sort`` / ``jnp.argsort`` / ``jnp.quantile``
(stable, NaN last, ``-0.0`` equal to ``0.0``; tested). Ranks and sorted values of float32 draws,
the gate's common case, come from one host call: numba packs each value with its index into a
64-bit key, numpy's SIMD integer sort orders the keys, and one numba pass resolves ties and writes
ranks and sorted values into the call's result buffers (60 against 126 us per 4,000 draws).

Unlike :func:`jax.pure_callback`, whose programs JAX never writes to the persistent compilation
cache, a custom call leaves the programs holding it cacheable: the kernels' programs with the
gate inside them compile once per machine, as before.

``ENGINE_HOST_SORT=0`` turns host sorting off (every sort is ``lax.sort``); it is read when a
program is traced.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from engine.sampling import host_ffi

__all__ = ["host_sort_enabled", "sort", "argsort", "average_ranks", "average_ranks_and_sort", "quantile", "median",
           "ENV_VAR"]

ENV_VAR = "ENGINE_HOST_SORT"
"""Environment variable: ``0`` (or ``false``, ``no``, ``off``) sorts with ``lax.sort`` on CPU too."""


def host_sort_enabled() -> bool:
    """Whether programs traced now sort on the host when they run on CPU (:data:`ENV_VAR`, and a
    JAX whose FFI :mod:`engine.sampling.host_ffi` knows)."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return host_ffi.available()


def _on_host(name, np_fn, lax_fn, x, out_dtype):
    """``lax_fn(x)`` on non-CPU platforms; on CPU the custom call ``name`` running ``np_fn``
    (numpy, along the last axis, any leading axes) on the host. Same shape as ``x``; a tuple
    ``out_dtype`` gives a tuple of results (``np_fn`` and ``lax_fn`` return one per dtype)."""
    if not host_sort_enabled() or x.size == 0:
        return lax_fn(x)
    host_ffi.register(name, np_fn)
    several = isinstance(out_dtype, tuple)
    results = tuple(jax.ShapeDtypeStruct(x.shape, d) for d in (out_dtype if several else (out_dtype,)))

    def on_cpu(a):
        # vmap_method="expand_dims": a batched call gets the batch axes in front, so the numpy
        # function (along the last axis) sorts every batch member in ONE call
        out = host_ffi.ffi_call(name, results if several else results[0], a, vmap_method="expand_dims")
        return tuple(out) if several else out

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


def _np_sort(a):
    """``np.sort`` along the last axis with ``lax.sort``'s order of ties."""
    return (np.sort(a, axis=-1, kind="stable" if _needs_stable(a) else "quicksort"),)


def _np_argsort(a):
    """Stable ``np.argsort`` along the last axis."""
    return (np.argsort(a, axis=-1, kind="stable"),)


def _along_last(fn, x, axis):
    """``fn`` (along the last axis) applied along ``axis`` of ``x``."""
    if axis == -1:
        return fn(x)
    return jnp.moveaxis(fn(jnp.moveaxis(x, axis, -1)), -1, axis)


def sort(x, axis: int = -1):
    """``jnp.sort(x, axis=axis)`` (stable; NaN last), on the host on CPU."""
    x = jnp.asarray(x)
    axis = _negative_axis(x, axis)
    return _along_last(lambda a: _on_host("engine_host_sort", _np_sort, jnp.sort, a, a.dtype), x, axis)


def argsort(x, axis: int = -1):
    """``jnp.argsort(x, axis=axis, stable=True)`` (ties keep their order; NaN last), on the
    host on CPU; indices in ``jnp.argsort``'s integer dtype."""
    x = jnp.asarray(x)
    axis = _negative_axis(x, axis)
    lax_fn = lambda a: jnp.argsort(a, stable=True)  # noqa: E731
    out_dtype = jax.eval_shape(lax_fn, x).dtype
    return _along_last(lambda a: _on_host("engine_host_argsort", _np_argsort, lax_fn, a, out_dtype), x, axis)


def _np_ranks_of_sorted(order, ordered):
    """1-based average ranks from a sort's ``order`` and the ``ordered`` values (last axis)."""
    size = order.shape[-1]
    differ = ordered[..., 1:] != ordered[..., :-1]
    edge = np.ones(order.shape[:-1] + (1,), bool)
    position = np.broadcast_to(np.arange(size), order.shape)
    first = np.maximum.accumulate(np.where(np.concatenate([edge, differ], -1), position, 0), axis=-1)
    ends = np.concatenate([differ, edge], -1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, size - 1), -1), axis=-1), -1)
    ranks = np.empty(order.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def _np_sorted_order(a):
    # the order among ties changes no (shared) rank, and shows in the sorted values only when
    # equal entries differ in bits, so the fast unstable sort serves unless they do
    order = np.argsort(a, axis=-1, kind="stable" if _needs_stable(a) else "quicksort")
    return order, np.take_along_axis(a, order, axis=-1)


def _np_average_ranks(a):
    """:func:`average_ranks` in numpy along the last axis (any leading axes)."""
    return (_np_ranks_of_sorted(*_np_sorted_order(a)),)


def _np_ranks_and_sort(a):
    """:func:`average_ranks_and_sort` in numpy along the last axis (any leading axes)."""
    order, ordered = _np_sorted_order(a)
    return _np_ranks_of_sorted(order, ordered), ordered


_NAN_BITS, _SIGN, _LOW = np.uint64(0x7FC00000), np.uint64(0x80000000), np.uint64(0xFFFFFFFF)
_SHIFT, _NAN_KEY = np.uint64(32), np.uint64(0xFFC00000)
"""float32 bits of the canonical NaN, the sign bit, a 64-bit key's low word and the shift to its
high word, and the key (high word) every NaN maps to (:func:`_float32_keys_py`)."""


def _float32_keys_py(x, keys):
    """``keys [rows, n]`` 64-bit sort keys of float32 ``x [rows, n]``: the high word maps the
    value to an unsigned integer in ``lax.sort``'s order (``-0.0`` as ``0.0``, every NaN as one
    NaN after ``inf``: the comparator's canonical forms), the low word is the index, which
    breaks ties, so one unstable integer sort of the keys is ``lax.sort``'s stable order."""
    bits = x.view(np.uint32)
    rows, n = x.shape
    for r in range(rows):
        for i in range(n):
            b = np.uint64(bits[r, i])  # every operation below on 64-bit unsigned integers
            if x[r, i] == 0:
                b = np.uint64(0)
            elif x[r, i] != x[r, i]:
                b = _NAN_BITS
            key = (b ^ _LOW) if b & _SIGN else (b | _SIGN)
            keys[r, i] = (key << _SHIFT) | np.uint64(i)


def _tie_pass_py(keys, x, ranks, ordered):
    """From ``keys [rows, n]`` (:func:`_float32_keys_py`, sorted) of ``x``: the average 1-based
    ``ranks`` (written at each entry's index) and ``ordered``, ``x``'s entries in sorted order
    with their own bits, in ONE pass. Each run of equal high words is a tie group, except that
    a NaN is a group of its own (``lax``'s ``!=`` finds NaNs unequal)."""
    rows, n = keys.shape
    for r in range(rows):
        j = 0
        while j < n:
            k = keys[r, j] >> _SHIFT
            e = j + 1
            if k != _NAN_KEY:
                while e < n and (keys[r, e] >> _SHIFT) == k:
                    e += 1
            rank = 0.5 * (j + e - 1) + 1.0
            for i in range(j, e):
                index = keys[r, i] & _LOW
                ranks[r, index] = rank
                ordered[r, i] = x[r, index]
            j = e


@functools.cache
def _numba_kernels():
    """``(keys, tie pass)``: :func:`_float32_keys_py` and :func:`_tie_pass_py` compiled by numba
    (nogil; cached on disk), or ``None`` where numba does not import."""
    try:
        import numba
    except ImportError:  # pragma: no cover (numba comes with PyTensor)
        return None
    jit = numba.njit(nogil=True, cache=True)
    return jit(_float32_keys_py), jit(_tie_pass_py)


def _packable(x) -> bool:
    """Whether ``x``'s ranks and sort come from ONE integer sort of 64-bit keys on the host
    (:func:`_host_ranks_and_sort`): float32 with numba available."""
    return x.dtype == jnp.float32 and _numba_kernels() is not None


def _np_ranks_and_sort_float32(x, ranks, ordered):
    """Host side of :func:`_host_ranks_and_sort`, along the last axis of float32 ``x``, into the
    call's result buffers: the keys in numba, numpy's SIMD sort of them (integers sort several
    times faster than floats argsort), then one numba pass for the ranks and the sorted values.
    About 55 us per 4,000 draws, of which the sort is 42, against 145 for the same in numpy
    passes; the kernels release the GIL, so the devices' host calls run in parallel."""
    make_keys, tie_pass = _numba_kernels()
    n = x.shape[-1]
    flat = np.ascontiguousarray(x).reshape(-1, n)
    keys = np.empty(flat.shape, np.uint64)
    make_keys(flat, keys)
    keys.sort(axis=-1)
    tie_pass(keys, flat, ranks.reshape(-1, n), ordered.reshape(-1, n))


_np_ranks_and_sort_float32.writes_results = True


def _host_ranks_and_sort(x):
    """``(average ranks, sort)`` along the last axis of a :func:`_packable` ``x`` from ONE host
    call (CPU only: the caller puts it under ``platform_dependent``)."""
    name = "engine_host_ranks_and_sort_f32"
    host_ffi.register(name, _np_ranks_and_sort_float32)
    results = (jax.ShapeDtypeStruct(x.shape, jnp.result_type(float)), jax.ShapeDtypeStruct(x.shape, x.dtype))
    return host_ffi.ffi_call(name, results, x, vmap_method="expand_dims")


def average_ranks(flat):
    """1-based average ranks of a 1-D array (ties share their mean rank, like scipy's
    'average'), from one stable argsort: a tie group's first and last sorted positions come from
    running max / min scans, so no search is needed. Result in the default float dtype; on CPU
    the whole computation runs on the host (for float32 from one integer sort of 64-bit
    keys, :func:`_np_ranks_and_sort_float32`)."""
    flat = jnp.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"average_ranks takes a 1-D array (vmap it), got shape {flat.shape}")
    if host_sort_enabled() and flat.size and _packable(flat):
        return jax.lax.platform_dependent(flat, cpu=lambda a: _host_ranks_and_sort(a)[0],
                                          default=_lax_average_ranks)
    out_dtype = jnp.result_type(float)
    return _on_host("engine_host_average_ranks", _np_average_ranks, _lax_average_ranks, flat, out_dtype)


def _lax_average_ranks(flat):
    return _lax_ranks_and_sort(flat)[0]


def _lax_ranks_and_sort(flat):
    size = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    ordered = flat[order]
    position = jnp.arange(size)
    starts = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
    ends = jnp.concatenate([ordered[1:] != ordered[:-1], jnp.ones(1, bool)])
    first = jax.lax.cummax(jnp.where(starts, position, 0))
    last = jax.lax.cummin(jnp.where(ends, position, size - 1), reverse=True)
    return jnp.zeros(size, jnp.result_type(float)).at[order].set((first + last) / 2.0 + 1.0), ordered


def average_ranks_and_sort(flat):
    """``(average_ranks(flat), sort(flat))`` of a 1-D array from ONE sort (on the host on CPU,
    one ``lax`` argsort elsewhere); bitwise the same as the two calls."""
    flat = jnp.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"average_ranks_and_sort takes a 1-D array (vmap it), got shape {flat.shape}")
    if host_sort_enabled() and flat.size and _packable(flat):
        return jax.lax.platform_dependent(flat, cpu=lambda a: tuple(_host_ranks_and_sort(a)),
                                          default=_lax_ranks_and_sort)
    return _on_host("engine_host_ranks_and_sort", _np_ranks_and_sort, _lax_ranks_and_sort, flat,
                    (jnp.result_type(float), flat.dtype))


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

"""Variational beliefs in, validated and normalised, out: a :class:`BeliefSet`.

Contract 3 of the design. A beliefs source is one file (``.npz``, ``.pt`` loaded with
``torch.load(weights_only=True)``, or ``.nc``), several such files (one per checkpoint, stacked
along the checkpoint axis), or a mapping of arrays (numpy, JAX, or torch tensors; CUDA tensors
enter JAX through DLPack without a host copy). With C checkpoints, T tokens, n observation
slots and K dimensions (C may be omitted):

- univariate: ``mu_q`` [C,T], ``sigma_q`` [C,T], ``observed`` [C,T,n], ``prior_mu``,
  ``prior_sigma``, optional ``obs_sigma`` (default 1), all broadcastable to [C,T];
- multivariate: ``mu_q`` [C,T,K], ``cov_q`` [C,T,K,K], ``observed`` [C,T,n,K], ``prior_mu``
  [..,K], ``prior_cov`` [..,K,K], optional ``obs_cov`` (default identity);
- either: ``n_obs`` [C,T] or ``mask`` [C,T,n] for ragged observation counts, ``checkpoint``
  [C] and ``token`` [T] labels. ``observed``, ``n_obs`` and ``mask`` may omit C when the
  observations are the same at every checkpoint.

Every check raises :class:`engine.errors.InputError` with one line naming the field, the
problem and the first offending index, before any sampling starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.errors import InputError

__all__ = ["BeliefSet", "beliefs_from_arrays", "load_beliefs", "concat_checkpoints", "read_file", "SUFFIXES"]

UNIVARIATE = ("mu_q", "sigma_q", "observed", "prior_mu", "prior_sigma", "obs_sigma")
MULTIVARIATE = ("mu_q", "cov_q", "observed", "prior_mu", "prior_cov", "obs_cov")
OPTIONAL = ("obs_sigma", "obs_cov", "n_obs", "mask", "checkpoint", "token", "z_true")
LABELS = ("checkpoint", "token")


@dataclass(frozen=True)
class BeliefSet:
    """Validated beliefs, every field broadcast to its full shape.

    Attributes
    ----------
    kind
        "univariate" or "multivariate".
    fields
        Contract names -> arrays: ``mu_q`` [C,T(,K)], ``sigma_q`` [C,T] or ``cov_q`` [C,T,K,K],
        ``observed`` [C,T,n(,K)] with each token's valid observations first (a ``mask`` is
        compacted, padding repeats the last valid observation so it stays finite),
        ``prior_mu``, ``prior_sigma``/``prior_cov``, ``obs_sigma``/``obs_cov``. Arrays are
        numpy, or JAX arrays when the input lived on an accelerator.
    num_obs
        [C,T] valid observations per token (host numpy, int64).
    checkpoints, tokens
        Labels [C] and [T] (host numpy).
    source
        Where the beliefs came from (a path or "arrays"), for reports.
    """

    kind: str
    fields: dict[str, Any]
    num_obs: np.ndarray
    checkpoints: np.ndarray
    tokens: np.ndarray
    source: str = "arrays"

    def __getitem__(self, name: str):
        return self.fields[name]

    @property
    def num_checkpoints(self) -> int:
        return int(self.num_obs.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.num_obs.shape[1])

    @property
    def max_num_obs(self) -> int:
        return int(self.fields["observed"].shape[2])

    @property
    def dim(self) -> int:
        """K for multivariate beliefs, 1 for univariate ones."""
        return int(self.fields["mu_q"].shape[2]) if self.kind == "multivariate" else 1

    @property
    def num_problems(self) -> int:
        return self.num_checkpoints * self.num_tokens

    def flat(self, name: str):
        """Field ``name`` with (checkpoint, token) flattened to one problem axis [C*T, ...]."""
        arr = self.fields[name]
        return arr.reshape((self.num_problems,) + tuple(arr.shape[2:]))

    def host(self, name: str) -> np.ndarray:
        """Field ``name`` flattened to problems, as a host numpy array."""
        return np.asarray(self.flat(name))


# --------------------------------------------------------------------------- array namespace


def _is_jax(x) -> bool:
    try:
        import jax
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, jax.Array)


def array_namespace(x):
    """``jax.numpy`` for JAX arrays, else ``numpy``: field checks run where the data live."""
    if _is_jax(x):
        import jax.numpy as jnp

        return jnp
    return np


def _to_array(value, name: str):
    """numpy / list / torch (CPU, or CUDA via DLPack) / JAX -> numpy or JAX array, no copies."""
    mod = type(value).__module__
    if mod.startswith("torch"):
        tensor = value.detach()
        if tensor.is_cuda:
            import jax
            import jax.dlpack

            if not any(d.platform == "gpu" for d in jax.devices()):
                raise InputError(
                    f"field {name!r}: a CUDA tensor, but JAX runs on {jax.default_backend()}; use "
                    "runtime=gpu with jax[cuda12], or pass tensor.cpu()"
                )
            return jax.dlpack.from_dlpack(tensor)  # zero-copy: stays on the GPU
        if tensor.dtype.is_complex:
            raise InputError(f"field {name!r}: complex values are not supported")
        return tensor.resolve_conj().resolve_neg().numpy()
    if _is_jax(value):
        return value
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"field {name!r}: not an array ({err})") from None
    return arr


def _check_numeric(arr, name: str):
    kind = np.dtype(arr.dtype).kind
    if kind not in "biuf":
        raise InputError(f"field {name!r}: expected real numbers, got dtype {arr.dtype}")
    return arr


def _first_index(bad) -> tuple[int, ...]:
    """First True position of a boolean array, as a tuple of ints (host)."""
    flat = np.asarray(bad).reshape(-1)
    pos = int(np.argmax(flat))
    return tuple(int(i) for i in np.unravel_index(pos, np.shape(bad)))


def _where(index: tuple[int, ...], ckpts=None, tokens=None) -> str:
    text = f"first bad index {list(index)}"
    if ckpts is not None and tokens is not None and len(index) >= 2:
        text += f" (checkpoint {ckpts[index[0]]!r}, token {tokens[index[1]]!r})"
    return text


def _broadcast(arr, shape: tuple[int, ...], name: str, spec: str):
    try:
        target = np.broadcast_shapes(tuple(arr.shape), shape)
    except ValueError:
        target = None
    if target != tuple(shape):
        raise InputError(
            f"field {name!r} has shape {tuple(arr.shape)} but mu_q sets {spec} = {tuple(shape)} "
            "(it must broadcast to that)"
        )
    return array_namespace(arr).broadcast_to(arr, shape)


# --------------------------------------------------------------------------- validation


def _kind_of(keys: set[str]) -> str:
    if "sigma_q" in keys and "cov_q" in keys:
        raise InputError("field 'cov_q': give sigma_q (univariate) or cov_q (multivariate), not both")
    if "cov_q" in keys:
        return "multivariate"
    if "sigma_q" in keys:
        return "univariate"
    raise InputError(
        "field 'sigma_q': missing; univariate beliefs need sigma_q, multivariate ones cov_q"
    )


def beliefs_from_arrays(arrays: Mapping[str, Any], *, source: str = "arrays") -> BeliefSet:
    """Validate a mapping of contract-3 fields and return a :class:`BeliefSet`.

    Parameters
    ----------
    arrays
        Field name -> array-like (numpy, list, JAX array, torch tensor); see the module docstring
        for the names and shapes. ``checkpoint``/``token`` may be any 1-D labels.
    source
        Description kept for reports.

    Raises
    ------
    InputError
        Missing or unknown fields, shapes that do not broadcast, non-finite values, scales
        <= 0, covariances that are not symmetric positive definite, bad ``n_obs``/``mask``.
    """
    if not isinstance(arrays, Mapping):
        raise InputError(f"beliefs: expected a mapping of field names to arrays, got {type(arrays).__name__}")
    on_device = any(_is_jax(v) or getattr(v, "is_cuda", False) for v in arrays.values())
    if on_device:  # JAX would silently truncate float64 inputs outside x64 mode
        import jax

        with jax.enable_x64(True):
            return _from_arrays(arrays, source)
    return _from_arrays(arrays, source)


def _from_arrays(arrays: Mapping[str, Any], source: str) -> BeliefSet:
    keys = set(arrays)
    kind = _kind_of(keys)
    names = UNIVARIATE if kind == "univariate" else MULTIVARIATE
    allowed = set(names) | set(OPTIONAL)
    unknown = sorted(keys - allowed)
    if unknown:
        raise InputError(
            f"field {unknown[0]!r}: unknown {kind} beliefs field; expected {sorted(allowed)}"
        )
    for name in names:
        if name not in keys and name not in OPTIONAL:
            raise InputError(f"field {name!r}: missing from {kind} beliefs")
    if "n_obs" in keys and "mask" in keys:
        raise InputError("field 'mask': give n_obs or mask, not both")

    raw = {}
    for name in keys - set(LABELS):
        raw[name] = _check_numeric(_to_array(arrays[name], name), name)
    core = 1 if kind == "univariate" else 2  # trailing axes of mu_q beyond [T]
    mu = raw["mu_q"]
    if mu.ndim == core:  # C omitted
        raw = {k: v[None] if k in _PER_TOKEN else v for k, v in raw.items()}
        mu = raw["mu_q"]
        has_c = False
    elif mu.ndim == core + 1:
        has_c = True
    else:
        want = "[C,T] or [T]" if kind == "univariate" else "[C,T,K] or [T,K]"
        raise InputError(f"field 'mu_q': expected shape {want}, got {tuple(mu.shape)}")
    C, T = int(mu.shape[0]), int(mu.shape[1])
    if T == 0 or C == 0:
        raise InputError(f"field 'mu_q': no tokens or checkpoints (shape {tuple(mu.shape)})")

    checkpoints = _labels(arrays.get("checkpoint"), C, "checkpoint", has_c)
    tokens = _labels(arrays.get("token"), T, "token", True)
    if kind == "univariate":
        fields = _univariate(raw, C, T)
    else:
        fields = _multivariate(raw, C, T)
    observed, num_obs = _ragged(raw, fields["observed"], C, T, kind, checkpoints, tokens)
    fields["observed"] = observed
    _check_values(fields, kind, num_obs, checkpoints, tokens)
    return BeliefSet(kind, fields, num_obs, checkpoints, tokens, source)


_PER_TOKEN = {"mu_q"}  # the rest broadcast from [T...] to [1,T...] as they are


def _labels(value, size: int, name: str, has_axis: bool) -> np.ndarray:
    if value is None:
        return np.arange(size)
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim == 0 and not has_axis:
        arr = arr[None]
    if arr.ndim != 1 or arr.shape[0] != size:
        raise InputError(f"field {name!r}: expected {size} labels, got shape {arr.shape}")
    if arr.dtype.kind not in "biufUS":
        raise InputError(f"field {name!r}: labels must be numbers or strings, got dtype {arr.dtype}")
    if arr.dtype.kind == "S":
        arr = arr.astype(str)
    dup = first_duplicate(arr)
    if dup is not None:
        raise InputError(f"field {name!r}: duplicate label {arr[dup]!r} at index {dup}")
    return arr


def first_duplicate(labels: np.ndarray) -> int | None:
    seen: set = set()
    for i, value in enumerate(labels.tolist()):
        if value in seen:
            return i
        seen.add(value)
    return None


def _float(arr):
    xp = array_namespace(arr)
    return arr if xp.issubdtype(arr.dtype, xp.floating) else arr.astype(float)


def _univariate(raw, C, T):
    ct = (C, T)
    out = {"mu_q": _float(raw["mu_q"])}
    out["sigma_q"] = _float(_broadcast(raw["sigma_q"], ct, "sigma_q", "[C,T]"))
    for name in ("prior_mu", "prior_sigma"):
        out[name] = _float(_broadcast(raw[name], ct, name, "[C,T]"))
    obs_sigma = raw.get("obs_sigma", np.ones(()))
    out["obs_sigma"] = _float(_broadcast(obs_sigma, ct, "obs_sigma", "[C,T]"))
    obs = raw["observed"]
    if obs.ndim == 2:  # [T,n]: the same observations at every checkpoint
        obs = obs[None]
    if obs.ndim != 3:
        raise InputError(f"field 'observed': expected shape [C,T,n], got {tuple(obs.shape)}")
    out["observed"] = _float(_broadcast(obs, ct + (int(obs.shape[2]),), "observed", "[C,T,n]"))
    if "z_true" in raw:  # optional: the latent that generated each token's data (calibration)
        out["z_true"] = _float(_broadcast(raw["z_true"], ct, "z_true", "[C,T]"))
    return out


def _multivariate(raw, C, T):
    K = int(raw["mu_q"].shape[2])
    ctk, ctkk = (C, T, K), (C, T, K, K)
    out = {"mu_q": _float(raw["mu_q"])}
    out["cov_q"] = _float(_broadcast(raw["cov_q"], ctkk, "cov_q", "[C,T,K,K]"))
    out["prior_mu"] = _float(_broadcast(raw["prior_mu"], ctk, "prior_mu", "[C,T,K]"))
    out["prior_cov"] = _float(_broadcast(raw["prior_cov"], ctkk, "prior_cov", "[C,T,K,K]"))
    obs_cov = raw.get("obs_cov", np.eye(K))
    out["obs_cov"] = _float(_broadcast(obs_cov, ctkk, "obs_cov", "[C,T,K,K]"))
    obs = raw["observed"]
    if obs.ndim == 3:  # [T,n,K]: the same observations at every checkpoint
        obs = obs[None]
    if obs.ndim != 4:
        raise InputError(f"field 'observed': expected shape [C,T,n,K], got {tuple(obs.shape)}")
    out["observed"] = _float(
        _broadcast(obs, (C, T, int(obs.shape[2]), K), "observed", "[C,T,n,K]")
    )
    if "z_true" in raw:  # optional: the latent that generated each token's data (calibration)
        out["z_true"] = _float(_broadcast(raw["z_true"], ctk, "z_true", "[C,T,K]"))
    return out


def _ragged(raw, observed, C, T, kind, ckpts, tokens):
    """Valid observations first; returns ``(observed, num_obs [C,T])``."""
    n = int(observed.shape[2])
    if n == 0:
        raise InputError("field 'observed': the observation axis n is empty")
    xp = array_namespace(observed)
    if "n_obs" in raw:
        n_obs = np.asarray(raw["n_obs"])
        if n_obs.dtype.kind == "f":
            frac = ~np.isfinite(n_obs) | (n_obs != np.round(n_obs))
            if frac.any():
                idx = _first_index(np.broadcast_to(frac, n_obs.shape))
                raise InputError(f"field 'n_obs': not a whole number, {_where(idx)}")
        n_obs = np.broadcast_to(_broadcast(n_obs, (C, T), "n_obs", "[C,T]"), (C, T)).astype(np.int64)
        bad = (n_obs < 0) | (n_obs > n)
        if bad.any():
            idx = _first_index(bad)
            raise InputError(
                f"field 'n_obs': must be in [0, {n}], {_where(idx, ckpts, tokens)} value {n_obs[idx]}"
            )
        return _fill_padding(observed, n_obs, kind), n_obs
    if "mask" not in raw:
        return observed, np.full((C, T), n, dtype=np.int64)
    mask = raw["mask"]
    mask = _broadcast(mask, (C, T, n), "mask", "[C,T,n]")
    if np.dtype(mask.dtype).kind != "b":
        bad = (mask != 0) & (mask != 1)
        if bool(xp.any(bad)):
            idx = _first_index(bad)
            raise InputError(f"field 'mask': must be 0/1 or boolean, {_where(idx, ckpts, tokens)}")
        mask = mask != 0
    # stable sort puts valid observations first; iid rows make the order irrelevant
    order = xp.argsort(~mask, axis=2, stable=True)
    if kind == "multivariate":
        observed = xp.take_along_axis(observed, order[..., None], axis=2)
    else:
        observed = xp.take_along_axis(observed, order, axis=2)
    # non-finite padding would poison gradients through the masked terms: check valid rows only
    valid = xp.arange(n)[None, None, :] < mask.sum(axis=2)[..., None]
    finite = xp.isfinite(observed) if kind == "univariate" else xp.isfinite(observed).all(-1)
    bad = valid & ~finite
    if bool(xp.any(bad)):
        c, t, j = _first_index(bad)
        orig = int(np.asarray(order)[c, t, j])
        raise InputError(
            f"field 'observed': non-finite value, {_where((c, t, orig), ckpts, tokens)}"
        )
    n_obs = np.asarray(mask.sum(axis=2)).astype(np.int64)
    return _fill_padding(observed, n_obs, kind), n_obs


def _fill_padding(observed, n_obs: np.ndarray, kind: str):
    """Replace slots past each token's count by its last valid observation (0 if none)."""
    xp = array_namespace(observed)
    n = observed.shape[2]
    if (n_obs == n).all():
        return observed
    last = xp.asarray(np.clip(n_obs - 1, 0, n - 1))
    idx = last[..., None, None] if kind == "multivariate" else last[..., None]
    fill = xp.take_along_axis(observed, idx, axis=2)
    fill = xp.where(xp.asarray(n_obs == 0)[..., None, None] if kind == "multivariate"
                    else xp.asarray(n_obs == 0)[..., None], 0.0, fill)
    fill = xp.where(xp.isfinite(fill), fill, 0.0)
    pad = xp.arange(n)[None, None, :] >= xp.asarray(n_obs)[..., None]
    if kind == "multivariate":
        pad = pad[..., None]
    return xp.where(pad, fill, observed)


def _check_values(fields, kind, num_obs, ckpts, tokens):
    for name, arr in fields.items():
        xp = array_namespace(arr)
        if name == "observed":
            pad = xp.arange(arr.shape[2])[None, None, :] >= xp.asarray(num_obs)[..., None]
            finite = xp.isfinite(arr) if kind == "univariate" else xp.isfinite(arr).all(-1)
            bad = ~finite & ~pad
        else:
            bad = ~xp.isfinite(arr)
        if bool(xp.any(bad)):
            idx = _first_index(bad)
            raise InputError(f"field {name!r}: non-finite value (NaN or inf), {_where(idx, ckpts, tokens)}")
    if kind == "univariate":
        for name in ("sigma_q", "prior_sigma", "obs_sigma"):
            arr = fields[name]
            bad = arr <= 0
            if bool(array_namespace(arr).any(bad)):
                idx = _first_index(bad)
                raise InputError(
                    f"field {name!r}: must be > 0, {_where(idx, ckpts, tokens)} value "
                    f"{float(np.asarray(arr[idx]))}"
                )
    else:
        for name in ("cov_q", "prior_cov", "obs_cov"):
            _check_spd(fields[name], name, ckpts, tokens)


def _check_spd(cov, name, ckpts, tokens):
    """Symmetric (to 1e-8 relative) and positive definite (smallest eigenvalue > 0)."""
    xp = array_namespace(cov)
    scale = xp.max(xp.abs(cov), axis=(-2, -1))
    asym = xp.max(xp.abs(cov - xp.swapaxes(cov, -1, -2)), axis=(-2, -1)) > 1e-8 * (1.0 + scale)
    if bool(xp.any(asym)):
        idx = _first_index(asym)
        raise InputError(f"field {name!r}: covariance not symmetric, {_where(idx, ckpts, tokens)}")
    eig_min = xp.linalg.eigvalsh(cov)[..., 0]
    bad = eig_min <= 1e-12 * (1.0 + scale)
    if bool(xp.any(bad)):
        idx = _first_index(bad)
        raise InputError(
            f"field {name!r}: covariance not positive definite, {_where(idx, ckpts, tokens)} "
            f"smallest eigenvalue {float(np.asarray(eig_min[idx])):.3g}"
        )


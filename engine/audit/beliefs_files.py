"""Reading beliefs files (``.npz``, ``.pt``, ``.nc``) into a raw field mapping.

Nothing here validates fields (``engine.audit.beliefs`` does); it only turns every way a file can be
unreadable into one :class:`engine.errors.InputError` line: a missing file, an unsupported
extension, a corrupt archive, or pickled objects, which are refused and never executed
(``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from engine.audit.beliefs import BeliefSet, beliefs_from_arrays, first_duplicate
from engine.errors import InputError

__all__ = ["read_file", "load_beliefs", "concat_checkpoints", "SUFFIXES"]

SUFFIXES = (".npz", ".pt", ".nc")
LABELS = ("checkpoint", "token")


def _read_npz(path: Path) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):
        raise InputError(f"field 'data.path': could not read {path} as .npz (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise InputError(
                f"field 'data.path': {path} holds pickled objects, refused (allow_pickle=False)"
            ) from None
        raise InputError(f"field 'data.path': could not read {path} as .npz ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as err:
        raise InputError(f"field 'data.path': could not read {path} as .npz ({err})") from None


def _read_pt(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise InputError(
                f"field 'data.path': could not read {path} as .pt (not a torch.save zip archive; "
                "corrupt, or a legacy pickle, refused unexecuted)"
            ) from None
        first = str(err).strip().splitlines()
        hint = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise InputError(
            f"field 'data.path': {path} holds pickled objects other than tensors; refused, nothing "
            f"executed (torch.load weights_only=True){': ' + hint if hint else ''}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        msg = " ".join(str(err).split())[:160]
        raise InputError(f"field 'data.path': could not read {path} as .pt ({msg})") from None
    if not isinstance(obj, Mapping):
        raise InputError(
            f"field 'data.path': {path} holds a {type(obj).__name__}, expected a dict of tensors"
        )
    return dict(obj)


def _read_nc(path: Path) -> dict[str, Any]:
    import xarray as xr

    try:
        with xr.open_dataset(path) as ds:
            ds.load()
            out = {name: ds[name].values for name in ds.data_vars}
            for label in LABELS:
                if label in ds.coords and label not in out:
                    out[label] = ds.coords[label].values
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        msg = " ".join(str(err).split())[:160]
        raise InputError(f"field 'data.path': could not read {path} as .nc ({msg})") from None
    return out


_READERS = {".npz": _read_npz, ".pt": _read_pt, ".nc": _read_nc}


def read_file(path) -> dict[str, Any]:
    """Raw field mapping of one beliefs file (no validation beyond being readable)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise InputError(
            f"field 'data.path': unsupported extension {suffix or '(none)'!r} of {path}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise InputError(f"field 'data.path': file not found: {path}")
    return _READERS[suffix](path)


def load_beliefs(paths: str | Path | Sequence[str | Path]) -> BeliefSet:
    """Load one beliefs file, or several (one or more checkpoints each) stacked along C.

    With several files, a file without a checkpoint axis is one checkpoint, labelled by its
    ``checkpoint`` field when present, else by its file stem.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("field 'data.path': no beliefs file given")
    sets = []
    for i, path in enumerate(paths):
        raw = read_file(path)
        if len(paths) > 1 and "checkpoint" not in raw:
            mu = raw.get("mu_q")
            core = 2 if "cov_q" in raw else 1
            if mu is not None and np.ndim(mu) == core:
                raw["checkpoint"] = np.array(path.stem)
        try:
            sets.append(beliefs_from_arrays(raw, source=str(path)))
        except InputError as err:
            raise InputError(f"{err} [in {path.name}]" if len(paths) > 1 else str(err)) from None
    return sets[0] if len(sets) == 1 else concat_checkpoints(sets)


def concat_checkpoints(sets: Sequence[BeliefSet]) -> BeliefSet:
    """Stack belief sets along the checkpoint axis (same kind, tokens and K; n padded)."""
    first = sets[0]
    for i, s in enumerate(sets[1:], start=1):
        if s.kind != first.kind:
            raise InputError(f"field 'mu_q': file {i} holds {s.kind} beliefs, file 0 {first.kind}")
        if s.num_tokens != first.num_tokens or s.dim != first.dim:
            raise InputError(
                f"field 'mu_q': file {i} has {s.num_tokens} tokens of dim {s.dim}, file 0 "
                f"{first.num_tokens} of dim {first.dim}"
            )
        if not np.array_equal(s.tokens, first.tokens):
            raise InputError(f"field 'token': file {i} labels its tokens differently from file 0")
    n = max(s.max_num_obs for s in sets)
    fields = {}
    for name in first.fields:
        parts = []
        for s in sets:
            arr = np.asarray(s.fields[name])
            if name == "observed" and arr.shape[2] < n:
                arr = np.concatenate(
                    [arr, np.repeat(arr[:, :, -1:], n - arr.shape[2], axis=2)], axis=2
                )
            parts.append(arr)
        fields[name] = np.concatenate(parts, axis=0)
    ckpts = np.concatenate([s.checkpoints.astype(str) if any(
        t.checkpoints.dtype.kind in "US" for t in sets) else s.checkpoints for s in sets])
    dup = first_duplicate(ckpts)
    if dup is not None:
        raise InputError(f"field 'checkpoint': duplicate label {ckpts[dup]!r} at index {dup}")
    return replace(
        first,
        fields=fields,
        num_obs=np.concatenate([s.num_obs for s in sets]),
        checkpoints=ckpts,
        source=", ".join(s.source for s in sets),
    )

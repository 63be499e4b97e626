"""Each distinct target posterior of an audit sampled once.

A token's posterior depends only on the template's inputs (prior, observations, noise, the
ragged row count); q does not enter it. Training checkpoints usually leave those inputs
untouched, so an audit of C checkpoints would sample every posterior C times. Here problems are
grouped by the content of their inputs: a BLAKE2b digest over every input's name, dtype, shape
and bytes (and the row count), and, inside every group of equal digests, a bitwise comparison
with the group's first member, so two problems are merged only when every input is identical in
every bit (a digest collision splits the group again; nothing is merged on a hash alone).

The MCMC run of a group (draws, diagnostics) is then shared by every member; what depends on q
(coverage of q's interval, PSIS k-hat of q as a proposal, z_true's rank; KL and W2 on the host)
is still computed per member, from the shared draws, inside the group's on-device summary
(``engine.audit.summary``: the member axis).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = ["TargetGroups", "group_targets", "identity_groups", "expand_rows", "DIGEST_BYTES", "MAX_MEMBERS"]

DIGEST_BYTES = 16
"""BLAKE2b digest size per problem (128 bits)."""

MAX_MEMBERS = 64
"""Most problems sharing one sampled target: a larger group is split (each part sampled), so
the per-member work and memory of a chunk stay bounded."""


@dataclass(frozen=True)
class TargetGroups:
    """Which sampled target each problem's MCMC results come from.

    members
        ``[D, M]`` flat problem indices of each distinct target's members, ascending; unused
        slots repeat the target's first member (so per-member computations stay finite).
    member_mask
        ``[D, M]`` which slots are real members.
    target_of
        ``[P]`` the distinct target of each problem.
    slot_of
        ``[P]`` each problem's slot in its target's row of ``members``.
    """

    members: np.ndarray
    member_mask: np.ndarray
    target_of: np.ndarray
    slot_of: np.ndarray

    @property
    def num_problems(self) -> int:
        return int(self.target_of.size)

    @property
    def num_targets(self) -> int:
        return int(self.members.shape[0])

    @property
    def max_members(self) -> int:
        return int(self.members.shape[1])

    @property
    def first(self) -> np.ndarray:
        """``[D]`` each target's first member (whose inputs are the target's)."""
        return self.members[:, 0]

    @property
    def latest(self) -> np.ndarray:
        """``[D]`` each target's last member: the latest checkpoint's (flat index ``c * T + t``)."""
        return np.where(self.member_mask, self.members, -1).max(axis=1)


def identity_groups(num_problems: int) -> TargetGroups:
    """Every problem its own target (deduplication off)."""
    index = np.arange(num_problems, dtype=np.int64)
    return TargetGroups(index[:, None], np.ones((num_problems, 1), bool), index, np.zeros(num_problems, np.int64))


def _row_bytes(arrays: dict, num_rows) -> tuple[list[np.ndarray], list[bytes]]:
    """Per input: its rows as a ``[P, nbytes]`` uint8 matrix, and its header (name, dtype, shape)."""
    rows, headers = [], []
    items = sorted((str(k), np.asarray(v)) for k, v in arrays.items())
    if num_rows is not None:
        items.append(("__num_rows__", np.asarray(num_rows, np.int64)))
    for name, arr in items:
        arr = np.ascontiguousarray(arr)
        headers.append(f"{name}|{arr.dtype.str}|{arr.shape[1:]}".encode())
        rows.append(arr.reshape(arr.shape[0], -1).view(np.uint8).reshape(arr.shape[0], -1))
    return rows, headers


def _digests(matrix: np.ndarray, header: bytes) -> list[bytes]:
    """BLAKE2b of ``header`` (every input's name, dtype and shape) and each row's bytes."""
    prefix = hashlib.blake2b(header, digest_size=DIGEST_BYTES)
    out = []
    for row in matrix:
        h = prefix.copy()
        h.update(row.tobytes())
        out.append(h.digest())
    return out


def group_targets(arrays: dict, num_rows=None, *, max_members: int = MAX_MEMBERS) -> TargetGroups:
    """Group problems whose inputs are bitwise identical.

    Parameters
    ----------
    arrays
        The template's inputs, name -> ``[P, ...]`` (numpy or JAX; every array the template reads).
    num_rows
        ``[P]`` valid rows of ragged problems (``None``: not ragged); part of the identity.
    max_members
        Largest group; bigger ones are split in order.

    Returns
    -------
    TargetGroups
        Targets in order of their first member.
    """
    rows, headers = _row_bytes(arrays, num_rows)
    matrix = np.concatenate(rows, axis=1)  # [P, bytes of one problem's inputs]
    num = matrix.shape[0]
    first: dict[bytes, int] = {}
    rep = np.array([first.setdefault(d, p) for p, d in enumerate(_digests(matrix, b"\n".join(headers)))],
                   dtype=np.int64).reshape(num)
    # equal digests merge only when every byte is equal too; a collision's rows are regrouped
    # by their exact bytes
    collided = np.flatnonzero(~np.all(matrix == matrix[rep], axis=1)) if num else np.zeros(0, np.int64)
    exact: dict[bytes, int] = {}
    for p in collided:
        rep[p] = exact.setdefault(matrix[p].tobytes(), int(p))
    order = np.argsort(rep, kind="stable")  # members of a group contiguous and ascending
    _, group_start, group_of_sorted = np.unique(rep[order], return_index=True, return_inverse=True)
    position = np.arange(num) - group_start[group_of_sorted]
    part = position // int(max_members)  # groups larger than max_members split in order
    leader = order[group_start[group_of_sorted] + part * int(max_members)]
    leaders, target_sorted = np.unique(leader, return_inverse=True)  # targets by first member
    width = int(min(max_members, np.bincount(target_sorted).max())) if num else 1
    target_of = np.empty(num, np.int64)
    slot_of = np.empty(num, np.int64)
    target_of[order] = target_sorted
    slot_of[order] = position - part * int(max_members)
    members = np.repeat(leaders[:, None], width, axis=1)
    members[target_of, slot_of] = np.arange(num)
    mask = np.zeros(members.shape, bool)
    mask[target_of, slot_of] = True
    return TargetGroups(members, mask, target_of, slot_of)


def expand_rows(summaries: dict, groups: TargetGroups, member_keys) -> dict:
    """Per-target summaries -> per-problem ones: a target's entries are repeated for each of its
    members; entries in ``member_keys`` (``[D, M, ...]``) give each problem its own slot."""
    out = {}
    for key, value in summaries.items():
        value = np.asarray(value)
        if key in member_keys:
            out[key] = value[groups.target_of, groups.slot_of]
        else:
            out[key] = value[groups.target_of]
    return out

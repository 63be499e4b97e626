"""How many problems one compiled chunk holds when the caller does not say (``batch_size=None``).

Two limits, the smaller wins:

- memory: inside a chunk's program every problem's ``[chain, draw]`` values of every constrained
  variable and the seven per-draw statistics exist at once (plus whatever a caller keeps per
  problem, e.g. an audit's draws from q), so 10^5 problems in one chunk would need tens of GB.
  A chunk's per-draw arrays are kept under :data:`CHUNK_MEMORY_BYTES` (8 bytes a value, float32
  runs have twice the headroom);
- speed, on CPU only: small chunks keep their per-draw arrays in the caches and, for NUTS, wait
  for fewer deep trees (every vmapped lane runs to the deepest tree of its chunk). Measured on
  this project's 2-core CPU (``benchmarks/chunk_sizes.py``, w1 and w4, N = 1000, 2 host devices,
  ``benchmarks/results/defaults.md``), chunks of :data:`CPU_PROBLEMS_PER_DEVICE` per device ran
  1.8-3.8x faster than one chunk of all problems (it compiles once: every chunk has the same
  shape). On GPU one big chunk is fastest, so only memory limits it.

Chunks are equal (padding is at most one problem per chunk plus the rounding to a multiple of the
device count), and the result is the same for every chunking up to statistics: problem ``i``
draws from ``fold_in(key, i)`` wherever it lands.
"""

from __future__ import annotations

__all__ = ["CHUNK_MEMORY_BYTES", "CPU_PROBLEMS_PER_DEVICE", "bytes_per_problem", "auto_batch_size"]

CHUNK_MEMORY_BYTES = 1 << 30
"""Memory budget of one chunk's per-draw arrays (draws and sampler statistics): 1 GiB."""

CPU_PROBLEMS_PER_DEVICE = 50
"""Problems per device and chunk on CPU (see the module docstring for the measurement)."""

NUM_DRAW_STATS = 7
"""Per-draw statistics a kernel reports (``SampleStats``' fields)."""


def bytes_per_problem(chains: int, draws: int, values_per_draw: int, extra_bytes: int = 0) -> int:
    """Bytes one problem's per-draw arrays take inside a chunk's program: ``values_per_draw``
    constrained values and :data:`NUM_DRAW_STATS` statistics per (chain, draw), 8 bytes each, plus
    ``extra_bytes`` the caller keeps per problem."""
    return 8 * int(chains) * int(draws) * (int(values_per_draw) + NUM_DRAW_STATS) + int(extra_bytes)


def auto_batch_size(
    num_problems: int,
    *,
    chains: int,
    draws: int,
    values_per_draw: int,
    num_devices: int = 1,
    platform: str = "cpu",
    extra_bytes: int = 0,
    memory_bytes: int = CHUNK_MEMORY_BYTES,
) -> int:
    """Problems per chunk: the fewest equal chunks within the memory budget and, on CPU, within
    :data:`CPU_PROBLEMS_PER_DEVICE` per device.

    Parameters
    ----------
    num_problems
        Problems in the run (>= 1).
    chains, draws
        Chains per problem and draws kept per chain.
    values_per_draw
        Constrained values per draw of one chain (every free variable's and Deterministic's size).
    num_devices
        Devices each chunk is sharded over; the result is a multiple of it where the problems allow.
    platform
        ``"cpu"`` or ``"gpu"``.
    extra_bytes
        Further bytes per problem that live as long as the chunk (e.g. an audit's draws from q).
    memory_bytes
        Budget of one chunk (default :data:`CHUNK_MEMORY_BYTES`).

    Returns
    -------
    int
        ``batch_size`` in ``[1, num_problems]`` (``num_problems`` rounded up to the devices).
    """
    num_devices = max(1, int(num_devices))
    per_problem = bytes_per_problem(chains, draws, values_per_draw, extra_bytes)
    max_size = max(1, int(memory_bytes) // max(per_problem, 1))
    if platform == "cpu":
        max_size = min(max_size, CPU_PROBLEMS_PER_DEVICE * num_devices)
    if max_size >= num_devices:
        max_size -= max_size % num_devices
    num_problems = max(1, int(num_problems))
    num_chunks = -(-num_problems // max_size)
    size = -(-num_problems // num_chunks)
    if size % num_devices and size + num_devices - size % num_devices <= max_size:
        size += num_devices - size % num_devices  # each device gets the same share
    return size

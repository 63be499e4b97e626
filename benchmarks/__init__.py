"""Throughput benchmarks: the engine against a loop of ``pm.sample``, side by side in one run.

Run ``python -m benchmarks.throughput --help``; results land in ``benchmarks/results/``.
"""

import os as _os

# compile time is part of every figure here: measure cold compiles, never programs that a
# previous run left in the engine's persistent compilation cache (engine.platform, item 5)
_os.environ.setdefault("ENGINE_COMPILE_CACHE", "0")

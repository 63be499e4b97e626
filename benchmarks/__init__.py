"""Throughput benchmarks: the engine against a loop of ``pm.sample``, side by side in one run.

Run ``python -m benchmarks.throughput --help``; results land in ``benchmarks/results/``.
"""

"""Simulation-based calibration of the samplers: ``sbc`` (``engine.sbc``: every simulation in
one batched call), ``models`` (its templates), ``report`` (plots and report.md)."""

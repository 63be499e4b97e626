"""Measuring aids shared by the contestants: quality gate, peak memory, CPU time, result rows."""

from __future__ import annotations

import os
import threading

import numpy as np

__all__ = ["GATE", "PeakRSS", "cpu_seconds", "subset_data", "gate_mask", "row_common", "device_peak_mb"]

GATE = {"r_hat_max": 1.01, "ess_bulk_min": 400.0}
"""Quality gate a problem must pass to count: R-hat < 1.01 and bulk ESS >= 400 (all parameters)."""


class PeakRSS:
    """Context manager polling this process's resident set size; ``peak_mb`` when done."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_mb = self.peak_mb = 0.0

    def _poll(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, its threads and its reaped children.

    Beside wall time because the cores may be shared: CPU time is less sensitive to other
    processes' load (though not immune: they also share caches and memory bandwidth).
    """
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def subset_data(data: dict, n: int) -> dict:
    """The first ``n`` problems of a workload's data (arrays or ragged lists)."""
    return {k: (list(v[:n]) if isinstance(v, (list, tuple)) else np.asarray(v)[:n]) for k, v in data.items()}


def gate_mask(r_hat_max: np.ndarray, ess_bulk_min: np.ndarray) -> np.ndarray:
    """``[problem]`` passes the quality gate (NaN fails)."""
    r_hat_max = np.asarray(r_hat_max, dtype=float)
    ess_bulk_min = np.asarray(ess_bulk_min, dtype=float)
    return (r_hat_max < GATE["r_hat_max"]) & (ess_bulk_min >= GATE["ess_bulk_min"])


def device_peak_mb() -> float | None:
    """Accelerator's peak bytes in use so far (process-wide), where the backend reports it."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU backends may not implement it
        return None
    return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"] / 2**20


def row_common(per_problem: dict, n: int, e2e_s: float, run_s: float | None, args) -> dict:
    passed = gate_mask(per_problem["r_hat_max"], per_problem["ess_bulk_min"])
    n_pass = int(passed.sum())
    per_post_e2e = e2e_s / n
    ess = per_problem["ess_bulk_min"][passed]
    return {
        "n": n,
        "n_pass": n_pass,
        "pass_share": n_pass / n,
        "e2e_s": e2e_s,
        "run_s": run_s,
        "posteriors_per_s_e2e": n_pass / e2e_s,
        "posteriors_per_s_run": None if run_s is None else n_pass / run_s,
        "ms_per_posterior_e2e": 1000 * per_post_e2e,
        "ms_per_posterior_run": None if run_s is None else 1000 * run_s / n,
        "min_bulk_ess_median": float(np.median(ess)) if n_pass else None,
        "min_bulk_ess_per_s": float(np.median(ess) / per_post_e2e) if n_pass else None,
        "r_hat_max_worst": float(np.nanmax(per_problem["r_hat_max"])),
        "divergences_total": int(np.sum(per_problem["divergences"])),
        "load_avg_1m": os.getloadavg()[0],
    }



"""Progress of long chunked runs: rate and ETA in the log, one JSON line per event on disk.

An audit of 10^5-10^6 tokens runs for hours in a Hydra job whose terminal nobody watches. After
every chunk :class:`RunLog` appends one JSON object to ``progress.jsonl`` in the run directory
(``event``, ``done``/``total`` problems, ``rate_per_s`` over this session, ``eta_s``, ``rss_mb``
of the process, the chunk's bounds and wall time) and, at most every ``log_every_s`` seconds,
logs one human line (``engine`` logger, which Hydra copies into the job's ``.log`` file). A
resumed run appends a new ``start`` event that says how many problems were already done, so
the file reads as the whole history of the run directory.

Read it with ``pandas.read_json(path, lines=True)``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "read_events"]

log = logging.getLogger("engine")


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class RunLog:
    """Rate, ETA and memory of a chunked run, logged and appended to a JSON-lines file.

    Parameters
    ----------
    path
        The ``.jsonl`` file to append to (``None``: log lines only).
    total
        Problems in the whole run (all chunks, including those done before a resume).
    done
        Problems already finished when this session starts (resumed chunks, other shards).
    unit
        What a problem is called in the log line ("token").
    log_every_s
        Least seconds between two log lines (the JSON file gets every chunk).
    """

    def __init__(self, path: Path | None, total: int, *, done: int = 0, unit: str = "problem",
                 log_every_s: float = 10.0):
        self.path = None if path is None else Path(path)
        self.total = int(total)
        self.done = int(done)
        self.unit = unit
        self.log_every_s = float(log_every_s)
        self._t0 = time.perf_counter()
        self._t_chunk = self._t0
        self._session_done = 0
        self._last_log = -float("inf")

    def _emit(self, event: str, **fields: Any) -> dict:
        record = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "done": self.done,
            "total": self.total,
            "elapsed_s": round(time.perf_counter() - self._t0, 3),
            "rss_mb": _rss_mb(),
            "pid": os.getpid(),
            **fields,
        }
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
                handle.flush()
        return record

    def start(self, **fields: Any) -> None:
        """A session begins (fields: chunks pending, shard, config hash, ...)."""
        self._t0 = self._t_chunk = time.perf_counter()
        self._emit("start", **fields)
        todo = self.total - self.done
        resumed = f" ({self.done} already done)" if self.done else ""
        log.info("sampling %d of %d %ss%s", todo, self.total, self.unit, resumed)

    def chunk(self, start: int, stop: int) -> dict:
        """Chunk ``start:stop`` finished."""
        now = time.perf_counter()
        n = int(stop) - int(start)
        self.done += n
        self._session_done += n
        elapsed = now - self._t0
        rate = self._session_done / elapsed if elapsed > 0 else float("nan")
        left = self.total - self.done
        eta = left / rate if rate > 0 else float("nan")
        record = self._emit(
            "chunk", chunk=[int(start), int(stop)], chunk_s=round(now - self._t_chunk, 3),
            rate_per_s=round(rate, 3), eta_s=round(eta, 1),
        )
        self._t_chunk = now
        if now - self._last_log >= self.log_every_s or left == 0:
            self._last_log = now
            log.info(
                "%d/%d %ss (%.1f%%), %.1f %ss/s, ETA %s, RSS %s MB",
                self.done, self.total, self.unit, 100.0 * self.done / max(self.total, 1), rate,
                self.unit, _duration(eta) if eta == eta else "?", record["rss_mb"],
            )
        return record

    def finish(self, **fields: Any) -> None:
        """The session's chunks are all done."""
        self._emit("finish", **fields)

    def fail(self, error: BaseException) -> None:
        """The session stopped on an exception (the finished chunks are kept). Best effort: on a
        full disk this line cannot be written either, and the original error matters more."""
        try:
            self._emit("error", error=f"{type(error).__name__}: {error}")
        except OSError:
            pass


def read_events(path: Path) -> list[dict]:
    """The events of a ``progress.jsonl`` file, in order (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

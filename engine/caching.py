"""A small least-recently-used cache for compiled things (models, programs, templates).

Keys are values (names, shapes, settings); an entry may also name the object it was built for
(``owner``, e.g. a ``pm.Model`` keyed by its ``id``) and holds it, so the ``id`` cannot be reused
by another object while the entry lives, and a hit is only a hit for that same object.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable


class LRUCache:
    """At most ``max_size`` entries; the least recently used is dropped first."""

    def __init__(self, max_size: int):
        self.max_size = int(max_size)
        self._entries: collections.OrderedDict[Hashable, tuple[Any, Any]] = collections.OrderedDict()

    def get_or_build(self, key: Hashable, build: Callable[[], Any], owner: Any = None) -> Any:
        """The value cached under ``key`` (for ``owner``), built by ``build()`` on a miss."""
        entry = self._entries.get(key)
        if entry is None or entry[0] is not owner:
            entry = (owner, build())
            self._entries[key] = entry
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

"""Object ids: chosen by the client, one space for every connection of the plugin process."""

from __future__ import annotations

import heapq
import threading

from .model import U32_MAX


class IdAllocator:
    """Hands out the smallest free id, starting at 0 as crosvm's client does.

    Ids come back with `free` once the server has destroyed the object (or refused to create
    it), so a long-running plugin that creates and destroys objects never runs out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._free: list[int] = []
        self._live: set[int] = set()

    def alloc(self) -> int:
        with self._lock:
            if self._free:
                ident = heapq.heappop(self._free)
            else:
                if self._next > U32_MAX:
                    raise OverflowError("all 2**32 object ids are in use")
                ident = self._next
                self._next += 1
            self._live.add(ident)
            return ident

    def free(self, ident: int) -> None:
        """Return an id; ids this allocator did not hand out (or already took back) are ignored."""
        with self._lock:
            if ident in self._live:
                self._live.remove(ident)
                heapq.heappush(self._free, ident)

    def is_live(self, ident: int) -> bool:
        with self._lock:
            return ident in self._live

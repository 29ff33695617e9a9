"""Python's cyclic garbage collector during a direct run's start: paused, then on for good.

Importing the supervisor makes about a hundred thousand objects, nearly all of them for the
life of the process. The collector, set off by allocations, scans them some fifty times while
they are made and finds a few hundred to free: several per cent of a run's imports.
So `vmsuper run` pauses it first thing (`pause`, from supervisor/entry.py) and turns it back on
once the imports are made (`resume`, from supervisor/launch.py), with everything made so far
out of its sight (`gc.freeze`): never scanned again, as `vmsuper serve` does for its forks.
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """The collector back on, what exists now frozen; only after `pause` (a caller that never
    paused it, such as a test calling the CLI in its own process, keeps its collector as it
    was)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()

"""Signalling the plugin's shutdown eventfd without ever blocking the event loop.

The plugin holds the same open file as the supervisor (GetShutdownEventfd hands it out), so it
can fill the counter (write 2**64-2): a plain write of 1 would then block until somebody reads
it, which a hostile or dead plugin never does. The file cannot be made non-blocking either:
O_NONBLOCK belongs to the open file, and the plugin's own blocking reads would start failing
with EAGAIN.

So the supervisor polls first: a counter too full to take 1 more is readable, which is all the
signal says ("already signalled"). Otherwise the write goes to a short-lived thread with its
own duplicate of the fd, since the plugin may still fill the counter between the poll and the
write; the loop never waits for that thread, and a thread stuck that way ends with vmsuper.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import threading


class Signalled(enum.Enum):
    WRITING = "writing"  # 1 is being added to the counter (normally done at once)
    ALREADY_FULL = "already full"  # the counter was too full to add to: readable already
    FAILED = "failed"  # no fd left to write with (EMFILE)


def signal_shutdown(eventfd: int) -> Signalled:
    """Add 1 to `eventfd`'s counter without blocking the caller."""
    poller = select.poll()
    poller.register(eventfd, select.POLLOUT)
    if not poller.poll(0):
        return Signalled.ALREADY_FULL
    try:
        copy = os.dup(eventfd)
    except OSError:
        return Signalled.FAILED
    threading.Thread(target=_write_one, args=(copy,), name="shutdown-eventfd", daemon=True).start()
    return Signalled.WRITING


def _write_one(fd: int) -> None:
    try:
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)
    finally:
        os.close(fd)

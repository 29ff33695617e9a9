"""The doorbell of a VCPU's mailbox: the worker's "request posted" to its runner thread and the
runner's "done" back, each a bell in the mailbox's head (`hotpath.c`) plus a pipe.

A bell's waiter sleeps in a read of its pipe and the ring writes it. A pipe rather than an
eventfd: a pipe's write wakes its reader as a synchronous wake-up, the scheduler's hint that
the writer is about to sleep, which lets the woken thread take the writer's CPU; an eventfd's
write gives no such hint. The worker, for one, rings its runner and then sleeps in the read of
its plugin's channel. Two VCPUs of one VM, and the slow plugins' path, took clearly less time
per exit with pipes, the rest as long (`docs/performance.md`, "Two VCPUs, and many VMs, on
two cores").
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
from types import TracebackType
from typing import Final

from vmsuper.shared import abi, hotpath
from vmsuper.shared.shm_mailbox import Mailbox

_BELL_STRIDE: Final = abi.MAIL.offset("done") - abi.MAIL.offset("request")
_U32_MASK: Final = (1 << 32) - 1


class Doorbell:
    """The hand-off of one mailbox: "request posted" (worker -> runner) and "done" (back).

    Each direction is a bell (`hotpath.c`): a sequence number and a "sleeping" flag in the
    mailbox's head, and a pipe to sleep on. A waiter polls the number first, for the
    mailbox's window at that moment (`Mailbox.poll_ns`, which the supervisor's polling gate
    sets, as for the C loops), so a hand-off between two busy processes costs no wake-up; a
    ring writes the pipe only when its waiter sleeps. Each process keeps its own last-seen
    numbers, and each side holds the pipes' ends it uses (`runner_fds`, `worker_fds`): the
    read end of the bell it waits on, the write end of the one it rings. A write end does not
    block: a pipe too full for a ring already holds what wakes its reader.
    """

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox
        self._request_read, self._request_write = _bell_pipe()
        try:
            self._done_read, self._done_write = _bell_pipe()
        except OSError:
            os.close(self._request_read)
            os.close(self._request_write)
            raise
        self.request_bell = mailbox.bells_address()
        self.done_bell = self.request_bell + _BELL_STRIDE
        self.request_seen = ctypes.c_uint32(mailbox.bell_seq(0))
        self.done_seen = ctypes.c_uint32(mailbox.bell_seq(1))
        self.wake_fd = -1
        """The read end of this process's `signal.set_wakeup_fd` pipe, if it has one (a VCPU
        worker): a wait then also ends for a signal that came while it polled, runs the
        handler and waits again, like an interrupted system call (PEP 475)."""
        self._bells: tuple[hotpath.Bell, hotpath.Bell] | None = None
        self._closed = False

    def runner_fds(self) -> tuple[int, int]:
        """The runner's ends: (request bell's read end, done bell's write end)."""
        return self._request_read, self._done_write

    def worker_fds(self) -> tuple[int, int]:
        """The worker's ends: (request bell's write end, done bell's read end)."""
        return self._request_write, self._done_read

    def _bell(self, which: int) -> hotpath.Bell:
        """Bell 0 (request) or 1 (done), made on first use (it needs the compiled module)."""
        if self._bells is None:
            self._bells = (
                hotpath.Bell(self.request_bell, self.request_seen),
                hotpath.Bell(self.done_bell, self.done_seen),
            )
        return self._bells[which]

    def ring_request(self) -> None:
        self._bell(0).ring(self._request_write)

    def wait_request(self) -> int:
        """Block until a request is posted; the number of rings since the last wait. Raises
        InterruptedError if a signal came while it slept."""
        return self._wait(self._bell(0), self._request_read)

    def ring_done(self, worker_pidfd: int = -1) -> None:
        """Ring "done" (a worker asleep in the read of its plugin's channel is woken through
        `worker_pidfd`, its pidfd: see `hotpath.Bell.ring`)."""
        self._bell(1).ring(self._done_write, worker_pidfd)

    def wait_done(self) -> int:
        return self._wait(self._bell(1), self._done_read)

    def _wait(self, bell: hotpath.Bell, read_end: int) -> int:
        before = bell.seen.value
        while True:
            try:
                bell.wait(read_end, self._mailbox.poll_ns, self.wake_fd)
                return (bell.seen.value - before) & _U32_MASK
            except InterruptedError:
                if self.wake_fd < 0:
                    raise
                drain_wakeup_pipe(self.wake_fd)  # the handlers run before the next wait

    def leave_runner_ends(self) -> None:
        """In a worker whose other fds were closed: forget the runner's ends (their numbers may
        name other files by now), so that nothing there uses or closes them."""
        self._request_read = self._done_write = -1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in (self._request_read, self._request_write, self._done_read, self._done_write):
                if fd >= 0:
                    os.close(fd)

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _bell_pipe() -> tuple[int, int]:
    """A bell's pipe: (read end, blocking; write end, non-blocking), both close-on-exec.

    One page is room enough (a ring is a byte), and every page of a pipe counts against its
    user's quota (`/proc/sys/fs/pipe-user-pages-soft`), which the channels' enlarged pipes
    need (`wire.enlarge_pipe`): a new pipe has sixteen.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1)  # rounded up to one page
        os.set_blocking(write_end, False)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    return read_end, write_end


def drain_wakeup_pipe(fd: int) -> None:
    """Empty a non-blocking `signal.set_wakeup_fd` pipe (Python already noted the signals);
    nothing for -1 (no pipe)."""
    if fd < 0:
        return
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 256):
            pass

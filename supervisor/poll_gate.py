"""Whether the VCPUs' runners and workers may poll now: on only while the host has CPU to spare.

Polling (`[vm] poll_us`) saves a wake-up per hand-off when a core is free to run the thread
being waited for; when the host has more runnable threads than cores, the poller takes the
very CPU that thread needs, and every VM polling makes every VM slower. The kernel says which
case holds: its CPU pressure (`/proc/pressure/cpu`, "some": the share of time at least one
runnable task waited for a CPU). So the supervisor samples that share every `INTERVAL` and
writes each VCPU's polling window into its mailbox (`Mailbox.poll_ns`), which the C loops read
at every wait: the configured window while the pressure stays below `THRESHOLD`, 0 above it.
The gate is made with the VM's VCPU set and first decides when the VCPUs start, before any of
them polls, from the pressure while the VM was set up: a VM that starts on a host already
busy does not poll at all until the host is calm.

Each reading wakes the supervisor, and on a busy host that wake-up takes a CPU from the VCPUs.
So the gate reads every `INTERVAL_S` only while the pressure lets the VCPUs poll; while it has
polling off, it reads just twice per hold, at its end (a baseline, then the decision), and a
host that stays busy doubles the hold, so that a VM among many on a busy host is read about once
a `HOLD_MAX_S`.

A VM's own busy VCPUs can be what keeps the host busy: two VCPUs that exit all the time, on two
CPUs, are six busy threads (a runner, a worker and a plugin thread each), and their pressure
turns polling off at every reading, after each hold's try has cost a spell of four pollers
taking turns at two CPUs. So at each reading the gate also counts the VM's busy VCPUs (a VCPU
is busy when its exits since the last reading, each worth a polling window, add up to
`BUSY_SHARE` of the time between the readings or more), and while two pollers per busy VCPU
would outnumber the supervisor's CPUs, the window is 0 without a try: the VM runs as with
`poll_us = 0`. Other VMs' busy VCPUs count too: each gate writes its VM's count to the user's
board (supervisor/busy_board.py) and adds the other runs' counts to its own, so K one-VCPU VMs
busy at once on fewer than 2K CPUs stop polling once the others' counts are on the board, and
one that starts while they are does not poll at all.

A reading can count busy VCPUs only over an interval they spent exiting, and their first exits
come when the plugin has started them, some milliseconds after the VCPUs start: until a reading
whose interval began after their first exits, the VCPUs are starting (`QuietVcpus`). While
they are, the gate takes every one of them for busy (room only if two pollers for each, with
the other runs' busy VCPUs, fit the CPUs), and while that alone keeps polling off it reads every
`FIRST_INTERVAL_S`: a VM whose VCPUs would fill the CPUs does not poll at its start, and one
that has room after all polls from its first whole interval of exits, a few milliseconds in.
Other VMs keep the usual pace: short intervals make the pressure's share a noisy figure, and
the first exits of a lone VCPU, among its plugin's and the supervisor's start, would turn its
polling off for a hold now and then.

A VM whose VCPUs make no exits (stopped by the plugin, halted, or waiting on a device) has no
hand-off to poll for, so a reading decides nothing for it; yet at 40 readings a second, many
such VMs would each keep a CPU awake. So from the second reading in a row that finds no exit
since the one before, each doubles the wait for the next (`QuietVcpus`), from `INTERVAL_S` up
to `QUIET_MAX_S`, and one exit brings it back. A VM that wakes on a busy host then polls for
that wait at most, never for longer than it was quiet.

`PollPolicy` is the pressure's decision, fed readings and returning the window, `BusyVcpus` and
`QuietVcpus` the counts', fed exit counts (no I/O, each tested alone); `PollGate` is the shell:
the file, the board, the counts and the mailboxes; the supervisor's event loop ticks it when
the last tick said.
Without the file (a kernel without PSI) the window stays as configured.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Final

from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.supervisor.busy_board import BusyBoard

__all__ = [
    "BUSY_SHARE",
    "FIRST_INTERVAL_S",
    "HOLD_MAX_S",
    "HOLD_MIN_S",
    "INTERVAL_S",
    "QUIET_MAX_S",
    "STARTING_READINGS_MAX",
    "THRESHOLD",
    "BusyVcpus",
    "PollGate",
    "PollPolicy",
    "QuietVcpus",
]

PRESSURE_FILE: Final = "/proc/pressure/cpu"
INTERVAL_S: Final = 0.025
FIRST_INTERVAL_S: Final = 0.005
"""The readings come sooner while the VCPUs start: a host that became busy just as they started
(or that their polling makes busy) has them poll for a few milliseconds only."""
STARTING_READINGS_MAX: Final = 40
"""At most this many readings take the VCPUs for starting (0.2 s of readings at
FIRST_INTERVAL_S): VCPUs that compute without exits, or wait that long for their plugin, are
then judged by their count like any others, at the usual pace."""
THRESHOLD: Final = 0.5
"""Stall share above which polling stops: half the time, some task waited for a CPU."""
BUSY_SHARE: Final = 0.5
"""A VCPU is busy when its exits since the last reading, each worth a polling window, add up to
this share of the time between the readings or more: its pollers would be on a CPU about that
much of the time."""
HOLD_MIN_S: Final = 0.05
HOLD_MAX_S: Final = 1.6
"""How long polling stays off before it is tried again: doubled each time a try finds the host
still busy (from HOLD_MIN_S, at most HOLD_MAX_S), back to HOLD_MIN_S once the host is calm."""
QUIET_MAX_S: Final = 0.4
"""The longest wait between two readings while the VM's VCPUs make no exits."""
BOARD_STALE_S: Final = 2 * max(HOLD_MAX_S, QUIET_MAX_S)
"""Another run's count on the board is ignored once older than this: twice the longest wait
between two of its gate's readings (its writes), so that only a run gone without clearing its
slot stops counting."""


class PollPolicy:
    """The decision: fed the kernel's cumulative stall time, says the polling window now, and
    when it needs its next reading.

    Polling goes off as soon as one interval's stall share passes THRESHOLD. It stays off for
    a hold, and after the hold only if the host is calm (with polling off, pressure comes from
    others); then it goes back on. Every stop, and every hold's end that finds the host still
    busy, doubles the hold (up to HOLD_MAX_S), so a host that stays busy sees a short try, and
    a reading, every HOLD_MAX_S at most.
    """

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self.polling = window_ns > 0
        self._last: tuple[float, int] | None = None
        self._hold = HOLD_MIN_S
        self._off_until = 0.0

    def update(self, now: float, stall_us: int) -> int:
        """The window (ns) after a reading of the cumulative stall time `stall_us` at `now`
        (seconds, monotonic)."""
        last, self._last = self._last, (now, stall_us)
        if self.window_ns == 0 or last is None or now <= last[0]:
            return self.current()
        share = (stall_us - last[1]) / ((now - last[0]) * 1e6)
        busy = share > THRESHOLD
        if self.polling and busy:
            self.polling = False
            self._off_until = now + self._hold
            self._hold = min(self._hold * 2, HOLD_MAX_S)
        elif not self.polling and now >= self._off_until:
            if busy:
                self._off_until = now + self._hold
                self._hold = min(self._hold * 2, HOLD_MAX_S)
            else:
                self.polling = True
        elif self.polling and now >= self._off_until + self._hold:
            self._hold = HOLD_MIN_S  # calm for a whole hold since polling came back
        return self.current()

    def current(self) -> int:
        return self.window_ns if self.polling else 0

    def next_reading(self, now: float) -> float:
        """When the next reading is due (monotonic seconds): every INTERVAL_S while polling;
        while off, one interval before the hold ends (the baseline) and at its end."""
        if self.polling or self.window_ns == 0:
            return now + INTERVAL_S
        return max(now + INTERVAL_S, self._off_until - INTERVAL_S)


class BusyVcpus:
    """Whether the host's busy VCPUs, the VM's own and `others`, leave a CPU for each of their
    pollers (a runner and a worker each): fed every VCPU's count of exits so far, at each
    reading (see the module doc). Room until a reading finds otherwise; a VM none of whose
    VCPUs is busy has nothing to poll for often, and always has room."""

    def __init__(self, window_ns: int, cpus: int) -> None:
        self.window_ns = window_ns
        self.cpus = cpus
        self.room = True
        self.count = 0
        """The VM's busy VCPUs at the last reading."""
        self._last: tuple[float, list[int]] | None = None

    def update(
        self, now: float, exits: Sequence[int], others: int = 0, *, starting: bool = False
    ) -> bool:
        """Whether there is room after a reading of every VCPU's exits so far at `now`, with
        `others` busy VCPUs in other VMs; `starting` (see `QuietVcpus`): the interval is not
        one of exits throughout, so every VCPU counts as busy."""
        last, self._last = self._last, (now, list(exits))
        if starting:
            self.room = self.window_ns == 0 or self.fits(len(exits), others)
        if self.window_ns == 0 or last is None or now <= last[0]:
            return self.room
        bar_ns = BUSY_SHARE * (now - last[0]) * 1e9
        self.count = sum(
            (count - before) * self.window_ns >= bar_ns
            for before, count in zip(last[1], exits, strict=True)
        )
        if not starting:
            self.room = self.count == 0 or self.fits(self.count, others)
        return self.room

    def fits(self, vcpus: int, others: int = 0) -> bool:
        """Whether two pollers for each of `vcpus` busy VCPUs and `others` fit the CPUs."""
        return 2 * (vcpus + others) <= self.cpus


class QuietVcpus:
    """How long the next reading may wait, fed every VCPU's count of exits so far at each
    reading: INTERVAL_S while they exit; after the second reading in a row that finds no exit
    since the one before, twice as long at each, up to QUIET_MAX_S (see the module doc).

    VCPUs that had made no exit by the last reading are `starting`, not quiet: the interval
    since then is not yet one of exits throughout, so the busy count it gives is not their
    pace. `BusyVcpus` takes each of them for busy then, and `PollGate` reads them again after
    the wait returned, FIRST_INTERVAL_S (STARTING_READINGS_MAX times at most), if that keeps
    them from polling."""

    def __init__(self) -> None:
        self.quiet_readings = 0
        self.starting = True
        self._starting_readings = 0
        self._last: list[int] | None = None

    def update(self, exits: Sequence[int]) -> float:
        """The wait (seconds) after a reading of every VCPU's exits so far."""
        counts = list(exits)
        if self._last is not None and counts == self._last and any(counts):
            self.quiet_readings = min(self.quiet_readings + 1, 16)
        else:
            self.quiet_readings = 0
        self.starting = (self._last is None or not any(self._last)) and (
            self._starting_readings < STARTING_READINGS_MAX
        )
        self._starting_readings += self.starting
        self._last = counts
        if self.starting:
            return FIRST_INTERVAL_S
        if self.quiet_readings == 0:
            return INTERVAL_S
        return min(INTERVAL_S * 2 ** (self.quiet_readings - 1), QUIET_MAX_S)


def read_stall_us(fd: int) -> int:
    """The "some" line's total (µs) of a /proc/pressure file open at `fd`."""
    text = os.pread(fd, 256, 0).decode("ascii", "replace")
    for word in text.split("\n", 1)[0].split():
        if word.startswith("total="):
            return int(word[6:])
    raise ValueError(f"no total in {text!r}")


class PollGate:
    """The VCPUs' polling windows, set from the host's CPU pressure and the VM's busy VCPUs (see
    the module doc)."""

    def __init__(
        self,
        mailboxes: Sequence[Mailbox],
        window_ns: int,
        *,
        exits: Callable[[], Sequence[int]] | None = None,
        cpus: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        pressure_file: str = PRESSURE_FILE,
        board_file: str | None = None,
    ) -> None:
        """`exits`: every VCPU's count of exits so far, in mailbox order (None: not counted);
        `cpus`: how many CPUs the VCPUs' threads may run on (None: this process's);
        `board_file`: the busy VCPUs' board shared with other runs (None: none; with `exits`
        only)."""
        self._mailboxes = list(mailboxes)
        self.policy = PollPolicy(window_ns)
        self.busy = BusyVcpus(window_ns, cpus if cpus is not None else len(os.sched_getaffinity(0)))
        self.quiet = QuietVcpus()
        self._exits = exits
        self._clock = clock
        self._fd = -1
        self._board: BusyBoard | None = None
        if window_ns > 0:
            with contextlib.suppress(OSError):
                self._fd = os.open(pressure_file, os.O_RDONLY | os.O_CLOEXEC)
        if self._fd >= 0 and exits is not None and board_file is not None:
            self._board = BusyBoard.open(board_file, stale_ns=int(BOARD_STALE_S * 1e9))
        self._set(self.policy.current())
        self.tick()  # the baseline of the first interval

    @property
    def active(self) -> bool:
        """False when there is nothing to decide: polling is off, or the kernel has no PSI."""
        return self._fd >= 0

    def tick(self) -> float | None:
        """Take a reading and set the windows; returns when the next reading is due (the
        gate's clock), None once there is nothing more to decide (see `active`)."""
        if self._fd < 0:
            return None
        try:
            stall = read_stall_us(self._fd)
        except (OSError, ValueError):
            self.close()  # unreadable now: keep polling as configured
            self._set(self.policy.window_ns)
            return None
        now = self._clock()
        window = self.policy.update(now, stall)
        exits = self._exits() if self._exits is not None else None
        wait, held_starting = 0.0, False
        if exits is not None:
            others = self._board.others() if self._board is not None else 0
            wait = self.quiet.update(exits)
            room = self.busy.update(now, exits, others, starting=self.quiet.starting)
            held_starting = self.quiet.starting and not room and self.policy.polling
            if not room:
                window = 0
            if self._board is not None:
                self._board.publish(self.busy.count)
        if window != self._window:
            self._set(window)
        if held_starting:
            return now + wait  # sooner: only the VCPUs' start holds polling off
        due = self.policy.next_reading(now)
        return due if exits is None else max(due, now + wait)

    def _set(self, window_ns: int) -> None:
        self._window = window_ns
        for mailbox in self._mailboxes:
            mailbox.poll_ns = window_ns

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._board is not None:
            self._board.close()
            self._board = None

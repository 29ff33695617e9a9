"""The run's clock: its time limit, and VCPUs that wait on the plugin far too long.

A plugin thread that died leaves its VCPU in an exit nobody answers; a plugin that serves only
some VCPUs leaves the others in Init, and no VCPU runs until all have left it. Both look like a
run that does nothing. The supervisor's event loop asks this module, between wake-ups, whether
the time limit is over and whether a VCPU has waited longer than `[vm] stall_warning`.

Nothing is added to the per-exit path: the watchdog only reads what already lies in shared
memory. A worker's run state says whether it waits on the plugin, and its mailbox's request
bell (bumped for every `KVM_RUN` and every ioctl the worker asks for, in C and in Python alike)
says whether it made any progress since the last look; the pending exit itself is read from
the supervisor's own mapping of the VCPU's `kvm_run` page, which KVM leaves alone while the
VCPU is out of the guest. A wait is thus timed from the first look that saw it, a fraction of
the threshold late at most.

`StallWatch` is the logic alone, fed samples and a clock, so it is tested without KVM.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

from vmsuper.shared import kvm
from vmsuper.shared.abi import RunState
from vmsuper.shared.shm import SharedRegion

__all__ = [
    "Sample",
    "Stall",
    "StallWatch",
    "StillInInit",
    "check_period",
    "describe_exit",
    "read_sample",
]

MAX_CHECK_PERIOD = 0.5
"""Seconds between two looks at the VCPUs, at most (a quarter of the threshold when lower)."""


class Phase(enum.Enum):
    """What a sample says a VCPU is doing, as far as the watchdog cares."""

    INIT = "init"
    """Not yet resumed from Init (or its worker has not started serving)."""
    WAITING = "waiting"
    """Out of the guest, waiting for the plugin's answer to an exit."""
    OTHER = "other"
    """In the guest, held at the start barrier, or stopped: no plugin wait."""


class Sample(NamedTuple):
    """One look at one VCPU: its phase, its progress mark and, when waiting, its exit."""

    phase: Phase
    progress: int
    exit: str = ""


class Stall(NamedTuple):
    """VCPU `vcpu` has waited `waited` seconds for the plugin to answer `exit`."""

    vcpu: int
    exit: str
    waited: float

    def message(self) -> str:
        return (
            f"VCPU {self.vcpu} has waited {self.waited:.1f} s for the plugin to answer {self.exit}"
        )


class StillInInit(NamedTuple):
    """These VCPUs have not been resumed from Init `waited` seconds after Start."""

    vcpus: tuple[int, ...]
    waited: float

    def message(self) -> str:
        which = ", ".join(str(v) for v in self.vcpus)
        noun = "VCPU" if len(self.vcpus) == 1 else "VCPUs"
        return (
            f"{noun} {which} still in Init {self.waited:.1f} s after Start: the plugin has not"
            " resumed them, and no VCPU enters the guest until every one has"
        )


class _Wait:
    """A wait seen in progress: since when, and whether it was warned about."""

    __slots__ = ("key", "since", "warned")

    def __init__(self, key: tuple[Phase, int], since: float, warned: bool = False) -> None:
        self.key = key
        self.since = since
        self.warned = warned


class StallWatch:
    """Turns samples taken over time into warnings: one per stall, never a flood."""

    __slots__ = ("_init_warned", "_waits", "started", "threshold")

    def __init__(self, threshold: float, started: float) -> None:
        self.threshold = threshold
        self.started = started
        self._waits: dict[int, _Wait] = {}
        self._init_warned = False

    def observe(self, samples: Sequence[Sample], now: float) -> list[Stall | StillInInit]:
        """Warnings due at `now`, given one sample per VCPU (index = VCPU)."""
        found: list[Stall | StillInInit] = []
        for vcpu, sample in enumerate(samples):
            key = (sample.phase, sample.progress)
            wait = self._waits.get(vcpu)
            if sample.phase is not Phase.WAITING:
                self._waits.pop(vcpu, None)
                continue
            if wait is None or wait.key != key:
                self._waits[vcpu] = wait = _Wait(key, now)
            waited = now - wait.since
            if not wait.warned and waited >= self.threshold:
                wait.warned = True
                found.append(Stall(vcpu, sample.exit, waited))
        in_init = tuple(v for v, s in enumerate(samples) if s.phase is Phase.INIT)
        since_start = now - self.started
        if in_init and not self._init_warned and since_start >= self.threshold:
            self._init_warned = True
            found.append(StillInInit(in_init, since_start))
        return found


def check_period(threshold: float) -> float:
    return min(MAX_CHECK_PERIOD, threshold / 4)


_IO_DIRECTIONS = {kvm.KVM_EXIT_IO_IN: "read", kvm.KVM_EXIT_IO_OUT: "write"}


def describe_exit(run: kvm.kvm_run) -> str:
    """The exit a VCPU waits on, in words: what, where (hex), how big, which way."""
    reason = run.exit_reason
    if reason == kvm.KVM_EXIT_IO:
        io = run.io
        way = _IO_DIRECTIONS.get(io.direction, f"direction {io.direction}")
        count = f" x {io.count}" if io.count != 1 else ""
        return f"an I/O port {way} at {io.port:#x} ({io.size} bytes{count})"
    if reason == kvm.KVM_EXIT_MMIO:
        mmio = run.mmio
        way = "write" if mmio.is_write else "read"
        return f"an MMIO {way} at {mmio.phys_addr:#x} ({mmio.len} bytes)"
    if reason == kvm.KVM_EXIT_INTR:
        return "a pause (Wait{User})"
    if reason == kvm.KVM_EXIT_HYPERV:
        return "a Hyper-V exit"
    return f"an exit with reason {reason}"


def read_sample(region: SharedRegion, vcpu: int, run: kvm.kvm_run | None) -> Sample:
    """One look at VCPU `vcpu`, from shared memory and its run page (None: not mapped)."""
    state = region.slot(vcpu).run_state
    progress = region.mailbox(vcpu).bell_seq(0)
    if state in (RunState.NOT_STARTED, RunState.INIT):
        return Sample(Phase.INIT, progress)
    if state in (RunState.WAITING_PLUGIN, RunState.PAUSED) and run is not None:
        exit_ = describe_exit(run)
        # The bell moved while the page was read: the exit may not be this one; look again.
        if region.mailbox(vcpu).bell_seq(0) == progress:
            return Sample(Phase.WAITING, progress, exit_)
    return Sample(Phase.OTHER, progress)


class Watchdog:
    """The clock of one run: when to look next, whether time is up, which VCPUs stall."""

    def __init__(
        self, region: SharedRegion, *, timeout: float, stall_after: float, now: float
    ) -> None:
        self.timeout = timeout
        self._region = region
        self._timeout_at = now + timeout if timeout > 0 else None
        self._stall_after = stall_after
        self._watch: StallWatch | None = None
        self._runs: Sequence[kvm.kvm_run | None] = ()
        self._next_look: float | None = None

    def vcpus_started(self, runs: Sequence[kvm.kvm_run | None], now: float) -> None:
        """Start watching the VCPUs (their run pages, in VCPU order) from `now` on."""
        if self._stall_after <= 0:
            return
        self._watch = StallWatch(self._stall_after, now)
        self._runs = runs
        self._next_look = now + check_period(self._stall_after)

    def stop(self) -> None:
        """Nothing more to watch (the run is shutting down)."""
        self._timeout_at = self._next_look = None
        self._watch = None
        self._runs = ()

    def wake_in(self, now: float) -> float | None:
        """Seconds until the watchdog needs a look, None when it needs none."""
        times = [t for t in (self._timeout_at, self._next_look) if t is not None]
        return max(0.0, min(times) - now) if times else None

    def timed_out(self, now: float) -> bool:
        return self._timeout_at is not None and now >= self._timeout_at

    def stalls(self, now: float) -> list[Stall | StillInInit]:
        """New warnings, if a look is due (each stall is reported once)."""
        if self._watch is None or self._next_look is None or now < self._next_look:
            return []
        self._next_look = now + check_period(self._stall_after)
        samples = [read_sample(self._region, i, run) for i, run in enumerate(self._runs)]
        return self._watch.observe(samples, now)

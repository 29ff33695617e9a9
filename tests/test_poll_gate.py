"""The polling gate: polling only while the host's CPU pressure leaves CPU to spare."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.supervisor import poll_gate
from vmsuper.supervisor.busy_board import BusyBoard
from vmsuper.supervisor.poll_gate import (
    HOLD_MAX_S,
    HOLD_MIN_S,
    QUIET_MAX_S,
    STARTING_READINGS_MAX,
    BusyVcpus,
    PollGate,
    PollPolicy,
    QuietVcpus,
)

WINDOW = 50_000
STEP = poll_gate.INTERVAL_S
FIRST = poll_gate.FIRST_INTERVAL_S


class Host:
    """A clock and the kernel's cumulative stall time, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.stall_us = 0

    def advance(self, share: float, seconds: float = STEP) -> None:
        self.now += seconds
        self.stall_us += int(share * seconds * 1e6)

    def feed(self, policy: PollPolicy, share: float, seconds: float = STEP) -> int:
        self.advance(share, seconds)
        return policy.update(self.now, self.stall_us)


def test_polling_stays_on_while_the_host_is_calm() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    assert policy.update(host.now, host.stall_us) == WINDOW  # the first reading: a baseline
    for _ in range(100):
        assert host.feed(policy, 0.3) == WINDOW


def test_pressure_stops_polling_for_a_hold_then_it_is_tried_again() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    assert host.feed(policy, 0.9) == 0
    # Off for the hold, whatever the readings say meanwhile.
    assert host.feed(policy, 0.0, HOLD_MIN_S / 2) == 0
    assert host.feed(policy, 0.0, HOLD_MIN_S / 2) == WINDOW


def test_a_host_that_stays_busy_keeps_polling_off() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    assert host.feed(policy, 1.0) == 0
    for _ in range(200):  # others keep the CPUs busy: never back on
        assert host.feed(policy, 0.8) == 0


def test_each_failed_try_doubles_the_hold_up_to_its_bound() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    holds = []
    for _ in range(8):
        assert host.feed(policy, 1.0) == 0  # polling made the host busy again
        off = 0.0
        while host.feed(policy, 0.0) == 0:
            off += STEP
        holds.append(off)
    assert holds[0] < holds[1] < holds[2]
    assert HOLD_MIN_S - STEP <= holds[0] <= HOLD_MIN_S + STEP
    assert all(hold <= HOLD_MAX_S + STEP for hold in holds)
    assert holds[-1] >= HOLD_MAX_S - 2 * STEP


def test_a_calm_spell_resets_the_hold() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    for _ in range(4):  # grow the hold
        host.feed(policy, 1.0)
        while host.feed(policy, 0.0) == 0:
            pass
    for _ in range(int(HOLD_MAX_S / STEP) + 2):  # calm, polling on, for over a hold
        assert host.feed(policy, 0.1) == WINDOW
    assert host.feed(policy, 1.0) == 0
    off = 0.0
    while host.feed(policy, 0.0) == 0:
        off += STEP
    assert off <= HOLD_MIN_S + STEP


def follow(host: Host, policy: PollPolicy, share: float, seconds: float) -> list[int]:
    """`seconds` of a host at `share`, read only when the policy asks: each reading's window."""
    end = host.now + seconds
    windows = []
    while (due := policy.next_reading(host.now)) <= end:
        host.advance(share, due - host.now)
        windows.append(policy.update(host.now, host.stall_us))
    host.advance(share, end - host.now)
    return windows


def test_while_polling_the_host_is_read_every_interval() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    windows = follow(host, policy, 0.2, 100 * STEP)
    assert set(windows) == {WINDOW} and len(windows) == pytest.approx(100, abs=1)


def test_a_host_that_stays_busy_is_read_less_and_less_often() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    readings = follow(host, policy, 0.9, 20.0)
    assert set(readings) == {0}
    # Read every interval, that would be 800 readings; each hold's end takes two, and the
    # holds double up to HOLD_MAX_S: about two a HOLD_MAX_S once grown.
    assert len(readings) <= 2 * (20.0 / HOLD_MAX_S + 6)
    # Each hold's end still decides: once the host is calm, polling is back within a hold.
    assert follow(host, policy, 0.1, HOLD_MAX_S + STEP)[-1] == WINDOW


def test_when_polling_is_off_the_two_readings_come_at_the_hold_s_end() -> None:
    host, policy = Host(), PollPolicy(WINDOW)
    policy.update(host.now, host.stall_us)
    assert host.feed(policy, 1.0) == 0  # off at host.now, for HOLD_MIN_S
    off_at = host.now
    assert policy.next_reading(host.now) == pytest.approx(
        max(off_at + STEP, off_at + HOLD_MIN_S - STEP)
    )
    host.advance(0.9, HOLD_MIN_S - STEP)
    assert policy.update(host.now, host.stall_us) == 0  # the baseline: no decision yet
    assert policy.next_reading(host.now) == pytest.approx(off_at + HOLD_MIN_S)
    host.advance(0.9, STEP)
    assert policy.update(host.now, host.stall_us) == 0  # still busy: a longer hold
    assert policy.next_reading(host.now) == pytest.approx(host.now + 2 * HOLD_MIN_S - STEP)


def test_no_window_means_no_polling_whatever_the_host() -> None:
    host, policy = Host(), PollPolicy(0)
    for share in (0.0, 1.0, 0.0):
        assert host.feed(policy, share) == 0


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    shared = SharedRegion.create(2)
    yield shared
    shared.close()


def _pressure(path: Path, total: int) -> None:
    path.write_text(
        f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )


def _gate(
    region: SharedRegion, pressure: Path, host: Host, **kwargs: Any
) -> tuple[PollGate, list[Mailbox]]:
    """A gate over two VCPUs' mailboxes, reading `pressure` (calm so far) at `host`'s clock."""
    _pressure(pressure, host.stall_us)
    mailboxes = [region.mailbox(0), region.mailbox(1)]
    gate = PollGate(
        mailboxes, WINDOW, clock=lambda: host.now, pressure_file=str(pressure), **kwargs
    )
    return gate, mailboxes


def _tick_after(
    gate: PollGate, pressure: Path, host: Host, share: float, seconds: float
) -> float | None:
    """The gate's reading `seconds` on, `share` of them stalled."""
    host.advance(share, seconds)
    _pressure(pressure, host.stall_us)
    return gate.tick()


def test_the_gate_writes_every_vcpu_s_window_from_the_file(
    region: SharedRegion, tmp_path: Path
) -> None:
    pressure = tmp_path / "cpu"
    host = Host()
    gate, mailboxes = _gate(region, pressure, host)
    try:
        assert gate.active  # and its first reading, a baseline, is taken
        assert [m.poll_ns for m in mailboxes] == [WINDOW, WINDOW]
        host.advance(0.95)
        _pressure(pressure, host.stall_us)
        assert gate.tick() == pytest.approx(host.now + HOLD_MIN_S - STEP)  # when it reads next
        assert [m.poll_ns for m in mailboxes] == [0, 0]
        host.advance(0.0, HOLD_MIN_S)
        _pressure(pressure, host.stall_us)
        assert gate.tick() == pytest.approx(host.now + STEP)
        assert [m.poll_ns for m in mailboxes] == [WINDOW, WINDOW]
    finally:
        gate.close()


def test_without_pressure_figures_the_window_stays_as_configured(
    region: SharedRegion, tmp_path: Path
) -> None:
    mailbox = region.mailbox(0)
    gate = PollGate([mailbox], WINDOW, pressure_file=str(tmp_path / "absent"))
    assert not gate.active and mailbox.poll_ns == WINDOW
    assert gate.tick() is None  # nothing to decide: no more readings
    assert mailbox.poll_ns == WINDOW
    garbled = tmp_path / "garbled"
    garbled.write_text("nothing here\n")
    mailbox.poll_ns = 0
    gate = PollGate([mailbox], WINDOW, pressure_file=str(garbled))
    # Its first reading fails: the gate gives up and leaves polling as configured.
    assert not gate.active and mailbox.poll_ns == WINDOW


def test_the_host_s_pressure_file_reads() -> None:
    fd = os.open(poll_gate.PRESSURE_FILE, os.O_RDONLY)
    try:
        first = poll_gate.read_stall_us(fd)
        assert first >= 0 and poll_gate.read_stall_us(fd) >= first
    finally:
        os.close(fd)


def test_two_pollers_per_busy_vcpu_must_fit_the_cpus() -> None:
    """A VCPU is busy when its exits, each worth a window, fill half the interval or more;
    polling needs a CPU for each busy VCPU's runner and worker."""
    busy_exits = int(poll_gate.BUSY_SHARE * STEP * 1e9 / WINDOW) + 1  # just over the bar
    busy = BusyVcpus(WINDOW, cpus=2)
    assert busy.update(100.0, [0, 0])  # the first reading: a baseline, room as before
    assert not busy.update(100.0 + STEP, [busy_exits, busy_exits])
    assert busy.update(100.0 + 2 * STEP, [2 * busy_exits, busy_exits])  # one went quiet
    assert busy.update(100.0 + 3 * STEP, [2 * busy_exits + busy_exits // 2, busy_exits + 5])
    four_cpus = BusyVcpus(WINDOW, cpus=4)
    four_cpus.update(0.0, [0, 0])
    assert four_cpus.update(STEP, [busy_exits, busy_exits])
    one_vcpu = BusyVcpus(WINDOW, cpus=2)
    one_vcpu.update(0.0, [0])
    assert one_vcpu.update(STEP, [10 * busy_exits])


def test_the_gate_stops_polling_while_the_vm_s_busy_vcpus_fill_the_cpus(
    region: SharedRegion, tmp_path: Path
) -> None:
    """However calm the host: the VM's own VCPUs would be what keeps it busy."""
    pressure, host, counts = tmp_path / "cpu", Host(), [1, 1]  # exits before: not starting
    gate, mailboxes = _gate(region, pressure, host, exits=lambda: counts, cpus=2)
    busy_exits = int(poll_gate.BUSY_SHARE * STEP * 1e9 / WINDOW) + 1
    try:
        for step, (first, second, window) in enumerate(
            [(1, 1, 0), (1, 0, WINDOW), (1, 1, 0)], start=1
        ):
            host.advance(0.1)
            _pressure(pressure, host.stall_us)
            counts[:] = [counts[0] + first * busy_exits, counts[1] + second * busy_exits]
            assert gate.tick() == pytest.approx(host.now + STEP), step  # read on, no hold
            assert [m.poll_ns for m in mailboxes] == [window, window], step
    finally:
        gate.close()


def test_other_vms_busy_vcpus_count_against_the_cpus_too() -> None:
    busy_exits = int(poll_gate.BUSY_SHARE * STEP * 1e9 / WINDOW) + 1
    busy = BusyVcpus(WINDOW, cpus=4)
    busy.update(0.0, [0])
    assert busy.update(STEP, [busy_exits], others=1)  # 2 x 2 pollers on 4 CPUs
    assert busy.count == 1
    assert not busy.update(2 * STEP, [2 * busy_exits], others=2)  # 2 x 3 on 4
    assert busy.update(3 * STEP, [2 * busy_exits + 1], others=5)  # its VCPU went quiet
    assert busy.count == 0


def test_the_gate_counts_the_busy_vcpus_other_runs_write_on_the_board(
    region: SharedRegion, tmp_path: Path
) -> None:
    """Another run's busy VCPU (a board of the test's own, as another supervisor would write it)
    and this VM's one fill two CPUs; this VM's count goes on the board for the others."""
    pressure, host, counts = tmp_path / "cpu", Host(), [1, 0]  # exits before: not starting
    board_file = str(tmp_path / "runtime" / "busy-vcpus")
    gate, mailboxes = _gate(
        region, pressure, host, exits=lambda: counts, cpus=2, board_file=board_file
    )
    other = BusyBoard.open(board_file, stale_ns=10**9)
    assert other is not None
    busy_exits = int(poll_gate.BUSY_SHARE * STEP * 1e9 / WINDOW) + 1
    try:
        for step, (mine, others, window) in enumerate(
            [(1, 0, WINDOW), (1, 1, 0), (0, 1, WINDOW), (1, 1, 0), (1, 0, WINDOW)], start=1
        ):
            other.publish(others)
            host.advance(0.1)
            _pressure(pressure, host.stall_us)
            counts[0] += mine * busy_exits
            gate.tick()
            assert [m.poll_ns for m in mailboxes] == [window, window], step
            assert other.others() == mine, step
    finally:
        gate.close()
        assert other.others() == 0  # the gate cleared its slot
        other.close()


def test_a_gate_without_polling_has_no_board(region: SharedRegion, tmp_path: Path) -> None:
    board_file = tmp_path / "runtime" / "busy-vcpus"
    gate = PollGate([region.mailbox(0)], 0, exits=lambda: [0], board_file=str(board_file))
    gate.close()
    assert not board_file.exists()


def test_quiet_vcpus_are_read_less_and_less_often_until_one_exits() -> None:
    quiet = QuietVcpus()
    assert quiet.update([5, 0]) == FIRST  # the first reading, a baseline: the next one soon
    waits = [quiet.update([5, 0]) for _ in range(7)]
    assert waits == pytest.approx(
        [STEP, 2 * STEP, 4 * STEP, 8 * STEP, QUIET_MAX_S, QUIET_MAX_S, QUIET_MAX_S]
    )
    assert quiet.update([5, 1]) == STEP  # one exit: back to the usual pace at once
    assert quiet.update([5, 1]) == STEP  # the first quiet reading does not wait longer yet
    assert quiet.update([5, 1]) == 2 * STEP


def test_vcpus_that_have_not_exited_yet_are_starting_and_read_sooner() -> None:
    """Until a reading whose interval began after the first exits: FIRST_INTERVAL_S."""
    quiet = QuietVcpus()
    assert [quiet.update([0, 0]) for _ in range(10)] == [FIRST] * 10
    assert quiet.starting
    assert quiet.update([1, 0]) == FIRST  # its interval began before the first exit
    assert quiet.starting
    assert quiet.update([3, 0]) == STEP  # a whole interval of exits: the usual pace
    assert not quiet.starting
    assert quiet.update([3, 0]) == STEP  # then quiet as ever: not starting again
    assert quiet.update([3, 0]) == 2 * STEP
    assert not quiet.starting


def test_vcpus_that_never_exit_are_read_sooner_for_a_bounded_time() -> None:
    quiet = QuietVcpus()
    waits = [quiet.update([0]) for _ in range(STARTING_READINGS_MAX + 5)]
    assert waits == [FIRST] * STARTING_READINGS_MAX + [STEP] * 5
    assert not quiet.starting
    assert quiet.update([1]) == STEP  # the count is spent: the first exits change nothing


@pytest.mark.parametrize("cpus", [2, 4])
def test_starting_vcpus_count_as_busy_and_are_read_sooner_while_that_holds_polling_off(
    region: SharedRegion, tmp_path: Path, cpus: int
) -> None:
    """Two VCPUs on two CPUs do not poll at their start, and are read every FIRST_INTERVAL_S
    until a whole interval of exits shows one of them idle; on four CPUs, room for all their
    pollers, they poll from the start, read at the usual pace."""
    pressure, host, counts = tmp_path / "cpu", Host(), [0, 0]
    gate, mailboxes = _gate(region, pressure, host, exits=lambda: counts, cpus=cpus)
    busy_exits = int(poll_gate.BUSY_SHARE * FIRST * 1e9 / WINDOW) + 1  # over the bar
    held_wait, held_window = (FIRST, 0) if cpus == 2 else (STEP, WINDOW)
    try:
        assert [m.poll_ns for m in mailboxes] == [held_window] * 2  # before the VCPUs start
        for step, (exits, wait, window) in enumerate(
            [
                (0, held_wait, held_window),  # no exit yet
                (busy_exits // 4, held_wait, held_window),  # the first exits, part of an interval
                (busy_exits, STEP, WINDOW),  # a whole interval: the second VCPU is idle
            ],
            start=1,
        ):
            counts[0] += exits
            due = _tick_after(gate, pressure, host, 0.1, FIRST)
            assert due == pytest.approx(host.now + wait), step
            assert [m.poll_ns for m in mailboxes] == [window, window], step
    finally:
        gate.close()


def _one_vcpu_gate(
    region: SharedRegion, pressure: Path, host: Host, **kwargs: Any
) -> tuple[PollGate, Mailbox]:
    """A gate over one VCPU that has not exited yet, on two CPUs."""
    _pressure(pressure, host.stall_us)
    mailbox = region.mailbox(0)
    gate = PollGate(
        [mailbox],
        WINDOW,
        clock=lambda: host.now,
        pressure_file=str(pressure),
        exits=lambda: [0],
        cpus=2,
        **kwargs,
    )
    return gate, mailbox


def test_a_starting_vm_does_not_poll_while_other_runs_fill_the_cpus(
    region: SharedRegion, tmp_path: Path
) -> None:
    board_file = str(tmp_path / "runtime" / "busy-vcpus")
    other = BusyBoard.open(board_file, stale_ns=10**9)
    assert other is not None
    other.publish(1)
    pressure, host = tmp_path / "cpu", Host()
    gate, mailbox = _one_vcpu_gate(region, pressure, host, board_file=board_file)
    try:
        assert mailbox.poll_ns == 0  # a busy VCPU elsewhere, and this one's two pollers
        other.publish(0)
        _tick_after(gate, pressure, host, 0.1, FIRST)
        assert mailbox.poll_ns == WINDOW
    finally:
        gate.close()
        other.close()


def test_a_gate_that_holds_polling_off_reads_starting_vcpus_at_the_hold_s_pace(
    region: SharedRegion, tmp_path: Path
) -> None:
    pressure, host = tmp_path / "cpu", Host()
    gate, mailbox = _one_vcpu_gate(region, pressure, host)
    try:
        assert mailbox.poll_ns == WINDOW  # one VCPU's two pollers fit two CPUs
        due = _tick_after(gate, pressure, host, 0.95, FIRST)  # busy: off before any exit
        assert due == pytest.approx(host.now + HOLD_MIN_S - STEP)
        assert mailbox.poll_ns == 0
    finally:
        gate.close()


def test_the_gate_reads_a_quiet_vm_less_often_and_keeps_its_window(
    region: SharedRegion, tmp_path: Path
) -> None:
    """Quiet VCPUs: the readings space out, and the window is still the pressure's."""
    pressure, host, counts = tmp_path / "cpu", Host(), [3, 1]
    gate, mailboxes = _gate(region, pressure, host, exits=lambda: counts, cpus=2)
    try:
        waits = []
        for _ in range(6):
            due = gate.tick()
            assert due is not None
            waits.append(due - host.now)
            host.advance(0.1, due - host.now)
            _pressure(pressure, host.stall_us)
        assert waits == pytest.approx(
            [STEP, 2 * STEP, 4 * STEP, 8 * STEP, QUIET_MAX_S, QUIET_MAX_S]
        )
        assert [m.poll_ns for m in mailboxes] == [WINDOW, WINDOW]  # a calm host: polling stays on
        counts[:] = [4, 1]
        assert gate.tick() == pytest.approx(host.now + STEP)
        # The pressure still decides at each reading: a busy host turns polling off, quiet or
        # not, and the quiet wait starts over from one interval.
        host.advance(0.9)
        _pressure(pressure, host.stall_us)
        assert gate.tick() == pytest.approx(host.now + STEP)  # first quiet reading: no wait yet
        assert [m.poll_ns for m in mailboxes] == [0, 0]
    finally:
        gate.close()

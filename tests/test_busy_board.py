"""The busy VCPUs' board: runs of one user see each other's counts, never their own, and a run
that is gone stops counting (supervisor/busy_board.py)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsuper.supervisor.busy_board import SLOT, SLOTS, BusyBoard

STALE_NS = 3_000_000_000
CHILD_DEADLINE_S = 30.0


class Clock:
    """CLOCK_MONOTONIC ns, moved by hand."""

    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "runtime" / "busy-vcpus")


@pytest.fixture
def boards(path: str) -> Iterator[list[BusyBoard]]:
    """Boards opened by a test, closed after it."""
    opened: list[BusyBoard] = []
    yield opened
    for board in opened:
        board.close()


def open_board(path: str, boards: list[BusyBoard], clock: Clock | None = None) -> BusyBoard:
    board = BusyBoard.open(path, stale_ns=STALE_NS, **({"clock": clock} if clock else {}))
    assert board is not None
    boards.append(board)
    return board


def test_each_run_sees_the_others_busy_vcpus_not_its_own(
    path: str, boards: list[BusyBoard]
) -> None:
    first, second, third = (open_board(path, boards) for _ in range(3))
    assert [first.slot, second.slot, third.slot] == [0, 1, 2]
    assert [b.others() for b in (first, second, third)] == [0, 0, 0]  # each starts at 0
    first.publish(2)
    second.publish(1)
    assert [b.others() for b in (first, second, third)] == [1, 2, 3]
    first.publish(0)  # its VCPUs went quiet
    assert [b.others() for b in (first, second, third)] == [1, 0, 1]
    folder = Path(path).parent
    assert (folder.stat().st_mode & 0o777, Path(path).stat().st_mode & 0o777) == (0o700, 0o600)
    assert Path(path).stat().st_size == SLOTS * SLOT.size


def test_a_count_not_written_again_for_longer_than_stale_ns_is_ignored(
    path: str, boards: list[BusyBoard]
) -> None:
    clock = Clock()
    writer, reader = open_board(path, boards, clock), open_board(path, boards, clock)
    writer.publish(1)
    clock.ns += STALE_NS
    assert reader.others() == 1
    clock.ns += 1
    assert reader.others() == 0
    writer.publish(1)
    assert reader.others() == 1


def test_a_closed_run_clears_its_slot_and_the_next_run_takes_it(
    path: str, boards: list[BusyBoard]
) -> None:
    first, second = open_board(path, boards), open_board(path, boards)
    first.publish(1)
    first.close()
    first.close()  # idempotent
    assert second.others() == 0
    assert open_board(path, boards).slot == 0


def test_a_killed_run_s_slot_is_freed_by_the_kernel_and_its_count_expires(
    path: str, boards: list[BusyBoard]
) -> None:
    """SIGKILL: the run never clears its slot; the kernel drops its lock at once, and its count
    stops counting once stale."""
    clock = Clock()
    reader = open_board(path, boards, clock)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from vmsuper.supervisor.busy_board import BusyBoard
                board = BusyBoard.open({path!r}, stale_ns={STALE_NS})
                board.publish(3)
                print(board.slot, flush=True)
                sys.stdin.read()  # until killed (or the test's end of the pipe closes)
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], CHILD_DEADLINE_S)
        assert ready, "the child did not take a slot in time"
        assert child.stdout.readline().strip() == "1"
        clock.ns = time.monotonic_ns()  # the child stamps with the real clock
        assert reader.others() == 3
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        for stream in (child.stdin, child.stdout):
            assert stream is not None
            stream.close()
    assert reader.others() == 3  # not cleared: still fresh
    assert open_board(path, boards, clock).slot == 1  # but free at once
    clock.ns += STALE_NS + 1
    assert reader.others() == 0


def test_a_full_board_still_reads_the_others(path: str, boards: list[BusyBoard]) -> None:
    for _ in range(SLOTS):
        open_board(path, boards)
    boards[-1].publish(4)
    late = open_board(path, boards)
    assert late.slot is None
    late.publish(7)  # nowhere to write: nothing changes
    assert late.others() == 4
    assert boards[0].others() == 4


@pytest.mark.parametrize("kind", ["symlink", "group readable", "directory", "another user's"])
def test_a_board_file_that_is_not_the_user_s_own_is_not_used(
    path: str, tmp_path: Path, kind: str
) -> None:
    board_file = Path(path)
    board_file.parent.mkdir(mode=0o700)
    if kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"")
        board_file.symlink_to(tmp_path / "elsewhere")
    elif kind == "group readable":
        board_file.touch(mode=0o640)
        board_file.chmod(0o640)
    elif kind == "directory":
        board_file.mkdir()
    else:
        if os.geteuid() != 0:
            pytest.fail("making a file of another user's takes root (CI runs as root)")
        board_file.touch(mode=0o600)
        os.chown(board_file, 65534, 65534)
    assert BusyBoard.open(path, stale_ns=STALE_NS) is None


def test_a_folder_of_another_user_s_means_no_board(path: str) -> None:
    folder = Path(path).parent
    folder.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.fail("making a folder of another user's takes root (CI runs as root)")
    os.chown(folder, 65534, 65534)
    assert BusyBoard.open(path, stale_ns=STALE_NS) is None
    assert not Path(path).exists()


def test_a_short_board_file_is_extended_and_kept(path: str, boards: list[BusyBoard]) -> None:
    board_file = Path(path)
    board_file.parent.mkdir(mode=0o700)
    board_file.touch(mode=0o600)
    board = open_board(path, boards)
    board.publish(2)
    assert board_file.stat().st_size == SLOTS * SLOT.size
    assert open_board(path, boards).others() == 2


def test_a_board_truncated_under_the_runs_reads_as_empty_and_is_written_again(
    path: str, boards: list[BusyBoard]
) -> None:
    first, second = open_board(path, boards), open_board(path, boards)
    first.publish(2)
    os.truncate(path, 0)
    assert second.others() == 0  # no SIGBUS: nothing is mapped
    first.publish(2)
    assert second.others() == 2
    os.truncate(path, SLOT.size - 3)  # first's slot (0) cut in the middle
    assert second.others() == 0

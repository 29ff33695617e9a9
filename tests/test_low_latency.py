"""The low-latency request (supervisor/low_latency.py): held as an open fd, refused gracefully."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from held_fds import fds_on
from warning_log import WarningLog

from vmsuper.supervisor import low_latency
from vmsuper.supervisor.low_latency import LATENCY_FILE, LatencyHold


def _host_target_us() -> int:
    """The host's current latency target, as the file reads (every holder's lowest)."""
    fd = os.open(LATENCY_FILE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        value: int = struct.unpack("<i", os.read(fd, 4))[0]
        return value
    finally:
        os.close(fd)


def test_the_request_holds_the_host_at_zero_until_released() -> None:
    if not os.access(LATENCY_FILE, os.W_OK):
        pytest.fail(f"{LATENCY_FILE} must be writable here (the suite runs as root)")
    hold, log = LatencyHold(), WarningLog()
    assert not hold.held and fds_on(LATENCY_FILE) == 0
    assert hold.take(log) and hold.take(log)  # the second take keeps the first request
    assert hold.held and fds_on(LATENCY_FILE) == 1
    assert _host_target_us() == 0
    hold.release()
    hold.release()
    assert not hold.held and fds_on(LATENCY_FILE) == 0
    assert log.warnings == []


def test_a_refused_request_is_logged_and_its_fd_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, data: bytes) -> int:
        assert os.readlink(f"/proc/self/fd/{fd}") == LATENCY_FILE
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    hold, log = LatencyHold(), WarningLog()
    with monkeypatch.context() as patched:
        patched.setattr(low_latency.os, "write", refuse)
        assert hold.take(log) is False
    assert not hold.held and fds_on(LATENCY_FILE) == 0
    assert log.warnings == [("low_latency_unavailable", {"error": "[Errno 22] Invalid argument"})]


def test_a_missing_file_is_logged_with_its_reason(tmp_path: Path) -> None:
    hold, log = LatencyHold(str(tmp_path / "no-such-file")), WarningLog()
    assert hold.take(log) is False
    assert not hold.held
    [(event, fields)] = log.warnings
    assert event == "low_latency_unavailable"
    assert "No such file or directory" in str(fields["error"])

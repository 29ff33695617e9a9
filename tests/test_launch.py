"""A run's first steps (supervisor/launch.py) that the end-to-end runs do not reach."""

from __future__ import annotations

import errno
import os

import pytest

from vmsuper.supervisor import launch as launching


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.warnings.append((event, fields))


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_a_refused_low_latency_request_is_logged_and_its_fd_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(fd: int, data: bytes) -> int:
        assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/cpu_dma_latency"
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    log = _Log()
    before = _open_fds()
    with monkeypatch.context() as patched:
        patched.setattr(launching.os, "write", refuse)
        fd = launching._hold_low_latency(log)
    assert fd == -1
    assert log.warnings == [("low_latency_unavailable", {"error": "[Errno 22] Invalid argument"})]
    assert _open_fds() <= before


def test_pending_records_reach_the_log_in_order_once() -> None:
    """The first steps' records, kept until structlog is imported (`launch.begin`)."""

    class _Log:
        def __init__(self) -> None:
            self.records: list[tuple[str, str, dict[str, object]]] = []

        def warning(self, event: str, **fields: object) -> None:
            self.records.append(("warning", event, fields))

        def error(self, event: str, **fields: object) -> None:
            self.records.append(("error", event, fields))

    pending = launching.PendingRecords()
    pending.warning("first", error="a")
    pending.error("second", error="b")
    log = _Log()
    pending.write_to(log)
    pending.write_to(log)
    assert log.records == [
        ("warning", "first", {"error": "a"}),
        ("error", "second", {"error": "b"}),
    ]

"""The pytest plugin's session server (vmsuper/session_server.py) when it cannot start: a
clear error, no variable left set, no folder left behind."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from vmsuper.session_server import SessionServer, SessionServerError
from vmsuper.supervisor.serve_client import SOCKET_VARIABLE


def folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("vmsuper-serve-*"))


@pytest.mark.parametrize(
    ("program", "said"),
    [
        ("/bin/false", "vmsuper serve did not start: no word"),
        ("/nonexistent/python", "cannot start vmsuper serve: [Errno 2]"),
    ],
)
def test_a_server_that_does_not_start_is_an_error_that_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, program: str, said: str
) -> None:
    monkeypatch.delenv(SOCKET_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "executable", program)
    before = folders()
    with pytest.raises(SessionServerError) as info:
        SessionServer()
    assert str(info.value).startswith(said)
    assert SOCKET_VARIABLE not in os.environ
    assert folders() == before


def test_a_server_that_says_something_else_is_stopped_and_quoted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A child of the stand-in keeps its stderr open: stopping waits for the stand-in only.
    left = tmp_path / "left.pid"
    stand_in = tmp_path / "python"
    stand_in.write_text(
        f"#!/bin/sh\nsleep 600 &\necho $! > {left}\n"
        "echo 'vmsuper serve: error: no room' >&2\nwait\n"
    )
    stand_in.chmod(0o755)
    monkeypatch.delenv(SOCKET_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "executable", str(stand_in))
    try:
        with pytest.raises(SessionServerError, match="did not start: vmsuper serve: error: no"):
            SessionServer()
        assert SOCKET_VARIABLE not in os.environ
    finally:
        os.kill(int(left.read_text()), signal.SIGKILL)

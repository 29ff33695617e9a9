"""`vmsuper run`'s side of `vmsuper serve`: hand the run to a supervisor already imported.

Most of a run's start is the interpreter's and the imports' (see docs/performance.md), the same
for every run. `vmsuper serve` pays them once and forks a ready supervisor per run; this module
is all `vmsuper run` imports before it knows whether one is there, so that it stays cheap
when none is. The run behaves as if it ran here: it gets this process's standard streams,
current folder, environment and umask; the signals that stop a run (SIGINT, SIGTERM, SIGHUP,
SIGQUIT) are passed on to it; and this process exits with its status. Without a server, or
with one whose code is not this one, the caller runs the VM itself.

The exchange, over `serve.sock` in the runtime folder, or the socket `VMSUPER_SERVE_SOCKET`
names (SOCK_SEQPACKET, one JSON object per message), with a server of this user only:

- the client sends `{"version", "argv", "cwd", "env", "umask"}` with its fds 0, 1 and 2;
- the server answers `{"started": PID}` with the run's pidfd, then `{"exit": STATUS}` when the
  run has ended; or `{"refused": REASON, "local": BOOL}`, where `local` says whether running
  here instead is right (a server of other code, or one about to stop) or not (a request the
  server cannot take).

What this module imports is what the command pays before its run starts, so it takes the C
modules under `socket` and `signal` (`_socket`, `_signal`: the same calls, without the enums
that those modules build at import), writes and reads its JSON itself
(supervisor/serve_json.py), and does without contextlib (with its collections and functools).
tests/test_cli.py keeps it so.
"""

from __future__ import annotations

import _socket
import os
import select
import sys

from vmsuper import __version__
from vmsuper.shared import wire
from vmsuper.supervisor import serve_json

TYPE_CHECKING = False  # typing itself costs a run's start milliseconds: mypy alone imports these
if TYPE_CHECKING:
    import signal as _signal  # the same functions; typeshed has no stubs for _signal
    from collections.abc import Sequence
    from typing import Any, Final
else:
    import _signal

__all__ = [
    "FORWARDED_SIGNALS",
    "SERVE_VARIABLE",
    "SOCKET_NAME",
    "SOCKET_VARIABLE",
    "hand_over",
    "socket_path",
]

SOCKET_NAME: Final = "serve.sock"
SERVE_VARIABLE: Final = "VMSUPER_SERVE"
"""Set to 0, `vmsuper run` never hands its run to a server (the test suite does so)."""
SOCKET_VARIABLE: Final = "VMSUPER_SERVE_SOCKET"
"""A server's socket elsewhere than in the runtime folder (the pytest plugin's, for one
session)."""
FORWARDED_SIGNALS: Final = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
SERVER_FAILED: Final = 125
"""As the supervisor's own internal failure (outcome.EXIT_SUPERVISOR_FAILED)."""
_LOST_RUN_WAIT_S: Final = 10.0


def socket_path() -> str:
    """Where a server listens: `VMSUPER_SERVE_SOCKET`, else in the runtime folder."""
    named = os.environ.get(SOCKET_VARIABLE)
    if named:
        return named
    from vmsuper.shared.runtime import runtime_folder

    return os.path.join(runtime_folder(), SOCKET_NAME)


def hand_over(argv: Sequence[str]) -> int | None:
    """Run `vmsuper` with `argv` in a server's fork and return its exit status; None when
    there is no server to take it (or it says to run here)."""
    if os.environ.get(SERVE_VARIABLE) == "0":
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        try:
            conn.connect(socket_path())
        except OSError:
            return None  # none listens (or none may be reached): the usual case
        # The run's environment and streams go to a server of this user only (a socket that
        # VMSUPER_SERVE_SOCKET names may sit in a folder others can write).
        _, uid, _ = wire.peer_credentials(conn)
        if uid != os.geteuid():
            _say(f"{socket_path()} is a server of uid {uid}, not this user's; running the VM here")
            return None
        return _converse(conn, argv)
    finally:
        conn.close()


def _converse(conn: _socket.socket, argv: Sequence[str]) -> int | None:
    try:
        cwd = os.getcwd()
    except OSError as exc:  # the folder was removed: a server cannot enter it, this process can
        said = f"{exc.strerror}: the current folder"
        _say(f"cannot hand the run to vmsuper serve ({said}); running it here")
        return None
    umask = os.umask(0o022)
    os.umask(umask)
    request: dict[str, serve_json.Value] = {
        "version": __version__,
        "argv": list(argv),
        "cwd": cwd,
        "env": dict(os.environ),
        "umask": umask,
    }
    try:
        wire.send_datagram(conn, serve_json.dumps(request), [0, 1, 2])
        reply, fds = _receive(conn)
    except (OSError, wire.WireError) as exc:
        _say(f"cannot hand the run to vmsuper serve ({exc}); running it here")
        return None
    if not reply:  # closed unanswered (a server stopping): it started nothing
        _say("vmsuper serve closed the connection without an answer; running the VM here")
        return None
    if "refused" in reply:
        if reply.get("local"):
            _say(f"vmsuper serve did not take the run ({reply['refused']}); running it here")
            return None
        _say(f"vmsuper serve refused the run: {reply['refused']}")
        return SERVER_FAILED
    if "started" not in reply or len(fds) != 1:
        _say(f"unexpected answer from vmsuper serve: {reply!r}")
        return SERVER_FAILED
    return _follow(conn, fds[0])


def _follow(conn: _socket.socket, pidfd: int) -> int:
    """Pass stop signals on to the run until the server says how it ended."""

    def pass_on(signum: int, _frame: object) -> None:
        try:
            _signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:  # the run has ended: nothing to pass on
            return

    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, pass_on)
    try:
        reply, _ = _receive(conn)
    except (OSError, wire.WireError):
        reply = {}
    if isinstance(reply.get("exit"), int):
        return int(reply["exit"])
    # The server is gone: its runs must not outlive their commands.
    _say("vmsuper serve went away during the run; stopping the run")
    try:
        _signal.pidfd_send_signal(pidfd, _signal.SIGTERM)
    except ProcessLookupError:  # it has ended already
        return SERVER_FAILED
    select.select([pidfd], [], [], _LOST_RUN_WAIT_S)
    return SERVER_FAILED


def _receive(conn: _socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message ({} for a hang-up or anything but a JSON object) and its fds."""
    dgram = wire.recv_datagram(conn, max_fds=1)
    if dgram is None:
        return {}, []
    try:
        reply = serve_json.loads(dgram.data)
    except ValueError:
        reply = None
    return (reply if isinstance(reply, dict) else {}), dgram.fds


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"vmsuper: {message}\n")
        sys.stderr.flush()
    except OSError:  # no stderr to tell
        return

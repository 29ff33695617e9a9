"""`vmsuper serve`: keep a supervisor imported, and fork it for each `vmsuper run`.

A run spends most of its start in the interpreter and the imports (the config's msgspec, the
log's structlog, protobuf, the runner), the same every time. The server pays them once; each
`vmsuper run` then hands its command line, folder, environment, umask and standard streams
over the server's socket (`serve_client.py`), and a fork of the server becomes that run's
supervisor: the same code path as `vmsuper run` alone (`cli.main`), started about as far as
an interpreter alone would be. The server answers with the run's pidfd (the command passes
its stop signals on through it) and, once the run has ended, its exit status.

Boundaries:
- The socket is the user's own (mode 0600, in the runtime folder), and the server takes a
  run only from a peer of its own user id (SO_PEERCRED): nothing is gained over running the
  command, and a request is still checked in full (`parse_request`) before anything forks.
- A command that goes away (killed, or its socket closed) stops its run with SIGTERM, as a
  hang-up would: no run outlives its command.
- A server whose installed code has changed since it started (or of another version than the
  command's) sends runs back to run in their commands, and stops once its runs have ended.
- SIGTERM, SIGINT or SIGHUP stops taking runs and lets the running ones finish; a second one
  stops them (SIGTERM) too.

Each run is a child of the server, not of its command: its cgroup, limits and CPU time are
the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import io
import json
import os
import selectors
import signal
import socket
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import vmsuper
import vmsuper.shared
import vmsuper.workers
from vmsuper import __version__
from vmsuper.shared import wire
from vmsuper.shared.runtime import RuntimeDirError, make_runtime_dir
from vmsuper.supervisor import serve_client
from vmsuper.supervisor.msgspec_import import msgspec
from vmsuper.supervisor.serve_client import socket_path

__all__ = ["Refusal", "RunRequest", "code_stamp", "main", "parse_request", "refusal"]

STDIO_FDS: Final = 3
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Stop taking runs and end once they have; a second one stops them too. (A hang-up of the
terminal the server was started from is no reason to break the runs in progress.)"""


class RunRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a `vmsuper run` hands over (see serve_client.py)."""

    version: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    umask: int


class Refusal(Exception):
    """A run the server does not take; `local`: the command should run it itself."""

    def __init__(self, reason: str, *, local: bool = False) -> None:
        super().__init__(reason)
        self.local = local


def refusal(exc: wire.WireError) -> Refusal:
    """Why a datagram the transport refused (its fds already closed) is not taken."""
    if isinstance(exc, wire.MessageTooLarge):
        return Refusal(f"the request is longer than {exc.limit} bytes")
    if isinstance(exc, wire.TooManyFds):
        return Refusal(f"expected {STDIO_FDS} fds (stdin, stdout, stderr), got {exc.count} or more")
    return Refusal(f"cannot read the request: {exc}")


def parse_request(data: bytes, fds: Sequence[int]) -> RunRequest:
    """The request in one message with its fds, checked in full; raises `Refusal`."""
    if len(fds) != STDIO_FDS:
        raise Refusal(f"expected {STDIO_FDS} fds (stdin, stdout, stderr), got {len(fds)}")
    try:
        # json, not msgspec's decoder: undecodable bytes in the command's environment, folder
        # or command line come as lone surrogates (\udcXX), which msgspec's decoder refuses.
        request = msgspec.convert(json.loads(data), RunRequest)
    except (ValueError, msgspec.ValidationError) as exc:
        raise Refusal(f"malformed request: {exc}") from None
    if request.version != __version__:
        raise Refusal(f"the server is vmsuper {__version__}", local=True)
    if request.argv[:1] != ["run"]:
        raise Refusal("only 'vmsuper run' is served")
    if not 0 <= request.umask <= 0o777:
        raise Refusal(f"umask {request.umask:#o} out of range")
    if not os.path.isabs(request.cwd):
        raise Refusal(f"the folder {request.cwd!r} is not absolute")
    texts = (*request.argv, request.cwd, *request.env, *request.env.values())
    if any("\0" in text for text in texts):
        raise Refusal("a NUL character in the command line, folder or environment")
    return request


def code_stamp() -> int:
    """The newest modification time (ns) among vmsuper's installed files: a change means the
    server no longer runs the code a command would."""
    newest = 0
    roots = [
        Path(folder)
        for package in (vmsuper, vmsuper.shared, vmsuper.supervisor, vmsuper.workers)
        for folder in package.__path__
    ]
    for root in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [d for d in subfolders if d != "__pycache__"]
            for name in files:
                if name.endswith((".py", ".so")):
                    with contextlib.suppress(OSError):
                        newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
    return newest


def _prepare_a_run() -> None:
    """Everything a run imports, and what its first steps make (the command line's parser,
    msgspec's TOML parser and view of the config's types, the hot path's library), so that no
    fork pays for them again. What fails here is only left for the runs to meet and report."""
    import pwd
    import tempfile

    import vmsuper.supervisor.cli
    import vmsuper.supervisor.launch
    import vmsuper.supervisor.runner
    import vmsuper.workers.worker_process
    from vmsuper.shared import hotpath
    from vmsuper.supervisor import config_shape, sandbox_user
    from vmsuper.supervisor.config import Config, ConfigError, load_config

    vmsuper.supervisor.cli.build_parser()
    with contextlib.suppress(ImportError):
        hotpath.binding()
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as sample:
        sample.write('[plugin]\npath = "/bin/true"\n')
        sample.flush()
        with contextlib.suppress(ConfigError, OSError):
            load_config(sample.name, check_plugin=False)
    config_shape.prepare(Config)  # every table's annotations, not only the sample's
    # A run looks users up (whom the plugin and the workers run as, whose home folders to hide),
    # and the first lookup of a process loads the C library's NSS modules (over a millisecond
    # here, for a user that is absent). Loaded here, every fork finds them; the entries are not
    # kept, so each run still sees the passwd database as it is then.
    with contextlib.suppress(sandbox_user.UserError):
        sandbox_user.plugin_user(None)
    pwd.getpwall()


class _Run:
    def __init__(self, pid: int, pidfd: int, conn: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.conn = conn
        self.stopped = False


class Server:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = code_stamp()
        self.sel = selectors.DefaultSelector()
        self.runs: dict[int, _Run] = {}
        self.listener: socket.socket | None = None
        self.stopping = 0
        self.why_stopped = "no listening socket"
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- lifecycle -------------------------------------------------------------------------

    def listen(self) -> None:
        make_runtime_dir(self.path.parent)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(self.path))
        except FileNotFoundError:
            pass
        except OSError:
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket") from None
            self.path.unlink()  # left by a server that died
        else:
            raise OSError(errno.EADDRINUSE, f"a server already listens on {self.path}")
        finally:
            probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(64)
        self.listener = listener
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_signal)
        signal.set_wakeup_fd(self._wake_w)
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda *_: None)

    def serve(self) -> None:
        while self.listener is not None or self.runs:
            for key, _ in self.sel.select():
                key.data(key.fileobj)

    def stop_taking_runs(self) -> None:
        if self.listener is None:
            return
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _on_signal(self, _fd: object) -> None:
        got = b""
        with contextlib.suppress(BlockingIOError):
            got = os.read(self._wake_r, 64)
        if not any(b in STOP_SIGNALS for b in got):
            return
        self.stopping += 1
        self.why_stopped = "signalled"
        self.stop_taking_runs()
        if self.stopping > 1:
            for run in self.runs.values():
                self._stop(run)

    # -- runs ------------------------------------------------------------------------------

    def _accept(self, _sock: object) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, self._on_request)

    def _on_request(self, conn: object) -> None:
        assert isinstance(conn, socket.socket)
        self.sel.unregister(conn)
        try:
            request, fds = self._receive(conn)
        except Refusal as exc:
            _send(conn, {"refused": str(exc), "local": exc.local})
            conn.close()
            return
        try:
            pid = self._fork(request, fds)
        except OSError as exc:
            _close(fds)
            _send(conn, {"refused": f"cannot start the run: {exc}", "local": True})
            conn.close()
            return
        _close(fds)
        pidfd = os.pidfd_open(pid)
        run = _Run(pid, pidfd, conn)
        self.runs[pidfd] = run
        _send(conn, {"started": pid}, [pidfd])
        self.sel.register(pidfd, selectors.EVENT_READ, self._on_run_exit)
        self.sel.register(conn, selectors.EVENT_READ, lambda _c, r=run: self._on_command(r))

    def _receive(self, conn: socket.socket) -> tuple[RunRequest, list[int]]:
        """The request; any fds that came with a refused one are closed."""
        pid, uid, _ = wire.peer_credentials(conn)
        try:
            dgram = wire.recv_datagram(conn, max_fds=STDIO_FDS)
        except wire.WireError as exc:
            raise refusal(exc) from None
        except OSError as exc:
            raise Refusal(f"cannot read the request: {exc}") from None
        if dgram is None:
            raise Refusal("the connection closed without a request")
        try:
            if uid != os.geteuid():
                raise Refusal(f"uid {uid} (pid {pid}) is not this server's user")
            request = parse_request(dgram.data, dgram.fds)
            if code_stamp() != self.stamp:
                self.why_stopped = "vmsuper's code changed since it started"
                self.stop_taking_runs()  # and end once the runs in progress have
                raise Refusal("its code changed since it started", local=True)
        except Refusal:
            _close(dgram.fds)
            raise
        return request, dgram.fds

    def _fork(self, request: RunRequest, fds: list[int]) -> int:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            _become_run(request, fds)  # never returns
        return pid

    def _on_command(self, run: _Run) -> None:
        """The command's socket is readable: it went away (nothing else comes from it)."""
        self.sel.unregister(run.conn)
        self._stop(run)

    def _stop(self, run: _Run) -> None:
        if not run.stopped:
            run.stopped = True
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(run.pidfd, signal.SIGTERM)

    def _on_run_exit(self, pidfd: object) -> None:
        assert isinstance(pidfd, int)
        run = self.runs.pop(pidfd)
        self.sel.unregister(pidfd)
        _, status = os.waitpid(run.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        _send(run.conn, {"exit": code if code >= 0 else 128 - code})
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(run.conn)
        run.conn.close()
        os.close(pidfd)


def _become_run(request: RunRequest, fds: list[int]) -> NoReturn:
    """In the fork: take on the command's streams, folder, environment and umask, and run
    `vmsuper` as it would have."""
    status = serve_client.SERVER_FAILED
    try:
        signal.set_wakeup_fd(-1)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Out of the way first: a received fd may itself be 0, 1 or 2.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        os.closerange(STDIO_FDS, os.sysconf("SC_OPEN_MAX"))
        gc.freeze()  # the server's objects own numbers just closed: never finalize them
        sys.stdin = _text_stream(0, "r")
        sys.stdout = _text_stream(1, "w")
        sys.stderr = _text_stream(2, "w", errors="backslashreplace", line_buffering=True)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environ.update(request.env)
        os.umask(request.umask)
        sys.argv = ["vmsuper", *request.argv]
        from vmsuper.supervisor.cli import main

        status = main(request.argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            import traceback

            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(status)


def _text_stream(
    fd: int, mode: str, *, errors: str = "strict", line_buffering: bool = False
) -> Any:
    """A standard stream on `fd` as the interpreter would have made it for the command."""
    raw = io.FileIO(fd, mode, closefd=False)
    interactive = raw.isatty()
    binary = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(
        binary,
        encoding="utf-8",
        errors=errors,
        line_buffering=line_buffering or interactive,
    )


def _send(conn: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    with contextlib.suppress(OSError, wire.WireError):  # a command gone already: nothing to tell
        wire.send_datagram(conn, json.dumps(message).encode(), fds)


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmsuper serve",
        description=(
            "Keep a supervisor imported and fork it for each 'vmsuper run' of this user, which"
            " then starts in a fraction of the time. Runs until SIGTERM, SIGINT or SIGHUP (a"
            " second one also stops the runs in progress)."
        ),
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"where to listen (default: ${serve_client.SOCKET_VARIABLE}, else"
        f" {serve_client.SOCKET_NAME} in the runtime folder: where 'vmsuper run' looks)",
    )
    args = parser.parse_args(argv)
    server = Server(args.socket or Path(socket_path()))
    try:
        server.listen()
    except (OSError, RuntimeDirError) as exc:
        print(f"vmsuper serve: error: {exc}", file=sys.stderr)
        return 1
    _prepare_a_run()
    gc.collect()
    gc.freeze()  # the forks share the imported objects' pages instead of copying them
    print(f"vmsuper serve: listening on {server.path}", file=sys.stderr, flush=True)
    try:
        server.serve()
    finally:
        server.stop_taking_runs()
    print(f"vmsuper serve: stopped ({server.why_stopped})", file=sys.stderr, flush=True)
    return 0

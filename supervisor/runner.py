"""`vmsuper run`: set up the VM, serve the plugin, and shut everything down.

The plugin is started and the VM made before this module is imported (supervisor/launch.py,
supervisor/machine.py): the plugin's start overlaps the imports here and the rest of the set-up.

One thread, one selector: main sockets, the plugin's exit (pidfd), stdout and stderr, the VCPU
workers' exits (pidfds), SIGTERM/SIGINT/SIGHUP (through the wakeup fd) and a timer for the
plugin's cgroup counters. The VCPUs' runner threads start only at Start, after the workers are
forked, so nothing is ever forked with threads.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from vmsuper.shared import hotpath, kvm, logs, wire
from vmsuper.shared.plugin_pb2 import MainRequest, MainResponse
from vmsuper.shared.ranges import RangeTable
from vmsuper.shared.shm import SharedRegion
from vmsuper.supervisor import cgroups, outcome, poll_gate, runinfo
from vmsuper.supervisor import launch as launching
from vmsuper.supervisor.config import Config
from vmsuper.supervisor.launch import INFORMATIONAL, START_LINE, UNSANDBOXED_NOTICE, Launch, tell
from vmsuper.supervisor.machine import Machine, MachineError, open_machine
from vmsuper.supervisor.plugin_output import (
    STDOUT_LOG_NAME,
    OutputRelay,
    StderrRecords,
    StdoutFile,
)
from vmsuper.supervisor.plugin_process import PluginProcess, PluginStartError
from vmsuper.supervisor.sandbox_user import UserError
from vmsuper.supervisor.shutdown_signal import Signalled, signal_shutdown
from vmsuper.supervisor.vcpus import VcpuSet, workers_user
from vmsuper.supervisor.watchdog import Watchdog
from vmsuper.workers.framing_check import unused_channels_hint
from vmsuper.workers.limits import Limits
from vmsuper.workers.main_worker import MainWorker, NetInfo

if TYPE_CHECKING:
    from vmsuper.supervisor.net import Tap

__all__ = ["INFORMATIONAL", "START_LINE", "UNSANDBOXED_NOTICE", "Run", "Supervisor", "run"]

# Fds the supervisor needs besides the plugin's objects: logs, KVM, sockets, pipes, pidfds.
FD_HEADROOM = 1024


class SetupError(Exception):
    """The VM could not be set up; the message says which step and why."""


class Run:
    """Everything one VM run owns, released in reverse order by `close()`."""

    def __init__(self, config: Config, log: Any, limits: Limits | None = None) -> None:
        self.config = config
        self.log = log
        self.limits = Limits() if limits is None else limits
        self.system: kvm.Kvm | None = None
        self.vm: kvm.Vm | None = None
        self.region: SharedRegion | None = None
        self.vcpus: VcpuSet | None = None
        self.tap: Tap | None = None
        self.shutdown_eventfd = -1
        self.closers: list[Callable[[], None]] = []

    def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:  # keep releasing the rest
                self.log.error("release_failed", error=repr(exc))
        self.closers.clear()


def _set_up(run: Run, take_machine: Callable[[], Machine] = open_machine) -> None:
    """Set up what the run serves the plugin with; its VM comes from `take_machine` (the one
    the launch made: `Launch.take_machine`)."""
    cfg = run.config
    try:
        hotpath.binding()  # the runners and workers need it: a missing build fails here
    except hotpath.HotpathError as exc:
        raise SetupError(str(exc)) from exc
    try:
        machine = take_machine()
    except MachineError as exc:
        raise SetupError(str(exc)) from exc
    run.closers.append(machine.close)
    run.system, run.vm = machine
    run.region = SharedRegion.create(cfg.vm.vcpus)
    run.closers.append(run.region.close)
    try:
        worker_user = workers_user(cfg.vm.worker_user)
    except UserError as exc:
        raise SetupError(str(exc)) from exc
    run.vcpus = VcpuSet(
        run.vm,
        count=cfg.vm.vcpus,
        transport=cfg.plugin.vcpu_transport,
        region=run.region,
        mmap_size=run.system.vcpu_mmap_size(),
        log_dir=cfg.log.dir,
        log_level=cfg.log.level,
        poll_ns=cfg.vm.poll_us * 1000,
        low_latency=cfg.vm.low_latency,
        worker_user=worker_user,
    )
    run.closers.append(run.vcpus.shutdown)
    run.closers.append(run.vcpus.close_plugin_fds)
    run.shutdown_eventfd = os.eventfd(0, os.EFD_CLOEXEC)
    run.closers.append(lambda: os.close(run.shutdown_eventfd))
    if cfg.net is not None:
        from vmsuper.supervisor.net import NetSettings, Tap, parse_mac, unique_tap_name

        settings = NetSettings(
            host_ip=cfg.net.host_ip, netmask=cfg.net.netmask, mac=parse_mac(cfg.net.mac)
        )
        try:
            run.tap = Tap.create(settings, name=unique_tap_name())
        except Exception as exc:
            raise SetupError(str(exc)) from exc
        run.closers.append(run.tap.close)


class MainConnection:
    """One main socket and the replies it has not taken yet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.fd = sock.fileno()

    def close(self) -> None:
        for _, fds in self.pending:
            _close_fds(fds)
        self.pending.clear()
        self.sock.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Supervisor:
    """The event loop of one run."""

    def __init__(self, run: Run, launch: Launch) -> None:
        self.run = run
        self.launch = launch
        self.log = run.log
        self.sel = selectors.DefaultSelector()
        self.connections: dict[int, MainConnection] = {}
        self.failure: outcome.Failure | None = None
        self.shutting_down = False
        self.deadline: float | None = None
        self._next_poll_check: float | None = None
        self.plugin: PluginProcess | None = launch.plugin
        self.cgroup: cgroups.PluginCgroup | None = launch.cgroup
        self._limit_reached = False
        self.worker_pidfds: dict[int, int] = {}
        self._vcpus_watched = False  # by _watch_workers, once (its fds are gone after shutdown)
        self._relays: list[OutputRelay] = []
        assert run.vm is not None and run.system is not None and run.vcpus is not None
        assert run.region is not None
        self.watchdog = Watchdog(
            run.region,
            timeout=run.config.vm.timeout,
            stall_after=run.config.vm.stall_warning,
            now=time.monotonic(),
        )
        net = None
        if run.tap is not None:
            s = run.tap.settings
            net = NetInfo(run.tap.fd, s.mac, int(s.host_ip), int(s.netmask))
        self.worker = MainWorker(
            vm=run.vm,
            system=run.system,
            vcpus=run.vcpus,
            publisher=run.region.table,
            shutdown_eventfd=run.shutdown_eventfd,
            net=net,
            on_error=self._request_failed,
            on_internal_error=self._request_crashed,
            limits=run.limits,
            ranges=RangeTable(
                max_ranges=min(run.limits.reserved_ranges, run.region.table.max_ranges)
            ),
            connections_full=lambda: len(self.connections) >= run.limits.connections,
        )

    # -- wiring ------------------------------------------------------------------------------

    def _request_failed(self, case: str, reason: str, err: int) -> None:
        self.log.info("main_request_failed", request=case, errno=err, reason=reason)

    def _request_crashed(self, case: str, exc: BaseException) -> None:
        trace = _trace(exc)
        self.log.error("main_request_internal_error", request=case, error=repr(exc), trace=trace)

    def _add_connection(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = MainConnection(sock)
        self.connections[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, lambda _s: self._on_main_socket(conn))

    def _drop_connection(self, conn: MainConnection, why: str) -> None:
        self.log.info("connection_closed", fd=conn.fd, reason=why)
        self.sel.unregister(conn.sock)
        del self.connections[conn.fd]
        conn.close()

    # -- handlers ------------------------------------------------------------------------------

    def _on_main_socket(self, conn: MainConnection) -> None:
        limits = self.worker.limits
        try:
            dgram = wire.recv_datagram(
                conn.sock, max_size=limits.request_size, max_fds=limits.fds_per_message
            )
        except BlockingIOError:
            return
        except wire.MessageTooLarge as exc:
            self.log.warning("main_request_refused", reason=str(exc))
            self._send(conn, _error_response(errno.EMSGSIZE), [], [])
            return
        except wire.NoRoomForFds as exc:
            self.log.warning("main_request_refused", reason=str(exc))
            self._send(conn, _refusal(errno.EMFILE, exc.data), [], [])
            return
        except wire.WireError as exc:
            self.log.warning("main_request_refused", reason=str(exc))
            self._send(conn, _error_response(errno.EINVAL), [], [])
            return
        except OSError as exc:
            self._drop_connection(conn, f"receive failed: {exc}")
            return
        if dgram is None:
            self._drop_connection(conn, "hang-up")
            return
        reply = self.worker.handle(dgram.data, dgram.fds)
        if reply.hang_up:
            self.log.warning("main_request_undecodable", reason=reply.error)
            self._drop_connection(conn, reply.error or "undecodable request")
            return
        if reply.new_connection is not None:
            self._add_connection(reply.new_connection)
        self._send(conn, reply.data, reply.fds, reply.close_after_send, reply.undo)
        vcpus = self.run.vcpus
        if vcpus is not None and vcpus.started and not (self._vcpus_watched or self.shutting_down):
            self._watch_workers()

    def _send(
        self,
        conn: MainConnection,
        data: bytes,
        fds: list[int],
        close_after: list[int],
        undo: Callable[[], None] | None = None,
    ) -> None:
        """Send now, or queue (and stop reading this connection) until the plugin reads.

        A queued reply keeps its own copies of the fds; when there is no fd left for them
        (EMFILE, ENFILE), the request is undone where it made something (`undo`) and answered
        with that errno instead.
        """
        if not conn.pending:
            try:
                wire.send_datagram(conn.sock, data, fds)
            except BlockingIOError:
                pass
            except OSError as exc:
                _close_fds(close_after)
                self._drop_connection(conn, f"send failed: {exc}")
                return
            else:
                _close_fds(close_after)
                return
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, lambda _s: self._flush(conn))
        # Our own copies: the originals may be closed (a destroyed object) before this is sent.
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError as exc:
            _close_fds(copies)
            copies = []
            err = exc.errno or errno.EMFILE
            self.log.warning(
                "main_reply_failed", errno=err, reason=f"cannot queue the reply: {exc}"
            )
            if undo is not None:
                undo()
            data = _error_response(err, like=data)
        conn.pending.append((data, copies))
        _close_fds(close_after)

    def _flush(self, conn: MainConnection) -> None:
        while conn.pending:
            data, fds = conn.pending[0]
            try:
                wire.send_datagram(conn.sock, data, fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self._drop_connection(conn, f"send failed: {exc}")
                return
            conn.pending.popleft()
            _close_fds(fds)
        self.sel.modify(conn.sock, selectors.EVENT_READ, lambda _s: self._on_main_socket(conn))

    def _watch_workers(self) -> None:
        assert self.run.vcpus is not None
        self._vcpus_watched = True
        self.worker_pidfds = dict(self.run.vcpus.worker_pidfds())
        for vcpu, pidfd in self.worker_pidfds.items():
            self.sel.register(pidfd, selectors.EVENT_READ, lambda _fd, v=vcpu: self._on_worker(v))
        self.sel.register(
            self.run.vcpus.runner_failures, selectors.EVENT_READ, self._on_runner_failed
        )
        self.log.info("vcpus_started", vcpus=len(self.worker_pidfds))
        self.watchdog.vcpus_started(self.run.vcpus.run_pages(), time.monotonic())
        gate = self.run.vcpus.poll_gate
        if gate is not None and gate.active:
            self._next_poll_check = time.monotonic() + poll_gate.FIRST_INTERVAL_S

    def _on_watchdog(self) -> None:
        """The time limit and stalled VCPUs (see supervisor/watchdog.py)."""
        now = time.monotonic()
        if self.watchdog.timed_out(now):
            self.log.warning("timed_out", seconds=self.watchdog.timeout)
            self.begin_shutdown(outcome.timed_out(self.watchdog.timeout), "timeout")
            return
        for found in self.watchdog.stalls(now):
            message = found.message()
            self.log.warning("vcpu_stalled", message=message, **found._asdict())
            with contextlib.suppress(OSError):
                os.write(2, f"vmsuper: warning: {message}\n".encode())

    def _on_worker(self, vcpu: int) -> None:
        assert self.run.vcpus is not None
        pidfd = self.worker_pidfds.pop(vcpu, None)
        if pidfd is None:
            # Several deaths in one wake-up: the first began the shutdown, which reaps the rest.
            return
        self.sel.unregister(pidfd)
        reason = self.run.vcpus.worker_exited(vcpu)
        if reason is None:
            self.log.info("vcpu_stopped", vcpu=vcpu)
            self.begin_shutdown(None, f"vcpu {vcpu} stopped")
        else:
            self.log.error("vcpu_failed", vcpu=vcpu, reason=reason)
            vcpus = self.run.vcpus
            failure = outcome.worker_failure(
                vcpu, reason, vcpus.worker_code(vcpu), vcpus.stop_reason(vcpu)
            )
            self.begin_shutdown(failure, "vcpu failed")

    def _on_runner_failed(self, _fd: int) -> None:
        self.begin_shutdown(None, "runner failed")  # which names the runner

    def _on_plugin_exit(self, _fd: int) -> None:
        assert self.plugin is not None
        self.sel.unregister(self.plugin.pidfd)
        self._check_limits()
        status = self.plugin.poll()
        code, described = outcome.plugin_status(status)
        self.log.info("plugin_exited", plugin_pid=self.plugin.pid, outcome=described)
        assert self.run.vcpus is not None
        hint = unused_channels_hint(
            transport=self.run.config.plugin.vcpu_transport,
            channels_given=self.worker.vcpu_channels_given,
            started=self.run.vcpus.started,
            plugin_failed=code != 0,
        )
        if hint is not None:
            self.log.warning("transport_hint", hint=hint)
            with contextlib.suppress(OSError):
                os.write(2, f"vmsuper: hint: {hint}\n".encode())
        self.begin_shutdown(None, described)

    def _on_limit_watch(self, fd: int) -> None:
        cgroups.drain_timer(fd)
        self._check_limits()

    def _check_limits(self) -> None:
        """The one place a limit of the plugin's cgroup ends the run, with the cause."""
        if self.cgroup is None or self._limit_reached:
            return
        reason = self.cgroup.violation()
        if reason is not None:
            self._limit_reached = True
            self.log.error("plugin_limit_reached", reason=reason)
            self.cgroup.kill_all()
            self.begin_shutdown(outcome.plugin_limit_reached(reason), reason)

    def _watch_output(self, plugin: PluginProcess) -> None:
        """Relay the plugin's stdout and stderr (see plugin_output.py)."""
        limits = self.run.limits
        stdout_log = StdoutFile(
            self.run.config.log.dir / STDOUT_LOG_NAME, self.log, max_bytes=limits.plugin_log_bytes
        )
        stderr_log = StderrRecords(
            self.log, max_bytes=limits.plugin_log_bytes, max_records=limits.plugin_log_lines
        )
        for fd, echo_fd, sink in (
            (plugin.stdout_fd, 1, stdout_log),
            (plugin.stderr_fd, 2, stderr_log),
        ):
            relay = OutputRelay(fd, echo_fd, sink)
            self._relays.append(relay)
            self.sel.register(fd, selectors.EVENT_READ, lambda _fd, r=relay: self._on_output(r))

    def _on_output(self, relay: OutputRelay) -> None:
        if not relay.read():
            self.sel.unregister(relay.fd)
            relay.close()
        self._steer_output(relay)

    def _on_echo_writable(self, relay: OutputRelay) -> None:
        relay.pump_echo()
        self._steer_output(relay)

    def _steer_output(self, relay: OutputRelay) -> None:
        """Wait for vmsuper's stdout/stderr while echo waits, and stop reading the plugin's
        pipe while too much does (see OutputRelay)."""
        watched = self.sel.get_map()
        if relay.echo_pending and relay.echo_fd not in watched:
            try:
                self.sel.register(
                    relay.echo_fd, selectors.EVENT_WRITE, lambda _fd: self._on_echo_writable(relay)
                )
            except (OSError, ValueError):  # a file epoll cannot watch: writes never wait
                relay.drain()
        elif not relay.echo_pending and relay.echo_fd in watched:
            self.sel.unregister(relay.echo_fd)
        if relay.closed:
            return
        if relay.wants_input and relay.fd not in watched:
            self.sel.register(relay.fd, selectors.EVENT_READ, lambda _fd: self._on_output(relay))
        elif not relay.wants_input and relay.fd in watched:
            self.sel.unregister(relay.fd)

    def _on_signal(self, _fd: int) -> None:
        for signum in self.launch.signals.take():
            self.log.info("signal_received", signal=outcome.signal_name(signum))
            self.begin_shutdown(outcome.stopped_by_signal(signum), "signal")

    # -- lifecycle -------------------------------------------------------------------------------

    def begin_shutdown(self, failure: outcome.Failure | None, why: str) -> None:
        vcpus = self.run.vcpus
        assert vcpus is not None
        if not self.shutting_down:
            # A runner that failed is the cause of whatever else ends the run with it (its
            # worker's request answered with EIO, the plugin's failing call): name it.
            for vcpu, error in vcpus.failed_runners()[:1]:
                reason = f"the runner thread of VCPU {vcpu} failed: {error}"
                failure, why = outcome.supervisor_failure(reason), "runner failed"
        if failure is not None and self.failure is None:
            self.failure = failure
        if self.shutting_down:
            return
        self.shutting_down = True
        self.watchdog.stop()
        self.log.info("shutdown_started", reason=why)
        signalled = signal_shutdown(self.run.shutdown_eventfd)
        if signalled is not Signalled.WRITING:
            self.log.warning("shutdown_eventfd", result=signalled.value)
        for pidfd in self.worker_pidfds.values():
            self.sel.unregister(pidfd)
        self.worker_pidfds.clear()
        if self._vcpus_watched:  # this part of the shutdown runs once
            self.sel.unregister(vcpus.runner_failures)
        vcpus.shutdown()
        vcpus.close_plugin_fds()
        self.deadline = time.monotonic() + self.run.config.plugin.grace_period

    def serve(self) -> tuple[int, str]:
        """Serve the launched plugin until the run ends; returns (exit status, reason)."""
        plugin = self.plugin
        sock = self.launch.sock
        assert plugin is not None and sock is not None
        self.sel.register(self.launch.signals.read_fd, selectors.EVENT_READ, self._on_signal)
        try:
            plugin.wait_started()
        except PluginStartError as exc:
            self.failure = outcome.supervisor_failure(str(exc))
            self.log.error("plugin_start_failed", error=str(exc))
            return self._finish()
        path = str(self.run.config.plugin.path)
        self.log.info("plugin_started", plugin_pid=plugin.pid, path=path)
        self.launch.sock = None
        self._add_connection(sock)
        self.sel.register(plugin.pidfd, selectors.EVENT_READ, self._on_plugin_exit)
        self._watch_output(plugin)
        if self.cgroup is not None:
            self.sel.register(self.cgroup.watch_fd, selectors.EVENT_READ, self._on_limit_watch)
        self._loop()
        return self._finish()

    def _loop(self) -> None:
        assert self.plugin is not None
        while True:
            timeout = None
            if self.deadline is not None:
                if self.plugin.poll() is not None:
                    return
                timeout = max(0.0, self.deadline - time.monotonic())
                if timeout == 0.0:
                    self.log.warning("plugin_killed", reason="grace period over")
                    self.plugin.kill()
                    self.plugin.wait()
                    return
            now = time.monotonic()
            watch = self.watchdog.wake_in(now)
            if self._next_poll_check is not None:
                check = max(0.0, self._next_poll_check - now)
                watch = check if watch is None else min(watch, check)
            if watch is not None and (timeout is None or watch < timeout):
                timeout = watch
            for key, _ in self.sel.select(timeout):
                if self.sel.get_map().get(key.fd) is not key:
                    continue  # unregistered by an earlier callback of this same wake-up
                callback = key.data
                try:
                    callback(key.fileobj)
                except Exception as exc:
                    self.log.exception("internal_error", error=repr(exc))
                    self.begin_shutdown(
                        outcome.supervisor_failure(f"internal error: {exc!r}"), "bug"
                    )
            self._on_watchdog()
            self._check_polling()

    def _check_polling(self) -> None:
        """Polling only while the host has CPU to spare (see supervisor/poll_gate.py)."""
        if self._next_poll_check is None or time.monotonic() < self._next_poll_check:
            return
        gate = self.run.vcpus.poll_gate if self.run.vcpus is not None else None
        if gate is None or self.shutting_down:
            self._next_poll_check = None
            return
        self._next_poll_check = gate.tick()

    def _finish(self) -> tuple[int, str]:
        if self.plugin is not None:
            self.plugin.kill()
            self.plugin.wait()
        for relay in self._relays:
            relay.drain()  # whatever the plugin wrote last
            relay.close()
        if not self.shutting_down:
            self.begin_shutdown(None, "finishing")
        for failure in self.worker.destroy_all():
            self.log.error("destroy_failed", error=failure)
        for conn in list(self.connections.values()):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
            conn.close()
        self.connections.clear()
        self.sel.close()
        status, reason = outcome.decide(
            self.failure, self.plugin.wait_status if self.plugin is not None else None
        )
        return status, reason


def _error_response(err: int, like: bytes = b"") -> bytes:
    """A response carrying `err`, and the oneof case of the response `like`, if any."""
    response = MainResponse()
    if like:
        case = MainResponse.FromString(like).WhichOneof("message")
        if case is not None:
            getattr(response, case).SetInParent()
    response.errno = err
    return response.SerializeToString()


def _refusal(err: int, request: bytes) -> bytes:
    """A response carrying `err` and the oneof case of `request`, if it decodes."""
    response = MainResponse()
    with contextlib.suppress(DecodeError):
        case = MainRequest.FromString(request).WhichOneof("message")
        if case is not None:
            getattr(response, case).SetInParent()
    response.errno = err
    return response.SerializeToString()


def _trace(exc: BaseException) -> str:
    """`exc`'s traceback as text (traceback, with the textwrap it imports, is imported for the
    rare record that carries one rather than at every start)."""
    import traceback

    return "".join(traceback.format_exception(exc))


def raise_open_file_limit(limits: Limits, vcpus: int, log: Any) -> None:
    """Let the supervisor hold every fd the limits allow the plugin to make it hold.

    The soft RLIMIT_NOFILE is often 1024 (Debian's default) while the object limit alone
    allows 4096 objects (an irq event holds two eventfds). The soft limit goes up to what
    the limits need, never above the hard limit; whatever still runs out is answered with
    EMFILE on the wire.
    """
    per_connection = 2 + 2 * vcpus + limits.fds_per_message  # socket, a queued reply's copies
    wanted = 2 * limits.objects + limits.connections * per_connection + 4 * vcpus + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("open_file_limit", error=str(exc), soft=soft, hard=hard)
            return
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open_file_limit", soft=soft, hard=hard, wanted=wanted)


def _publish(run: Run, config_path: Path | None) -> list[Path]:
    """Say where this run can be found (`runinfo`); a failure only costs `vmsuper stats`."""
    assert run.region is not None
    try:
        return runinfo.publish(
            log_dir=run.config.log.dir,
            config=config_path,
            vcpus=run.config.vm.vcpus,
            shm_fd=run.region.fd,
        )
    except (OSError, runinfo.RunInfoError) as exc:
        run.log.warning("run_info_failed", error=str(exc))
        return []


def run(config: Config, config_path: Path | None = None, launch: Launch | None = None) -> int:
    """Run one VM to the end; returns vmsuper's exit status (see supervisor/outcome.py).

    `launch` is the run's start (`launch.begin`: the log, the plugin started); without it, the
    run starts here. Whatever goes wrong ends here with a status and one line on stderr, never
    a traceback: a log folder that cannot be made is a supervisor-side failure (125), and so is
    any exception of vmsuper's own, whose traceback goes to supervisor.jsonl (`crashed`).
    """
    if launch is None:
        begun = launching.begin(config)
        if isinstance(begun, int):
            return begun
        launch = begun
    log = launch.log
    run_state = Run(config=config, log=log, limits=launch.limits)
    status, reason = outcome.EXIT_SUPERVISOR_FAILED, "set-up failed"
    supervisor: Supervisor | None = None
    try:
        raise_open_file_limit(run_state.limits, config.vm.vcpus, log)
        if launch.plugin is None:
            assert launch.failure is not None
            status, reason = outcome.decide(launch.failure, None)
        else:
            try:
                _set_up(run_state, launch.take_machine)
            except (SetupError, OSError) as exc:
                reason = f"set-up failed: {exc}"
                log.error("setup_failed", error=str(exc))
                tell(f"vmsuper: {reason}")
                launch.abandon()
            else:
                supervisor = Supervisor(run_state, launch)
                published = _publish(run_state, config_path)
                try:
                    status, reason = supervisor.serve()
                finally:
                    runinfo.withdraw(published)
    except Exception as exc:
        status, reason = outcome.EXIT_SUPERVISOR_FAILED, f"internal error: {exc!r}"
        log.error("crashed", error=repr(exc), trace=_trace(exc))
        launch.abandon()
    finally:
        run_state.close()
        launch.close()  # the plugin is reaped: its cgroup goes too
    logs.essential_logger().info("run_finished", status=status, reason=reason)
    if status != 0:
        tell(f"vmsuper: {reason} (exit status {status})")
    return status

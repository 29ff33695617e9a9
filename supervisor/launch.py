"""The first steps of `vmsuper run`: the run's log, the stop signals, and the plugin started.

A run's start-up is mostly Python importing the supervisor. This module imports little, so the
plugin is started before the rest is imported (structlog with the run's log, then the runner)
and the VM set up (supervisor/runner.py): the plugin's own start (joining its cgroup, the
sandbox's set-up, its exec and initialisation) overlaps that work instead of following it. The
plugin's requests wait, unread, on its socket until the event loop serves them; a set-up that
fails kills the plugin before anything answers it (`Launch.abandon`).

SIGTERM, SIGINT and SIGHUP are noted from before the plugin starts (`StopSignals`), and the
event loop takes what was noted, so a signal that comes while the VM is set up ends the run in
order, with the plugin reaped and its cgroup removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from vmsuper.shared import log_files
from vmsuper.supervisor import cgroups, outcome
from vmsuper.supervisor.config import Config
from vmsuper.supervisor.executable import check_exec_format
from vmsuper.supervisor.plugin_process import PluginProcess, PluginStartError
from vmsuper.supervisor.sandbox import Sandbox
from vmsuper.workers.limits import Limits

# SIGINT (Ctrl-C), SIGTERM, SIGHUP (the terminal went away): an orderly shutdown, then 128+N.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
UNSANDBOXED_NOTICE = (
    "vmsuper: the plugin runs unsandboxed, with all of vmsuper's privileges"
    " ([plugin] sandbox = false)"
)
START_LINE = "vmsuper: logs in "
"""How the line that names a run's log folder on stderr begins."""
INFORMATIONAL = (START_LINE, UNSANDBOXED_NOTICE)
"""How the lines vmsuper prints on stderr that report no cause begin (tests and tools that
look for the cause skip them)."""


class StopSignals:
    """The stop signals, noted for the event loop: a handler records each and the wake-up fd
    (`read_fd`, for the loop's selector) gets a byte."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._noted: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        def note(signum: int, frame: object) -> None:
            self._noted.append(signum)

        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, note)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def take(self) -> list[int]:
        """The signals noted since the last call, oldest first."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 512)
        noted, self._noted = self._noted, []
        return noted

    def close(self) -> None:
        """Put back the handlers `install` found, and close the wake-up fds."""
        if self._previous:
            signal.set_wakeup_fd(-1)
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
        os.close(self.read_fd)
        os.close(self._write_fd)


class Launch:
    """What the first steps leave to the run: its log and limits, the stop signals, and the
    plugin with its main socket and cgroup (`plugin` None: it could not be started, `failure`
    says why)."""

    def __init__(self, config: Config, signals: StopSignals) -> None:
        self.config = config
        self.log: Any = None  # the supervisor's logger, once `begin` has opened the log
        self.limits: Limits = config.limits.to_limits()
        self.signals = signals
        self.plugin: PluginProcess | None = None
        self.sock: socket.socket | None = None
        self.cgroup: cgroups.PluginCgroup | None = None
        self.failure: outcome.Failure | None = None
        self.latency_fd = -1
        self._closed = False

    def abandon(self) -> None:
        """Kill and reap the plugin, whatever state it is in (the run ends before serving it)."""
        plugin = self.plugin
        if plugin is None:
            return
        with contextlib.suppress(Exception):
            plugin.kill()
            plugin.wait()

    def close(self) -> None:
        """Release what the launch holds (once); the plugin must be reaped by now."""
        if self._closed:
            return
        self._closed = True
        if self.plugin is not None:
            with contextlib.suppress(OSError):
                self.plugin.close()
            self.plugin = None
        if self.sock is not None:
            self.sock.close()
        if self.cgroup is not None:
            for problem in self.cgroup.remove():
                if self.log is not None:
                    self.log.warning("cgroup_not_removed", error=problem)
            self.cgroup = None
        if self.latency_fd >= 0:
            os.close(self.latency_fd)
            self.latency_fd = -1
        self.signals.close()


def run(config: Config, config_path: Path | None = None) -> int:
    """`vmsuper run`: start the plugin (`begin`), then import the runner and hand it the run
    (`runner.run`); returns vmsuper's exit status."""
    launch = begin(config)
    if isinstance(launch, int):
        return launch
    try:
        # With the runner, the VCPU workers' modules, while the plugin starts: at Start they
        # would be imported between the plugin's Start and its first exit.
        import vmsuper.workers.worker_process  # noqa: F401
        from vmsuper.supervisor import runner

        return runner.run(config, config_path, launch=launch)
    finally:  # after a failure of vmsuper's own; a run that ended has done this already
        launch.abandon()
        launch.close()


def begin(config: Config) -> Launch | int:
    """Make the run's log folder, note the stop signals, start the plugin, then open the log.

    structlog is imported with the log, after the plugin is started: its import overlaps the
    plugin's start. What happened before (low latency refused, the plugin not started) is
    logged then, after run_started.

    Returns vmsuper's exit status instead when the log cannot be made (125, with one line on
    stderr). A plugin that cannot be started leaves `Launch.failure` set.
    """
    try:
        log_files.make_private_folder(config.log.dir)
    except OSError as exc:
        return _no_log(f"cannot create the log folder {config.log.dir}", exc)
    signals = StopSignals()
    signals.install()
    launch = Launch(config, signals)
    latency_error = None
    if config.vm.low_latency:  # from before the plugin runs, as the VCPUs may run at once
        launch.latency_fd, latency_error = _hold_low_latency()
    not_started = _start_plugin(launch)
    from vmsuper.shared import logs

    log_path = config.log.dir / log_files.SUPERVISOR_LOG
    try:
        launch.log = logs.configure_logging(log_path, level=config.log.level, mark_live=True)
    except OSError as exc:
        launch.abandon()
        launch.close()
        return _no_log(f"cannot open the log file {log_path}", exc)
    _announce_start(config, logs.essential_logger())
    if not config.plugin.sandbox:
        tell(UNSANDBOXED_NOTICE)
    if latency_error is not None:
        launch.log.warning("low_latency_unavailable", error=latency_error)
    if not_started is not None:
        event, fields = not_started
        launch.log.error(event, **fields)
    return launch


def _no_log(what: str, exc: OSError) -> int:
    """125, and one line on stderr: a run without its log would leave nothing to read."""
    reason = f"{what}: {exc.strerror or exc}"
    status = outcome.EXIT_SUPERVISOR_FAILED
    print(f"vmsuper: {reason} (exit status {status})", file=sys.stderr)
    return status


def _start_plugin(launch: Launch) -> tuple[str, dict[str, str]] | None:
    """Start the plugin in its cgroup and sandbox; when it cannot be, set `launch.failure` and
    return the record that says why (the log is not open yet)."""
    config = launch.config
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    launch.sock = ours
    try:
        plugin = config.plugin
        check_exec_format(plugin.path)
        limits = launch.limits
        launch.cgroup = cgroups.for_run(
            limits.plugin_memory, limits.plugin_processes, limits.plugin_cpu
        )
        launch.plugin = PluginProcess.spawn(
            plugin.path,
            plugin.args,
            plugin.env,
            theirs.fileno(),
            sandbox=_sandbox(config),
            open_files=limits.plugin_open_files,
            before_exec=launch.cgroup.enter if launch.cgroup is not None else None,
            wait=False,
        )
    except PluginStartError as exc:
        launch.failure = outcome.supervisor_failure(str(exc))
        return "plugin_start_failed", {"error": str(exc)}
    except Exception as exc:  # vmsuper's own: the run ends as for any crash (runner.run)
        import traceback  # only for this record

        launch.failure = outcome.supervisor_failure(f"internal error: {exc!r}")
        return "crashed", {"error": repr(exc), "trace": "".join(traceback.format_exception(exc))}
    finally:
        theirs.close()
    return None


def _hold_low_latency() -> tuple[int, str | None]:
    """Ask the idle governor for shallow C-states while the fd stays open: (fd, None), or
    (-1, why not)."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY | os.O_CLOEXEC)
        os.write(fd, struct.pack("<i", 0))
    except OSError as exc:
        return -1, str(exc)
    return fd, None


def _sandbox(cfg: Config) -> Sandbox | None:
    """The plugin's sandbox, hiding the log root (other runs' logs) from it; None: unconfined."""
    if not cfg.plugin.sandbox:
        return None
    hidden = () if cfg.log.root is None else (cfg.log.root,)
    return Sandbox.for_plugin(cfg.plugin, hidden=hidden)


def tell(line: str) -> None:
    """One line on stderr, which may be gone by now (a terminal that hung up: EIO)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def _announce_start(config: Config, essential: Any) -> None:
    """The run_started record (kept at every level) and one line on stderr naming the logs."""
    essential.info(
        "run_started",
        vcpus=config.vm.vcpus,
        transport=config.plugin.vcpu_transport,
        log_dir=str(config.log.dir),
    )
    with contextlib.suppress(OSError, ValueError):
        print(f"{START_LINE}{config.log.dir}", file=sys.stderr, flush=True)

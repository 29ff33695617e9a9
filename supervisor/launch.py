"""The first steps of `vmsuper run`: the run's log, the stop signals, and the plugin started.

A run's start-up is mostly Python importing the supervisor. This module imports little, so the
plugin is started (and then the VM made: supervisor/machine.py) before the rest is imported and
set up (supervisor/runner.py): the plugin's own start (joining its cgroup, the sandbox's set-up,
its exec and initialisation) overlaps that work instead of following it. structlog is among the
rest: the log file is opened before the plugin starts (shared/log_files.py), its records are
written once structlog is in (`PendingRecords`). The plugin's requests wait, unread, on its
socket until the event loop serves them; a set-up that fails kills the plugin before anything
answers it (`Launch.abandon`).

SIGTERM, SIGINT and SIGHUP are noted from before the plugin starts (`StopSignals`), and the
event loop takes what was noted, so a signal that comes while the VM is set up ends the run in
order, with the plugin reaped and its cgroup removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmsuper.shared import log_files
from vmsuper.supervisor import cgroups, collector, outcome
from vmsuper.supervisor.config import Config
from vmsuper.supervisor.executable import check_exec_format
from vmsuper.supervisor.plugin_process import PluginProcess, PluginStartError
from vmsuper.supervisor.sandbox import Sandbox
from vmsuper.workers.limits import Limits

if TYPE_CHECKING:
    from vmsuper.supervisor.machine import Machine

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

    def __init__(self, config: Config, log: Any, signals: StopSignals) -> None:
        self.config = config
        self.log = log
        self.limits: Limits = config.limits.to_limits()
        self.signals = signals
        self.plugin: PluginProcess | None = None
        self.sock: socket.socket | None = None
        self.cgroup: cgroups.PluginCgroup | None = None
        self.failure: outcome.Failure | None = None
        self.machine: Machine | Exception | None = None
        self._closed = False

    def take_machine(self) -> Machine:
        """The run's VM, made once the plugin was started, now the caller's to close; raises
        what kept it from being made (`MachineError`, or a failure of vmsuper's own), as the
        set-up making it would have."""
        made, self.machine = self.machine, None
        if isinstance(made, BaseException):
            raise made
        if made is None:  # not made (no plugin started), or taken already: a fresh one
            from vmsuper.supervisor.machine import open_machine

            return open_machine()
        return made

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
        if self.machine is not None and not isinstance(self.machine, BaseException):
            self.machine.close()  # the run ended before its set-up took it
        self.machine = None
        if self.cgroup is not None:
            for problem in self.cgroup.remove():
                self.log.warning("cgroup_not_removed", error=problem)
            self.cgroup = None
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

        collector.resume()  # the start-up's imports are made (supervisor/collector.py)
        return runner.run(config, config_path, launch=launch)
    finally:  # after a failure of vmsuper's own; a run that ended has done this already
        launch.abandon()
        launch.close()


def begin(config: Config) -> Launch | int:
    """Open the run's log, note the stop signals and start the plugin.

    Returns vmsuper's exit status instead when the log folder cannot be made (125, with one
    line on stderr), before anything has started. A plugin that cannot be started leaves
    `Launch.failure` set.
    """
    try:
        log_file = log_files.open_log(config.log.dir / log_files.SUPERVISOR_LOG, mark_live=True)
    except OSError as exc:
        said = exc.strerror or str(exc)
        reason = f"cannot create the log folder {config.log.dir}: {said}"
        status = outcome.EXIT_SUPERVISOR_FAILED
        print(f"vmsuper: {reason} (exit status {status})", file=sys.stderr)
        return status
    tell(f"{START_LINE}{config.log.dir}")
    signals = StopSignals()
    signals.install()
    pending = PendingRecords()
    launch = Launch(config, pending, signals)
    try:
        if not config.plugin.sandbox:
            tell(UNSANDBOXED_NOTICE)
        _start_plugin(launch)
        if launch.plugin is not None:  # the VM, made now: see supervisor/machine.py
            from vmsuper.supervisor import machine

            try:
                launch.machine = machine.open_machine()
            except Exception as exc:  # raised where the set-up takes it (`take_machine`)
                launch.machine = exc
        # structlog's import, tens of ms, overlaps the plugin's start.
        from vmsuper.shared import logs

        launch.log = logs.log_to(log_file, level=config.log.level)
    except BaseException:  # vmsuper's own: nothing is left running, and the log unlocked
        log_file.close()
        launch.abandon()
        launch.close()
        raise
    logs.essential_logger().info(
        "run_started",
        vcpus=config.vm.vcpus,
        transport=config.plugin.vcpu_transport,
        log_dir=str(config.log.dir),
    )
    pending.write_to(launch.log)
    return launch


def _start_plugin(launch: Launch) -> None:
    """Start the plugin in its cgroup (and sandbox), on a new main socket; a failure sets
    `launch.failure` and is logged."""
    config, log = launch.config, launch.log
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
        log.error("plugin_start_failed", error=str(exc))
    except Exception as exc:  # vmsuper's own: the run ends as for any crash (runner.run)
        import traceback  # only for this record

        launch.failure = outcome.supervisor_failure(f"internal error: {exc!r}")
        log.error("crashed", error=repr(exc), trace="".join(traceback.format_exception(exc)))
    finally:
        theirs.close()


class PendingRecords:
    """The log of a run's first steps, before structlog is imported: it keeps each record
    (`warning` and `error`, as the logger's: level, event, fields) for `write_to` to pass on
    to the real one."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.records.append(("warning", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.records.append(("error", event, fields))

    def write_to(self, log: Any) -> None:
        """Log the records kept, oldest first, to `log`, and forget them."""
        records, self.records = self.records, []
        for level, event, fields in records:
            getattr(log, level)(event, **fields)


def _sandbox(cfg: Config) -> Sandbox | None:
    """The plugin's sandbox, hiding the log root (other runs' logs) from it; None: unconfined."""
    if not cfg.plugin.sandbox:
        return None
    hidden = () if cfg.log.root is None else (cfg.log.root,)
    return Sandbox.for_plugin(cfg.plugin, hidden=hidden)


def tell(line: str) -> None:
    """One line on stderr, which may be gone by now (a terminal that hung up: EIO) or closed."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)

"""One `vmsuper run` of a benchmark plugin, timed from the harness's side.

The harness takes `time.monotonic()` just before it executes `vmsuper run`, so the plugins'
CLOCK_MONOTONIC stamps (the same clock) can be read against it. Each run gets its own folder
for the config, the logs and vmsuper's stderr. A plugin told to hold blocks on a FIFO after a
report line, so the harness can look at the running VM (`while_held`) before letting it go on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from vmsuper.testing import VmSpec

REPORT_PREFIX: Final = '{"bench"'
DEFAULT_TIMEOUT_S: Final = 120.0
_STDERR_TAIL: Final = 4000
_STOP_GRACE_S: Final = 5.0


class RunError(Exception):
    """A run failed, timed out, or its plugin reported nothing; the message says how."""


@dataclass(frozen=True)
class RunSpec:
    """What to run: the plugin's argv (absolute executable first) and the VM's settings."""

    plugin: Sequence[str]
    vcpus: int = 1
    transport: str = "socket"
    low_latency: bool = False
    # `[vm] poll_us`; None leaves the key out, so vmsuper's own default is what gets measured.
    poll_us: int | None = None
    holds: int = 0
    expect_report: bool = True
    sandbox: bool = True
    # Host folders the sandboxed plugin must see (read-only, at the same path): the guest
    # binaries and the FIFO live there.
    mounts: Sequence[Path] = ()
    # Variables set for `vmsuper run` on top of this process's (e.g. the socket of a
    # `vmsuper serve` to hand the run to).
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    folder: Path
    t_exec: float
    t_exec_wall: float
    t_exit: float
    status: int
    supervisor_pid: int
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.t_exit - self.t_exec


def vmsuper_command() -> list[str]:
    """`vmsuper` as users run it: the console script beside this interpreter if installed."""
    script = Path(sys.executable).with_name("vmsuper")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "vmsuper"]


def config_toml(spec: RunSpec, args: Sequence[str], log_dir: Path) -> str:
    """The run's config, written the way vmsuper's own test runner writes one."""
    vm = VmSpec(
        vcpus=spec.vcpus,
        low_latency=spec.low_latency,
        poll_us=spec.poll_us,
        transport=spec.transport,
        args=list(args),
        sandbox=spec.sandbox,
        mounts=[(mount, None, False) for mount in spec.mounts],
    )
    return vm.to_toml(Path(spec.plugin[0]), log_dir)


def run_vm(
    spec: RunSpec,
    folder: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    while_held: Callable[[RunResult, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run one VM to its end and return the plugin's report with the harness's timestamps.

    With `spec.holds`, the plugin pauses that many times after printing a report line, until
    the harness has called `while_held(result, line)` and released it through the FIFO.
    """
    folder.mkdir(parents=True, exist_ok=True)
    args = list(spec.plugin[1:])
    fifo = folder / "release.fifo"
    if spec.holds:
        os.mkfifo(fifo)
        args.append(str(fifo))
    config = folder / "vm.toml"
    config.write_text(config_toml(spec, args, folder / "logs"))
    stderr_path = folder / "stderr.txt"
    deadline = time.monotonic() + timeout
    with open(stderr_path, "wb") as stderr:
        t_exec_wall = time.time()
        t_exec = time.monotonic()
        proc = subprocess.Popen(
            [*vmsuper_command(), "run", str(config)],
            env={**os.environ, **spec.env} if spec.env else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    result = RunResult(folder, t_exec, t_exec_wall, t_exit=0.0, status=-1, supervisor_pid=proc.pid)
    try:
        assert proc.stdout is not None
        reader = _ReportReader(proc.stdout.fileno(), deadline)
        for _ in range(spec.holds):
            line = reader.next_report()
            if line is None:
                break
            result.report = line
            if while_held is not None:
                while_held(result, line)
            _release(fifo, deadline, proc)
        for line in reader.rest():
            result.report = line
        result.status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        result.t_exit = time.monotonic()
    except subprocess.TimeoutExpired:
        raise RunError(
            f"vmsuper run did not finish in {timeout:.0f} s{_tail(stderr_path)}"
        ) from None
    except RunError as exc:
        _stop(proc)
        raise RunError(f"{exc}{_tail(stderr_path)}") from None
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    if result.status != 0:
        raise RunError(f"vmsuper run exited with status {result.status}{_tail(stderr_path)}")
    if spec.expect_report and not result.report:
        raise RunError(f"the plugin printed no report{_tail(stderr_path)}")
    return result


class _ReportReader:
    """The plugin's report lines from vmsuper's stdout, read with a deadline."""

    def __init__(self, fd: int, deadline: float) -> None:
        self._fd = fd
        self._deadline = deadline
        self._buffer = b""
        self._eof = False

    def next_report(self) -> dict[str, Any] | None:
        """The next report line, or None at the end of the output."""
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                if line.startswith(REPORT_PREFIX.encode()):
                    report: dict[str, Any] = json.loads(line)
                    return report
                continue
            if self._eof:
                return None
            self._fill()

    def rest(self) -> list[dict[str, Any]]:
        reports = []
        while (report := self.next_report()) is not None:
            reports.append(report)
        return reports

    def _fill(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired("vmsuper", 0)
        readable, _, _ = select.select([self._fd], [], [], remaining)
        if readable:
            chunk = os.read(self._fd, 65536)
            self._buffer += chunk
            self._eof = not chunk


def log_event_times(run: RunResult) -> dict[str, float]:
    """Seconds from the exec to the first supervisor log record of each event name.

    The records carry wall-clock ISO timestamps, hence the wall-clock exec time; a missing or
    unreadable log gives an empty answer (the log format is not the harness's to rely on).
    """
    times: dict[str, float] = {}
    try:
        lines = (run.folder / "logs" / "supervisor.jsonl").read_text().splitlines()
    except OSError:
        return times
    for line in lines:
        try:
            record = json.loads(line)
            stamp = datetime.fromisoformat(record["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        times.setdefault(str(record.get("event")), stamp - run.t_exec_wall)
    return times


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace").strip()
    return f"; stderr:\n{text[-_STDERR_TAIL:]}" if text else ""


def _parse_report(out: bytes) -> dict[str, Any]:
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(REPORT_PREFIX):
            report: dict[str, Any] = json.loads(line)
            return report
    return {}


def _release(fifo: Path, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    """Let a holding plugin go: open its FIFO for writing (once it reads) and close it."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            if proc.poll() is not None:
                raise RunError("the run ended before its plugin waited on the FIFO") from None
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("vmsuper", 0) from None
            time.sleep(0.001)
            continue
        os.close(fd)
        return


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a run that failed half-way: SIGTERM (vmsuper shuts down cleanly), then SIGKILL to
    the session it leads, so no plugin or worker outlives it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_command(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Run a program that prints one report line (the C reference) and return the report."""
    name = Path(argv[0]).name
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise RunError(f"{name} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        raise RunError(f"{name} exited with {done.returncode}: {done.stderr.strip()}")
    report = _parse_report(done.stdout.encode())
    if not report:
        raise RunError(f"{name} printed no report")
    return report

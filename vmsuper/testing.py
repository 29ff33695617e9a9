"""Run a whole VM — `vmsuper run` as a real process — from a test, and collect what it left.

This is what the pytest plugin (`vmsuper.pytest_plugin`) publishes to users; vmsuper's own
end-to-end tests use it too. Each run gets its own folder (config, logs), so parallel test
processes never share anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmsuper.capacity import CapacityGuard, Lease

DEFAULT_TIMEOUT = 60.0
SANDBOX_VARIABLE = "VMSUPER_TEST_SANDBOX"
KVM_PATH = "/dev/kvm"
REPORT_LOG_LINES = 20
"""How many last lines of each log a failing test's report shows."""


def default_sandbox() -> bool:
    """VmSpec's default: sandboxed, as `vmsuper run` is, unless VMSUPER_TEST_SANDBOX=0.

    A suite that looks at its plugins from the host (their pid, their parent, files they
    write) sets the variable to 0 for all its runs, or passes `VmSpec(sandbox=False)` for one.
    """
    return os.environ.get(SANDBOX_VARIABLE, "") != "0"


def required_strictly() -> bool:
    """In CI (CI=true), or with VMSUPER_REQUIRE_KVM=1, a missing /dev/kvm fails tests rather
    than skipping them: a suite that ran nothing must not look green."""
    return os.environ.get("CI") == "true" or os.environ.get("VMSUPER_REQUIRE_KVM") == "1"


def kvm_unusable_reason() -> str | None:
    """Why this host cannot run VMs (None if it can)."""
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_PATH} is not usable: {exc.strerror}"
    os.close(fd)
    return None


@dataclass
class VmResult:
    """What one run produced: exit status, the plugin's output and the run's logs."""

    status: int
    stdout: str
    stderr: str
    log_dir: Path
    config_path: Path

    def records(self, name: str = "supervisor") -> list[dict[str, Any]]:
        """The JSON-lines records of `supervisor` or `vcpu-N`."""
        path = self.log_dir / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def vcpu_records(self, vcpu: int) -> list[dict[str, Any]]:
        return self.records(f"vcpu-{vcpu}")

    def events(self, name: str = "supervisor") -> list[str]:
        return [r.get("event", "") for r in self.records(name)]


@dataclass
class VmSpec:
    """The config of a test run, written as TOML into the run's folder."""

    vcpus: int = 1
    low_latency: bool = False
    # [vm] poll_us; None leaves the key out (the config's default).
    poll_us: int | None = None
    # [vm] timeout and stall_warning (seconds); None leaves the key out (no limit; 5 s).
    timeout: float | None = None
    stall_warning: float | None = None
    transport: str = "socket"
    grace_period: float = 1.0
    log_level: str = "info"
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    net: Mapping[str, str] | None = None
    # [plugin] sandbox: true unless VMSUPER_TEST_SANDBOX=0 (see `default_sandbox`); None
    # leaves the key out (the config's default, true).
    sandbox: bool | None = field(default_factory=default_sandbox)
    # [[plugin.mounts]]: (src, dst or None, writable); a callable plugin's module folder is
    # added by VmRunner.
    mounts: Sequence[tuple[Path | str, str | None, bool]] = ()
    # [plugin] user; None leaves the key out (the default user).
    user: str | None = None
    extra_toml: str = ""

    def to_toml(self, plugin_path: Path, log_dir: Path) -> str:
        lines = [
            "[vm]",
            f"vcpus = {self.vcpus}",
            f"low_latency = {json.dumps(self.low_latency)}",
        ]
        if self.poll_us is not None:
            lines.append(f"poll_us = {self.poll_us}")
        if self.timeout is not None:
            lines.append(f"timeout = {float(self.timeout)}")
        if self.stall_warning is not None:
            lines.append(f"stall_warning = {float(self.stall_warning)}")
        lines += [
            "[plugin]",
            f"path = {json.dumps(str(plugin_path))}",
            f"args = {json.dumps(list(self.args))}",
            f"vcpu_transport = {json.dumps(self.transport)}",
            f"grace_period = {self.grace_period}",
        ]
        if self.env:
            pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in self.env.items())
            lines.append(f"env = {{ {pairs} }}")
        if self.sandbox is not None:
            lines.append(f"sandbox = {json.dumps(self.sandbox)}")
        if self.user is not None:
            lines.append(f"user = {json.dumps(self.user)}")
        for src, dst, writable in self.mounts:
            lines += ["[[plugin.mounts]]", f"src = {json.dumps(str(src))}"]
            if dst is not None:
                lines.append(f"dst = {json.dumps(dst)}")
            lines.append(f"writable = {json.dumps(writable)}")
        if self.net is not None:
            lines.append("[net]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in self.net.items()]
        lines += [
            "[log]",
            f"dir = {json.dumps(str(log_dir))}",
            f"level = {json.dumps(self.log_level)}",
        ]
        return "\n".join(lines) + "\n" + self.extra_toml


def write_python_plugin(folder: Path, source: str, name: str = "plugin.py") -> Path:
    """Write an executable Python plugin that runs with this interpreter."""
    path = folder / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
    path.chmod(0o755)
    return path


def _callable_plugin(folder: Path, func: Callable[..., Any]) -> Path:
    module = sys.modules[func.__module__]
    module_file = getattr(module, "__file__", None)
    if module_file is None or "<" in func.__qualname__:
        raise ValueError("a callable plugin must be a module-level function in a real file")
    source = f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_vmsuper_plugin_module", {module_file!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        result = getattr(module, {func.__name__!r})()
        sys.exit(0 if result is None else int(result))
    """
    return write_python_plugin(folder, source, name=f"{func.__name__}_plugin.py")


@dataclass
class StartedRun:
    """A run this runner started, kept to report on it when a test fails."""

    proc: subprocess.Popen[str]
    config_path: Path
    log_dir: Path
    result: VmResult | None = None


@dataclass
class VmRunner:
    """Starts VMs for tests; one folder per run below `base`.

    It keeps every run it started (`started`): the pytest plugin reports on them when a test
    fails (`report_sections`).

    With a `capacity` guard, each VM first takes as many host-wide VCPU slots as it has VCPUs
    (`vmsuper.capacity`); `run` gives them back when the VM has ended, `close` whatever
    `start`ed VMs still hold. `on_wait` hears of every VM that had to wait for its slots.
    """

    base: Path
    timeout: float = DEFAULT_TIMEOUT
    capacity: CapacityGuard | None = None
    on_wait: Callable[[Lease, int], None] | None = None
    """Called with the lease and the VM's VCPU count when taking slots had to wait."""
    on_start: Callable[[Path], None] | None = None
    """Called with each run's log folder as its VM starts."""
    _count: int = 0
    started: list[StartedRun] = field(default_factory=list)
    _leases: dict[int, Lease] = field(default_factory=dict)

    def folder(self) -> Path:
        self._count += 1
        path = self.base / f"run{self._count}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(
        self,
        plugin: Path | str | Callable[..., Any],
        spec: VmSpec | None = None,
        *,
        popen: Mapping[str, Any] | None = None,
    ) -> tuple[subprocess.Popen[str], Path, Path]:
        """Start `vmsuper run` without waiting; returns (process, config path, log dir).

        The process's stdout and stderr are pipes: collect them, and the exit status, with
        `finish(process, config_path, log_dir, timeout)` (or `self.finish(process)`).
        `popen` adds keyword arguments of `subprocess.Popen` (e.g. ``process_group=0``, or a
        ``preexec_fn`` that lowers a limit vmsuper starts with).
        """
        spec = spec or VmSpec()
        folder = self.folder()
        if callable(plugin):
            plugin_path = _callable_plugin(folder, plugin)
            if spec.sandbox is not False:  # the plugin loads the function's module file
                module_folder = Path(sys.modules[plugin.__module__].__file__ or ".").parent
                spec = dataclasses.replace(
                    spec, mounts=[*spec.mounts, (module_folder, None, False)]
                )
        else:
            plugin_path = Path(plugin)
        log_dir = folder / "logs"
        config_path = folder / "vm.toml"
        config_path.write_text(spec.to_toml(plugin_path.resolve(), log_dir))
        lease = None
        if self.capacity is not None:
            lease = self.capacity.acquire(spec.vcpus)
            if lease.waited and self.on_wait is not None:
                self.on_wait(lease, spec.vcpus)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmsuper", "run", str(config_path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env=os.environ.copy(),
                **(popen or {}),
            )
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        self.started.append(StartedRun(proc, config_path, log_dir))
        if lease is not None:
            self._leases[proc.pid] = lease
        if self.on_start is not None:
            self.on_start(log_dir)
        return proc, config_path, log_dir

    def release(self, proc: subprocess.Popen[str]) -> None:
        """Give back the capacity slots of a VM that `start` started (once it has ended)."""
        lease = self._leases.pop(proc.pid, None)
        if lease is not None:
            lease.release()

    def close(self) -> None:
        """Give back every slot still held (the VMs' processes should have ended)."""
        for lease in self._leases.values():
            lease.release()
        self._leases.clear()

    def run(
        self,
        plugin: Path | str | Callable[..., Any],
        spec: VmSpec | None = None,
        *,
        timeout: float | None = None,
    ) -> VmResult:
        """Run a VM to the end. On a timeout vmsuper gets SIGTERM, then SIGKILL."""
        proc, _, _ = self.start(plugin, spec)
        return self.finish(proc, timeout=timeout)

    def finish(self, proc: subprocess.Popen[str], *, timeout: float | None = None) -> VmResult:
        """`finish` for a run this runner started; the result is kept for the report, and
        the run's capacity slots are given back."""
        run = next(r for r in self.started if r.proc is proc)
        try:
            run.result = finish(proc, run.config_path, run.log_dir, timeout or self.timeout)
        finally:
            self.release(proc)
        return run.result

    def stop_all(self) -> None:
        """Stop (SIGTERM, then SIGKILL) the runs still going; at the end of a test."""
        for run in self.started:
            if run.proc.poll() is None:
                with contextlib.suppress(TimeoutError):
                    run.result = finish(run.proc, run.config_path, run.log_dir, 0.001)
            else:
                for stream in (run.proc.stdout, run.proc.stderr):
                    if stream is not None:
                        stream.close()

    def report_sections(self) -> list[tuple[str, str]]:
        """(title, text) of what a failing test needs to see, for each run it started."""
        sections = []
        for number, run in enumerate(self.started, 1):
            name = "vmsuper" if len(self.started) == 1 else f"vmsuper run {number}"
            sections += run_report(name, run)
        return sections


def run_report(name: str, run: StartedRun) -> list[tuple[str, str]]:
    """The report sections of one run: outcome, output, the last lines of each log."""
    result = run.result
    if result is None and run.proc.poll() is not None:
        with contextlib.suppress(Exception):
            # Ended, but nobody collected it (a test that failed before `finish`).
            run.result = result = finish(run.proc, run.config_path, run.log_dir, 5)
    finished = _run_finished(run.log_dir)
    if finished is not None:
        outcome = f"status {finished.get('status')}: {finished.get('reason')}"
    elif run.proc.poll() is None:
        outcome = "still running when the test failed (stopped at teardown)"
    else:
        outcome = f"exit status {run.proc.returncode}, no run_finished record"
    summary = [
        f"outcome: {outcome}",
        f"log folder: {run.log_dir}",
        f"config: {run.config_path}",
        f"read the logs: vmsuper logs {run.log_dir}",
    ]
    sections = [(f"{name}: outcome", "\n".join(summary))]
    if result is not None:
        sections.append((f"{name}: stdout (the plugin's)", result.stdout or "(empty)"))
        sections.append(
            (f"{name}: stderr (vmsuper's and the plugin's)", result.stderr or "(empty)")
        )
    for path in _log_files(run.log_dir):
        lines = _last_lines(path, REPORT_LOG_LINES)
        sections.append((f"{name}: {path.name}, last {REPORT_LOG_LINES} lines", lines or "(empty)"))
    return sections


def _run_finished(log_dir: Path) -> dict[str, Any] | None:
    path = log_dir / "supervisor.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "run_finished":
                return record
    return None


def _log_files(log_dir: Path) -> list[Path]:
    """supervisor.jsonl, then vcpu-N.jsonl in VCPU order."""
    if not log_dir.is_dir():
        return []
    vcpus = sorted(
        (p for p in log_dir.glob("vcpu-*.jsonl") if p.stem[5:].isdigit()),
        key=lambda p: int(p.stem[5:]),
    )
    supervisor = log_dir / "supervisor.jsonl"
    return ([supervisor] if supervisor.exists() else []) + vcpus


def _last_lines(path: Path, count: int) -> str:
    """The last `count` records of a log, as `vmsuper logs` prints them."""
    from vmsuper.shared.logs import format_text

    lines = path.read_text(errors="replace").splitlines()[-count:]
    shown = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            shown.append(line)
            continue
        shown.append(format_text(record) if isinstance(record, dict) else line)
    return "\n".join(shown)


def finish(
    proc: subprocess.Popen[str], config_path: Path, log_dir: Path, timeout: float
) -> VmResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise TimeoutError(f"vmsuper run did not finish in {timeout} s; stderr:\n{err}") from None
    return VmResult(proc.returncode, out, err, log_dir, config_path)


def iter_processes_with_env(key: str, value: str) -> Iterator[int]:
    """Pids of processes whose environment holds key=value (to find leftovers of a run)."""
    needle = f"{key}={value}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    yield int(entry.name)
        except OSError:
            continue

"""Run a whole VM — `vmsuper run` as a real process — from a test, and collect what it left.

This is what the pytest plugin (`vmsuper.pytest_plugin`) publishes to users; vmsuper's own
end-to-end tests use it too. Each run gets its own folder (config, logs), so parallel test
processes never share anything.
"""

from __future__ import annotations

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


def default_sandbox() -> bool:
    """VmSpec's default: plugins run unsandboxed unless VMSUPER_TEST_SANDBOX=1.

    Unsandboxed is the default here, unlike in vmsuper's own config, because tests look at the
    plugin from the host (its pid, its parent, files it writes); set the variable to run a
    whole suite sandboxed, or pass `VmSpec(sandbox=True)` for one run.
    """
    return os.environ.get(SANDBOX_VARIABLE, "") == "1"


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
    # [vm] fast_exits and poll_us; None leaves the key out (the config's default).
    fast_exits: bool | None = None
    poll_us: int | None = None
    transport: str = "socket"
    grace_period: float = 1.0
    log_level: str = "info"
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    net: Mapping[str, str] | None = None
    # [plugin] sandbox; None leaves the key out (the config's default, true).
    sandbox: bool | None = field(default_factory=default_sandbox)
    # [[plugin.mounts]]: (src, dst or None, writable); a callable plugin's module folder is
    # added by VmRunner.
    mounts: Sequence[tuple[Path | str, str | None, bool]] = ()
    extra_toml: str = ""

    def to_toml(self, plugin_path: Path, log_dir: Path) -> str:
        lines = [
            "[vm]",
            f"vcpus = {self.vcpus}",
            f"low_latency = {json.dumps(self.low_latency)}",
        ]
        if self.fast_exits is not None:
            lines.append(f"fast_exits = {json.dumps(self.fast_exits)}")
        if self.poll_us is not None:
            lines.append(f"poll_us = {self.poll_us}")
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
class VmRunner:
    """Starts VMs for tests; one folder per run below `base`.

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
    _leases: dict[int, Lease] = field(default_factory=dict)

    def folder(self) -> Path:
        self._count += 1
        path = self.base / f"run{self._count}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(
        self, plugin: Path | str | Callable[..., Any], spec: VmSpec | None = None
    ) -> tuple[subprocess.Popen[str], Path, Path]:
        """Start `vmsuper run` without waiting; returns (process, config path, log dir)."""
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
            )
        except BaseException:
            if lease is not None:
                lease.release()
            raise
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
        proc, config_path, log_dir = self.start(plugin, spec)
        try:
            return finish(proc, config_path, log_dir, timeout or self.timeout)
        finally:
            self.release(proc)


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

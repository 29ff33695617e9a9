"""vmsuper in a real terminal: the plugin never holds it, and Ctrl-C, a hang-up or a signal to
vmsuper's whole process group end the run in order (shutdown eventfd, grace period, 128+N)."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rawplugin import plugin_source

from vmsuper.testing import VmResult, VmRunner, VmSpec, finish, write_python_plugin

pytestmark = pytest.mark.kvm

DEADLINE = 60.0

# Waits for the VM's end on the shutdown eventfd, then says so: a plugin killed at once
# never prints SAW SHUTDOWN.
WAITS_FOR_SHUTDOWN = """
_, fds = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
_, vcpus = call(req(get_vcpus=pb.MainRequest.GetVcpus()))
call(req(start=pb.MainRequest.Start()))
# The VCPU's Init comes from its worker: the worker is up, in its own session, before READY.
vcpu = socket.socket(fileno=vcpus[0])
wire.send_datagram(vcpu, pb.VcpuRequest(wait=pb.VcpuRequest.Wait()).SerializeToString(), [])
assert pb.VcpuResponse.FromString(wire.recv_datagram(vcpu).data).wait.HasField("init")
print("READY", os.getpid(), flush=True)
os.eventfd_read(fds[0])
print("SAW SHUTDOWN", flush=True)
sys.exit(0)
"""

# Tries to read, reconfigure and take over whatever terminal its stdio might be.
GRABS_THE_TERMINAL = """
import termios
RESULTS["isatty"] = [os.isatty(fd) for fd in (0, 1, 2)]
for fd in (0, 1, 2):
    try:
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~(termios.ECHO | termios.ICANON)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        pass
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
    RESULTS["dev_tty"] = "opened"
except OSError as exc:
    RESULTS["dev_tty"] = errno.errorcode[exc.errno]
try:
    RESULTS["read_stdin"] = os.read(0, 100).decode()
except BlockingIOError:
    RESULTS["read_stdin"] = "EAGAIN"
for fd in (1, 2):
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
report()
"""


class Terminal:
    """vmsuper run as the foreground job of a new session on a pseudo-terminal."""

    def __init__(self, config: Path) -> None:
        self.master, self.slave = os.openpty()
        self.output = b""

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmsuper", "run", str(config)],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=take_terminal,
        )

    def read_until(self, text: bytes) -> None:
        deadline = time.monotonic() + DEADLINE
        while text not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {self.output!r}"
            self._read(0.5)

    def wait(self) -> int:
        deadline = time.monotonic() + DEADLINE
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"vmsuper did not end: {self.output!r}"
            self._read(0.2)
        while self._read(0):
            pass
        return self.proc.returncode

    def _read(self, timeout: float) -> bool:
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            return False
        self.output += chunk
        return bool(chunk)

    def hang_up(self) -> None:
        """Close the terminal's master side, as a closed terminal window does."""
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[type[Terminal]]:
    made: list[Terminal] = []

    class Tracked(Terminal):
        def __init__(self, config: Path) -> None:
            super().__init__(config)
            made.append(self)

    yield Tracked
    for term in made:
        term.close()


def write_config(tmp_path: Path, body: str, spec: VmSpec) -> Path:
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    folder = VmRunner(tmp_path / "runs").folder()
    config = folder / "vm.toml"
    config.write_text(spec.to_toml(plugin, folder / "logs"))
    return config


@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_the_plugin_cannot_touch_the_terminal(
    tmp_path: Path, terminal: type[Terminal], sandbox: bool
) -> None:
    config = write_config(tmp_path, GRABS_THE_TERMINAL, VmSpec(sandbox=sandbox))
    term = terminal(config)
    before = termios.tcgetattr(term.slave), fcntl.fcntl(term.slave, fcntl.F_GETFL)
    os.write(term.master, b"secret typed by the user\n")
    assert term.wait() == 0, term.output
    after = termios.tcgetattr(term.slave), fcntl.fcntl(term.slave, fcntl.F_GETFL)
    assert after == before
    assert not after[1] & os.O_NONBLOCK
    # The plugin's stdout still reaches the terminal, through vmsuper.
    line = next(x for x in term.output.decode().splitlines() if x.startswith("{"))
    assert line.startswith('{"isatty": [false, false, false]')
    assert '"dev_tty": "ENXIO"' in line and '"read_stdin": ""' in line
    kept = (config.parent / "logs" / "plugin-stdout.log").read_text()
    assert kept.startswith('{"isatty": [false, false, false]')


@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_ctrl_c_gives_the_plugin_its_grace_period(
    tmp_path: Path, terminal: type[Terminal], sandbox: bool
) -> None:
    config = write_config(tmp_path, WAITS_FOR_SHUTDOWN, VmSpec(sandbox=sandbox, grace_period=20))
    term = terminal(config)
    term.read_until(b"READY")
    os.write(term.master, b"\x03")  # what Ctrl-C types: the terminal sends SIGINT
    assert term.wait() == 128 + signal.SIGINT, term.output
    assert b"SAW SHUTDOWN" in term.output


def test_a_terminal_hang_up_gives_the_plugin_its_grace_period(
    tmp_path: Path, terminal: type[Terminal]
) -> None:
    marker = tmp_path / "saw-shutdown"
    body = WAITS_FOR_SHUTDOWN.replace(
        'print("SAW SHUTDOWN", flush=True)', f"open({str(marker)!r}, 'w').close()"
    )
    config = write_config(tmp_path, body, VmSpec(sandbox=False, grace_period=20))
    term = terminal(config)
    term.read_until(b"READY")
    term.hang_up()  # the kernel sends SIGHUP to the session's leader: vmsuper
    assert term.proc.wait(timeout=DEADLINE) == 128 + signal.SIGHUP
    assert marker.exists()
    finished = [
        r
        for r in VmResult(0, "", "", config.parent / "logs", config).records()
        if r["event"] == "run_finished"
    ]
    assert finished and finished[0]["status"] == 128 + signal.SIGHUP


def run_ready(tmp_path: Path, sandbox: bool) -> tuple[subprocess.Popen[str], Path, Path]:
    """vmsuper as the leader of its own process group, its plugin started and waiting."""
    plugin = write_python_plugin(tmp_path, plugin_source(WAITS_FOR_SHUTDOWN))
    runner = VmRunner(tmp_path / "runs")
    spec = VmSpec(sandbox=sandbox, grace_period=20)
    proc, config, log_dir = runner.start(plugin, spec, popen={"process_group": 0})
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("READY")
    return proc, config, log_dir


@pytest.mark.parametrize(
    ("signum", "sandbox"),
    [
        (signal.SIGINT, False),
        (signal.SIGTERM, False),
        (signal.SIGHUP, False),
        (signal.SIGINT, True),
    ],
    ids=["SIGINT", "SIGTERM", "SIGHUP", "SIGINT-sandboxed"],
)
def test_a_signal_to_the_whole_process_group_ends_the_run_in_order(
    tmp_path: Path, signum: int, sandbox: bool
) -> None:
    proc, config, logs = run_ready(tmp_path, sandbox)
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert descendants  # the plugin (or bwrap) and the VCPU worker
        # Nothing vmsuper started is in its process group: the signal reaches vmsuper alone.
        assert all(os.getpgid(p.pid) != proc.pid for p in descendants)
        os.killpg(proc.pid, signum)  # what `timeout -s INT` or a shell's kill -- -PGID does
        result = finish(proc, config, logs, timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result.status == 128 + signum, result.stderr
    assert "SAW SHUTDOWN" in result.stdout
    assert "plugin_killed" not in result.events()

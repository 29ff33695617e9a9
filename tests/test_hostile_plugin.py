"""A plugin that attacks the supervisor through what it shares with it: the shutdown eventfd,
the tap, its own output, fds it passes, the supervisor's fd table, odd exit statuses."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from rawplugin import plugin_source

from vmsuper.testing import VmResult, VmRunner, VmSpec, finish, write_python_plugin

pytestmark = pytest.mark.kvm

NET = {"host_ip": "100.115.93.5", "netmask": "255.255.255.252", "mac": "de:21:e8:47:6b:6b"}
FULL_COUNTER = (1 << 64) - 2  # the most an eventfd holds: one more write would block


def findings(result: VmResult) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"plugin printed no findings; stderr:\n{result.stderr[-4000:]}"
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def run_raw(tmp_path: Path, body: str, spec: VmSpec | None = None) -> VmResult:
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    return VmRunner(tmp_path / "runs").run(plugin, spec, timeout=60)


# -- the shutdown eventfd ----------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_a_full_shutdown_eventfd_does_not_wedge_the_exit(tmp_path: Path, sandbox: bool) -> None:
    result = run_raw(
        tmp_path,
        f"""
        _, fds = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
        os.eventfd_write(fds[0], {FULL_COUNTER})
        sys.exit(0)
        """,
        VmSpec(sandbox=sandbox),
    )
    assert result.status == 0, result.stderr
    assert "shutdown_started" in result.events()


@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_a_full_shutdown_eventfd_does_not_wedge_sigterm(tmp_path: Path, sandbox: bool) -> None:
    body = f"""
    _, fds = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
    os.eventfd_write(fds[0], {FULL_COUNTER})
    print("full", flush=True)
    while True:
        signal.pause()  # until a signal ends it
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    spec = VmSpec(grace_period=0.2, sandbox=sandbox)
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "full"
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, config, logs, timeout=30)
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert {"plugin_killed", "run_finished"} <= set(result.events())


# -- the tap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_a_tap_made_persistent_by_the_plugin_goes_away_with_the_run(
    tmp_path: Path, taps_allowed: None, sandbox: bool
) -> None:
    result = run_raw(
        tmp_path,
        """
        response, fds = call(req(get_net_config=pb.MainRequest.GetNetConfig()))
        with open(f"/proc/self/fdinfo/{fds[0]}") as f:
            RESULTS["tap"] = next(line.split(":", 1)[1].strip() for line in f
                                  if line.startswith("iff:"))
        fcntl.ioctl(fds[0], 0x400454CB, 1)  # TUNSETPERSIST
        with open(f"/proc/self/fdinfo/{fds[0]}") as f:
            RESULTS["fdinfo"] = f.read()
        os.close(fds[0])
        report()
        """,
        VmSpec(net=NET, sandbox=sandbox),
    )
    assert result.status == 0, result.stderr
    tap = findings(result)["tap"]
    assert tap.startswith("vms")
    assert not Path("/sys/class/net", tap).exists()


# -- the plugin's output ----------------------------------------------------------------------

LOG_CAP = 256 * 1024
LINE_CAP = 1000
OUTPUT_LIMITS = f"[limits]\nplugin_log_bytes = {LOG_CAP}\nplugin_log_lines = {LINE_CAP}\n"


@pytest.mark.parametrize("flood", ["one long line", "bare newlines"])
def test_a_stderr_flood_is_bounded_and_requests_are_still_served(
    tmp_path: Path, flood: str
) -> None:
    chunk = "b'x' * 65536" if flood == "one long line" else "b'\\n' * 65536"
    result = run_raw(
        tmp_path,
        f"""
        answered = 0
        for _ in range(64):  # 4 MiB
            os.write(2, {chunk})
            answered += errno_of(req(check_extension=pb.MainRequest.CheckExtension())) == 0
        RESULTS["answered"] = answered
        os.write(2, b"\\nlast words\\n")
        report()
        """,
        VmSpec(extra_toml=OUTPUT_LIMITS),
    )
    assert result.status == 0, result.stderr[-2000:]
    assert findings(result)["answered"] == 64
    records = result.records()
    lines = [r for r in records if r["event"] == "plugin_stderr"]
    assert len(lines) <= LINE_CAP
    assert sum(len(r["line"]) for r in lines) <= LOG_CAP
    assert all(len(r["line"]) <= 4096 for r in lines)
    capped = [r for r in records if r["event"] == "plugin_output_capped"]
    assert len(capped) == 1 and capped[0]["stream"] == "stderr"
    assert capped[0]["limit"] == (
        "plugin_log_bytes" if flood == "one long line" else "plugin_log_lines"
    )
    dropped = [r for r in records if r["event"] == "plugin_output_dropped"]
    assert dropped and dropped[0]["bytes"] > 0
    if flood == "one long line":
        assert lines[0].get("continued") is None and lines[1]["continued"] is True
    log_size = (result.log_dir / "supervisor.jsonl").stat().st_size
    assert log_size < LOG_CAP + LINE_CAP * 256 + 65536
    # The echo is not capped: the console shows everything.
    assert len(result.stderr) >= 64 * 65536 and "last words" in result.stderr


def test_stdout_is_relayed_and_kept_bounded_in_the_log_folder(tmp_path: Path) -> None:
    result = run_raw(
        tmp_path,
        f"""
        os.write(1, b"hello from the plugin\\n")
        os.write(1, b"y" * {2 * LOG_CAP})
        os.write(1, b"\\nthe end\\n")
        """,
        VmSpec(extra_toml=OUTPUT_LIMITS),
    )
    assert result.status == 0, result.stderr
    assert result.stdout.startswith("hello from the plugin\n") and "the end" in result.stdout
    kept = (result.log_dir / "plugin-stdout.log").read_bytes()
    assert kept.startswith(b"hello from the plugin\n")
    assert LOG_CAP <= len(kept) < LOG_CAP + 200 and b"plugin_log_bytes" in kept[LOG_CAP:]
    assert [r["stream"] for r in result.records() if r["event"] == "plugin_output_capped"] == [
        "stdout"
    ]


def test_a_stdout_nobody_reads_does_not_stop_the_supervisor(tmp_path: Path) -> None:
    """vmsuper's stdout is a pipe the test does not read while the plugin floods its own."""
    fifo = tmp_path / "served"
    os.mkfifo(fifo)
    body = f"""
    import threading

    def flood():
        with contextlib.suppress(OSError):
            while True:
                os.write(1, b"o" * 65536)

    threading.Thread(target=flood, daemon=True).start()
    MAIN.settimeout(20)
    try:
        served = sum(
            errno_of(req(check_extension=pb.MainRequest.CheckExtension())) == 0
            for _ in range(200)
        )
    except TimeoutError:
        served = -1
    with open({str(fifo)!r}, "w") as f:
        f.write(f"{{served}}\\n")
    os._exit(0)
    """
    plugin = write_python_plugin(tmp_path, "import contextlib\n" + plugin_source(body))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin)
    try:
        report = b""
        deadline = time.monotonic() + 60
        while not report.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the plugin never reported"
            if select.select([reader], [], [], remaining)[0]:
                report += os.read(reader, 100)
        assert report == b"200\n"
        result = finish(proc, config, logs, timeout=60)
    finally:
        os.close(reader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result.status == 0, result.stderr
    assert len(result.stdout) > 65536


# -- the supervisor's fd table ------------------------------------------------------------------

PIPELINED_IRQ_EVENTS = """
import socket as _socket
count = {count}
MAIN.setblocking(False)
sent = received = 0
errnos = {{}}
while received < count:
    while sent < count:
        request = req(create=pb.MainRequest.Create(
            id=sent, irq_event=pb.MainRequest.Create.IrqEvent(irq_id=sent % 16)))
        try:
            wire.send_datagram(MAIN, request.SerializeToString())
        except BlockingIOError:
            break
        sent += 1
    select.select([MAIN], [], [], 10)
    while True:
        try:
            dgram = wire.recv_datagram(MAIN)
        except BlockingIOError:
            break
        assert dgram is not None
        response = pb.MainResponse.FromString(dgram.data)
        assert response.WhichOneof("message") == "create"
        errnos[response.errno] = errnos.get(response.errno, 0) + 1
        for fd in dgram.fds:
            os.close(fd)
        received += 1
MAIN.setblocking(True)
RESULTS["errnos"] = errnos
RESULTS["after"] = errno_of(req(check_extension=pb.MainRequest.CheckExtension()))
if {start}:  # the workers' pidfds come after every object's fds: numbers above 1024
    RESULTS["start"] = errno_of(req(start=pb.MainRequest.Start()))
report()
"""


def run_with_open_files(
    tmp_path: Path, soft: int, hard: int, count: int, start: bool = False
) -> VmResult:
    source = PIPELINED_IRQ_EVENTS.format(count=count, start=start)
    plugin = write_python_plugin(tmp_path, plugin_source("import select\n" + source))
    runner = VmRunner(tmp_path / "runs")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc, _, _ = runner.start(plugin, VmSpec(), popen={"preexec_fn": low_limit})
    return runner.finish(proc, timeout=60)


def test_a_low_soft_open_file_limit_is_raised_for_the_objects_allowed(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    result = run_with_open_files(tmp_path, 256, hard, count=600, start=True)
    assert result.status == 0, result.stderr
    assert findings(result) == {"errnos": {"0": 600}, "after": 0, "start": 0}
    assert "internal_error" not in result.events()


def test_running_out_of_fds_is_an_errno_on_the_wire(tmp_path: Path) -> None:
    result = run_with_open_files(tmp_path, 200, 200, count=300)
    assert result.status == 0, result.stderr
    found = findings(result)
    assert set(found["errnos"]) <= {"0", "24"} and found["errnos"].get("24", 0) > 0, found
    assert found["after"] == 0
    events = result.events()
    assert "internal_error" not in events and "open_file_limit" in events


NO_FD_LEFT = """
# Io events take one fd each: once one is refused with EMFILE, the supervisor has none left.
made = 0
while True:
    err = errno_of(req(create=pb.MainRequest.Create(id=made, io_event=pb.MainRequest.Create.IoEvent(
        address=0x1000 + made, length=1))))
    if err:
        break
    made += 1
RESULTS["io_events"] = made > 50
RESULTS["refused"] = err
memory = req(create=pb.MainRequest.Create(id=100000, memory=pb.MainRequest.Create.Memory(
    start=0, length=0x1000)))
fd = sealed_memfd(0x1000)
RESULTS["memory_without_room"] = errno_of(memory, fds=[fd])
errno_of(req(destroy=pb.MainRequest.Destroy(id=0)))
RESULTS["memory_with_room"] = errno_of(memory, fds=[fd])
report()
"""


def test_no_fd_left_for_a_passed_memfd_is_emfile(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(NO_FD_LEFT))
    runner = VmRunner(tmp_path / "runs")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    proc, _, _ = runner.start(plugin, VmSpec(), popen={"preexec_fn": low_limit})
    result = runner.finish(proc, timeout=60)
    assert result.status == 0, result.stderr
    assert findings(result) == {
        "io_events": True,
        "refused": 24,  # EMFILE
        "memory_without_room": 24,  # the memfd could not even be received
        "memory_with_room": 0,
    }


# -- fds of the wrong kind ---------------------------------------------------------------------


def test_a_lingering_socket_passed_as_memory_is_refused_without_blocking(tmp_path: Path) -> None:
    result = run_raw(
        tmp_path,
        """
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            while True:
                client.send(b"z" * 65536)
        except BlockingIOError:
            pass
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
        fd = client.detach()
        RESULTS["errno"] = errno_of(req(create=pb.MainRequest.Create(
            id=1, memory=pb.MainRequest.Create.Memory(start=0, length=4096))), fds=[fd])
        os.close(fd)
        # A supervisor stuck in close() would not answer within this deadline.
        MAIN.settimeout(20)
        RESULTS["next_request"] = errno_of(req(check_extension=pb.MainRequest.CheckExtension()))
        report()
        """,
    )
    assert result.status == 0, result.stderr
    assert findings(result) == {"errno": 1, "next_request": 0}  # EPERM: not a sealed memfd


# -- exit statuses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "sandbox", "expected", "said"),
    [
        ("sys.exit(163)", True, 163, "plugin killed by signal 35"),
        ("os.kill(os.getpid(), 35)", False, 163, "plugin killed by signal 35"),
        ("sys.exit(200)", False, 200, "plugin exited with status 200"),
    ],
)
def test_unnamed_signals_and_high_exit_codes_pass_through(
    tmp_path: Path, body: str, sandbox: bool, expected: int, said: str
) -> None:
    plugin = write_python_plugin(tmp_path, "import os, sys\n" + body + "\n")
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(sandbox=sandbox))
    assert result.status == expected, result.stderr
    assert said in result.stderr
    assert "internal_error" not in result.events()


# -- full trust -------------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", [False, True], ids=["unsandboxed", "sandboxed"])
def test_an_unsandboxed_run_says_so(tmp_path: Path, sandbox: bool) -> None:
    plugin = write_python_plugin(tmp_path, "import sys\nsys.exit(0)\n")
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(sandbox=sandbox))
    assert result.status == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if "runs unsandboxed" in line]
    assert notices == (
        []
        if sandbox
        else [
            "vmsuper: the plugin runs unsandboxed, with all of vmsuper's privileges"
            " ([plugin] sandbox = false)"
        ]
    )

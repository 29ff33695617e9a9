"""A plugin that speaks the pipes VCPU transport, run with `vcpu_transport = "socket"`: the run
ends at once with the cause and the fix, instead of failing obscurely or hanging."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rawplugin import plugin_source

from vmsuper.supervisor import outcome
from vmsuper.supervisor.runner import INFORMATIONAL
from vmsuper.testing import VmRunner, VmSpec, write_python_plugin
from vmsuper.workers.framing_check import length_delimited_request, unused_channels_hint

# Frames its first VCPU request as crosvm's client library frames messages on pipes: a varint
# length, then the message. Then waits for the VM to shut down.
PIPES_FRAMED = """
call(req(start=pb.MainRequest.Start()))
_, fds = call(req(get_vcpus=pb.MainRequest.GetVcpus()))
_, (shutdown,) = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
wait = pb.VcpuRequest(wait=pb.VcpuRequest.Wait()).SerializeToString()
for fd in fds:
    socket.socket(fileno=os.dup(fd)).send(wire.encode_delimited(wait))
os.eventfd_read(shutdown)
"""

PLAIN = """
call(req(start=pb.MainRequest.Start()))
_, fds = call(req(get_vcpus=pb.MainRequest.GetVcpus()))
_, (shutdown,) = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
for fd in fds:
    sock = socket.socket(fileno=os.dup(fd))
    sock.send(pb.VcpuRequest(wait=pb.VcpuRequest.Wait()).SerializeToString())
    assert pb.VcpuResponse.FromString(sock.recv(4096)).wait.WhichOneof("exit") == "init"
print("init answered", flush=True)
sys.exit(0)
"""

FIX = '[plugin] vcpu_transport = "pipes"'


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_length_delimited_requests_on_sockets_end_the_run_with_the_fix(
    tmp_path: Path, vcpus: int
) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(PIPES_FRAMED))
    # The time limit only keeps a regression from hanging the suite; it must not be what ends it.
    spec = VmSpec(vcpus=vcpus, transport="socket", timeout=30)
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == outcome.EXIT_SUPERVISOR_FAILED, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if _said(line)]
    assert line.startswith(f"vmsuper: plugin speaks the pipes VCPU transport: set {FIX} (")
    tail = r" \(length-delimited wait on VCPU \d's socket\) \(exit status 125\)"
    assert re.fullmatch(".*" + tail, line)
    stopped = [r for v in range(vcpus) for r in result.vcpu_records(v) if r["event"] == "stopped"]
    assert any(r["status"] == 19 and r["request_bytes"] == 3 for r in stopped)


@pytest.mark.kvm
def test_plain_requests_on_sockets_are_served(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(PLAIN))
    result = VmRunner(tmp_path / "runs").run(
        plugin, VmSpec(vcpus=2, transport="socket", timeout=30)
    )
    assert result.status == 0, result.stderr
    assert "init answered" in result.stdout


def test_only_exactly_one_length_delimited_request_counts() -> None:
    wait = b"\x0a\x00"  # VcpuRequest{wait{}}
    assert length_delimited_request(b"\x02" + wait) == "wait"
    assert length_delimited_request(wait) is None  # a plain request
    assert length_delimited_request(b"\x03" + wait) is None  # length does not match
    assert length_delimited_request(b"\x02\xff\xff") is None  # not a request behind it
    assert length_delimited_request(b"") is None
    assert length_delimited_request(b"\x80" * 11) is None  # no varint end
    resume = b"\x12\x03\x0a\x01\x07"  # VcpuRequest{resume{data: 07}}
    assert length_delimited_request(bytes([len(resume)]) + resume) == "resume"


# Pairs up its VCPU channel ends as crosvm's client library does (two per VCPU) and gives up
# as it does when they do not pair up.
PAIRS_CHANNELS = """
_, fds = call(req(get_vcpus=pb.MainRequest.GetVcpus()))
if len(fds) % 2:
    print("crosvm_connect() failed: -71", file=sys.stderr, flush=True)
    sys.exit(1)
call(req(start=pb.MainRequest.Start()))
sys.exit(0)
"""

HINT = (
    "vmsuper: hint: the plugin took its VCPU channels (one socket per VCPU) and failed before"
    f" Start; a plugin built on crosvm's libcrosvm_plugin.so expects two pipes per VCPU: set {FIX}"
)


@pytest.mark.kvm
@pytest.mark.parametrize("transport", ["socket", "pipes"])
def test_a_client_that_cannot_pair_its_channels_gets_the_fix(
    tmp_path: Path, transport: str
) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(PAIRS_CHANNELS))
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(transport=transport, timeout=30))
    if transport == "socket":
        assert result.status == 1, result.stderr
        assert HINT in result.stderr.splitlines()
        assert "transport_hint" in result.events()
    else:
        assert result.status == 0, result.stderr
        assert "hint" not in result.stderr


def _hint(
    transport: str = "socket",
    channels_given: bool = True,
    started: bool = False,
    plugin_failed: bool = True,
) -> str | None:
    return unused_channels_hint(
        transport=transport,
        channels_given=channels_given,
        started=started,
        plugin_failed=plugin_failed,
    )


def test_the_hint_needs_every_sign() -> None:
    assert _hint() is not None
    assert _hint(plugin_failed=False) is None
    assert _hint(started=True) is None
    assert _hint(channels_given=False) is None
    assert _hint(transport="pipes") is None


def _said(line: str) -> bool:
    """vmsuper's own lines on stderr that report a cause."""
    return line.startswith("vmsuper:") and not line.startswith(INFORMATIONAL)

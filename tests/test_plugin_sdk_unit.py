"""The plugin SDK against a fake server in the test, over real socketpairs and pipes.

The main-connection fake queues its answer before the SDK asks (a SEQPACKET socketpair keeps
it), then checks the request that came in. Each VCPU fake is a thread that plays a script:
for every request of the expected kind it writes the scripted responses (all in one write on
pipes), and hangs up on anything unexpected so the SDK can never block forever.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import mmap
import os
import socket
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from vmsuper.plugin import (
    Connection,
    ConnectionClosedError,
    CpuidEntry,
    Init,
    Io,
    IoEvent,
    IrqchipRoute,
    MsiRoute,
    PluginError,
    ProtocolError,
    RegHint,
    Space,
    Vcpu,
    VcpuStateError,
    dirty_log_size,
)
from vmsuper.shared import kvm, wire
from vmsuper.shared import plugin_pb2 as pb

Transport = str
TRANSPORTS = ("pipes", "socket")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _no_fd_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"fds left open: {sorted(leaked)}"


# --- fake main server ----------------------------------------------------------------------


def main_response(case: str, err: int = 0, **fields: Any) -> pb.MainResponse:
    response = pb.MainResponse(errno=err)
    if case:
        sub = getattr(response, case)
        sub.SetInParent()
        for name, value in fields.items():
            setattr(sub, name, value)
    return response


class FakeMain:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def answer(self, case: str, err: int = 0, fds: Sequence[int] = (), **fields: Any) -> None:
        self.send(main_response(case, err, **fields), fds)

    def send(self, response: pb.MainResponse, fds: Sequence[int] = ()) -> None:
        wire.send_datagram(self.sock, response.SerializeToString(), fds)

    def request(self) -> tuple[pb.MainRequest, list[int]]:
        datagram = wire.recv_datagram(self.sock)
        assert datagram is not None
        return pb.MainRequest.FromString(datagram.data), datagram.fds

    def idle(self) -> bool:
        try:
            self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


@pytest.fixture
def main() -> Iterator[tuple[Connection, FakeMain]]:
    server, client = seqpacket_pair()
    conn = Connection(client)
    try:
        yield conn, FakeMain(server)
    finally:
        conn.close()
        server.close()


# --- fake VCPU channels --------------------------------------------------------------------

Step = tuple[str, list[pb.VcpuResponse]]


class ScriptedVcpu:
    """Server side of one VCPU channel, answering requests from a script in a thread."""

    def __init__(self, transport: Transport, script: Sequence[Step]) -> None:
        self.transport = transport
        self.script = deque(script)
        self.requests: list[pb.VcpuRequest] = []
        self.errors: list[str] = []
        self._sock: socket.socket | None = None
        if transport == "pipes":
            req_r, req_w = os.pipe()
            resp_r, resp_w = os.pipe()
            self.client_fds = [req_w, resp_r]
            self._in, self._out = req_r, resp_w
        else:
            server, client = seqpacket_pair()
            self.client_fds = [client.detach()]
            self._sock = server
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Close the client's ends here (the SDK got its own copies) and start serving."""
        for fd in self.client_fds:
            os.close(fd)
        self._thread.start()

    def _read(self) -> bytes:
        if self._sock is not None:
            return self._sock.recv(1 << 20)
        return os.read(self._in, 1 << 20)

    def _write(self, responses: list[pb.VcpuResponse]) -> None:
        if self._sock is not None:
            for response in responses:
                self._sock.send(response.SerializeToString())
        else:
            data = b"".join(wire.encode_delimited(r.SerializeToString()) for r in responses)
            os.write(self._out, data)

    def _run(self) -> None:
        try:
            while True:
                data = self._read()
                if not data:
                    break
                request = pb.VcpuRequest.FromString(data)
                self.requests.append(request)
                case = request.WhichOneof("message")
                if not self.script or self.script[0][0] != case:
                    self.errors.append(f"unexpected {case} request: {request}")
                    break
                _, responses = self.script.popleft()
                if responses:
                    self._write(responses)
        finally:
            if self._sock is not None:
                self._sock.close()
            else:
                os.close(self._in)
                os.close(self._out)

    def finish(self) -> list[pb.VcpuRequest]:
        """Wait for the fake to end (the client must have closed its side); check the script."""
        self._thread.join(10)
        assert not self._thread.is_alive(), "fake VCPU still serving"
        assert not self.errors, self.errors
        assert not self.script, f"script not played to the end: {list(self.script)}"
        return self.requests


def vcpu_response(case: str, err: int = 0, **fields: Any) -> pb.VcpuResponse:
    response = pb.VcpuResponse(errno=err)
    sub = getattr(response, case)
    sub.SetInParent()
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(sub, name).extend(value)
        else:
            setattr(sub, name, value)
    return response


def init() -> pb.VcpuResponse:
    response = pb.VcpuResponse()
    response.wait.init.SetInParent()
    return response


def io(**fields: Any) -> pb.VcpuResponse:
    response = pb.VcpuResponse()
    response.wait.io.SetInParent()
    for name, value in fields.items():
        setattr(response.wait.io, name, value)
    return response


def attach(conn: Connection, fake: FakeMain, vcpus: Sequence[ScriptedVcpu]) -> list[Vcpu]:
    fake.answer("get_vcpus", fds=[fd for v in vcpus for fd in v.client_fds])
    for v in vcpus:
        v.start()
    result = conn.get_vcpus()
    request, _ = fake.request()
    assert request.WhichOneof("message") == "get_vcpus"
    return result


def regs_with(**values: int) -> kvm.kvm_regs:
    regs = kvm.kvm_regs()
    for name, value in values.items():
        setattr(regs, name, value)
    return regs


def state_request(request: pb.VcpuRequest) -> tuple[str | None, int, bytes]:
    case = request.WhichOneof("message")
    if case == "set_state":
        return case, request.set_state.set, request.set_state.state
    if case == "get_state":
        return case, request.get_state.set, b""
    return case, -1, b""


# --- main connection: errors ---------------------------------------------------------------


def test_errno_becomes_plugin_error_with_that_errno(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.answer("reserve_range", errno.EPERM)
    with pytest.raises(PluginError) as info:
        conn.reserve_range(Space.MMIO, 0x1000, 0x10, async_write=True)
    assert type(info.value) is PluginError
    assert info.value.errno == errno.EPERM
    assert info.value.request == "reserve_range"
    # The wire has only the errno: the text says where the server logged its reason.
    assert str(info.value) == (
        "[Errno 1] reserve_range: Operation not permitted; the server logs why as"
        " main_request_failed (request=reserve_range) in the run's supervisor.jsonl, at level info"
    )
    request, fds = fake.request()
    assert fds == []
    assert request.reserve_range.space == pb.MMIO
    assert (request.reserve_range.start, request.reserve_range.length) == (0x1000, 0x10)
    assert request.reserve_range.async_write


def test_response_of_another_case_is_a_protocol_error(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.answer("start")
    with pytest.raises(ProtocolError) as info:
        conn.set_irq(4, True)
    assert info.value.errno == errno.EPROTO
    assert "start" in str(info.value)


def test_failure_without_the_case_is_a_protocol_error(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.answer("", errno.EINVAL)
    with pytest.raises(ProtocolError):
        conn.start()


def test_negative_errno_is_a_protocol_error(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.answer("start", -errno.EINVAL)
    with pytest.raises(ProtocolError, match="negative errno"):
        conn.start()


def test_undecodable_response_is_a_protocol_error(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.sock.send(b"\xff\xff\xff")
    with pytest.raises(ProtocolError, match="undecodable"):
        conn.start()


def test_hang_up_is_connection_closed(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ConnectionClosedError):
        conn.check_extension(1)


def test_fds_of_a_failed_response_are_closed(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fake.answer("get_shutdown_eventfd", errno.EIO, fds=[efd])
    finally:
        os.close(efd)
    with pytest.raises(PluginError) as info:
        conn.get_shutdown_eventfd()
    assert info.value.errno == errno.EIO
    # the autouse fixture proves the received copy was closed


def test_bad_arguments_are_refused_before_sending(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    with pytest.raises(ValueError, match="release_range"):
        conn.reserve_range(Space.IOPORT, 0x60, 0)
    with pytest.raises(ValueError, match="address space"):
        conn.reserve_range(7, 0x60, 1)
    with pytest.raises(ValueError, match="length"):
        conn.create_io_event(Space.IOPORT, 0x60, length=3)
    with pytest.raises(ValueError, match="8 unsigned bits"):
        conn.create_io_event(Space.IOPORT, 0x60, length=1, datamatch=0x100)
    with pytest.raises(ValueError, match="4 KiB"):
        conn.create_memory(0, 0x1800)
    with pytest.raises(ValueError, match="32 unsigned bits"):
        conn.set_identity_map_addr(1 << 32)
    with pytest.raises(ValueError, match="clear_call_hint"):
        conn.set_call_hint(Space.IOPORT, 0, on_write=True)
    with pytest.raises(TypeError):
        conn.set_irq("4", True)  # type: ignore[arg-type]
    assert fake.idle()


# --- main connection: requests and their answers -------------------------------------------


def test_create_memory_sends_a_sealed_memfd_mapped_for_the_plugin(
    main: tuple[Connection, FakeMain],
) -> None:
    conn, fake = main
    fake.answer("create")
    memory = conn.create_memory(0x10000, 0x4000, read_only=True, dirty_log=True)
    request, fds = fake.request()
    try:
        assert len(fds) == 1
        create = request.create
        assert create.WhichOneof("constructor") == "memory"
        assert create.id == memory.id == 0
        assert (create.memory.start, create.memory.length, create.memory.offset) == (
            0x10000,
            0x4000,
            0,
        )
        assert create.memory.read_only and create.memory.dirty_log
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK
        assert os.fstat(fds[0]).st_size == 0x4000
        memory.mmap[0x1000:0x1004] = b"abcd"
        with mmap.mmap(fds[0], 0x4000) as seen_by_server:
            assert seen_by_server[0x1000:0x1004] == b"abcd"
    finally:
        for fd in fds:
            os.close(fd)

    fake.answer("dirty_log", bitmap=b"\x05")
    assert memory.dirty_log() == b"\x05"
    request, _ = fake.request()
    assert request.dirty_log.id == memory.id

    fake.answer("destroy")
    memory.destroy()
    request, _ = fake.request()
    assert request.WhichOneof("message") == "destroy" and request.destroy.id == memory.id
    assert memory.mmap.closed
    memory.destroy()  # idempotent: nothing more is sent
    assert fake.idle()


def test_dirty_bitmap_of_the_wrong_size_is_a_protocol_error(
    main: tuple[Connection, FakeMain],
) -> None:
    conn, fake = main
    fake.answer("create")
    with conn.create_memory(0, 20 * 4096) as memory:
        for fd in fake.request()[1]:
            os.close(fd)
        assert dirty_log_size(memory.length) == 3
        fake.answer("dirty_log", bitmap=b"\0\0\0\0")
        with pytest.raises(ProtocolError, match="expected 3"):
            memory.dirty_log()
        fake.request()
        fake.answer("destroy")


def test_failed_create_frees_the_id_and_closes_the_memfd(
    main: tuple[Connection, FakeMain],
) -> None:
    conn, fake = main
    fake.answer("create", errno.EEXIST)
    with pytest.raises(PluginError) as info:
        conn.create_memory(0, 4096)
    assert info.value.errno == errno.EEXIST
    _, fds = fake.request()
    for fd in fds:
        os.close(fd)
    efd = os.eventfd(0)
    fake.answer("create", fds=[efd])
    os.close(efd)
    event = conn.create_io_event(Space.IOPORT, 0x80)
    assert event.id == 0
    request, _ = fake.request()
    assert request.create.id == 0
    fake.answer("destroy")
    event.destroy()


def test_ids_are_shared_by_new_connections(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    server2, client2 = seqpacket_pair()
    fake2 = FakeMain(server2)
    created: list[tuple[IoEvent, FakeMain]] = []

    def io_event(c: Connection, f: FakeMain) -> int:
        efd = os.eventfd(0)
        f.answer("create", fds=[efd])
        os.close(efd)
        event = c.create_io_event(Space.MMIO, 0xD000, length=4, datamatch=7)
        request, _ = f.request()
        assert request.create.id == event.id
        assert request.create.io_event.datamatch == 7
        created.append((event, f))
        return event.id

    def destroy(index: int) -> None:
        event, f = created.pop(index)
        f.answer("destroy")
        event.destroy()
        assert f.request()[0].destroy.id == event.id

    try:
        fake.answer("new_connection", fds=[client2.fileno()])
        client2.close()
        with conn.new_connection() as conn2:
            assert fake.request()[0].WhichOneof("message") == "new_connection"
            assert io_event(conn, fake) == 0
            assert io_event(conn2, fake2) == 1
            destroy(0)
            assert io_event(conn2, fake2) == 0, "a destroyed id is reused"
            assert io_event(conn, fake) == 2
            while created:
                destroy(0)
    finally:
        server2.close()


def test_wrong_fd_count_is_a_protocol_error_and_the_object_is_destroyed(
    main: tuple[Connection, FakeMain],
) -> None:
    conn, fake = main
    efd = os.eventfd(0)
    fake.answer("create", fds=[efd])  # an irq event needs two
    os.close(efd)
    fake.answer("destroy")
    with pytest.raises(ProtocolError, match="expected 2 fds"):
        conn.create_irq_event(5)
    create, _ = fake.request()
    destroy, _ = fake.request()
    assert create.create.irq_event.irq_id == 5 and create.create.irq_event.resample
    assert destroy.destroy.id == create.create.id


def test_irq_event_fds(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    trigger, resample = os.eventfd(0), os.eventfd(0)
    fake.answer("create", fds=[trigger, resample])
    event = conn.create_irq_event(9)
    fake.request()
    event.trigger()
    assert os.eventfd_read(trigger) == 1
    os.eventfd_write(resample, 3)
    assert event.read_resample() == 3
    os.close(trigger)
    os.close(resample)
    fake.answer("destroy")
    event.destroy()


def test_net_config_is_decoded(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    tap_stand_in = os.eventfd(0)
    address = int.from_bytes(ipaddress.IPv4Address("192.168.10.1").packed, "little")
    mask = int.from_bytes(ipaddress.IPv4Address("255.255.255.0").packed, "little")
    fake.answer(
        "get_net_config",
        fds=[tap_stand_in],
        host_mac_address=b"\x02\x00\x00\x00\x00\x01",
        host_ipv4_address=address,
        netmask=mask,
    )
    os.close(tap_stand_in)
    config = conn.get_net_config()
    try:
        assert config.host_mac == b"\x02\x00\x00\x00\x00\x01"
        assert config.host_ipv4 == ipaddress.IPv4Address("192.168.10.1")
        assert config.netmask == ipaddress.IPv4Address("255.255.255.0")
        assert config.network == ipaddress.IPv4Network("192.168.10.0/24")
        os.eventfd_write(config.tap_fd, 1)  # a real, owned fd
    finally:
        os.close(config.tap_fd)


def test_routes_hints_and_cpuid_are_encoded(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    fake.answer("set_irq_routing")
    conn.set_irq_routing([IrqchipRoute(4, 2, 4), MsiRoute(24, 0xFEE00000, 0x4021)])
    routes = fake.request()[0].set_irq_routing.routes
    assert [r.WhichOneof("route") for r in routes] == ["irqchip", "msi"]
    assert (routes[0].irq_id, routes[0].irqchip.irqchip, routes[0].irqchip.pin) == (4, 2, 4)
    assert (routes[1].irq_id, routes[1].msi.address, routes[1].msi.data) == (
        24,
        0xFEE00000,
        0x4021,
    )

    fake.answer("set_call_hint")
    conn.set_call_hint(Space.IOPORT, 0x5F0, True, [RegHint(rax=0, rdx=9, send_sregs=True)])
    hint = fake.request()[0].set_call_hint
    assert (hint.space, hint.address, hint.on_write) == (pb.IOPORT, 0x5F0, True)
    (detail,) = hint.hints
    assert (detail.match_rax, detail.match_rbx, detail.match_rcx, detail.match_rdx) == (
        True,
        False,
        False,
        True,
    )
    assert (detail.rax, detail.rdx, detail.send_sregs, detail.send_debugregs) == (
        0,
        9,
        True,
        False,
    )

    fake.answer("set_call_hint")
    conn.clear_call_hint()
    assert fake.request()[0].set_call_hint.address == 0

    response = main_response("get_supported_cpuid")
    response.get_supported_cpuid.entries.add(function=7, has_index=True, index=0, ebx=0x29)
    fake.send(response)
    assert conn.get_supported_cpuid() == [CpuidEntry(function=7, index=0, ebx=0x29, has_index=True)]
    fake.request()


def test_vm_state_sizes_are_checked(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    pit = kvm.kvm_pit_state2()
    pit.flags = 1
    fake.answer("get_state", state=bytes(pit))
    assert conn.get_pit_state().flags == 1
    assert fake.request()[0].get_state.set == pb.MainRequest.PIT

    fake.answer("get_state", state=b"\0" * 3)
    with pytest.raises(ProtocolError, match="kvm_pic_state"):
        conn.get_pic_state(primary=False)
    assert fake.request()[0].get_state.set == pb.MainRequest.PIC1

    fake.answer("set_state")
    conn.set_clock(kvm.kvm_clock_data(clock=123))
    request = fake.request()[0].set_state
    assert request.set == pb.MainRequest.CLOCK
    assert kvm.kvm_clock_data.from_buffer_copy(request.state).clock == 123
    with pytest.raises(ValueError, match="kvm_ioapic_state"):
        conn.set_ioapic_state(b"\0")
    with pytest.raises(TypeError):
        conn.set_pit_state(kvm.kvm_clock_data())


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PluginError) as info:
        Connection.from_env({})
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(PluginError) as info:
        Connection.from_env({"CROSVM_SOCKET": "three"})
    assert info.value.errno == errno.EINVAL

    server, client = seqpacket_pair()
    fd = client.detach()
    os.set_inheritable(fd, True)
    monkeypatch.setenv("CROSVM_SOCKET", str(fd))
    with server, Connection.from_env() as conn:
        assert conn.fileno() == fd
        assert not os.get_inheritable(fd)
        FakeMain(server).answer("check_extension", has_extension=True)
        assert conn.check_extension(kvm.KVM_CAP_HYPERV_SYNIC)
        request = FakeMain(server).request()[0]
        assert request.check_extension.extension == kvm.KVM_CAP_HYPERV_SYNIC

    stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with stream_b, pytest.raises(PluginError) as info:
        Connection.from_fd(stream_a.detach())
    assert info.value.errno == errno.EPROTOTYPE


# --- VCPU channels --------------------------------------------------------------------------


def test_transport_is_recognised_from_the_fds(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    pipe_r, pipe_w = os.pipe()
    sock_a, sock_b = seqpacket_pair()
    fake.answer("get_vcpus", fds=[pipe_w, pipe_r, sock_a.fileno()])
    for fd in (pipe_r, pipe_w):
        os.close(fd)
    sock_a.close()
    sock_b.close()
    with pytest.raises(ProtocolError, match="neither"):
        conn.get_vcpus()
    fake.request()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_first_wait_is_sent_once_and_answered_with_init(
    main: tuple[Connection, FakeMain], transport: Transport
) -> None:
    conn, fake = main
    fakes = [ScriptedVcpu(transport, [("wait", [init()]), ("resume", [])]) for _ in range(2)]
    vcpus = attach(conn, fake, fakes)
    assert [v.index for v in vcpus] == [0, 1]
    assert conn.get_vcpus() == vcpus and conn.get_vcpu(1) is vcpus[1]
    with pytest.raises(IndexError):
        conn.get_vcpu(2)
    for vcpu in vcpus:
        assert vcpu.wait() == Init()
        assert vcpu.event == Init()
        vcpu.resume()
        assert vcpu.event is None
    conn.close()
    for f in fakes:
        requests = f.finish()
        assert [r.WhichOneof("message") for r in requests] == ["wait", "resume"]
        assert requests[1].resume == pb.VcpuRequest.Resume()


def test_pipes_several_responses_in_one_read_are_all_returned(
    main: tuple[Connection, FakeMain],
) -> None:
    conn, fake = main
    async_write = io(space=pb.MMIO, address=0x1000, is_write=True, no_resume=True, data=b"\x01")
    read = io(space=pb.IOPORT, address=0x60, is_write=False, data=b"\0\0")
    script: list[Step] = [("wait", [init()]), ("resume", [async_write, read]), ("resume", [])]
    vfake = ScriptedVcpu("pipes", script)
    (vcpu,) = attach(conn, fake, [vfake])
    assert vcpu.wait() == Init()
    vcpu.resume()
    first = vcpu.wait()
    assert first == Io(Space.MMIO, 0x1000, True, True, b"\x01")
    assert vcpu.event is None, "an async write does not stop the VCPU"
    assert vcpu.has_pending(), "the second response came in the same read"
    with pytest.raises(VcpuStateError):
        vcpu.resume()
    second = vcpu.wait()
    assert second == Io(Space.IOPORT, 0x60, False, False, b"\0\0")
    assert second.length == 2 and not vcpu.has_pending()
    with pytest.raises(ValueError, match="3 bytes"):
        vcpu.resume(b"abc")
    vcpu.resume(b"\x12")
    conn.close()
    requests = vfake.finish()
    assert requests[-1].resume.data == b"\x12\x00"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deferred_register_sets_ride_on_resume(
    main: tuple[Connection, FakeMain], transport: Transport
) -> None:
    conn, fake = main
    vfake = ScriptedVcpu(transport, [("wait", [init()]), ("resume", [])])
    (vcpu,) = attach(conn, fake, [vfake])
    vcpu.wait()
    regs = regs_with(rip=0x1000, rflags=2)
    sregs = kvm.kvm_sregs()
    sregs.cr0 = 1
    vcpu.set_regs(regs)
    vcpu.set_sregs(sregs)
    vcpu.resume()
    conn.close()
    wait, resume = vfake.finish()
    assert wait.WhichOneof("message") == "wait"
    assert resume.resume.regs == bytes(regs)
    assert resume.resume.sregs == bytes(sregs)
    assert resume.resume.debugregs == b""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_eager_registers_answer_gets_without_a_round_trip(
    main: tuple[Connection, FakeMain], transport: Transport
) -> None:
    conn, fake = main
    regs = regs_with(rax=0x1234, rip=0x7000)
    sregs = kvm.kvm_sregs()
    sregs.cr3 = 0x9000
    debugregs = kvm.kvm_debugregs()
    debugregs.dr7 = 0x400
    hinted = io(space=pb.IOPORT, address=0x5F0, is_write=True, data=b"\x07")
    hinted.wait.io.regs = bytes(regs)
    hinted.wait.io.sregs = bytes(sregs)
    script: list[Step] = [
        ("wait", [init()]),
        ("resume", [hinted]),
        ("get_state", [vcpu_response("get_state", state=bytes(debugregs))]),
        ("resume", [hinted]),
        ("set_msrs", [vcpu_response("set_msrs")]),
        ("get_state", [vcpu_response("get_state", state=bytes(regs))]),
        ("resume", []),
    ]
    vfake = ScriptedVcpu(transport, script)
    (vcpu,) = attach(conn, fake, [vfake])
    vcpu.wait()
    vcpu.resume()
    assert vcpu.wait() == Io(Space.IOPORT, 0x5F0, True, False, b"\x07")
    assert vcpu.get_regs().rax == 0x1234
    assert vcpu.get_regs().rip == 0x7000
    assert vcpu.get_sregs().cr3 == 0x9000
    assert vcpu.get_debugregs().dr7 == 0x400  # not sent eagerly: one round trip
    with pytest.raises(ValueError, match="takes none"):
        vcpu.resume(b"\x01")
    vcpu.resume()
    vcpu.wait()
    vcpu.set_msrs([(0x10, 0)])  # may change registers: the eager copy is dropped
    assert vcpu.get_regs().rax == 0x1234
    vcpu.resume()
    conn.close()
    cases = [state_request(r) for r in vfake.finish()]
    assert cases == [
        ("wait", -1, b""),
        ("resume", -1, b""),
        ("get_state", pb.VcpuRequest.DEBUGREGS, b""),
        ("resume", -1, b""),
        ("set_msrs", -1, b""),
        ("get_state", pb.VcpuRequest.REGS, b""),
        ("resume", -1, b""),
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deferred_sets_are_sent_before_requests_that_could_see_them(
    main: tuple[Connection, FakeMain], transport: Transport
) -> None:
    conn, fake = main
    regs = regs_with(rax=5)
    kernel_regs = regs_with(rax=5, rflags=2)
    hinted = io(space=pb.IOPORT, address=0x5F0, is_write=True, data=b"\x07")
    hinted.wait.io.regs = bytes(regs_with(rbx=1))
    hinted.wait.io.sregs = bytes(kvm.kvm_sregs())
    script: list[Step] = [
        ("wait", [init()]),
        ("set_state", [vcpu_response("set_state")]),
        ("get_state", [vcpu_response("get_state", state=bytes(kernel_regs))]),
        ("resume", [hinted]),
        ("set_state", [vcpu_response("set_state")]),
        ("set_msrs", [vcpu_response("set_msrs")]),
        ("get_state", [vcpu_response("get_state", state=bytes(kvm.kvm_sregs()))]),
        ("resume", []),
    ]
    vfake = ScriptedVcpu(transport, script)
    (vcpu,) = attach(conn, fake, [vfake])
    vcpu.wait()
    vcpu.set_regs(regs)
    assert bytes(vcpu.get_regs()) == bytes(kernel_regs), "the kernel's view after the set"
    vcpu.resume()
    vcpu.wait()
    sregs = kvm.kvm_sregs()
    sregs.efer = 0x500
    vcpu.set_sregs(sregs)
    vcpu.set_msrs({0xC0000080: 0xD01})  # EFER: must land after the sregs, as written
    vcpu.get_sregs()  # the eager sregs may be stale after set_msrs: asked again
    vcpu.resume()
    conn.close()
    requests = vfake.finish()
    cases = [state_request(r) for r in requests]
    assert cases[1] == ("set_state", pb.VcpuRequest.REGS, bytes(regs))
    assert cases[2] == ("get_state", pb.VcpuRequest.REGS, b"")
    assert cases[4] == ("set_state", pb.VcpuRequest.SREGS, bytes(sregs))
    assert [(e.index, e.data) for e in requests[5].set_msrs.entries] == [(0xC0000080, 0xD01)]
    assert cases[6] == ("get_state", pb.VcpuRequest.SREGS, b"")
    assert requests[7].resume.regs == requests[7].resume.sregs == b""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vcpu_errors(main: tuple[Connection, FakeMain], transport: Transport) -> None:
    conn, fake = main
    script: list[Step] = [
        ("wait", [init()]),
        ("get_state", [vcpu_response("get_state", errno.EINVAL)]),
        ("get_state", [vcpu_response("set_state")]),
        ("get_msrs", [vcpu_response("get_msrs", entry_data=[1])]),
        ("enable_capability", [vcpu_response("enable_capability", errno.EINVAL)]),
    ]
    vfake = ScriptedVcpu(transport, script)
    (vcpu,) = attach(conn, fake, [vfake])
    with pytest.raises(VcpuStateError, match="running"):
        vcpu.get_regs()
    assert vcpu.wait() == Init()
    with pytest.raises(VcpuStateError, match="resume"):
        vcpu.wait()
    with pytest.raises(PluginError) as info:
        vcpu.get_fpu()
    assert info.value.errno == errno.EINVAL and info.value.request == "get_fpu"
    assert str(info.value) == (
        "[Errno 22] get_fpu: Invalid argument; the server logs why as request_failed"
        " (request=get_state) in the run's vcpu-0.jsonl, at level warning"
    )
    with pytest.raises(ProtocolError):
        vcpu.get_lapic()
    with pytest.raises(ProtocolError, match="asked for 2 MSRs"):
        vcpu.get_msrs([0x10, 0x11])
    with pytest.raises(PluginError) as info:
        vcpu.enable_capability(1)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        vcpu.set_regs(b"\0" * 3)
    conn.close()
    vfake.finish()
    with pytest.raises(VcpuStateError, match="closed"):
        vcpu.wait()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_hang_up_ends_wait(main: tuple[Connection, FakeMain], transport: Transport) -> None:
    conn, fake = main
    vfake = ScriptedVcpu(transport, [])  # hangs up on the first request
    (vcpu,) = attach(conn, fake, [vfake])
    with pytest.raises(ConnectionClosedError):
        vcpu.wait()
    with pytest.raises(AssertionError, match="unexpected wait"):
        vfake.finish()


def test_last_connection_closes_the_vcpu_channels(main: tuple[Connection, FakeMain]) -> None:
    conn, fake = main
    vfake = ScriptedVcpu("socket", [("wait", [])])
    attach(conn, fake, [vfake])
    conn.close()
    vfake.finish()  # ends only when it reads end-of-file from the SDK's side

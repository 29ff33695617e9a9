"""Untrusted plugin input, three ways: hypothesis properties in process, short atheris runs of
the fuzz targets, and a real plugin process flooding a real supervisor.

Whatever a plugin sends, the supervisor must answer every request (or, for undecodable bytes,
close that connection, as documented), raise nothing, and afterwards hold no fd or mapping it
did not hold before. The generators and the contract checks live in tests/fuzz/, shared with
the long atheris runs described in docs/fuzzing.md.
"""

from __future__ import annotations

import errno
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from fuzz.fds import FdKind, FdSpec, memfd_mappings, opened_fds
from fuzz.hostile import VCPU_CASES, vcpu_request
from fuzz.main_target import MainHarness
from fuzz.processes import all_gone, descendants, read_json_line
from fuzz.protocol_driver import DrivenProtocol
from fuzz.vcpu_target import FakeRanges, FakeVcpu, VcpuHarness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawplugin import plugin_source

from vmsuper.shared.plugin_pb2 import (
    AddressSpace,
    MainRequest,
    MainResponse,
    VcpuRequest,
    VcpuResponse,
)
from vmsuper.testing import VmRunner, VmSpec, finish, write_python_plugin
from vmsuper.workers.limits import Limits
from vmsuper.workers.vcpu_protocol import Phase

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class DataChooser:
    """The fuzz generators' `Chooser` over hypothesis draws (so a failure shrinks)."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def integer(self, low: int, high: int) -> int:
        return self._data.draw(st.integers(low, high))

    def boolean(self) -> bool:
        return self._data.draw(st.booleans())

    def blob(self, max_size: int) -> bytes:
        return self._data.draw(st.binary(max_size=max_size))


class FirstOptions:
    """A `Chooser` that always takes the first option: a worker with default limits, no tap."""

    def integer(self, low: int, high: int) -> int:
        return low

    def boolean(self) -> bool:
        return False

    def blob(self, max_size: int) -> bytes:
        return b""


def wire_space(n: int) -> AddressSpace:
    """Any int32 as the schema's AddressSpace: proto3 enums are open on the wire."""
    return cast("AddressSpace", n)


fd_specs_st = st.lists(
    st.builds(FdSpec, st.sampled_from(FdKind), st.sampled_from([0, 0x1000, 0x1001, 0x10000])),
    max_size=6,
)


@pytest.fixture(scope="module")
def harness() -> Iterator[MainHarness]:
    with MainHarness() as made:
        yield made


# -- the main worker in process, on a real VM -------------------------------------------------


@pytest.mark.kvm
@SETTINGS
@given(data=st.binary(max_size=512), specs=fd_specs_st)
def test_arbitrary_bytes_with_any_fds(
    harness: MainHarness, data: bytes, specs: list[FdSpec]
) -> None:
    with harness.checked(harness.new_worker(FirstOptions())) as worker:
        harness.exchange(worker, data, specs)


@pytest.mark.kvm
@SETTINGS
@given(st.data())
def test_hostile_request_sequences(harness: MainHarness, data: st.DataObject) -> None:
    """Valid requests with extreme values (ids 0 and 2**32-1, addresses up to 2**64-1, open
    enum values, state blobs of every size, limit-sized repeated fields), damaged ones and
    garbage, each with 0..6 fds of odd kinds: every reply honours the contract (case, errno,
    fds, object ids) and nothing leaks once the worker destroys what it made."""
    harness.run(DataChooser(data))


Create = MainRequest.Create
UNKNOWN_SPACES = {
    "io_event": MainRequest(create=Create(id=1, io_event=Create.IoEvent(space=wire_space(5)))),
    "reserve_range": MainRequest(
        reserve_range=MainRequest.ReserveRange(space=wire_space(-1), start=0x600, length=1)
    ),
    "set_call_hint": MainRequest(
        set_call_hint=MainRequest.SetCallHint(space=wire_space(2), address=0x600)
    ),
}


@pytest.mark.kvm
@pytest.mark.parametrize("request_", UNKNOWN_SPACES.values(), ids=UNKNOWN_SPACES.keys())
def test_unknown_address_space_is_refused(harness: MainHarness, request_: MainRequest) -> None:
    """AddressSpace is an open enum: any int32 can arrive and must get EINVAL, not an
    exception out of the worker (which the event loop turns into a supervisor failure)."""
    worker = harness.new_worker(FirstOptions())
    with harness.checked(worker):
        reply = worker.handle(request_.SerializeToString(), [])
        response = MainResponse.FromString(reply.data)
        assert response.errno == errno.EINVAL
        assert response.WhichOneof("message") == request_.WhichOneof("message")
        assert reply.fds == []


@pytest.mark.kvm
def test_memory_refused_at_the_slot_limit_leaves_no_mapping(harness: MainHarness) -> None:
    """Found by the main target: a memory create refused for want of a slot must not keep
    the mapping it made (each refusal would pin the plugin's memfd in the supervisor)."""
    worker = harness.new_worker(FirstOptions())
    worker.objects.limits = Limits(memory_slots=1)
    with harness.checked(worker):
        maps = memfd_mappings()
        for obj_id, start in ((1, 0), (2, 0x10000)):
            request = MainRequest(
                create=Create(id=obj_id, memory=Create.Memory(start=start, length=0x1000))
            )
            with opened_fds([FdSpec(FdKind.SEALED_MEMFD, 0x1000)]) as opened:
                reply = worker.handle(request.SerializeToString(), opened.sent)
            want = 0 if obj_id == 1 else errno.ENOSPC
            assert MainResponse.FromString(reply.data).errno == want
        assert memfd_mappings() == maps + 1  # the one object's


# -- the VCPU protocol state machine ----------------------------------------------------------


@SETTINGS
@given(st.data())
def test_vcpu_protocol_sequences(data: st.DataObject) -> None:
    """Requests, exits, range and hint changes and failing ioctls in any order: the state
    machine does what the contract's table says, raising only ResumeFailed."""
    VcpuHarness().run(DataChooser(data))


@SETTINGS
@given(st.data())
def test_every_request_before_the_init_wait_is_eproto(data: st.DataObject) -> None:
    chooser = DataChooser(data)
    vcpu = FakeVcpu()
    protocol = DrivenProtocol(vcpu, FakeRanges())
    refused_cases = [c for c in VCPU_CASES if c not in ("wait", "shutdown")]
    for _ in range(chooser.integer(1, 8)):
        request = vcpu_request(chooser, refused_cases)
        answer = protocol.receive_request(request.SerializeToString())
        assert answer is not None
        response = VcpuResponse.FromString(answer)
        case = request.WhichOneof("message")
        assert response.errno == errno.EPROTO
        assert response.WhichOneof("message") == (None if case == "resume" else case)
        assert protocol.phase is Phase.INIT
    assert vcpu.calls == []
    answer = protocol.receive_request(VcpuRequest(wait=VcpuRequest.Wait()).SerializeToString())
    assert answer is not None
    init = VcpuResponse.FromString(answer)
    assert init.errno == 0 and init.wait.WhichOneof("exit") == "init"


# -- the fuzz targets under atheris -------------------------------------------------------------


@pytest.mark.parametrize(
    "target", [pytest.param("main_target", marks=pytest.mark.kvm), "vcpu_target"]
)
def test_atheris_target_runs_clean(tmp_path: Path, target: str) -> None:
    """A short, seeded run of each target (the long ones are in docs/fuzzing.md)."""
    # A declared test dependency: a broken install must fail here, not skip the fuzzing.
    importlib.import_module("atheris")
    runs = 2000
    proc = subprocess.run(
        [
            sys.executable, "-m", f"tests.fuzz.{target}", f"-runs={runs}", "-seed=1",
            "-timeout=60", f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {runs} runs" in proc.stderr
    assert not list(tmp_path.iterdir())  # no crash, leak or timeout artifact


# -- a hostile plugin process against the real supervisor ---------------------------------------

FLOOD = """
import collections
sys.path.insert(0, sys.argv[1])
from google.protobuf.message import DecodeError
from fuzz.fds import fd_kinds, fd_spec, fd_specs, memfd_mappings, opened_fds
from fuzz.hostile import RandomChooser, VCPU_CASES, main_request, mutate, pick, vcpu_request

ch = RandomChooser(int(sys.argv[2]))
ROUNDS = int(sys.argv[3])
MAX_FDS = 4  # [limits] fds_per_message: more are refused (EINVAL), all closed
VCPU_SAFE = [c for c in VCPU_CASES if c not in ("resume", "shutdown")]
STATS = collections.Counter()
PROBLEMS = []


def problem(what):
    if len(PROBLEMS) < 20:
        PROBLEMS.append(what)


def exchange(sock, data, specs):
    with opened_fds(specs) as opened:
        try:
            wire.send_datagram(sock, data, opened.sent)
        finally:
            for fd in opened.sent:
                os.close(fd)  # the receiver got its own copies
    return wire.recv_datagram(sock)


def new_connection():
    response, fds = call(req(new_connection=pb.MainRequest.NewConnection()))
    if response.errno:
        return None
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(20)
    return sock


def main_round(spare, live):
    mode = ch.integer(0, 9)
    data = main_request(ch).SerializeToString()
    if mode == 0:
        data = ch.blob(64)
    elif mode == 1:
        data = mutate(ch, data)
    try:
        request = pb.MainRequest.FromString(data)
    except DecodeError:
        request = None
    specs = fd_specs(ch, request)
    if request is None or not data:
        # Undecodable bytes close the connection they came on, and so does an empty datagram
        # (a zero-length read is a hang-up): never send them on MAIN.
        sock = spare.pop() if spare else new_connection()
        if sock is None:
            return
        dgram = exchange(sock, data, specs)
        if data and len(specs) > MAX_FDS:  # refused before it is decoded; the connection stays
            if dgram is None or pb.MainResponse.FromString(dgram.data).errno != errno.EINVAL:
                problem(f"{len(specs)} fds with garbage: {dgram}")
            spare.append(sock)
            STATS["too_many_fds"] += 1
        elif dgram is not None:
            problem(f"garbage {data.hex()} answered: {dgram}")
        else:
            sock.close()
            STATS["hang_up"] += 1
        return
    sock = MAIN if not spare or ch.boolean() else pick(ch, spare)
    dgram = exchange(sock, data, specs)
    if dgram is None:
        problem(f"hang-up after {request}")
        if sock is MAIN:
            raise SystemExit(f"the supervisor dropped the main connection: {PROBLEMS}")
        spare.remove(sock)
        return
    response = pb.MainResponse.FromString(dgram.data)
    case = request.WhichOneof("message")
    if len(specs) > MAX_FDS:
        dgram.close_fds()
        if response.errno != errno.EINVAL:
            problem(f"{case} with {len(specs)} fds: errno {response.errno}")
        STATS["too_many_fds"] += 1
        return
    if response.WhichOneof("message") != case or response.errno < 0:
        problem(f"{case} answered with {response}")
    STATS[f"{case}:{'ok' if response.errno == 0 else 'error'}"] += 1
    if case == "new_connection" and response.errno == 0 and len(spare) < 6:
        sock = socket.socket(fileno=dgram.fds.pop())
        sock.settimeout(20)
        spare.append(sock)
    dgram.close_fds()
    if case == "create" and response.errno == 0:
        live.add(request.create.id)
    elif case == "destroy" and response.errno == 0:
        live.discard(request.destroy.id)


def vcpu_round(vcpus):
    vcpu = pick(ch, vcpus)
    data = vcpu_request(ch, VCPU_SAFE).SerializeToString()
    if ch.integer(0, 3) == 0:
        data = mutate(ch, data) if ch.boolean() else ch.blob(64)
    try:
        request = pb.VcpuRequest.FromString(data)
        case = request.WhichOneof("message")
    except DecodeError:
        request = case = None
    if case in ("resume", "shutdown") or not data:
        # Would run the guest or stop the VCPU (an empty datagram is a hang-up): not what
        # this run is about.
        return
    specs = [fd_spec(ch) for _ in range(0 if ch.integer(0, 7) else ch.integer(1, 2))]
    dgram = exchange(vcpu, data, specs)
    response = pb.VcpuResponse.FromString(dgram.data)
    want = errno.EBADMSG if request is None else errno.ENOTTY if case is None else None
    if case == "wait":
        want = errno.EPROTO
    if specs:
        want = errno.EINVAL
    if want is not None and response.errno != want:
        problem(f"VCPU {case}: errno {response.errno}, not {want}")
    if case is not None and response.WhichOneof("message") != case:
        problem(f"VCPU {case} answered with {response.WhichOneof('message')}")
    STATS["vcpu"] += 1


call(req(start=pb.MainRequest.Start()))
_, vcpu_fds = call(req(get_vcpus=pb.MainRequest.GetVcpus()))
vcpus = [socket.socket(fileno=fd) for fd in vcpu_fds]
MAIN.settimeout(20)
for vcpu in vcpus:
    vcpu.settimeout(20)
    wire.send_datagram(vcpu, pb.VcpuRequest(wait=pb.VcpuRequest.Wait()).SerializeToString())
    init = pb.VcpuResponse.FromString(wire.recv_datagram(vcpu).data)
    assert init.wait.WhichOneof("exit") == "init", init
print(json.dumps({"started": os.getpid()}), flush=True)

SUPERVISOR = os.getppid()
try:
    with open(f"/proc/{SUPERVISOR}/cmdline") as f:
        MEASURED = f.read().split("\\0")[1:3] == ["-m", "vmsuper"]
except OSError:
    MEASURED = False  # sandboxed: the supervisor is not in this pid namespace
before = [fd_kinds(SUPERVISOR), memfd_mappings(SUPERVISOR)] if MEASURED else None
spare, live = [], set()
for i in range(ROUNDS):
    if i in (ROUNDS // 3, 2 * ROUNDS // 3):
        wire.send_datagram(MAIN, b"\\x0a" + b"\\xff" * ((1 << 20) + 100))
        STATS["too_large"] += pb.MainResponse.FromString(wire.recv_datagram(MAIN).data).errno
    elif ch.integer(0, 9) == 0:
        vcpu_round(vcpus)
    else:
        main_round(spare, live)

for obj_id in sorted(live):
    if errno_of(req(destroy=pb.MainRequest.Destroy(id=obj_id))):
        problem(f"destroy of live object {obj_id} failed")
for sock in spare:
    sock.close()
# Two round trips: the supervisor has taken every hang-up by the second answer.
for _ in range(2):
    response, _ = call(req(check_extension=pb.MainRequest.CheckExtension(extension=0)))
RESULTS.update(
    answers=response.check_extension.has_extension, stats=STATS, problems=PROBLEMS,
    before=before, after=[fd_kinds(SUPERVISOR), memfd_mappings(SUPERVISOR)] if MEASURED else None,
)
report()
"""


@pytest.mark.kvm
def test_hostile_plugin_cannot_hurt_the_supervisor(tmp_path: Path) -> None:
    rounds = 3000
    plugin = write_python_plugin(tmp_path, plugin_source(FLOOD))
    spec = VmSpec(
        vcpus=2, args=[str(TESTS), "20240607", str(rounds)], mounts=[(TESTS, None, False)]
    )
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    try:
        read_json_line(proc)
        family = descendants(proc.pid)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    result = finish(proc, config, logs, timeout=180)
    assert result.status == 0, result.stderr[-4000:]
    crashes = [r for r in result.records() if "internal_error" in r["event"]]
    assert crashes == []
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["problems"] == []
    assert found["answers"] is True
    stats = found["stats"]
    # The run reached deep: objects made, connections dropped for garbage, limits hit.
    assert stats["create:ok"] > 20 and stats["destroy:ok"] > 0, stats
    assert stats["hang_up"] > 20 and stats["too_many_fds"] > 5 and stats["vcpu"] > 100, stats
    assert stats["too_large"] == 2 * errno.EMSGSIZE
    if found["before"] is not None:  # not sandboxed: the supervisor's /proc was readable
        assert found["after"] == found["before"]
    assert len(family) >= 3  # the plugin and two VCPU workers
    assert all_gone(family)

"""The exit engine's pieces on their own: its binding (loaded only when used, refused when
stale), its protobuf encoding and parsing against protobuf and the Python oracles
(tests/fuzz/wire_oracle.py), its decoding, its range lookup against the range table, its signal
watch (which can be taken back), its bells and seqlocks.

The loops themselves run in tests/test_vcpus.py (real KVM) and tests/test_vcpu_worker.py
(scripted exits, checked against the protocol oracle).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
from engine_constants import engine_constant
from fuzz.wire_oracle import plain_resume_data, wire_fields
from hypothesis import given
from hypothesis import strategies as st
from liveplugin import wait_for

from vmsuper.shared import abi, hotpath, hotpath_source, kvm
from vmsuper.shared.plugin_pb2 import VcpuRequest, VcpuResponse
from vmsuper.shared.ranges import RangeTable, Space
from vmsuper.shared.shm import SharedRegion
from vmsuper.shared.shm_doorbell import Doorbell, drain_wakeup_pipe
from vmsuper.shared.shm_mailbox import Mailbox


def test_contexts_take_addresses_for_pointers_and_read_back_by_name() -> None:
    seen = ctypes.c_uint32()
    context = hotpath.RunnerContext(request_seen=ctypes.addressof(seen), out_fd=5, hold_runs=1)
    assert (context.out_fd, context.hold_runs, context.stopping) == (5, 1, 0)
    assert int(hotpath.binding().ffi.cast("uintptr_t", context.request_seen)) == ctypes.addressof(
        seen
    )
    context.stopping = 1
    assert context.stopping == 1
    with pytest.raises(KeyError):
        hotpath.WorkerContext(no_such_field=1)


# What the tests below run in a child whose compiled hot path cannot be imported: it notes any
# attempt, and says so at exit.
_BLOCKED = """
import atexit, sys
attempts = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "vmsuper.shared._hotpath":
            attempts.append(name)
            raise ImportError("made unimportable for the test")
atexit.register(lambda: print("engine-import-attempts:", len(attempts), file=sys.stderr))
sys.meta_path.insert(0, Block())
"""


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "VMSUPER_RUNS_DIR": str(tmp_path / "runs")},
    )


def test_importing_the_binding_and_its_users_needs_no_compiled_module(tmp_path: Path) -> None:
    done = _run_blocked(
        "import vmsuper.shared.hotpath, vmsuper.shared.shm, vmsuper.plugin\n"
        "import vmsuper.workers.exit_engine, vmsuper.workers.worker_process\n"
        "import vmsuper.supervisor.runners\n"
        "from vmsuper.shared.shm import RegionView, SharedRegion\n"
        "import os\n"
        "region = SharedRegion.create(2)\n"
        "with RegionView.open(os.getpid(), region.fd) as view:\n"
        "    print(view.vcpus, view.reading(1).state.name)\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "NOT_STARTED"]
    assert "engine-import-attempts: 0" in done.stderr


@pytest.mark.parametrize(
    "argv", [["--help"], ["logs", "no-such-run"], ["check"], ["stats"], ["stats", "--json"]]
)
def test_commands_that_need_no_engine_run_without_it(argv: list[str], tmp_path: Path) -> None:
    done = _run_blocked(
        f"from vmsuper.supervisor.cli import main\nraise SystemExit(main({argv!r}))\n",
        tmp_path,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "engine-import-attempts: 0" in done.stderr


def test_first_use_without_the_compiled_module_says_how_to_build_it(tmp_path: Path) -> None:
    done = _run_blocked(
        "from vmsuper.shared import hotpath\n"
        "try:\n"
        "    hotpath.take_signal()\n"
        "except hotpath.HotpathError as exc:\n"
        "    print(exc)\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install --no-build-isolation -e ." in done.stdout
    assert "./dev test" in done.stdout
    assert "engine-import-attempts: 1" in done.stderr


def test_a_library_from_before_the_binding_is_named_for_removal(tmp_path: Path) -> None:
    """A pre-cffi build left beside the sources (no module init) is what Python imports
    first; the error names it, since a rebuild alone would not remove it."""
    package = tmp_path / "vmsuper" / "shared"
    package.mkdir(parents=True)
    (tmp_path / "vmsuper" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "hotpath.py").write_text(Path(hotpath.__file__).read_text())
    (package / "hotpath_source.py").write_text(Path(hotpath_source.__file__).read_text())
    (package / "abi.py").write_text(Path(abi.__file__).read_text())
    old = package / "_hotpath.cpython-311-x86_64-linux-gnu.so"
    source = tmp_path / "empty.c"
    source.write_text("int vms_abi(void) { return 2; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(old), str(source)], check=True)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vmsuper.shared import hotpath\n"
            "try:\n"
            "    hotpath.binding()\n"
            "except hotpath.HotpathError as exc:\n"
            "    print(exc)\n",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert f"remove {old.name} from {package}" in done.stdout


def test_a_run_without_the_compiled_module_fails_its_set_up_saying_how_to_build_it(
    tmp_path: Path,
) -> None:
    config = Path(__file__).resolve().parent.parent / "configs" / "hello.toml"
    done = _run_blocked(
        "from vmsuper.supervisor.cli import main\n"
        f"raise SystemExit(main(['run', {str(config)!r}, '--log-dir', 'logs']))\n",
        tmp_path,
    )
    assert done.returncode == 125, done.stderr
    assert "set-up failed: vmsuper's compiled hot path cannot be loaded" in done.stderr
    assert "pip install --no-build-isolation -e ." in done.stderr
    assert "Traceback" not in done.stderr


def test_a_build_from_other_sources_is_refused(tmp_path: Path) -> None:
    """The digest compiled into the module must be that of the sources beside it."""
    package = Path(hotpath.__file__).parent
    assert hotpath_source.digest(package) == hotpath.binding().lib.VMS_SOURCE_DIGEST
    copy = tmp_path / "shared"
    copy.mkdir()
    for name in hotpath_source.SOURCES:
        (copy / name).write_bytes((package / name).read_bytes())
    assert hotpath_source.digest(copy) == hotpath.binding().lib.VMS_SOURCE_DIGEST
    with (copy / "hotpath.c").open("a") as f:
        f.write("/* changed */\n")
    assert hotpath_source.digest(copy) != hotpath.binding().lib.VMS_SOURCE_DIGEST


def test_the_source_digest_sees_any_change_to_any_source(tmp_path: Path) -> None:
    """A changed byte or bit, an added or removed byte, in any of the files, or bytes moved
    from one file to the next: each gives another digest, which fits 63 bits."""
    package = Path(hotpath.__file__).parent
    original = {name: (package / name).read_bytes() for name in hotpath_source.SOURCES}

    def digest_of(files: dict[str, bytes]) -> int:
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        return hotpath_source.digest(tmp_path)

    built = digest_of(original)
    assert built == hotpath.binding().lib.VMS_SOURCE_DIGEST
    assert 0 <= built < 1 << 63
    for name, data in original.items():
        for at in (0, len(data) // 2, len(data) - 1):
            for changed in (
                data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :],
                data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :],
                data[:at] + data[at + 1 :],
                data[:at] + b"\n" + data[at:],
            ):
                assert digest_of({**original, name: changed}) != built, (name, at)
    for first, second in itertools.pairwise(hotpath_source.SOURCES):
        moved = {
            **original,
            first: original[first][:-1],
            second: original[first][-1:] + original[second],
        }
        assert digest_of(moved) != built, (first, second)
    assert digest_of(original) == built


def test_a_stale_build_is_refused_on_first_use(tmp_path: Path) -> None:
    """The compiled module beside a copy of its sources loads; once one source changes, the
    first use is refused with a HotpathError that says how to rebuild."""
    installed = Path(hotpath.__file__).parent
    package = tmp_path / "vmsuper" / "shared"
    package.mkdir(parents=True)
    (tmp_path / "vmsuper" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    compiled = hotpath.binding().__file__
    assert compiled is not None
    module = Path(compiled)
    for name in {*hotpath_source.SOURCES, "hotpath.py", module.name}:
        (package / name).write_bytes((installed / name).read_bytes())
    use = (
        "from vmsuper.shared import hotpath\n"
        "try:\n"
        "    print(hotpath.binding().__file__)\n"
        "except hotpath.HotpathError as exc:\n"
        "    print(exc)\n"
    )

    def first_use() -> str:
        done = subprocess.run(
            [sys.executable, "-c", use],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert first_use() == f"{package / module.name}\n"
    with (package / "seqlock.c").open("a") as f:
        f.write("/* changed */\n")
    refused = first_use()
    assert f"built from other sources than those in {package}" in refused
    assert hotpath.REBUILD in refused


# -- encoding and parsing ---------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(
    space=st.sampled_from([Space.IOPORT, Space.MMIO]),
    address=u64,
    is_write=st.booleans(),
    no_resume=st.booleans(),
    data=st.binary(max_size=300),
)
def test_wait_io_encoding_is_protobufs_canonical_one(
    space: int, address: int, is_write: bool, no_resume: bool, data: bytes
) -> None:
    expected = VcpuResponse()
    io = expected.wait.io
    io.SetInParent()
    io.space = space  # type: ignore[assignment]
    io.address, io.is_write, io.no_resume, io.data = address, is_write, no_resume, data
    encoded = hotpath.encode_io_wait(space, address, is_write, no_resume, data)
    assert VcpuResponse.FromString(encoded) == expected
    # The canonical encoding (which protobuf's serializer need not produce, so it is checked
    # against the wire format itself): fields in number order, no proto3 default written.
    [(wait, wait_body)] = wire_fields(encoded)
    assert wait == (2, 2) and isinstance(wait_body, bytes)  # VcpuResponse.wait
    [(io_field, io_body)] = wire_fields(wait_body)
    assert io_field == (2, 2) and isinstance(io_body, bytes)  # Wait.io
    fields = wire_fields(io_body)
    numbers = [number for (number, _), _ in fields]
    assert numbers == sorted(set(numbers)), "fields out of order, or repeated"
    assert all(value not in (0, b"") for _, value in fields), "a proto3 default was written"


def test_wire_fields_reads_the_canonical_form() -> None:
    # space=1, address=0x3f8, data=b"hi", by hand from the wire format's rules.
    io = b"\x08\x01" + b"\x10\xf8\x07" + b"\x2a\x02hi"
    assert wire_fields(io) == [((1, 0), 1), ((2, 0), 0x3F8), ((5, 2), b"hi")]
    assert (
        hotpath.encode_io_wait(1, 0x3F8, False, False, b"hi")
        == b"\x12" + bytes([len(io) + 2]) + b"\x12" + bytes([len(io)]) + io
    )


@given(data=st.binary(max_size=300))
def test_plain_resume_reads_what_clients_send(data: bytes) -> None:
    request = VcpuRequest(resume=VcpuRequest.Resume(data=data)).SerializeToString()
    assert hotpath.plain_resume(request) == data


@given(raw=st.binary(max_size=40))
def test_plain_resume_accepts_only_plain_resumes(raw: bytes) -> None:
    found = hotpath.plain_resume(raw)
    if found is None:
        return
    request = VcpuRequest.FromString(raw)
    assert request.WhichOneof("message") == "resume"
    assert request.resume == VcpuRequest.Resume(data=found)


def test_plain_resume_leaves_the_rest_to_protobuf() -> None:
    with_regs = VcpuRequest(resume=VcpuRequest.Resume(data=b"x", regs=bytes(144)))
    for request in (with_regs, VcpuRequest(wait=VcpuRequest.Wait())):
        assert hotpath.plain_resume(request.SerializeToString()) is None
    assert hotpath.plain_resume(b"\x12\x05\x0a\x03ab") is None  # cut short
    assert hotpath.plain_resume(b"\x12\x02\x0a\x00\x00") is None  # trailing byte


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


RESUME_EDGES = [
    b"",
    b"\x12",
    b"\x12\x00",
    b"\x12\x02\x0a\x00",
    b"\x12\x03\x0a\x01z",
    b"\x12\x03\x0a\x01",  # cut short
    b"\x12\x04\x0a\x01zz",  # data shorter than Resume says
    b"\x12\x03\x12\x01z",  # Resume.regs, not data
    b"\x0a\x00",  # Wait, not Resume
    b"\x12\x80\x00",  # a long but valid varint for 0
    b"\x12" + b"\xff" * 9 + b"\x01",  # 2**64 - 1: longer than the message
    b"\x12" + b"\x80" * 9 + b"\x02",  # over 64 bits
    b"\x12" + b"\x80" * 10,  # never ends
    b"\x12\x83\x80\x80\x80\x80\x80\x80\x80\x80\x02\x0a\x01z",  # 3 + 2**64 (wraps in C)
]


@pytest.mark.parametrize("request_", RESUME_EDGES)
def test_plain_resume_edges_match_python(request_: bytes) -> None:
    assert hotpath.plain_resume(request_) == plain_resume_data(request_)


@given(st.binary(max_size=40))
def test_plain_resume_of_any_bytes_matches_python(request_: bytes) -> None:
    assert hotpath.plain_resume(request_) == plain_resume_data(request_)


@given(st.binary(max_size=200), st.binary(max_size=3))
def test_plain_resume_of_resumes_matches_python(data: bytes, tail: bytes) -> None:
    body = b"\x0a" + _varint(len(data)) + data
    for request_ in (
        b"\x12" + _varint(len(body)) + body,
        b"\x12" + _varint(len(body)) + body + tail,
    ):
        assert hotpath.plain_resume(request_) == plain_resume_data(request_)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([Space.IOPORT, Space.MMIO]),
            st.integers(0, 0x1_0000),
            st.integers(1, 0x100),
            st.booleans(),
        ),
        max_size=20,
    ),
    st.lists(st.tuples(st.sampled_from([Space.IOPORT, Space.MMIO]), st.integers(0, 0x1_0200))),
)
def test_range_lookup_matches_the_table(
    wanted: list[tuple[Space, int, int, bool]], probes: list[tuple[Space, int]]
) -> None:
    table = RangeTable()
    for space, start, length, async_write in wanted:
        if table.lookup(space, start) is None and table.lookup(space, start + length - 1) is None:
            try:
                table.reserve(space, start, length, async_write)
            except Exception:  # an overlap in between: skip it
                continue
    ranges = list(table.ranges())
    for space, address in [*probes, *((r.space, r.start) for r in ranges)]:
        index = hotpath.find_range(ranges, space, address)
        expected = table.lookup(space, address)
        assert (ranges[index] if index >= 0 else None) == expected


# -- decoding ---------------------------------------------------------------------------------


def test_the_engine_decodes_io_and_mmio_exits_and_only_those() -> None:
    page = (ctypes.c_char * 8192)()
    run = kvm.kvm_run.from_buffer(page)
    run.exit_reason = kvm.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port = kvm.KVM_EXIT_IO_OUT, 2, 0x3F8
    run.io.count, run.io.data_offset = 3, 4096
    access = hotpath.decode_access(ctypes.addressof(page), len(page))
    assert access is not None
    got = (access.space, access.address, access.is_write, access.offset, access.length)
    assert got == (Space.IOPORT, 0x3F8, 1, 4096, 6)
    assert (access.size, access.count) == (2, 3)
    run.io.data_offset = 8190  # its data would leave the page: not an exit KVM makes
    assert hotpath.decode_access(ctypes.addressof(page), len(page)) is None
    run.exit_reason = kvm.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEE0_0000, 4, 0
    access = hotpath.decode_access(ctypes.addressof(page), len(page))
    assert access is not None
    offset = ctypes.addressof(run.mmio.data) - ctypes.addressof(page)
    got = (access.space, access.address, access.is_write, access.offset, access.length)
    assert got == (Space.MMIO, 0xFEE0_0000, 0, offset, 4)
    run.exit_reason = kvm.KVM_EXIT_HLT
    assert hotpath.decode_access(ctypes.addressof(page), len(page)) is None
    del run


# -- bells ------------------------------------------------------------------------------------


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    shared = SharedRegion.create(1)
    try:
        yield shared
    finally:
        shared.close()


def wait_until_sleeping(mailbox: Mailbox, which: int) -> None:
    """Until the bell's waiter sleeps in a read of its pipe (it has polled and given up)."""
    wait_for(lambda: bool(mailbox.bell_sleeping(which)), "the waiter to sleep")


@pytest.mark.parametrize("spin_ns", [0, 200_000])
def test_a_bell_wakes_its_waiter_in_another_thread(region: SharedRegion, spin_ns: int) -> None:
    mailbox = region.mailbox(0)
    mailbox.poll_ns = spin_ns
    with Doorbell(mailbox) as bell:
        # Rung before the wait, or (most likely) while it polls: no sleep needed.
        for ringer in (None, threading.Thread(target=bell.ring_request)):
            if ringer is None:
                bell.ring_request()
            else:
                ringer.start()
            assert bell.wait_request() == 1
            if ringer is not None:
                ringer.join()
        # Rung once the waiter sleeps: the ring must write its pipe.
        got: list[int] = []
        waiter = threading.Thread(target=lambda: got.append(bell.wait_request()))
        waiter.start()
        try:
            wait_until_sleeping(mailbox, 0)
        finally:
            bell.ring_request()
            waiter.join(30)
        assert got == [1]
        assert not mailbox.bell_sleeping(0)


def thread_cpu_s(tid: int) -> float:
    """CPU time of this process's thread `tid` so far (its schedstat)."""
    with open(f"/proc/self/task/{tid}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9


def test_a_doorbell_polls_for_its_mailbox_s_window_of_the_moment(region: SharedRegion) -> None:
    """The supervisor's polling gate sets the window (`poll_gate`): the Python waits (a
    worker's VCPU ioctls) follow it as the C loops do, and poll not at all when it says 0."""
    mailbox = region.mailbox(0)
    with Doorbell(mailbox) as bell:
        for window, polls in ((3_000_000_000, True), (0, False)):
            mailbox.poll_ns = window
            tids: list[int] = []
            started = threading.Event()

            def wait(tids: list[int], started: threading.Event) -> None:
                tids.append(threading.get_native_id())
                started.set()
                bell.wait_request()

            waiter = threading.Thread(target=wait, args=(tids, started))
            waiter.start()
            try:
                assert started.wait(30)
                if polls:  # it spends CPU on the bell, and does not sleep
                    tid = tids[0]

                    def polled(tid: int = tid) -> bool:
                        return thread_cpu_s(tid) >= 0.05

                    wait_for(polled, "the waiter to poll")
                    assert not mailbox.bell_sleeping(0)
                else:  # it sleeps at once, having spent next to no CPU
                    wait_until_sleeping(mailbox, 0)
                    assert thread_cpu_s(tids[0]) < 0.05
            finally:
                bell.ring_request()
                waiter.join(30)
            assert not waiter.is_alive()


def test_a_bell_wakes_a_sleeping_waiter_in_another_process(region: SharedRegion) -> None:
    mailbox = region.mailbox(0)
    with Doorbell(mailbox) as bell:
        pid = os.fork()
        if pid == 0:
            try:
                bell.wait_request()
                bell.ring_done()
            finally:
                os._exit(0)
        try:
            wait_until_sleeping(mailbox, 0)
        finally:
            bell.ring_request()
        assert bell.wait_done() == 1
        assert os.waitpid(pid, 0)[1] == 0


# -- a worker asleep in the read of its channel (hotpath.c: read_cancel) ----------------------


def _cancellable_read(fd: int, rearm: bool) -> int:
    buf = hotpath.binding().ffi.new("uint8_t[]", 16)
    return int(hotpath.library.vms_cancellable_read(fd, buf, 16, int(rearm)))


def _blocked_in_read(pid: int, fd: int) -> bool:
    """Whether process `pid` sleeps in read(fd) (/proc/PID/syscall: number, then arguments)."""
    with open(f"/proc/{pid}/syscall") as status:
        fields = status.read().split()
    return fields[:2] == ["0", hex(fd)]


def _child_reports(body: Callable[[], list[int]]) -> tuple[int, Callable[[], list[int]]]:
    """Fork a child that runs `body` and writes its results to a pipe: (its pid, a function
    that returns them, failing if they do not come within 30 s)."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            found = body()
            os.write(report_w, b"".join(r.to_bytes(8, "little", signed=True) for r in found))
        finally:
            os._exit(0)
    os.close(report_w)

    def reported() -> list[int]:
        try:
            ready, _, _ = select.select([report_r], [], [], 30)
            assert ready, "the child's read did not end"
            data = os.read(report_r, 4096)
            return [
                int.from_bytes(data[i : i + 8], "little", signed=True)
                for i in range(0, len(data), 8)
            ]
        finally:
            os.close(report_r)

    return pid, reported


def _reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _woken_in_read(
    child: Callable[[], list[int]], fd: int, wake: Callable[[int], None]
) -> list[int]:
    """Fork `child`, wait until it blocks in read(fd), call `wake` with its pidfd: what the
    child reported."""
    pid, reported = _child_reports(child)
    pidfd = os.pidfd_open(pid)
    try:
        wait_for(lambda: _blocked_in_read(pid, fd), "the child to block in read")
        wake(pidfd)
        return reported()
    finally:
        os.close(pidfd)
        _reap(pid)


@pytest.fixture
def channel() -> Iterator[tuple[int, int]]:
    """A pipe standing for a plugin's channel: (read end, write end)."""
    ends = os.pipe()
    try:
        yield ends
    finally:
        for fd in ends:
            os.close(fd)


def test_the_wake_signal_ends_a_read_that_blocks(channel: tuple[int, int]) -> None:
    """The handler restarts what it interrupts (SA_RESTART), so the kernel rewinds the blocked
    read to make it again: only the handler moving it to the window's exit ends it."""
    data_r, _ = channel

    def child() -> list[int]:
        hotpath.catch_wake()
        return [_cancellable_read(data_r, rearm=True)]

    def wake(pidfd: int) -> None:
        signal.pidfd_send_signal(pidfd, abi.WAKE_SIGNAL)

    assert _woken_in_read(child, data_r, wake) == [-errno.EINTR]


@pytest.mark.parametrize("which", ["wake", "watched"])
def test_a_signal_just_before_the_read_ends_it_at_once(
    which: str, channel: tuple[int, int]
) -> None:
    """A signal that lands after the last check and before the read (here: before the call)
    leaves the flag set, and the read does not block; a read rearmed after it, with bytes
    waiting, reads them."""
    data_r, data_w = channel

    def child() -> list[int]:
        if which == "wake":
            hotpath.catch_wake()
            sent = abi.WAKE_SIGNAL
        else:
            signal.signal(signal.SIGUSR2, lambda signum, frame: None)
            hotpath.watch_signal(signal.SIGUSR2)
            sent = signal.SIGUSR2
        os.kill(os.getpid(), sent)  # handled before kill returns
        first = _cancellable_read(data_r, rearm=False)
        os.write(data_w, b"abc")
        return [first, _cancellable_read(data_r, rearm=True)]

    pid, reported = _child_reports(child)
    try:
        assert reported() == [-errno.EINTR, 3]
    finally:
        _reap(pid)


def test_a_ring_wakes_a_worker_asleep_in_read_through_its_pidfd(
    region: SharedRegion, channel: tuple[int, int]
) -> None:
    """A bell whose waiter says it sleeps in a read (`Sleeping.IN_READ`) is rung with the
    wake-up signal, sent through the pidfd the ringing side holds."""
    data_r, _ = channel
    with Doorbell(region.mailbox(0)) as bell:
        sleeping = ctypes.c_uint32.from_address(bell.done_bell + abi.BELL.offset("sleeping"))

        def child() -> list[int]:
            hotpath.catch_wake()
            sleeping.value = abi.Sleeping.IN_READ
            return [_cancellable_read(data_r, rearm=True)]

        assert _woken_in_read(child, data_r, bell.ring_done) == [-errno.EINTR]


def _on_usr2(signum: int, frame: FrameType | None) -> None:
    _on_usr2.calls += 1  # type: ignore[attr-defined]


_on_usr2.calls = 0  # type: ignore[attr-defined]


@pytest.fixture
def usr2_handler() -> Iterator[None]:
    previous = signal.signal(signal.SIGUSR2, _on_usr2)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, previous)
        hotpath.take_signal()


def test_a_signal_while_a_bell_sleeps_interrupts_it(
    region: SharedRegion, usr2_handler: None
) -> None:
    waiter = threading.get_ident()
    woken = threading.Event()

    def send() -> None:
        # Once the waiter sleeps, at this very thread; again while it still sleeps, since a
        # signal that lands just before its read() is handled without interrupting anything.
        wait_until_sleeping(region.mailbox(0), 0)
        while not woken.is_set():
            signal.pthread_kill(waiter, signal.SIGUSR2)
            woken.wait(0.05)

    with Doorbell(region.mailbox(0)) as bell:
        sender = threading.Thread(target=send)
        sender.start()
        try:
            with pytest.raises(InterruptedError):
                hotpath.bell_wait(bell.request_bell, bell.runner_fds()[0], bell.request_seen, 0)
        finally:
            woken.set()
            sender.join()


def test_a_signal_before_the_sleep_is_not_slept_through(
    region: SharedRegion, usr2_handler: None
) -> None:
    """A watched signal that came while nothing could be interrupted (here: before the call)
    still ends the wait, through the wake-up pipe or the noted flag."""
    calls = _on_usr2.calls  # type: ignore[attr-defined]
    hotpath.watch_signal(signal.SIGUSR2)
    with Doorbell(region.mailbox(0)) as bell:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        try:
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
            assert _on_usr2.calls == calls + 1  # type: ignore[attr-defined]  # Python's handler ran
            for wake_fd in (read_end, -1):  # the pipe, then the flag alone
                with pytest.raises(InterruptedError):
                    hotpath.bell_wait(
                        bell.request_bell, bell.runner_fds()[0], bell.request_seen, 0, wake_fd
                    )
            assert hotpath.take_signal()
            assert not hotpath.take_signal()
            drain_wakeup_pipe(read_end)
            bell.ring_request()
            hotpath.bell_wait(
                bell.request_bell, bell.runner_fds()[0], bell.request_seen, 0, read_end
            )
        finally:
            hotpath.unwatch_signal(signal.SIGUSR2)
            signal.set_wakeup_fd(previous)
            os.close(read_end)
            os.close(write_end)


def _sigaction_handler(signum: int) -> int:
    """The address of the handler the kernel would call for `signum` (0: SIG_DFL, 1: SIG_IGN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    action = (ctypes.c_char * 256)()  # struct sigaction: the handler first, the rest unread
    assert libc.sigaction(signum, None, action) == 0, ctypes.get_errno()
    return ctypes.c_void_p.from_buffer(action).value or 0


def test_a_watched_signal_can_be_unwatched(usr2_handler: None) -> None:
    """The engine's handler in front of Python's is global state: unwatching puts back
    exactly what was there, and the signal reaches Python's handler alone again."""
    pythons = _sigaction_handler(signal.SIGUSR2)
    hotpath.watch_signal(signal.SIGUSR2)
    hotpath.watch_signal(signal.SIGUSR2)  # twice: still one handler in front
    try:
        assert _sigaction_handler(signal.SIGUSR2) != pythons
        calls = _on_usr2.calls  # type: ignore[attr-defined]
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        assert _on_usr2.calls == calls + 1  # type: ignore[attr-defined]
        assert hotpath.take_signal()
    finally:
        hotpath.unwatch_signal(signal.SIGUSR2)
    assert _sigaction_handler(signal.SIGUSR2) == pythons
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
    assert _on_usr2.calls == calls + 2  # type: ignore[attr-defined]
    assert not hotpath.take_signal()  # no longer noted
    hotpath.unwatch_signal(signal.SIGUSR2)  # unwatching what is not watched changes nothing
    assert _sigaction_handler(signal.SIGUSR2) == pythons


# -- seqlocks ---------------------------------------------------------------------------------


def test_a_seqlock_read_sees_only_whole_writes() -> None:
    cells = (ctypes.c_uint64 * 3)()  # the generation, then 16 bytes of data
    gen, data = ctypes.addressof(cells), ctypes.addressof(cells) + 8
    out = bytearray(16)
    assert hotpath.seq_read(gen, data, out) == 0
    assert hotpath.seq_publish(gen, data, b"A" * 16) == 2
    assert hotpath.seq_read(gen, data, out) == 2 and out == b"A" * 16
    hotpath.seq_begin(gen)  # a writer under way: nothing it guards may be taken
    assert cells[0] == 3
    ctypes.memmove(data, b"B" * 8, 8)
    assert hotpath.seq_read(gen, data, out) is None
    assert hotpath.seq_end(gen) == 4
    assert hotpath.seq_read(gen, data, out) == 4 and out == b"B" * 8 + b"A" * 8


# -- the plugin's speed, as the engine judges it ----------------------------------------------


class Judge:
    """The engine's moving average of a plugin's response times (`recent_response_ns`, which
    decides whether the runner or the worker sends its exits), fed one response at a time
    through `vms_resumed`, as the worker's loop feeds it."""

    def __init__(self, region: SharedRegion) -> None:
        slot = region.slot(0)
        stats = slot.cell_address("stats")
        self._slot = slot
        self.context = hotpath.WorkerContext(stats=stats, run_state=slot.cell_address("run_state"))
        self._since = ctypes.c_uint64.from_address(stats + abi.STATS.offset("wait_since"))
        self._recent = ctypes.c_uint64.from_address(stats + abi.STATS.offset("recent_response_ns"))

    @property
    def recent(self) -> int:
        return self._recent.value

    @recent.setter
    def recent(self, value: int) -> None:
        self._recent.value = value

    def respond(self, after_ns: int, *, polled: bool) -> int:
        """One response, `after_ns` (and the few µs this call takes) after the wait began,
        polled for by the worker or not; returns the time the engine measured."""
        self._slot.run_state = abi.RunState.WAITING_PLUGIN
        self._since.value = time.monotonic_ns() - after_ns
        self.context.reply_polled = int(polled)
        hotpath.library.vms_resumed(self.context)
        assert self.context.reply_polled == 0  # it goes with the response it was set for
        return int(self.context.response_ns)


BAR = engine_constant("REPLY_POLL_MAX_NS")
PROBE_MAX = engine_constant("REPLY_PROBE_MAX_NS")
CAP = engine_constant("REPLY_SAMPLE_MAX_NS")
SLOW_NS = 1_000_000_000


def test_only_replies_polled_for_move_the_judgement(region: SharedRegion) -> None:
    judge = Judge(region)
    judge.respond(SLOW_NS, polled=False)  # the worker slept: its own wake-up is in the time
    assert judge.recent == 0
    judge.recent = BAR - 1
    judge.respond(SLOW_NS, polled=False)
    assert judge.recent == BAR - 1
    assert region.slot(0).reading().responses == 2  # counted all the same


def test_a_polled_reply_counts_for_an_eighth_at_most_the_cap(region: SharedRegion) -> None:
    judge = Judge(region)
    judge.respond(SLOW_NS, polled=True)
    assert judge.recent == CAP >> 3  # one stall moves a fast plugin's average by this much
    for _ in range(64):
        judge.respond(SLOW_NS, polled=True)
    assert BAR <= judge.recent <= CAP  # a plugin slow for good is judged slow, at the cap


def test_a_slow_plugin_that_answers_a_probe_quickly_is_fast_again(region: SharedRegion) -> None:
    judge = Judge(region)
    judge.recent = 10_000  # judged fast: a quick answer only moves the average
    took = judge.respond(0, polled=True)
    assert judge.recent == 10_000 - (10_000 >> 3) + (min(took, CAP) >> 3)
    # Judged slow: an answer under the probe's limit decides at once, the slow layout's cost
    # taken out, also one over the bar (a fast plugin's probe answered in the slow layout).
    for after_ns in (0, BAR):
        probe(judge, after_ns)


def probe(judge: Judge, after_ns: int) -> None:
    """A probe answered `after_ns` (and the call's few µs) after the exit: retried while the
    call itself took the answer past the limit (the test preempted just then)."""
    for _ in range(100):
        judge.recent = CAP
        took = judge.respond(after_ns, polled=True)
        if took < PROBE_MAX:
            assert judge.recent == took * BAR // PROBE_MAX < BAR
            return
        assert BAR <= judge.recent <= CAP  # a slow answer: still slow
    pytest.fail(f"no response under {PROBE_MAX} ns in 100 tries")


def test_a_probe_answered_past_the_limit_leaves_the_plugin_slow(region: SharedRegion) -> None:
    judge = Judge(region)
    judge.recent = CAP
    took = judge.respond(PROBE_MAX, polled=True)
    assert judge.recent == CAP - (CAP >> 3) + (min(took, CAP) >> 3) >= BAR

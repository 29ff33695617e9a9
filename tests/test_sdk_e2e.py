"""The plugin SDK (`vmsuper.plugin`) end to end: real plugin processes under the real supervisor.

Each test runs one VM whose plugin makes many SDK calls and prints its findings as JSON; the
test checks them. Guests are small real-mode programs (tests/guests/sdk_*.S) that talk to the
plugin through I/O ports and echo whatever they read, so what reached the guest is visible.
The raw protobuf view of the same requests is in test_main_requests.py; here everything goes
through the SDK, over both VCPU transports where the VCPU channel is involved.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vmsuper.shared import kvm
from vmsuper.shared.asm import assemble
from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

pytestmark = pytest.mark.kvm

GUESTS = Path(__file__).parent / "guests"
LOAD = 0x1000
TRANSPORTS = ["socket", "pipes"]
NET = {"host_ip": "100.115.92.5", "netmask": "255.255.255.252", "mac": "de:21:e8:47:6b:6a"}
SYS_NET = Path("/sys/class/net")

PRELUDE = '''
import errno, json, os, queue, select, sys, threading, time, traceback
from vmsuper.plugin import (
    Connection, CpuidEntry, HypervCall, HypervSynic, Init, Io, IrqchipRoute, MsiRoute,
    PluginError, RegHint, Space, User, VcpuStateError,
)
from vmsuper.shared import kvm

RESULTS = {}
ERRORS = []
LOAD = 0x1000
WAIT = 30.0


def vm_with_guest(conn, size=0x10000):
    """Guest memory at 0 holding the guest program (its path is argv[1]) at LOAD."""
    memory = conn.create_memory(0, size)
    with open(sys.argv[1], "rb") as f:
        code = f.read()
    memory.mmap[LOAD:LOAD + len(code)] = code
    return memory


def errno_of(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except PluginError as exc:
        return exc.errno
    return 0


def real_mode(vcpu, **regs):
    """Real mode with every segment based at 0, starting at LOAD; other VCPUs made runnable."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=2, **regs))
    if vcpu.index:
        vcpu.set_mp_state(kvm.kvm_mp_state(mp_state=kvm.KVM_MP_STATE_RUNNABLE))


class SendCounter:
    """Wraps a Vcpu's channel to count the requests it sends: what is not sent was cached."""

    def __init__(self, vcpu):
        self.inner = vcpu._channel
        self.sent = 0
        vcpu._channel = self

    def send(self, data):
        self.sent += 1
        self.inner.send(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sends(self, call, *args):
        before = self.sent
        call(*args)
        return self.sent - before


def counter_of(fd):
    """An eventfd's counter, consumed; 0 instead of blocking."""
    os.set_blocking(fd, False)
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def in_thread(target, *args):
    """A daemon thread whose exception is recorded in the findings instead of lost."""
    def body():
        try:
            target(*args)
        except BaseException:
            ERRORS.append(traceback.format_exc())
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def report(threads=()):
    for thread in threads:
        thread.join(WAIT)
    stuck = sum(thread.is_alive() for thread in threads)
    RESULTS["errors"] = ERRORS + ([f"{stuck} VCPU threads did not finish"] if stuck else [])
    print(json.dumps(RESULTS), flush=True)
'''


def run_sdk(
    tmp_path: Path,
    body: str,
    spec: VmSpec | None = None,
    guest: str | None = None,
    bits: int = 16,
) -> dict[str, Any]:
    """Run a plugin made of the prelude and `body`; return its findings (errors checked)."""
    spec = spec or VmSpec()
    if guest is not None:
        binary = tmp_path / "guest.bin"
        binary.write_bytes(assemble((GUESTS / guest).read_text(), bits=bits, origin=LOAD))
        spec = dataclasses.replace(spec, args=[str(binary)])
    plugin = write_python_plugin(tmp_path, PRELUDE + "\n" + textwrap.dedent(body))
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"plugin printed no findings; stderr:\n{result.stderr}"
    found: dict[str, Any] = json.loads(lines[-1])
    assert found.pop("errors") == [], result.stderr
    return found


APIC_ID_FIELDS = {0x1: (3, 0x00FF_FFFF), 0xB: (5, 0), 0x1F: (5, 0), 0x8000_001E: (2, 0)}
"""CPUID fields that hold the APIC ID of whichever host CPU answered: (column, mask kept)."""


def without_apic_ids(rows: list[list[int]]) -> list[list[int]]:
    """CPUID rows [function, index, eax, ebx, ecx, edx, has_index] minus the host APIC IDs."""
    out = []
    for row in rows:
        row = list(row)
        if row[0] in APIC_ID_FIELDS:
            column, keep = APIC_ID_FIELDS[row[0]]
            row[column] &= keep
        out.append(row)
    return out


def cpuid_rows(entries: list[kvm.kvm_cpuid_entry2]) -> list[list[int]]:
    significant = kvm.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return without_apic_ids(
        [
            [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx, int(bool(e.flags & significant))]
            for e in entries
        ]
    )


def test_main_connection_calls(tmp_path: Path) -> None:
    found = run_sdk(
        tmp_path,
        """
        R = RESULTS
        conn = Connection.from_env()
        second = conn.new_connection()

        a, b = conn.get_shutdown_eventfd(), second.get_shutdown_eventfd()
        R["shutdown_fds"] = [os.readlink(f"/proc/self/fd/{fd}") for fd in (a, b)]
        os.eventfd_write(a, 3)
        R["shutdown_counter"] = os.eventfd_read(b)
        os.close(a)
        os.close(b)

        R["irqchip"] = conn.check_extension(kvm.KVM_CAP_IRQCHIP)
        R["bogus_extension"] = second.check_extension(99999)
        R["synic"] = conn.check_extension(kvm.KVM_CAP_HYPERV_SYNIC)
        rows = lambda entries: [[e.function, e.index, e.eax, e.ebx, e.ecx, e.edx,
                                 int(e.has_index)] for e in entries]
        R["supported_cpuid"] = rows(conn.get_supported_cpuid())
        R["emulated_cpuid"] = rows(second.get_emulated_cpuid())
        R["msrs"] = conn.get_msr_index_list()
        R["net"] = errno_of(conn.get_net_config)

        conn.reserve_range(Space.IOPORT, 0x600, 16)
        R["ranges"] = {
            "overlap": errno_of(second.reserve_range, Space.IOPORT, 0x60F, 4),
            "other_space": errno_of(conn.reserve_range, Space.MMIO, 0x600, 16),
            "release": errno_of(conn.release_range, Space.IOPORT, 0x600),
            "release_again": errno_of(conn.release_range, Space.IOPORT, 0x600),
            "after_release": errno_of(second.reserve_range, Space.IOPORT, 0x60F, 4),
            "async": errno_of(conn.reserve_range, Space.MMIO, 0xD000_0000, 0x1000,
                              async_write=True),
            "overflow": errno_of(conn.reserve_range, Space.MMIO, 2**64 - 0x10, 0x20),
        }

        def irr(primary=True):
            return conn.get_pic_state(primary).irr

        def eventually(predicate):
            deadline = time.monotonic() + WAIT
            while not predicate():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
            return True

        R["irr_initially"] = irr()
        conn.set_irq(3, True)
        R["irr_after_set_irq"] = irr()
        conn.set_irq(3, False)
        irq = conn.create_irq_event(4)
        R["fds_of_irq_event"] = [os.readlink(f"/proc/self/fd/{fd}")
                                 for fd in (irq.trigger_fd, irq.resample_fd)]
        irq.trigger()
        R["irq_event_raised"] = eventually(lambda: irr() & 0x10)
        irq.destroy()
        R["irq_event_destroyed"] = [irq.destroyed, errno_of(conn.destroy, irq.id)]
        conn.set_irq_routing([IrqchipRoute(20, 0, 6), IrqchipRoute(22, 1, 2),
                              MsiRoute(21, 0xFEE0_0000, 0x30)])
        conn.set_irq(20, True)
        conn.set_irq(22, True)
        R["irr_routed"] = [irr(True), irr(False)]

        pic = conn.get_pic_state(True)
        pic.imr = 0xA5
        conn.set_pic_state(True, pic)
        pic = conn.get_pic_state(False)
        pic.imr = 0x5A
        second.set_pic_state(False, bytes(pic))
        R["imr"] = [conn.get_pic_state(True).imr, second.get_pic_state(False).imr]
        ioapic = conn.get_ioapic_state()
        R["ioapic_base"] = ioapic.base_address
        ioapic.redirtbl[3].bits = 0x1_0033
        conn.set_ioapic_state(ioapic)
        R["ioapic_entry"] = conn.get_ioapic_state().redirtbl[3].bits
        pit = conn.get_pit_state()
        pit.channels[2].count = 0x1234
        conn.set_pit_state(bytes(pit))
        R["pit_count"] = conn.get_pit_state().channels[2].count
        conn.set_clock(kvm.kvm_clock_data(clock=10**15))
        R["clock_moved"] = conn.get_clock().clock >= 10**15

        memory = conn.create_memory(0x100000, 0x2000, dirty_log=True)
        R["memory_overlap"] = errno_of(second.create_memory, 0x101000, 0x1000)
        R["dirty_log_via_second"] = second.memory_dirty_log(memory.id).hex()
        R["read_only_memory"] = errno_of(conn.create_memory, 0x200000, 0x1000, read_only=True)
        R["dirty_log_of_nothing"] = errno_of(conn.memory_dirty_log, 4000)
        with second.create_io_event(Space.IOPORT, 0x800, length=4, datamatch=0xABCD) as event:
            R["io_event_fd"] = os.readlink(f"/proc/self/fd/{event.fd}")
        R["io_event_destroyed"] = [event.destroyed, errno_of(conn.destroy, event.id)]

        R["identity_map_before_start"] = errno_of(conn.set_identity_map_addr, 0xFFFB_C000)
        conn.start()
        R["start_again"] = errno_of(second.start)
        R["identity_map_after_start"] = errno_of(conn.set_identity_map_addr, 0xFFFB_C000)
        second.close()
        conn.close()
        report()
        """,
    )
    with kvm.Kvm() as system:
        supported = cpuid_rows(system.get_supported_cpuid())
        emulated = cpuid_rows(system.get_emulated_cpuid())
        msrs = system.get_msr_index_list()
        with system.create_vm() as vm:
            synic = vm.check_extension(kvm.KVM_CAP_HYPERV_SYNIC) > 0
    found["supported_cpuid"] = without_apic_ids(found["supported_cpuid"])
    found["emulated_cpuid"] = without_apic_ids(found["emulated_cpuid"])
    assert found == {
        "shutdown_fds": ["anon_inode:[eventfd]"] * 2,
        "shutdown_counter": 3,
        "irqchip": True,
        "bogus_extension": False,
        "synic": synic,
        "supported_cpuid": supported,
        "emulated_cpuid": emulated,
        "msrs": msrs,
        "net": errno.ENODATA,
        "ranges": {
            "overlap": errno.EPERM,
            "other_space": 0,
            "release": 0,
            "release_again": errno.ENOENT,
            "after_release": 0,
            "async": 0,
            "overflow": errno.EINVAL,
        },
        "irr_initially": 0,
        "irr_after_set_irq": 0x08,
        "fds_of_irq_event": ["anon_inode:[eventfd]"] * 2,
        "irq_event_raised": True,
        "irq_event_destroyed": [True, errno.ENOENT],
        # PIC1's pending line shows on PIC0's cascade input (2) too.
        "irr_routed": [0x08 | 0x10 | 0x40 | 0x04, 0x04],
        "imr": [0xA5, 0x5A],
        "ioapic_base": 0xFEC0_0000,
        "ioapic_entry": 0x1_0033,
        "pit_count": 0x1234,
        "clock_moved": True,
        "memory_overlap": errno.EEXIST,
        "dirty_log_via_second": "00",
        "read_only_memory": 0,
        "dirty_log_of_nothing": errno.ENOENT,
        "io_event_fd": "anon_inode:[eventfd]",
        "io_event_destroyed": [True, errno.ENOENT],
        "identity_map_before_start": 0,
        "start_again": errno.EINVAL,
        "identity_map_after_start": errno.EINVAL,
    }
    assert 0x10 in msrs  # IA32_TSC: the comparison above is not between two empty lists


def test_net_config_hands_out_the_tap_that_goes_away_with_the_vm(
    tmp_path: Path, taps_allowed: None
) -> None:
    found = run_sdk(
        tmp_path,
        """
        conn = Connection.from_env()
        config = conn.get_net_config()
        again = conn.get_net_config()

        def tap_name(fd):
            with open(f"/proc/self/fdinfo/{fd}") as f:
                return next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("iff:"))

        RESULTS.update(
            mac=config.host_mac.hex(":"),
            ip=str(config.host_ipv4),
            netmask=str(config.netmask),
            network=str(config.network),
            fd=os.readlink(f"/proc/self/fd/{config.tap_fd}"),
            tap=tap_name(config.tap_fd),
            same_tap=tap_name(again.tap_fd) == tap_name(config.tap_fd),
        )
        RESULTS["tap_exists"] = os.path.isdir(f"/sys/class/net/{RESULTS['tap']}")
        os.close(config.tap_fd)
        os.close(again.tap_fd)
        report()
        """,
        # Unsandboxed: the plugin reads the tap's name from the host's /proc and /sys.
        VmSpec(net=NET, sandbox=False),
    )
    tap = found.pop("tap")
    assert found == {
        "mac": NET["mac"],
        "ip": NET["host_ip"],
        "netmask": NET["netmask"],
        "network": "100.115.92.4/30",
        "fd": "/dev/net/tun",
        "same_tap": True,
        "tap_exists": True,
    }
    assert tap and not (SYS_NET / tap).exists()


IO_BODY = """
conn = Connection.from_env()
memory = vm_with_guest(conn)
memory.mmap[0x3000:0x3004] = (0xA1B2C3D4).to_bytes(4, "little")
dirty = conn.create_memory(0x10000, 0x4000, dirty_log=True)
RESULTS["dirty_before"] = dirty.dirty_log().hex()
read_only = conn.create_memory(0x20000, 0x1000, read_only=True)
read_only.mmap[0:4] = (0x0BADCAFE).to_bytes(4, "little")
conn.reserve_range(Space.MMIO, 0x20000, 0x1000)
conn.reserve_range(Space.IOPORT, 0x600, 0x10)
conn.reserve_range(Space.IOPORT, 0x620, 1, async_write=True)
conn.reserve_range(Space.IOPORT, 0x630, 1)
conn.reserve_range(Space.MMIO, 0x30000, 0x1000)
conn.set_call_hint(Space.IOPORT, 0x602, True,
                   [RegHint(rax=0x1234, send_sregs=True, send_debugregs=True)])
any_length = conn.create_io_event(Space.IOPORT, 0x700)
only_seven = conn.create_io_event(Space.IOPORT, 0x702, length=1, datamatch=7)
answers = {0x600: [(0xBEEF).to_bytes(2, "little"), (0xDEADBEEF).to_bytes(4, "little")],
           0x30008: [(0x11223344).to_bytes(4, "little")]}
(vcpu,) = conn.get_vcpus()
counter = SendCounter(vcpu)
events = RESULTS["events"] = []


def at_init():
    real_mode(vcpu)
    # A get after deferred sets sends them first (regs, sregs), then asks.
    sends = counter.sends(vcpu.get_regs)
    RESULTS["init"] = {"rip": vcpu.get_regs().rip, "sends": sends,
                       "resume_sends": counter.sends(vcpu.resume)}
    try:
        vcpu.get_regs()
    except VcpuStateError:
        RESULTS["init"]["get_while_running"] = "VcpuStateError"


def on_write(event):
    if event.address == 0x602:
        sends = [counter.sends(get) for get in (vcpu.get_regs, vcpu.get_sregs,
                                                vcpu.get_debugregs)]
        regs = vcpu.get_regs()
        hinted = RESULTS.setdefault("hinted", [])
        hinted.append({"sends": sends, "rax": regs.rax, "rbx": regs.rbx,
                       "cs_base": vcpu.get_sregs().cs.base})
        if len(hinted) == 2:
            conn.clear_call_hint()
    elif event.address == 0x603:
        before = counter.sent
        regs = vcpu.get_regs()
        RESULTS["unhinted"] = {"rcx": regs.rcx}
        regs.rcx = 0x7777
        vcpu.set_regs(regs)  # deferred: goes with the resume
        RESULTS["unhinted"]["sends"] = counter.sent - before
    elif event.address == 0x630:
        conn.release_range(Space.IOPORT, 0x630)
        conn.reserve_range(Space.IOPORT, 0x640, 1)
    elif event.address == 0x60F:
        RESULTS["guest_wrote"] = memory.mmap[0x3100:0x3104].hex()
        RESULTS["read_only_intact"] = read_only.mmap[4:6].hex()
        RESULTS["dirty_after"] = dirty.dirty_log().hex()
        RESULTS["dirty_again"] = dirty.dirty_log().hex()
        RESULTS["io_events"] = [counter_of(any_length.fd), counter_of(only_seven.fd)]


def serve():
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            at_init()
            continue
        kind = "async" if event.no_resume else "write" if event.is_write else "read"
        events.append([event.space.name, event.address, kind, event.data.hex()])
        if event.no_resume:
            continue
        if not event.is_write:
            vcpu.resume(answers[event.address].pop(0))
            continue
        on_write(event)
        sends = counter.sends(vcpu.resume)
        if event.address == 0x603:
            RESULTS["unhinted"]["resume_sends"] = sends
        if event.address == 0x60F:
            return


thread = in_thread(serve)
conn.start()
report([thread])
"""

EXPECTED_IO_EVENTS = [
    ["IOPORT", 0x600, "read", "0000"],
    ["IOPORT", 0x601, "write", "efbe"],
    ["IOPORT", 0x600, "read", "00000000"],
    ["IOPORT", 0x601, "write", "efbeadde"],
    ["IOPORT", 0x601, "write", "d4c3b2a1"],
    ["MMIO", 0x30008, "read", "00000000"],
    ["IOPORT", 0x601, "write", "44332211"],
    ["MMIO", 0x30010, "write", "efbe"],
    ["IOPORT", 0x601, "write", "fecaad0b"],
    ["MMIO", 0x20004, "write", "5a5a"],
    ["IOPORT", 0x602, "write", "3412"],
    ["IOPORT", 0x602, "write", "2143"],
    ["IOPORT", 0x602, "write", "3412"],
    ["IOPORT", 0x603, "write", "34"],
    ["IOPORT", 0x601, "write", "7777"],
    *(["IOPORT", 0x620, "async", f"{i:02x}"] for i in range(8)),
    ["IOPORT", 0x601, "write", "00"],
    ["IOPORT", 0x630, "write", "00"],
    ["IOPORT", 0x640, "write", "00"],
    ["IOPORT", 0x60F, "write", "00"],
]


@pytest.mark.parametrize("log_level", ["info", "debug"], ids=["engine", "engine-reporting"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_io_memory_ranges_hints_and_io_events(
    tmp_path: Path, transport: str, log_level: str
) -> None:
    # At debug level the engine returns every completed exit for its record.
    spec = VmSpec(
        transport=transport, log_level=log_level, poll_us=0 if log_level == "info" else 50
    )
    found = run_sdk(tmp_path, IO_BODY, spec, guest="sdk_io.S")
    assert found.pop("events") == EXPECTED_IO_EVENTS
    assert found == {
        "dirty_before": "00",
        "init": {
            "rip": LOAD,
            "sends": 3,
            "resume_sends": 1,
            "get_while_running": "VcpuStateError",
        },
        # Matching rax: regs, sregs and debugregs came with the exit. Not matching: regs only.
        # Once the hint is cleared: nothing.
        "hinted": [
            {"sends": [0, 0, 0], "rax": 0x1234, "rbx": 0x5678, "cs_base": 0},
            {"sends": [0, 1, 1], "rax": 0x4321, "rbx": 0x5678, "cs_base": 0},
            {"sends": [1, 1, 1], "rax": 0x1234, "rbx": 0x5678, "cs_base": 0},
        ],
        # No hint: the get is a round trip, the set waits for the resume, which carries it.
        "unhinted": {"rcx": 0x9ABC, "sends": 1, "resume_sends": 1},
        "guest_wrote": "11eeffc0",
        "read_only_intact": "0000",
        "dirty_after": "04",
        "dirty_again": "00",
        "io_events": [3, 2],
    }


STATE_BODY = """
R = RESULTS
conn = Connection.from_env()
vm_with_guest(conn)
conn.reserve_range(Space.IOPORT, 0x600, 0x10)
LEAF = CpuidEntry(0x4000_0000, eax=0x4000_0000, ebx=0x600D_F00D)
table = [e for e in conn.get_supported_cpuid() if not 0x4000_0000 <= e.function < 0x4000_0100]
(vcpu,) = conn.get_vcpus()
R["guest_saw"] = []


def at_init():
    R["mp_state"] = vcpu.get_mp_state().mp_state
    real_mode(vcpu, rsi=0x5151)
    regs = vcpu.get_regs()
    R["regs"] = [regs.rip, regs.rsi, regs.rflags]
    R["cs_base"] = vcpu.get_sregs().cs.base
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x027F
    vcpu.set_fpu(fpu)
    R["fpu"] = vcpu.get_fpu().fcw
    debugregs = vcpu.get_debugregs()
    debugregs.db[0] = 0x12340
    debugregs.db[3] = 0x56780
    vcpu.set_debugregs(debugregs)
    R["debugregs"] = list(vcpu.get_debugregs().db)
    xcrs = vcpu.get_xcrs()
    R["xcr0"] = [xcrs.nr_xcrs >= 1, xcrs.xcrs[0].xcr, xcrs.xcrs[0].value & 1]
    vcpu.set_xcrs(xcrs)
    vcpu.set_msrs({0x174: 0x1234, 0x175: 0x5678})
    R["msrs"] = vcpu.get_msrs([0x175, 0x174])
    vcpu.set_cpuid([*table, LEAF])
    lapic = vcpu.get_lapic()
    lapic.regs[0x80] = 0x20  # task priority
    vcpu.set_lapic(lapic)
    R["lapic_tpr"] = vcpu.get_lapic().regs[0x80]
    vcpu.set_mp_state(kvm.kvm_mp_state(mp_state=kvm.KVM_MP_STATE_RUNNABLE))
    R["mp_state_set"] = vcpu.get_mp_state().mp_state
    events = vcpu.get_vcpu_events()
    events.nmi.masked = 1
    vcpu.set_vcpu_events(events)
    R["nmi_masked"] = vcpu.get_vcpu_events().nmi.masked
    R["enable_other_capability"] = errno_of(vcpu.enable_capability, kvm.KVM_CAP_IRQCHIP)
    vcpu.resume()


def serve():
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            at_init()
            continue
        vcpu.resume()
        if event.address == 0x601:
            R["guest_saw"].append(int.from_bytes(event.data, "little"))
        elif event.address == 0x60F:
            return


thread = in_thread(serve)
conn.start()
report([thread])
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vcpu_state_round_trips_and_reaches_the_guest(tmp_path: Path, transport: str) -> None:
    found = run_sdk(tmp_path, STATE_BODY, VmSpec(transport=transport), guest="sdk_state.S")
    assert found == {
        "mp_state": kvm.KVM_MP_STATE_RUNNABLE,
        "regs": [LOAD, 0x5151, 2],
        "cs_base": 0,
        # Read back only: whether a guest sees KVM_SET_FPU's x87 state depends on the host
        # (with XSAVE, the kernel may restore x87 state in its initial configuration).
        "fpu": 0x027F,
        "debugregs": [0x12340, 0, 0, 0x56780],
        "xcr0": [True, 0, 1],
        "msrs": [0x5678, 0x1234],
        "lapic_tpr": 0x20,
        "mp_state_set": kvm.KVM_MP_STATE_RUNNABLE,
        "nmi_masked": 1,
        "enable_other_capability": errno.EINVAL,
        # IA32_SYSENTER_CS, the CPUID leaf and rsi, as the guest saw them.
        "guest_saw": [0x1234, 0x600D_F00D, 0x5151],
    }


SMP_BODY = """
conn = Connection.from_env()
vm_with_guest(conn)
conn.reserve_range(Space.IOPORT, 0x600, 0x10)
conn.reserve_range(Space.IOPORT, 0x620, 1, async_write=True)
vcpus = conn.get_vcpus()
done = threading.Semaphore(0)
paused = queue.Queue()
LAST_TOKEN = 0x3000
per_vcpu = RESULTS["vcpus"] = [{"async": [], "tokens": []} for _ in vcpus]


def serve(vcpu):
    mine = per_vcpu[vcpu.index]
    own = conn.new_connection()  # a connection per thread, beside the shared one
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            mine["mp_state_at_init"] = vcpu.get_mp_state().mp_state
            real_mode(vcpu, rsi=vcpu.index)
            vcpu.resume()
        elif isinstance(event, User):
            mine["tokens"].append(event.user)
            vcpu.resume()
            paused.put(vcpu.index)
            if event.user == LAST_TOKEN:
                break
        elif event.no_resume:
            mine["async"].append(event.data[0])
        elif not event.is_write:
            vcpu.resume(bytes([0x11, vcpu.index]))
        elif event.address == 0x601:
            mine["echo"] = int.from_bytes(event.data, "little")
            with own.create_irq_event(8 + vcpu.index) as irq:
                mine["irq_event"] = irq.irq_id
            mine["irqchip"] = own.check_extension(kvm.KVM_CAP_IRQCHIP)
            mine["pic_state"] = len(bytes(conn.get_pic_state(True)))
            vcpu.resume()
        else:
            vcpu.resume()
            done.release()
    own.close()


def pause(mask, token):
    conn.pause_vcpus(mask, token)
    for _ in range(bin(mask).count("1")):
        paused.get(timeout=WAIT)


threads = [in_thread(serve, vcpu) for vcpu in vcpus]
conn.start()
for _ in vcpus:
    assert done.acquire(timeout=WAIT), "a VCPU did not finish its guest program"
everyone = (1 << len(vcpus)) - 1
odd = sum(1 << i for i in range(1, len(vcpus), 2))
pause(everyone, 0x1000)
pause(odd, 0x2000)
pause(everyone, LAST_TOKEN)
report(threads)
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_thread_per_vcpu_with_pauses(tmp_path: Path, transport: str) -> None:
    vcpus = 4
    found = run_sdk(tmp_path, SMP_BODY, VmSpec(vcpus=vcpus, transport=transport), "sdk_smp.S")
    assert found["vcpus"] == [
        {
            # With the in-kernel irqchip, every VCPU but the first starts uninitialized.
            "mp_state_at_init": (
                kvm.KVM_MP_STATE_RUNNABLE if i == 0 else kvm.KVM_MP_STATE_UNINITIALIZED
            ),
            "echo": (i << 8) | 0x12,
            "async": list(range(i * 16, i * 16 + 16)),
            "irq_event": 8 + i,
            "irqchip": True,
            "pic_state": 16,
            "tokens": [0x1000, 0x2000, 0x3000] if i % 2 else [0x1000, 0x3000],
        }
        for i in range(vcpus)
    ]


IRQ_BODY = """
R = RESULTS
conn = Connection.from_env()
vm_with_guest(conn)
conn.reserve_range(Space.IOPORT, 0x600, 0x20)
irq5 = conn.create_irq_event(5)
(vcpu,) = conn.get_vcpus()
R["irqs"] = []


def serve():
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            real_mode(vcpu)
            vcpu.resume()
            continue
        vcpu.resume()
        if event.address == 0x601:  # the guest is ready for interrupts
            irq5.trigger()
            continue
        R["irqs"].append(event.data[0])
        if event.data[0] != 5:
            return
        # The guest's EOI of the level-triggered irqfd interrupt signals the resample fd.
        readable, _, _ = select.select([irq5.resample_fd], [], [], WAIT)
        R["resampled"] = irq5.read_resample() if readable else 0
        conn.set_irq(6, True)
        conn.set_irq(6, False)


thread = in_thread(serve)
conn.start()
thread.join(WAIT)
ident = irq5.id
irq5.destroy()
R["destroyed"] = [irq5.destroyed, errno_of(conn.destroy, ident)]
report([thread])
"""


def test_interrupts_reach_the_guest(tmp_path: Path) -> None:
    found = run_sdk(tmp_path, IRQ_BODY, guest="sdk_irq.S")
    assert found == {"irqs": [5, 6], "resampled": 1, "destroyed": [True, errno.ENOENT]}


HYPERV_BODY = """
R = RESULTS
conn = Connection.from_env()
vm_with_guest(conn)
conn.reserve_range(Space.IOPORT, 0x600, 0x10)
supported = conn.get_supported_cpuid()
(vcpu,) = conn.get_vcpus()
FLAT = dict(base=0, limit=0xFFFF_FFFF, present=1, dpl=0, db=1, s=1, l=0, g=1)


def protected_mode():
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        for name, value in FLAT.items():
            setattr(seg, name, value)
        seg.selector, seg.type = 0x10, 3
    sregs.cs.selector, sregs.cs.type = 0x08, 0xB
    sregs.cr0 |= 1
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=2))


def serve():
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            vcpu.enable_capability(kvm.KVM_CAP_HYPERV_SYNIC)
            hyperv = vcpu.get_hyperv_cpuid()
            functions = {e.function for e in hyperv}
            R["hyperv_has_signature"] = 0x4000_0001 in functions
            vcpu.set_cpuid([e for e in supported if e.function not in functions] + hyperv)
            protected_mode()
            vcpu.resume()
        elif isinstance(event, HypervSynic):
            R["synic"] = [event.msr, event.control]
            vcpu.resume()
        elif isinstance(event, HypervCall):
            R["hypercall"] = [event.input, *event.params]
            vcpu.resume((5).to_bytes(8, "little"))
        elif event.address == 0x601:
            R["result"] = int.from_bytes(event.data, "little")
            vcpu.resume()
        else:
            vcpu.resume()
            return


thread = in_thread(serve)
conn.start()
report([thread])
"""


def test_hyperv_synic_and_hypercall_events(tmp_path: Path) -> None:
    needed = {"KVM_CAP_HYPERV_SYNIC": kvm.KVM_CAP_HYPERV_SYNIC}
    needed["KVM_CAP_HYPERV_CPUID"] = kvm.KVM_CAP_HYPERV_CPUID
    with kvm.Kvm() as system, system.create_vm() as vm:
        missing = [name for name, cap in needed.items() if vm.check_extension(cap) <= 0]
    if missing:
        pytest.skip(f"this host's KVM lacks {' and '.join(missing)}")
    found = run_sdk(tmp_path, HYPERV_BODY, guest="sdk_hyperv.S", bits=32)
    assert found == {
        "hyperv_has_signature": True,
        "synic": [0x4000_0080, 1],
        "hypercall": [0x5C, 0x2000, 0x3000],
        "result": 5,
    }


REFUSALS = """
import json
from vmsuper.plugin import Connection, Init, PluginError, Space

conn = Connection.from_env()
found = {}
conn.reserve_range(Space.IOPORT, 0x3F8, 8)
try:
    conn.reserve_range(Space.IOPORT, 0x3FC, 1)
except PluginError as exc:
    found["main"] = str(exc)
(vcpu,) = conn.get_vcpus()
conn.start()
assert isinstance(vcpu.wait(), Init)
try:
    vcpu.enable_capability(1)
except PluginError as exc:
    found["vcpu"] = str(exc)
print(json.dumps(found), flush=True)
"""


def test_a_refused_request_s_error_names_the_record_that_says_why(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, REFUSALS)
    result = VmRunner(tmp_path / "runs").run(plugin)
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["main"] == (
        "[Errno 1] reserve_range: Operation not permitted; the server logs why as"
        " main_request_failed (request=reserve_range) in the run's supervisor.jsonl, at level info"
    )
    # ... and that record is there, with the reason.
    [main] = [r for r in result.records() if r["event"] == "main_request_failed"]
    assert (main["request"], main["errno"]) == ("reserve_range", errno.EPERM)
    assert "0x3f8" in main["reason"]
    assert found["vcpu"] == (
        "[Errno 22] enable_capability: Invalid argument; the server logs why as request_failed"
        " (request=enable_capability) in the run's vcpu-0.jsonl, at level warning"
    )
    [vcpu] = [r for r in result.vcpu_records(0) if r["event"] == "request_failed"]
    assert (vcpu["request"], vcpu["errno"], vcpu["level"]) == (
        "enable_capability",
        errno.EINVAL,
        "warning",
    )
    assert "capability 1" in vcpu["reason"]

"""shared/kvm.py against a real VM: exits decoded from the run page, answers written back.

The guest (tests/guests/port_mmio.S) runs in real mode at 0x1000 and echoes every value it
reads, so each answer written into the run page is checked by what the guest does with it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsuper.shared import hotpath, kvm
from vmsuper.shared.asm import assemble
from vmsuper.shared.ranges import Space

pytestmark = pytest.mark.kvm

GUEST_SOURCE = Path(__file__).parent / "guests" / "port_mmio.S"
LOAD_ADDRESS = 0x1000
MEMORY_SIZE = 0x10000
DONE_PORT = 0xF0
MAX_EXITS = 200

PORT_ANSWERS = {0x50: 0xA5, 0x52: 0xBEEF, 0x54: 0xCAFE_F00D}
MMIO_ANSWERS = {0x20030: 0x1234_5678}


@dataclass
class Guest:
    system: kvm.Kvm
    vm: kvm.Vm
    vcpu: kvm.Vcpu
    mapping: mmap.mmap
    run: kvm.kvm_run
    memory: mmap.mmap


@pytest.fixture
def guest() -> Iterator[Guest]:
    code = assemble(GUEST_SOURCE.read_text(), bits=16, origin=LOAD_ADDRESS)
    memory = mmap.mmap(-1, MEMORY_SIZE)
    memory[LOAD_ADDRESS : LOAD_ADDRESS + len(code)] = code
    pinned = ctypes.c_char.from_buffer(memory)
    with kvm.Kvm() as system, system.create_vm() as vm:
        vm.set_identity_map_addr(0xFFFB_C000)
        vm.set_tss_addr(0xFFFB_D000)
        vm.create_irqchip()
        vm.create_pit2(kvm.KVM_PIT_SPEAKER_DUMMY)
        vm.set_user_memory_region(0, 0, 0, MEMORY_SIZE, ctypes.addressof(pinned))
        with vm.create_vcpu(0) as vcpu:
            sregs = vcpu.get_sregs()
            for segment in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
                segment.base, segment.selector = 0, 0
            vcpu.set_sregs(sregs)
            regs = kvm.kvm_regs(rip=LOAD_ADDRESS, rflags=0x2, rsp=0x8000)
            vcpu.set_regs(regs)
            mapping, run = vcpu.map_run()
            state = Guest(system, vm, vcpu, mapping, run, memory)
            del run
            try:
                yield state
            finally:
                del state.run  # the ctypes view must go before the mapping can close
                mapping.close()
    del pinned
    memory.close()


def drive(guest: Guest) -> list[tuple[str, int, bytes]]:
    """Run the guest to its done port; answer reads; return what it did, in order."""
    events: list[tuple[str, int, bytes]] = []
    for _ in range(MAX_EXITS):
        guest.vcpu.run()
        # Decoded by the exit engine's own decoder, as every VCPU worker decodes them.
        access = hotpath.decode_access(ctypes.addressof(guest.run), len(guest.mapping))
        if access is None:
            regs = guest.vcpu.get_regs()
            exit_ = kvm.decode_exit(guest.run)
            pytest.fail(f"unexpected exit {exit_} at rip {regs.rip:#x}")
        data = memoryview(guest.mapping)[access.offset : access.offset + access.length]
        if access.space == Space.IOPORT:
            if access.is_write:
                if access.address == DONE_PORT:
                    data.release()
                    return events
                events.append(("out", access.address, bytes(data)))
            else:
                data[:] = PORT_ANSWERS[access.address].to_bytes(access.length, "little")
                events.append(("in", access.address, bytes(access.length)))
        elif access.is_write:
            events.append(("mmio-write", access.address, bytes(data)))
        else:
            data[:] = MMIO_ANSWERS[access.address].to_bytes(access.length, "little")
            events.append(("mmio-read", access.address, bytes(access.length)))
        data.release()
    pytest.fail(f"the guest did not reach its done port within {MAX_EXITS} exits")


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_port_string_and_mmio_exits_round_trip(guest: Guest) -> None:
    events = drive(guest)
    string = [e for e in events if e[1] == 0x30]
    others = [e for e in events if e[1] != 0x30]
    # KVM may split `rep outsb` into one exit per byte: what counts is all of it, in order.
    assert b"".join(data for _, _, data in string) == b"vmsuper"
    assert events.index(string[0]) == 9 and events.index(string[-1]) == 8 + len(string)
    assert others == [
        ("out", 0x10, b"\x11"),
        ("out", 0x12, le(0x2233, 2)),
        ("out", 0x14, le(0x4455_6677, 4)),
        ("in", 0x50, bytes(1)),
        ("out", 0x51, b"\xa5"),
        ("in", 0x52, bytes(2)),
        ("out", 0x53, le(0xBEEF, 2)),
        ("in", 0x54, bytes(4)),
        ("out", 0x55, le(0xCAFE_F00D, 4)),
        ("mmio-write", 0x20010, b"\x5a"),
        ("mmio-write", 0x20020, le(0xDEAD_BEEF, 4)),
        ("mmio-read", 0x20030, bytes(4)),
        ("out", 0x31, le(0x1234_5678, 4)),
    ]
    # The done port is reached through the same run page, and the guest's state agrees.
    assert guest.run.exit_reason == kvm.KVM_EXIT_IO
    assert guest.vcpu.get_regs().rax & 0xFFFF_FFFF == 0x1234_5678


def test_vm_state_round_trips(guest: Guest) -> None:
    vm, vcpu = guest.vm, guest.vcpu
    for chip_id in (kvm.KVM_IRQCHIP_PIC_MASTER, kvm.KVM_IRQCHIP_PIC_SLAVE, kvm.KVM_IRQCHIP_IOAPIC):
        chip = vm.get_irqchip(chip_id)
        assert chip.chip_id == chip_id
        vm.set_irqchip(chip)
    ioapic = vm.get_irqchip(kvm.KVM_IRQCHIP_IOAPIC).chip.ioapic
    assert ioapic.base_address == 0xFEC0_0000
    assert all(entry.fields.mask == 1 for entry in ioapic.redirtbl)  # masked at reset
    vm.set_pit2(vm.get_pit2())
    clock = vm.get_clock()
    vm.set_clock(kvm.kvm_clock_data(clock=clock.clock))
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    vm.set_gsi_routing(
        [kvm.irqchip_route(4, kvm.KVM_IRQCHIP_IOAPIC, 4), kvm.msi_route(30, 0xFEE0_0000, 0x41)]
    )
    regs = vcpu.get_regs()
    regs.rbx = 0x1234_5678_9ABC
    vcpu.set_regs(regs)
    assert vcpu.get_regs().rbx == 0x1234_5678_9ABC
    vcpu.set_sregs(vcpu.get_sregs())
    fpu = vcpu.get_fpu()
    fpu.xmm[3][0] = 0x5A
    vcpu.set_fpu(fpu)
    assert vcpu.get_fpu().xmm[3][0] == 0x5A
    debugregs = vcpu.get_debugregs()
    debugregs.db[1] = 0x4000
    vcpu.set_debugregs(debugregs)
    assert vcpu.get_debugregs().db[1] == 0x4000
    vcpu.set_lapic(vcpu.get_lapic())
    vcpu.set_mp_state(vcpu.get_mp_state())
    xcrs = vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # XCR0 always has x87 state
    vcpu.set_xcrs(xcrs)
    vcpu.set_vcpu_events(vcpu.get_vcpu_events())
    assert vcpu.get_regs().rip == LOAD_ADDRESS
    assert vcpu.get_mp_state().mp_state == kvm.KVM_MP_STATE_RUNNABLE
    vcpu.set_cpuid2(guest.system.get_supported_cpuid())


def test_msrs_report_partial_reads(guest: Guest) -> None:
    sysenter_cs, bogus = 0x174, 0xDEAD_BEEF
    assert guest.vcpu.set_msrs([(sysenter_cs, 0x10)]) == 1
    values, count = guest.vcpu.get_msrs([sysenter_cs, bogus, sysenter_cs])
    assert (values, count) == ([0x10], 1)


def test_system_queries(guest: Guest) -> None:
    system = guest.system
    assert system.api_version() == kvm.KVM_API_VERSION
    assert system.check_extension(kvm.KVM_CAP_USER_MEMORY) == 1
    assert guest.vm.check_extension(kvm.KVM_CAP_IRQCHIP) == 1
    leaves = {entry.function for entry in system.get_supported_cpuid()}
    assert {0, 1, 0x8000_0000} <= leaves
    # Starting far too small must grow the buffer on E2BIG rather than fail.
    assert len(system.get_supported_cpuid(max_entries=1)) == len(system.get_supported_cpuid())
    assert 0x10 in system.get_msr_index_list()  # IA32_TIME_STAMP_COUNTER


def test_dirty_log_reports_written_pages(guest: Guest) -> None:
    size = 4 * 4096
    memory = mmap.mmap(-1, size)
    pinned = ctypes.c_char.from_buffer(memory)
    try:
        guest.vm.set_user_memory_region(
            1, kvm.KVM_MEM_LOG_DIRTY_PAGES, 0x10_0000, size, ctypes.addressof(pinned)
        )
        bitmap = bytearray(kvm.dirty_log_size(size))
        guest.vm.get_dirty_log(1, bitmap)
        assert bitmap == bytes(8)  # nothing written by the guest yet
        guest.vm.set_user_memory_region(1, 0, 0x10_0000, 0, ctypes.addressof(pinned))
    finally:
        del pinned
        memory.close()
    with pytest.raises(kvm.KvmError) as info:
        guest.vm.get_dirty_log(1, bytearray(8))  # the slot is gone
    assert info.value.errno == errno.ENOENT
    assert info.value.ioctl == "KVM_GET_DIRTY_LOG"


def test_eventfd_wiring(guest: Guest) -> None:
    vm = guest.vm
    notify, trigger, resample = os.eventfd(0), os.eventfd(0), os.eventfd(0)
    try:
        vm.ioeventfd(fd=notify, addr=0x500, length=2, datamatch=0x1234, pio=True)
        vm.ioeventfd(fd=notify, addr=0x500, length=2, datamatch=0x1234, pio=True, deassign=True)
        vm.ioeventfd(fd=notify, addr=0xD000_0000, length=0)
        with pytest.raises(kvm.KvmError) as info:  # the same registration twice
            vm.ioeventfd(fd=notify, addr=0xD000_0000, length=0)
        assert info.value.errno == errno.EEXIST
        vm.irqfd(trigger, 5, resample_fd=resample)
        vm.irqfd(trigger, 5, deassign=True)
    finally:
        for fd in (notify, trigger, resample):
            os.close(fd)
    with pytest.raises(ValueError, match="length"):
        vm.ioeventfd(fd=0, addr=0, length=3)
    with pytest.raises(ValueError, match="datamatch"):
        vm.ioeventfd(fd=0, addr=0, length=0, datamatch=1)


def test_forked_child_gets_eio_but_shares_the_run_page(guest: Guest) -> None:
    """The hard constraint: only the creating process may ioctl; any process may mmap."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, never return into pytest
        status = 1
        try:
            os.close(read_end)
            results = []
            for call in (guest.vcpu.get_regs, lambda: guest.vm.check_extension(0)):
                try:
                    call()
                    results.append("ok")
                except kvm.KvmError as exc:
                    results.append(errno.errorcode.get(exc.errno or 0, "?"))
            mapping, run = guest.vcpu.map_run()
            run.immediate_exit = 1
            results.append(f"exit_reason={run.exit_reason}")
            del run
            mapping.close()
            os.write(write_end, " ".join(results).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report = reader.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == f"EIO EIO exit_reason={guest.run.exit_reason}"
    # The child's write landed in the page the parent maps: KVM_RUN now returns at once.
    assert guest.run.immediate_exit == 1
    with pytest.raises(kvm.KvmError) as info:
        guest.vcpu.run()
    assert info.value.errno == errno.EINTR
    assert info.value.ioctl == "KVM_RUN"


def test_signal_kicks_a_thread_out_of_kvm_run(guest: Guest) -> None:
    """The pause mechanism: immediate_exit plus a signal to the thread in KVM_RUN gives EINTR,
    whether the signal lands before the thread enters the guest or while it is inside."""
    halt_loop = 0x3000
    guest.memory[halt_loop : halt_loop + 3] = bytes.fromhex("f4ebfd")  # 1: hlt; jmp 1b
    guest.vcpu.set_regs(kvm.kvm_regs(rip=halt_loop, rflags=0x2))
    outcome: list[BaseException | None] = []
    entered = threading.Event()

    def runner() -> None:
        entered.set()
        try:
            guest.vcpu.run()  # halts in the kernel: the in-kernel irqchip never returns HLT
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    thread = threading.Thread(target=runner)
    try:
        thread.start()
        assert entered.wait(10)
        guest.run.immediate_exit = 1
        assert thread.ident is not None
        while thread.is_alive():
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(0.05)
    finally:
        thread.join(10)
        signal.signal(signal.SIGUSR1, previous)
    assert len(outcome) == 1 and isinstance(outcome[0], kvm.KvmError)
    assert (outcome[0].errno, outcome[0].ioctl) == (errno.EINTR, "KVM_RUN")

"""Every MainRequest over the real main socket, from real plugin processes under real KVM.

Each test's plugin runs the requests itself and prints what it saw as JSON; the test checks
those findings and vmsuper's exit status.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from rawplugin import plugin_source

from vmsuper.testing import VmResult, VmRunner, VmSpec, write_python_plugin

pytestmark = pytest.mark.kvm


def run_plugin(tmp_path: Path, body: str, spec: VmSpec | None = None) -> tuple[VmResult, Any]:
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"plugin printed no findings; stderr:\n{result.stderr}"
    return result, json.loads(lines[-1])


def test_memory_create_destroy_and_every_error(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        R = RESULTS
        R["ok"] = create_memory(0, 0x0, 0x10000)
        R["same_id"] = create_memory(0, 0x100000, 0x1000)
        R["overlap"] = create_memory(1, 0x8000, 0x1000)
        R["no_fd"] = errno_of(req(create=pb.MainRequest.Create(
            id=2, memory=pb.MainRequest.Create.Memory(start=0x200000, length=0x1000))))
        R["unsealed"] = create_memory(3, 0x300000, 0x1000, fd=sealed_memfd(0x1000, seal=False))
        R["beyond_end"] = create_memory(4, 0x400000, 0x2000, fd=sealed_memfd(0x1000))
        R["overflow"] = create_memory(5, 2**64 - 0x1000, 0x2000)
        R["no_constructor"] = errno_of(req(create=pb.MainRequest.Create(id=6)))
        R["destroy"] = errno_of(req(destroy=pb.MainRequest.Destroy(id=0)))
        R["destroy_again"] = errno_of(req(destroy=pb.MainRequest.Destroy(id=0)))
        R["recreate"] = create_memory(0, 0x0, 0x10000)
        R["readonly"] = create_memory(7, 0x800000, 0x1000, read_only=True)
        report()
        """,
    )
    assert found == {
        "ok": 0,
        "same_id": errno.EEXIST,
        "overlap": errno.EEXIST,
        "no_fd": errno.EBADF,
        "unsealed": errno.EPERM,
        "beyond_end": errno.EINVAL,
        "overflow": errno.EOVERFLOW,
        "no_constructor": errno.ENOTTY,
        "destroy": 0,
        "destroy_again": errno.ENOENT,
        "recreate": 0,
        "readonly": 0,
    }


def test_io_events_of_every_length_and_irq_events(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        def io_event(obj_id, length, space=pb.IOPORT, address=0x500):
            return call(req(create=pb.MainRequest.Create(id=obj_id,
                io_event=pb.MainRequest.Create.IoEvent(space=space, address=address + obj_id,
                                                        length=length, datamatch=7))))
        lengths = {}
        for i, length in enumerate([0, 1, 2, 4, 8]):
            resp, fds = io_event(i, length)
            kinds = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
            lengths[str(length)] = [resp.errno, kinds]
        RESULTS["lengths"] = lengths
        resp, fds = io_event(10, 3)
        RESULTS["bad_length"] = [resp.errno, len(fds)]
        resp, fds = io_event(11, 4, space=pb.MMIO, address=0xd000_0000)
        RESULTS["mmio"] = resp.errno
        resp, fds = call(req(create=pb.MainRequest.Create(
            id=12, irq_event=pb.MainRequest.Create.IrqEvent(irq_id=5))))
        RESULTS["irq"] = [resp.errno, [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]]
        os.eventfd_write(fds[0], 1)
        RESULTS["destroy_irq"] = errno_of(req(destroy=pb.MainRequest.Destroy(id=12)))
        RESULTS["destroy_io"] = errno_of(req(destroy=pb.MainRequest.Destroy(id=4)))
        report()
        """,
    )
    for length in ("0", "1", "2", "4", "8"):
        assert found["lengths"][length] == [0, ["anon_inode:[eventfd]"]]
    assert found["bad_length"] == [errno.EINVAL, 0]
    assert found["mmio"] == 0
    assert found["irq"] == [0, ["anon_inode:[eventfd]", "anon_inode:[eventfd]"]]
    assert found["destroy_irq"] == 0
    assert found["destroy_io"] == 0


def test_connections_shutdown_eventfd_and_capabilities(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        resp, fds = call(req(new_connection=pb.MainRequest.NewConnection()))
        second = socket.socket(fileno=fds[0])
        resp, fds2 = call(req(new_connection=pb.MainRequest.NewConnection()), sock=second)
        third = socket.socket(fileno=fds2[0])
        # Objects made on one connection are visible (one id space) from another.
        RESULTS["create_on_second"] = errno_of(
            req(create=pb.MainRequest.Create(id=1, irq_event=pb.MainRequest.Create.IrqEvent(
                irq_id=3))), sock=second)
        RESULTS["same_id_on_third"] = errno_of(
            req(create=pb.MainRequest.Create(id=1, irq_event=pb.MainRequest.Create.IrqEvent(
                irq_id=4))), sock=third)
        third.close()  # hang-up closes only that connection
        RESULTS["first_still_works"] = errno_of(
            req(check_extension=pb.MainRequest.CheckExtension(extension=0)))
        RESULTS["second_still_works"] = errno_of(
            req(check_extension=pb.MainRequest.CheckExtension(extension=0)), sock=second)
        _, a = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()))
        _, b = call(req(get_shutdown_eventfd=pb.MainRequest.GetShutdownEventfd()), sock=second)
        os.eventfd_write(a[0], 5)
        RESULTS["same_eventfd"] = os.eventfd_read(b[0])
        resp, _ = call(req(check_extension=pb.MainRequest.CheckExtension(extension=0)))
        RESULTS["irqchip"] = resp.check_extension.has_extension
        resp, _ = call(req(check_extension=pb.MainRequest.CheckExtension(extension=99999)))
        RESULTS["bogus_cap"] = resp.check_extension.has_extension
        resp, _ = call(req(get_supported_cpuid=pb.MainRequest.CpuidRequest()))
        RESULTS["cpuid_functions"] = sorted({e.function for e in resp.get_supported_cpuid.entries})
        RESULTS["cpuid_has_index"] = any(e.has_index for e in resp.get_supported_cpuid.entries)
        resp, _ = call(req(get_emulated_cpuid=pb.MainRequest.CpuidRequest()))
        RESULTS["emulated"] = [resp.errno, len(resp.get_emulated_cpuid.entries)]
        resp, _ = call(req(get_msr_index_list=pb.MainRequest.MsrListRequest()))
        RESULTS["msrs"] = list(resp.get_msr_index_list.indices)
        RESULTS["net"] = errno_of(req(get_net_config=pb.MainRequest.GetNetConfig()))
        # No oneof case (only an unknown field 50: an empty datagram would be a hang-up).
        wire.send_datagram(MAIN, b"\\x90\\x03\\x01")
        RESULTS["empty"] = pb.MainResponse.FromString(wire.recv_datagram(MAIN).data).errno
        report()
        """,
    )
    assert found["create_on_second"] == 0
    assert found["same_id_on_third"] == errno.EEXIST
    assert found["first_still_works"] == 0 and found["second_still_works"] == 0
    assert found["same_eventfd"] == 5
    assert found["irqchip"] is True and found["bogus_cap"] is False
    assert 0 in found["cpuid_functions"] and 1 in found["cpuid_functions"]
    assert found["cpuid_has_index"] is True  # leaf 4/7/0xd are index-significant
    assert found["emulated"][0] == 0
    assert 0x10 in found["msrs"]  # IA32_TIME_STAMP_COUNTER
    assert found["net"] == errno.ENODATA
    assert found["empty"] == errno.ENOTTY


def test_reserve_range_rules(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        def reserve(space, start, length, async_write=False):
            return errno_of(req(reserve_range=pb.MainRequest.ReserveRange(
                space=space, start=start, length=length, async_write=async_write)))
        RESULTS["first"] = reserve(pb.IOPORT, 0x10, 0x10)
        RESULTS["overlap_start"] = reserve(pb.IOPORT, 0x0F, 0x10)
        RESULTS["inside"] = reserve(pb.IOPORT, 0x12, 1)
        RESULTS["other_space"] = reserve(pb.MMIO, 0x10, 0x10)
        RESULTS["adjacent"] = reserve(pb.IOPORT, 0x20, 0x10, True)
        RESULTS["overflow"] = reserve(pb.MMIO, 2**64 - 1, 2)
        RESULTS["release"] = reserve(pb.IOPORT, 0x10, 0)
        RESULTS["release_unknown"] = reserve(pb.IOPORT, 0x10, 0)
        RESULTS["again"] = reserve(pb.IOPORT, 0x10, 0x10)
        report()
        """,
    )
    assert found == {
        "first": 0,
        "overlap_start": errno.EPERM,
        "inside": errno.EPERM,
        "other_space": 0,
        "adjacent": 0,
        "overflow": errno.EINVAL,
        "release": 0,
        "release_unknown": errno.ENOENT,
        "again": 0,
    }


def test_irqs_routing_and_vm_state(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        R = RESULTS
        R["set_irq"] = [errno_of(req(set_irq=pb.MainRequest.SetIrq(irq_id=4, active=a)))
                        for a in (True, False)]
        Route = pb.MainRequest.SetIrqRouting.Route
        def routing(n, msi=False):
            routes = []
            for i in range(n):
                if msi:
                    routes.append(Route(irq_id=i, msi=Route.Msi(
                        address=0xfee00000, data=i)))
                else:
                    routes.append(Route(irq_id=i % 24, irqchip=Route.Irqchip(
                        irqchip=2, pin=i % 24)))
            return pb.MainRequest(set_irq_routing=pb.MainRequest.SetIrqRouting(routes=routes))
        big = routing(4096, msi=True)
        R["routes_4096_bytes"] = big.ByteSize()
        R["routes_4096"] = errno_of(big)
        R["routes_10000"] = errno_of(routing(10000, msi=True))
        R["after_10000"] = errno_of(routing(24))
        R["no_target"] = errno_of(pb.MainRequest(set_irq_routing=pb.MainRequest.SetIrqRouting(
            routes=[Route(irq_id=1)])))
        sizes = {}
        for name, which in [("PIC0", 0), ("PIC1", 1), ("IOAPIC", 2), ("PIT", 3), ("CLOCK", 4)]:
            resp, _ = call(req(get_state=pb.MainRequest.GetState(set=which)))
            blob = resp.get_state.state
            ok = errno_of(req(set_state=pb.MainRequest.SetState(set=which, state=blob)))
            short = errno_of(req(set_state=pb.MainRequest.SetState(set=which, state=blob[:-1])))
            sizes[name] = [resp.errno, len(blob), ok, short]
        R["state"] = sizes
        R["unknown_set"] = errno_of(req(get_state=pb.MainRequest.GetState(set=9)))
        R["identity_map"] = errno_of(req(set_identity_map_addr=pb.MainRequest.SetIdentityMapAddr(
            address=0xfeffc000)))
        report()
        """,
    )
    assert found["set_irq"] == [0, 0]
    assert 60_000 < found["routes_4096_bytes"] < 120_000  # far beyond crosvm's 4 KiB buffer
    assert found["routes_4096"] == 0
    assert found["routes_10000"] == errno.EINVAL
    assert found["after_10000"] == 0
    assert found["no_target"] == errno.EINVAL
    # Sizes of struct kvm_pic_state, kvm_ioapic_state, kvm_pit_state2 and kvm_clock_data.
    assert found["state"] == {
        "PIC0": [0, 16, 0, errno.EINVAL],
        "PIC1": [0, 16, 0, errno.EINVAL],
        "IOAPIC": [0, 216, 0, errno.EINVAL],
        "PIT": [0, 112, 0, errno.EINVAL],
        "CLOCK": [0, 48, 0, errno.EINVAL],
    }
    assert found["unknown_set"] == errno.EINVAL
    assert found["identity_map"] == 0


def test_bad_input_keeps_the_supervisor_serving(tmp_path: Path) -> None:
    _result, found = run_plugin(
        tmp_path,
        """
        resp, fds = call(req(new_connection=pb.MainRequest.NewConnection()))
        spare = socket.socket(fileno=fds[0])
        # The supervisor closes its copy of the end it sent just after sending it; a round
        # trip on the same connection comes after that, so the count is steady from here.
        errno_of(req(check_extension=pb.MainRequest.CheckExtension(extension=0)))
        before = supervisor_fds()
        # Fds with a request that takes none are closed and refused.
        extra = os.eventfd(0)
        RESULTS["unexpected_fd"] = errno_of(
            req(check_extension=pb.MainRequest.CheckExtension(extension=0)), fds=[extra, extra])
        # Larger than 1 MiB: an error response, and the connection keeps working.
        wire.send_datagram(MAIN, b"\\x0a" + b"\\xff" * ((1 << 20) + 100))
        d = wire.recv_datagram(MAIN)
        RESULTS["too_large"] = pb.MainResponse.FromString(d.data).errno
        # Exactly 1 MiB of valid request (a huge routing table) is accepted and answered.
        Route = pb.MainRequest.SetIrqRouting.Route
        routes = [Route(irq_id=1, irqchip=Route.Irqchip(irqchip=0, pin=1))] * 120000
        big = pb.MainRequest(set_irq_routing=pb.MainRequest.SetIrqRouting(routes=routes))
        RESULTS["big_size"] = big.ByteSize()
        RESULTS["big"] = errno_of(big)
        # Undecodable bytes: that connection only is closed.
        wire.send_datagram(spare, b"\\xff\\xff\\xff\\xff")
        RESULTS["garbage_hangup"] = wire.recv_datagram(spare) is None
        RESULTS["main_alive"] = errno_of(
            req(check_extension=pb.MainRequest.CheckExtension(extension=0)))
        for i in range(50):
            fd = sealed_memfd(0x1000)
            create_memory(100 + i, 0x1000_0000 + i * 0x1000, 0x1000, fd=fd)
            errno_of(req(destroy=pb.MainRequest.Destroy(id=100 + i)))
            r, f = call(req(create=pb.MainRequest.Create(
                id=300 + i, io_event=pb.MainRequest.Create.IoEvent(address=0x600 + i, length=1))))
            [os.close(x) for x in f]
            errno_of(req(destroy=pb.MainRequest.Destroy(id=300 + i)))
            r, f = call(req(new_connection=pb.MainRequest.NewConnection()))
            os.close(f[0])
        # The supervisor closes a connection when it sees its hang-up, in its own time: wait,
        # with a deadline, for the count to settle where it must (only the spare one gone).
        deadline = time.monotonic() + 30
        while supervisor_fds() - before > -1 and time.monotonic() < deadline:
            time.sleep(0.01)
        RESULTS["fd_growth"] = supervisor_fds() - before
        report()
        """,
        # Unsandboxed: the plugin counts the supervisor's fds in /proc of its parent, which in
        # the sandbox is not the supervisor.
        VmSpec(sandbox=False),
    )
    assert found["unexpected_fd"] == errno.EINVAL
    assert found["too_large"] == errno.EMSGSIZE
    assert found["big_size"] > 900_000
    assert found["big"] == errno.EINVAL  # decoded and answered: more routes than KVM takes
    assert found["garbage_hangup"] is True
    assert found["main_alive"] == 0
    # The spare connection was closed (-1); nothing else may remain from the 50 cycles.
    assert found["fd_growth"] == -1


def test_dirty_log_and_start_rules(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        create_memory(0, 0, 0x11000, dirty_log=True)
        resp, _ = call(req(dirty_log=pb.MainRequest.MemoryDirtyLog(id=0)))
        RESULTS["bitmap"] = [resp.errno, len(resp.dirty_log.bitmap)]
        call(req(create=pb.MainRequest.Create(id=1, irq_event=pb.MainRequest.Create.IrqEvent(
            irq_id=3))))
        RESULTS["not_memory"] = errno_of(req(dirty_log=pb.MainRequest.MemoryDirtyLog(id=1)))
        RESULTS["unknown"] = errno_of(req(dirty_log=pb.MainRequest.MemoryDirtyLog(id=77)))
        RESULTS["start"] = errno_of(req(start=pb.MainRequest.Start()))
        RESULTS["second_start"] = errno_of(req(start=pb.MainRequest.Start()))
        RESULTS["identity_after_start"] = errno_of(req(
            set_identity_map_addr=pb.MainRequest.SetIdentityMapAddr(address=0xfeffc000)))
        RESULTS["pause"] = errno_of(req(pause_vcpus=pb.MainRequest.PauseVcpus(
            cpu_mask=1, user=9)))
        report()
        """,
    )
    # 0x11000 bytes = 17 pages -> 3 bytes of bitmap.
    assert found["bitmap"] == [0, 3]
    assert found["not_memory"] == errno.ENOENT
    assert found["unknown"] == errno.ENOENT
    assert found["start"] == 0
    assert found["second_start"] == errno.EINVAL
    assert found["identity_after_start"] == errno.EINVAL
    assert found["pause"] == 0


def test_a_flooding_connection_does_not_wedge_the_others(tmp_path: Path) -> None:
    _, found = run_plugin(
        tmp_path,
        """
        resp, fds = call(req(new_connection=pb.MainRequest.NewConnection()))
        other = socket.socket(fileno=fds[0])
        MAIN.setblocking(False)
        probe = req(check_extension=pb.MainRequest.CheckExtension(extension=0)).SerializeToString()
        sent = stalls = 0
        # Never reading a reply: the supervisor's sends back fill up, and it must queue them
        # and stop reading this connection (its socket stays full for half a second) instead
        # of blocking.
        while sent < 50000 and stalls < 50:
            try:
                MAIN.send(probe)
                sent += 1
                stalls = 0
            except BlockingIOError:
                stalls += 1
                time.sleep(0.01)
        RESULTS["flooded"] = sent
        RESULTS["other_answers"] = errno_of(
            req(check_extension=pb.MainRequest.CheckExtension(extension=0)), sock=other)
        MAIN.setblocking(True)
        replies = 0
        while replies < sent:
            d = wire.recv_datagram(MAIN)
            assert pb.MainResponse.FromString(d.data).check_extension.has_extension
            replies += 1
        RESULTS["replies"] = replies
        RESULTS["after"] = errno_of(req(check_extension=pb.MainRequest.CheckExtension()))
        report()
        """,
    )
    assert found["flooded"] > 100
    assert found["other_answers"] == 0
    assert found["replies"] == found["flooded"]
    assert found["after"] == 0


def test_limits_from_the_config(tmp_path: Path) -> None:
    spec = VmSpec(extra_toml="[limits]\nobjects = 2\nconnections = 2\nplugin_open_files = 256\n")
    _, found = run_plugin(
        tmp_path,
        """
        import resource
        def irq_event(obj_id):
            return errno_of(req(create=pb.MainRequest.Create(
                id=obj_id, irq_event=pb.MainRequest.Create.IrqEvent(irq_id=obj_id))))
        RESULTS["objects"] = [irq_event(i) for i in range(3)]
        kept = [call(req(new_connection=pb.MainRequest.NewConnection())) for _ in range(2)]
        RESULTS["connections"] = [resp.errno for resp, _ in kept]
        RESULTS["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
        report()
        """,
        spec,
    )
    assert found["objects"] == [0, 0, errno.ENOSPC]
    # The first connection counts: one more is allowed, the next refused.
    assert found["connections"] == [0, errno.EMFILE]
    assert found["nofile"] == [256, 256]

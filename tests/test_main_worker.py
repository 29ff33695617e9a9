"""The main worker fed datagrams directly (no sockets), against a real VM: limits, fds, errors."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from vmsuper.shared import kvm
from vmsuper.shared.plugin_pb2 import MainRequest, MainResponse
from vmsuper.shared.shm import SharedRegion
from vmsuper.workers.limits import Limits
from vmsuper.workers.main_worker import MainWorker, Reply

pytestmark = pytest.mark.kvm


@dataclass
class FakeVcpus:
    """Stands in for the VCPU side, which the main worker only asks to start and pause."""

    started: bool = False
    pauses: list[tuple[int, int]] = field(default_factory=list)

    def plugin_fds(self) -> list[int]:
        return []

    def start(self) -> None:
        self.started = True

    def pause(self, mask: int, token: int) -> None:
        self.pauses.append((mask, token))


WorkerFactory = Callable[..., MainWorker]


@pytest.fixture
def make_worker() -> Iterator[WorkerFactory]:
    made: list[tuple[MainWorker, kvm.Kvm, kvm.Vm, SharedRegion, int]] = []

    def make(limits: Limits | None = None) -> MainWorker:
        system = kvm.Kvm()
        vm = system.create_vm()
        vm.create_irqchip()
        region = SharedRegion.create(1)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        worker = MainWorker(
            vm=vm,
            system=system,
            vcpus=FakeVcpus(),
            publisher=region.table,
            shutdown_eventfd=efd,
            limits=limits or Limits(),
        )
        made.append((worker, system, vm, region, efd))
        return worker

    yield make
    for worker, system, vm, region, efd in made:
        assert worker.destroy_all() == []
        region.close()
        vm.close()
        system.close()
        os.close(efd)


def answer(worker: MainWorker, request: MainRequest, fds: list[int] | None = None) -> Reply:
    return worker.handle(request.SerializeToString(), fds or [])


def errno_of(reply: Reply) -> int:
    return MainResponse.FromString(reply.data).errno


def memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, 1033, 0x0002)
    return fd


def memory(obj_id: int, start: int, length: int) -> MainRequest:
    return MainRequest(
        create=MainRequest.Create(
            id=obj_id, memory=MainRequest.Create.Memory(start=start, length=length)
        )
    )


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_object_slot_and_memory_limits(make_worker: WorkerFactory) -> None:
    worker = make_worker(Limits(objects=3, memory_slots=2, guest_memory=0x3000))
    assert errno_of(answer(worker, memory(0, 0, 0x1000), [memfd(0x1000)])) == 0
    assert errno_of(answer(worker, memory(1, 0x10000, 0x2000), [memfd(0x2000)])) == 0
    # A third slot is refused, and so is memory beyond the total.
    assert errno_of(answer(worker, memory(2, 0x20000, 0x1000), [memfd(0x1000)])) == errno.ENOSPC
    irq = MainRequest(
        create=MainRequest.Create(id=5, irq_event=MainRequest.Create.IrqEvent(irq_id=1))
    )
    reply = answer(worker, irq)
    assert errno_of(reply) == 0
    # Three objects exist: the object limit refuses a fourth of any kind.
    reply4 = answer(
        worker,
        MainRequest(
            create=MainRequest.Create(id=6, irq_event=MainRequest.Create.IrqEvent(irq_id=2))
        ),
    )
    assert errno_of(reply4) == errno.ENOSPC
    assert reply4.fds == []
    # Destroying one frees its slot and its share of guest memory.
    assert errno_of(answer(worker, MainRequest(destroy=MainRequest.Destroy(id=1)))) == 0
    assert errno_of(answer(worker, memory(1, 0x10000, 0x2000), [memfd(0x2000)])) == 0


def test_range_and_route_limits(make_worker: WorkerFactory) -> None:
    worker = make_worker(Limits(reserved_ranges=2, irq_routes=3))

    def reserve(start: int) -> int:
        return errno_of(
            answer(
                worker, MainRequest(reserve_range=MainRequest.ReserveRange(start=start, length=1))
            )
        )

    assert [reserve(0x10), reserve(0x20), reserve(0x30)] == [0, 0, errno.ENOSPC]
    Route = MainRequest.SetIrqRouting.Route
    routes = [Route(irq_id=i, irqchip=Route.Irqchip(irqchip=2, pin=i)) for i in range(4)]
    too_many = MainRequest(set_irq_routing=MainRequest.SetIrqRouting(routes=routes))
    assert errno_of(answer(worker, too_many)) == errno.EINVAL
    ok = MainRequest(set_irq_routing=MainRequest.SetIrqRouting(routes=routes[:3]))
    assert errno_of(answer(worker, ok)) == 0


def test_connection_limit(make_worker: WorkerFactory) -> None:
    worker = make_worker(Limits(connections=1))
    worker.connections_full = lambda: True
    reply = answer(worker, MainRequest(new_connection=MainRequest.NewConnection()))
    assert errno_of(reply) == errno.EMFILE
    assert reply.new_connection is None and reply.fds == []


def test_fds_with_refused_requests_are_closed(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    before = fd_count()
    stray = [os.eventfd(0) for _ in range(3)]
    reply = answer(worker, MainRequest(check_extension=MainRequest.CheckExtension()), stray)
    assert errno_of(reply) == errno.EINVAL
    two = [memfd(0x1000), memfd(0x1000)]
    assert errno_of(answer(worker, memory(0, 0, 0x1000), two)) == errno.EINVAL
    unsealed = os.memfd_create("u", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 0x1000)
    assert errno_of(answer(worker, memory(0, 0, 0x1000), [unsealed])) == errno.EPERM
    garbage = worker.handle(b"\xff\xff\xff", [os.eventfd(0)])
    assert garbage.hang_up
    assert fd_count() == before


def test_every_response_carries_the_case_even_on_failure(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    failing = [
        MainRequest(destroy=MainRequest.Destroy(id=42)),
        MainRequest(dirty_log=MainRequest.MemoryDirtyLog(id=42)),
        MainRequest(get_net_config=MainRequest.GetNetConfig()),
        MainRequest(set_state=MainRequest.SetState(set=MainRequest.PIT, state=b"x")),
        MainRequest(create=MainRequest.Create(id=1)),
    ]
    for request in failing:
        response = MainResponse.FromString(answer(worker, request).data)
        assert response.errno > 0
        assert response.WhichOneof("message") == request.WhichOneof("message")


def test_start_pause_and_identity_map_order(make_worker: WorkerFactory) -> None:
    worker = make_worker()
    assert (
        errno_of(
            answer(worker, MainRequest(pause_vcpus=MainRequest.PauseVcpus(cpu_mask=3, user=7)))
        )
        == 0
    )
    assert isinstance(worker.vcpus, FakeVcpus)
    assert worker.vcpus.pauses == [(3, 7)]
    assert errno_of(answer(worker, MainRequest(start=MainRequest.Start()))) == 0
    assert errno_of(answer(worker, MainRequest(start=MainRequest.Start()))) == errno.EINVAL
    late = MainRequest(set_identity_map_addr=MainRequest.SetIdentityMapAddr(address=0xFEFFC000))
    assert errno_of(answer(worker, late)) == errno.EINVAL

"""Fuzz target: the main worker (`MainWorker.handle`) against a real VM.

Each input is a short sequence of datagrams — hostile valid requests, damaged ones, raw
garbage — each with 0..6 fds of odd kinds (sealed and unsealed memfds, eventfds, pipes,
sockets...), fed to a fresh `MainWorker` over one VM. After every datagram the reply is
checked against the server contract, and after `destroy_all` the process must hold exactly
the fds and memfd mappings it held before: the plugin is untrusted, and nothing it sends may
raise out of the worker (or be caught there as a bug of its own and answered EIO), leak, or
go unanswered.

Long run (see docs/fuzzing.md)::

    .venv/bin/python -m tests.fuzz.main_target -runs=100000
    .venv/bin/python -m tests.fuzz.main_target -max_total_time=600 -artifact_prefix=/tmp/
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import socket
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from vmsuper.shared import kvm, wire
from vmsuper.shared.plugin_pb2 import MainRequest, MainResponse
from vmsuper.shared.shm import SharedRegion
from vmsuper.supervisor.machine import create_machine
from vmsuper.workers.limits import Limits
from vmsuper.workers.main_worker import MainWorker, NetInfo, Reply
from vmsuper.workers.vm_objects import PAGE_SIZE, MemoryObject

from .fds import FdSpec, fd_count, fd_specs, memfd_mappings, opened_fds
from .hostile import (
    MAIN_STATE_SIZES,
    Chooser,
    FdpChooser,
    instrument,
    load_atheris,
    main_request,
    mutate,
    pick,
    takes_memfd,
)

SMALL_LIMITS = Limits(
    objects=4, memory_slots=2, guest_memory=0x4000, reserved_ranges=2, irq_routes=8
)
"""Limits low enough that a short sequence reaches them (ENOSPC, EINVAL paths)."""


@dataclass
class FakeVcpus:
    """The VCPU side as the main worker sees it; its channel ends are the harness's fds."""

    fds: list[int]
    started: bool = False
    pauses: list[tuple[int, int]] = field(default_factory=list)

    def plugin_fds(self) -> list[int]:
        return list(self.fds)

    def start(self) -> None:
        self.started = True

    def pause(self, mask: int, token: int) -> None:
        if mask < 0 or token < 0:
            raise ValueError("negative mask or token")
        self.pauses.append((mask, token))


class ContractViolation(AssertionError):
    """A reply, or what the worker holds afterwards, breaks the server contract."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise ContractViolation(what)


class MainHarness:
    """One VM (set up as `vmsuper run` does) and the fds a worker hands out but never owns."""

    def __init__(self) -> None:
        self.system = kvm.Kvm()
        self.vm = create_machine(self.system)
        self.region = SharedRegion.create(2)
        self.shutdown_eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        self.tap_stand_in = os.eventfd(0, os.EFD_CLOEXEC)
        ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.vcpu_ends = [end.detach() for end in ends]
        self.internal_errors: list[str] = []
        """Bugs the worker caught and answered with EIO: each fails the input all the same."""

    def close(self) -> None:
        for fd in (self.shutdown_eventfd, self.tap_stand_in, *self.vcpu_ends):
            os.close(fd)
        self.region.close()
        self.vm.close()
        self.system.close()

    def __enter__(self) -> MainHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_worker(self, ch: Chooser) -> MainWorker:
        """A fresh worker, with or without a tap, with default or small limits."""
        net = None
        if ch.boolean():
            net = NetInfo(self.tap_stand_in, b"\xde\x21\xe8\x47\x6b\x6a", 0x6473_5C05, 0xFFFF_FFFC)
        return MainWorker(
            vm=self.vm,
            system=self.system,
            vcpus=FakeVcpus(self.vcpu_ends),
            publisher=self.region.table,
            shutdown_eventfd=self.shutdown_eventfd,
            net=net,
            limits=pick(ch, (Limits(), SMALL_LIMITS)),
            connections_full=pick(ch, (lambda: False, lambda: True)),
            on_internal_error=self._internal_error,
        )

    def _internal_error(self, case: str, exc: BaseException) -> None:
        trace = "".join(traceback.format_exception(exc))
        self.internal_errors.append(f"{case}: {trace}")

    @contextlib.contextmanager
    def checked(self, worker: MainWorker) -> Iterator[MainWorker]:
        """Use `worker`, then destroy all it made: the process must hold exactly the fds and
        memfd mappings it held before. The cyclic collector is off meanwhile, so no garbage of
        anything else closes an fd in between (nor hides a leak in a cycle)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Sockets refused are closed on threads of their own (shared/wire.py): none may
            # still be closing while fds are counted.
            expect(wire.wait_for_closes(10.0), "a refused socket's close did not return")
            fds_before, maps_before = fd_count(), memfd_mappings()
            try:
                yield worker
            finally:
                failures = worker.destroy_all()
            expect(wire.wait_for_closes(10.0), "a refused socket's close did not return")
            fds_after, maps_after = fd_count(), memfd_mappings()
        finally:
            if collecting:
                gc.enable()
        expect(failures == [], f"destroy_all failed: {failures}")
        expect(fds_after == fds_before, f"fds: {fds_before} before, {fds_after} after")
        expect(maps_after == maps_before, f"memfd maps: {maps_before} before, {maps_after} after")
        os.fstat(self.shutdown_eventfd)  # still ours, still open

    def run(self, ch: Chooser, most: int = 12) -> None:
        """One sequence of datagrams to a fresh worker; raises `ContractViolation` (or whatever
        escaped the worker) on a failure."""
        with self.checked(self.new_worker(ch)) as worker:
            for _ in range(ch.integer(1, most)):
                self.step(worker, ch)

    def step(self, worker: MainWorker, ch: Chooser) -> None:
        """One datagram: mostly a hostile request, else damaged or garbage, with fds."""
        request: MainRequest | None = None
        mode = ch.integer(0, 7)
        if mode == 0:
            data = ch.blob(64)
        else:
            request = main_request(ch)
            data = request.SerializeToString()
            if mode == 1:
                data = mutate(ch, data)
        self.exchange(worker, data, fd_specs(ch, request))

    def exchange(self, worker: MainWorker, data: bytes, specs: Sequence[FdSpec]) -> None:
        """Hand `data` with fds made from `specs` to the worker, check the reply, and release
        what the event loop releases once a reply is sent."""
        live_before = {obj_id for obj_id, _ in worker.objects.items()}
        with opened_fds(specs) as opened:
            reply = worker.handle(data, opened.sent)
        try:
            errors, self.internal_errors[:] = list(self.internal_errors), []
            expect(not errors, f"the worker caught a bug of its own: {errors}")
            self.check(worker, data, len(specs), reply, live_before)
        finally:
            for fd in reply.close_after_send:
                os.close(fd)
            if reply.new_connection is not None:
                reply.new_connection.close()

    def check(
        self, worker: MainWorker, data: bytes, sent: int, reply: Reply, live_before: set[int]
    ) -> None:
        """The reply to `data` (sent with `sent` fds) against the contract."""
        try:
            request = MainRequest.FromString(data)
        except DecodeError:
            expect(reply.hang_up, "undecodable bytes did not close the connection")
            expect(not reply.fds and reply.new_connection is None, "a hang-up carried fds")
            return
        expect(not reply.hang_up, "a decodable request closed the connection")
        try:
            response = MainResponse.FromString(reply.data)
        except DecodeError as exc:
            raise ContractViolation(f"the reply does not decode: {exc}") from exc
        case = request.WhichOneof("message")
        got = response.WhichOneof("message")
        expect(got == case, f"{case} answered with case {got}")
        err = response.errno
        expect(err >= 0, f"{case}: negative errno {err}")
        for fd in reply.fds:
            try:
                os.fstat(fd)
            except OSError as exc:
                raise ContractViolation(f"{case}: reply fd {fd} is not open: {exc}") from exc
        expect(set(reply.close_after_send) <= set(reply.fds), "closes an fd it does not send")
        if case is None:
            expect(err == errno.ENOTTY, f"a request without a message got errno {err}")
        memory = takes_memfd(request)
        if sent and not memory and case is not None:
            expect(err == errno.EINVAL, f"{case} with {sent} fds got errno {err}, not EINVAL")
        if memory and not sent:
            expect(err == errno.EBADF, f"create memory without an fd got errno {err}")
        if memory and sent > 1:
            expect(err == errno.EINVAL, f"create memory with {sent} fds got errno {err}")
        if err:
            expect(not reply.fds and reply.new_connection is None, f"failed {case} carried fds")
        else:
            self._check_success(worker, request, reply)
        if sent == (1 if memory else 0):
            self._check_objects(worker, request, err, live_before)

    def _check_success(self, worker: MainWorker, request: MainRequest, reply: Reply) -> None:
        case = request.WhichOneof("message")
        response = MainResponse.FromString(reply.data)
        if case == "create":
            constructor = request.create.WhichOneof("constructor") or ""
            want = {"io_event": 1, "irq_event": 2}.get(constructor, 0)
            expect(len(reply.fds) == want, f"create answered with {len(reply.fds)} fds")
        elif case == "new_connection":
            expect(reply.new_connection is not None, "new connection without a socket")
            expect(reply.close_after_send == reply.fds and len(reply.fds) == 1, "bad far end")
        elif case == "get_shutdown_eventfd":
            expect(reply.fds == [self.shutdown_eventfd], "not the VM's shutdown eventfd")
        elif case == "get_net_config":
            expect(reply.fds == [self.tap_stand_in], "not the tap")
        elif case == "get_vcpus":
            expect(reply.fds == self.vcpu_ends, "not the VCPU channel ends")
        elif case == "get_state":
            size = MAIN_STATE_SIZES[request.get_state.set]
            state = response.get_state.state
            expect(len(state) == size, f"state of {len(state)} bytes, not {size}")
        elif case == "dirty_log":
            obj = worker.objects.get(request.dirty_log.id)
            expect(isinstance(obj, MemoryObject), "dirty log of something not memory")
            assert isinstance(obj, MemoryObject)
            pages = (obj.length + PAGE_SIZE - 1) // PAGE_SIZE
            bitmap = response.dirty_log.bitmap
            expect(len(bitmap) == (pages + 7) // 8, f"{len(bitmap)}-byte bitmap, {pages} pages")
        if case not in ("create", "new_connection", "get_shutdown_eventfd", "get_net_config"):
            expect(reply.new_connection is None, f"{case} made a connection")
            if case != "get_vcpus":
                expect(reply.fds == [], f"{case} answered with fds")

    def _check_objects(
        self, worker: MainWorker, request: MainRequest, err: int, live_before: set[int]
    ) -> None:
        """Object ids: EEXIST for a live one, ENOENT for a missing one, the table follows."""
        case = request.WhichOneof("message")
        if case == "create" and request.create.WhichOneof("constructor") is not None:
            obj_id = request.create.id
            if obj_id in live_before:
                expect(err == errno.EEXIST, f"create of live id {obj_id} got errno {err}")
            expect((obj_id in worker.objects) == (err == 0 or obj_id in live_before), "table")
        elif case == "destroy":
            obj_id = request.destroy.id
            want = 0 if obj_id in live_before else errno.ENOENT
            expect(err == want, f"destroy of id {obj_id} got errno {err}, not {want}")
            expect(obj_id not in worker.objects, f"id {obj_id} still live after destroy")
        elif case == "dirty_log" and request.dirty_log.id not in live_before:
            expect(err == errno.ENOENT, f"dirty log of a missing object got errno {err}")


_harness: MainHarness | None = None


def TestOneInput(data: bytes) -> None:
    """libFuzzer's entry point: one input, one sequence against the process's VM."""
    global _harness
    if _harness is None:
        _harness = MainHarness()
    atheris = load_atheris()
    _harness.run(FdpChooser(atheris.FuzzedDataProvider(data)))


def main() -> None:
    atheris = load_atheris()
    instrument(atheris)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

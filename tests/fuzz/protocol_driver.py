"""`VcpuProtocol` driven as the worker drives it, on fakes, for the protocol's tests.

`VcpuProtocol` does no I/O: it returns actions. `DrivenProtocol` carries them out on a fake VCPU
(`Call`), a list of sent messages (`Send`) and byte buffers standing in for the run page
(`Resume`), so the tests read like a conversation. It also holds the oracle of the exit engine's
decision for one I/O or MMIO access (unreserved, async write, forwarded, at the call hint),
which tests/test_vcpu_worker.py checks against the engine itself. (It lives with the fuzz
targets, which drive the protocol the same way.)
"""

from __future__ import annotations

from typing import Any, Protocol

from vmsuper.shared import hotpath
from vmsuper.shared.ranges import CallHint, Range, Space
from vmsuper.workers.vcpu_protocol import (
    Answer,
    Phase,
    Resume,
    Steps,
    VcpuProtocol,
    carry_out,
)


class Calls(Protocol):
    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]: ...


class Ranges(Protocol):
    def lookup(self, space: Space, addr: int) -> Range | None: ...

    @property
    def hint(self) -> CallHint | None: ...


def fill(area: memoryview | bytearray, data: bytes) -> None:
    """What the engine does with a Resume's data (`vms_finish_access`): at most the area's
    size, zero-padded."""
    size = len(area)
    chunk = data[:size]
    area[: len(chunk)] = chunk
    area[len(chunk) :] = bytes(size - len(chunk))


class DrivenProtocol:
    """A protocol whose actions are carried out at once; see the module docstring."""

    def __init__(self, calls: Calls, ranges: Ranges, *, log: Any = None) -> None:
        self.protocol = VcpuProtocol(log=log)
        self.calls = calls
        self.ranges = ranges
        self.access_area: memoryview | bytearray | None = None
        """Where the pending access's answer goes (a read's data area)."""
        self.hcall_result: memoryview | bytearray | None = None
        self.resumes: list[Resume] = []
        self.range_counts: dict[Range, int] = {}
        """Forwarded accesses per range, as the engine counts them."""

    @property
    def phase(self) -> Phase:
        return self.protocol.phase

    @property
    def last_refusal(self) -> str | None:
        return self.protocol.last_refusal

    def perform(self, steps: Steps) -> list[bytes]:
        """Carry out every action (as the worker does); the messages sent, in order."""
        sent: list[bytes] = []
        carry_out(steps, self.calls.call, sent.append, self._resume)
        return sent

    def _resume(self, action: Resume) -> None:
        self.resumes.append(action)
        if action.answer is Answer.ACCESS and self.access_area is not None:
            fill(self.access_area, action.data)
        elif action.answer is Answer.HCALL_RESULT and self.hcall_result is not None:
            fill(self.hcall_result, action.data[:8])
        self.access_area = self.hcall_result = None

    def receive_request(self, data: bytes) -> bytes | None:
        sent = self.perform(self.protocol.receive_request(data))
        assert len(sent) <= 1, "one request, at most one response"
        return sent[0] if sent else None

    def refuse_request(self, data: bytes, code: int, why: str) -> bytes:
        return self.protocol.refuse_request(data, code, why)

    def io_access(
        self, space: Space, address: int, is_write: bool, data: memoryview | bytearray
    ) -> bytes | None:
        """The engine's handling of one access (`handle_exit` in hotpath.c): the message it
        sends, or None for an access answered without the plugin."""
        rng = self.ranges.lookup(space, address)
        if rng is None or (rng.async_write and not is_write):
            if not is_write:
                data[:] = bytes(len(data))
            return None
        self.range_counts[rng] = self.range_counts.get(rng, 0) + 1
        if is_write and rng.async_write:
            return hotpath.encode_io_wait(space, address, True, True, bytes(data))
        self.access_area = None if is_write else data
        hint = self.ranges.hint
        if hint is not None and hint.matches(space, address, is_write):
            [sent] = self.perform(
                self.protocol.hinted_access(space, address, is_write, bytes(data), hint)
            )
            return sent
        self.protocol.access_forwarded()
        payload = bytes(data) if is_write else bytes(len(data))
        return hotpath.encode_io_wait(space, address, is_write, False, payload)

    def hyperv_call(
        self, input: int, params0: int, params1: int, result: memoryview | bytearray
    ) -> bytes:
        answer = self.protocol.hyperv_call(input, params0, params1)
        self.hcall_result = result
        return answer

    def hyperv_synic(self, msr: int, control: int, evt_page: int, msg_page: int) -> bytes:
        return self.protocol.hyperv_synic(msr, control, evt_page, msg_page)

    def pause(self, token: int) -> bytes:
        return self.protocol.pause(token)

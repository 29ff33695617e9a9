"""VCPU ioctls from a worker, made by its runner thread in the supervisor.

KVM refuses VCPU ioctls from any process but the VM's creator, so a worker posts each one (the
request number and the argument bytes) to its mailbox in shared memory, rings the doorbell and
waits for the runner's answer. `KVM_RUN` is posted by the exit engine's own loop (`hotpath.c`);
this is the way for everything else the protocol asks for (`vcpu_protocol.Call`).
"""

from __future__ import annotations

import errno

from vmsuper.shared.shm_doorbell import Doorbell
from vmsuper.shared.shm_layout import ShmError
from vmsuper.shared.shm_mailbox import Mailbox
from vmsuper.workers.vcpu_protocol import CallFailed

__all__ = ["MailboxCalls"]


class MailboxCalls:
    """Runs one VCPU ioctl through the shared mailbox."""

    def __init__(self, mailbox: Mailbox, doorbell: Doorbell) -> None:
        self._mailbox = mailbox
        self._doorbell = doorbell

    def call(self, request: int, arg: bytes | bytearray) -> tuple[int, bytes]:
        """Run `request` with a copy of `arg`; (the ioctl's result, the argument bytes
        afterwards). Raises `CallFailed` with the kernel's errno or the runner's refusal."""
        mailbox = self._mailbox
        try:
            mailbox.post(request, arg)
        except ShmError as exc:  # more than the mailbox holds
            raise CallFailed(errno.E2BIG, request) from exc
        self._doorbell.ring_request()
        self._doorbell.wait_done()
        ret, err = mailbox.result()
        if err:
            raise CallFailed(err, request)
        return ret, mailbox.read_arg(len(arg))

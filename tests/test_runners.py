"""The runner's argument checks (pure): what a worker may make the supervisor's thread do."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from vmsuper.shared import kvm
from vmsuper.shared.abi import MAILBOX_ARG_SIZE
from vmsuper.supervisor.runners import ALLOWED_IOCTLS, check_argument


def counted(count: int, length: int) -> bytes:
    return struct.pack("<I4x", count) + bytes(max(0, length - 8))


@pytest.mark.parametrize(
    ("request_", "struct_type"),
    [
        (kvm.KVM_GET_REGS, kvm.kvm_regs),
        (kvm.KVM_SET_SREGS, kvm.kvm_sregs),
        (kvm.KVM_GET_LAPIC, kvm.kvm_lapic_state),
        (kvm.KVM_SET_MP_STATE, kvm.kvm_mp_state),
        (kvm.KVM_GET_XCRS, kvm.kvm_xcrs),
        (kvm.KVM_SET_VCPU_EVENTS, kvm.kvm_vcpu_events),
        (kvm.KVM_ENABLE_CAP, kvm.kvm_enable_cap),
    ],
)
def test_fixed_size_ioctls_need_exactly_their_struct(request_: int, struct_type: type) -> None:
    size = ctypes.sizeof(struct_type)
    assert check_argument(request_, bytes(size), size) == 0
    assert check_argument(request_, bytes(size - 1), size - 1) == errno.EINVAL
    assert check_argument(request_, bytes(size + 8), size + 8) == errno.EINVAL


@pytest.mark.parametrize(
    ("request_", "entry"),
    [
        (kvm.KVM_GET_MSRS, 16),
        (kvm.KVM_SET_MSRS, 16),
        (kvm.KVM_SET_CPUID2, 40),
        (kvm.KVM_GET_SUPPORTED_HV_CPUID, 40),
    ],
)
def test_counted_ioctls_must_hold_their_entries(request_: int, entry: int) -> None:
    assert check_argument(request_, counted(3, 8 + 3 * entry), 8 + 3 * entry) == 0
    assert check_argument(request_, counted(0, 8), 8) == 0
    # The kernel trusts the count: entries past what was posted would be read from (or
    # written to) whatever follows.
    assert check_argument(request_, counted(4, 8 + 3 * entry), 8 + 3 * entry) == errno.EINVAL
    assert check_argument(request_, counted(0xFFFF_FFFF, 8), 8) == errno.EINVAL
    assert check_argument(request_, b"\0" * 4, 4) == errno.EINVAL
    assert check_argument(request_, counted(0, 8), MAILBOX_ARG_SIZE + 1) == errno.EINVAL


@pytest.mark.parametrize(
    "request_",
    [kvm.KVM_CREATE_VCPU, kvm.KVM_SET_USER_MEMORY_REGION, kvm.KVM_IRQFD, kvm.KVM_RUN, 0],
)
def test_anything_else_is_refused(request_: int) -> None:
    assert request_ not in ALLOWED_IOCTLS
    assert check_argument(request_, bytes(64), 64) == errno.EPERM

"""Suite-wide fixtures: KVM availability (fail, not skip, in CI) and per-test run folders."""

from __future__ import annotations

import os

import pytest

KVM_PATH = "/dev/kvm"


def kvm_required_strictly() -> bool:
    """In CI, or when asked, a missing /dev/kvm is a failure rather than a skip."""
    return os.environ.get("CI") == "true" or os.environ.get("VMSUPER_REQUIRE_KVM") == "1"


def kvm_unusable_reason() -> str | None:
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_PATH} is not usable: {exc.strerror}"
    os.close(fd)
    return None


@pytest.fixture(autouse=True)
def _kvm_gate(request: pytest.FixtureRequest) -> None:
    """Tests marked `kvm` skip without KVM on a developer's machine, and fail in CI."""
    if request.node.get_closest_marker("kvm") is None:
        return
    reason = kvm_unusable_reason()
    if reason is None:
        return
    if kvm_required_strictly():
        pytest.fail(f"KVM is required here (CI or VMSUPER_REQUIRE_KVM=1): {reason}")
    pytest.skip(reason)

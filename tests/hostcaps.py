"""What this host lets the tests do: KVM and tap devices. Each answers with the reason it is
unusable, or None; the gates in conftest.py turn a reason into a skip, or a failure in CI."""

from __future__ import annotations

import os
from pathlib import Path

KVM_PATH = "/dev/kvm"
TUN_PATH = "/dev/net/tun"
CAP_NET_ADMIN = 12


def required_strictly() -> bool:
    """In CI, or when asked, a missing capability is a failure rather than a skip."""
    return os.environ.get("CI") == "true" or os.environ.get("VMSUPER_REQUIRE_KVM") == "1"


def kvm_unusable_reason() -> str | None:
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_PATH} is not usable: {exc.strerror}"
    os.close(fd)
    return None


def tap_unusable_reason() -> str | None:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{TUN_PATH} is not usable: {exc.strerror}"
    os.close(fd)
    status = Path("/proc/self/status").read_text()
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    if not int(cap_eff.split()[1], 16) >> CAP_NET_ADMIN & 1:
        return "creating a tap needs CAP_NET_ADMIN"
    return None

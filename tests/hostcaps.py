"""What this host lets the tests do: KVM and tap devices. Each answers with the reason it is
unusable, or None; the gates in conftest.py turn a reason into a skip, or a failure in CI."""

from __future__ import annotations

import os
from pathlib import Path

# The gate users' tests get from the pytest plugin is the suite's own.
from vmsuper.testing import KVM_PATH, kvm_unusable_reason, required_strictly

__all__ = [
    "KVM_PATH",
    "bound_below_tmp",
    "kvm_unusable_reason",
    "required_strictly",
    "tap_unusable_reason",
]

TUN_PATH = "/dev/net/tun"
CAP_NET_ADMIN = 12


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


def bound_below_tmp(*extra: Path) -> set[str]:
    """The first folders below /tmp that a sandboxed plugin sees besides its own: the
    project's sources and venv are bound into the sandbox, so when the checkout lives below
    /tmp (as a fresh clone may), /tmp inside shows their first folder too."""
    import sys

    import vmsuper

    sources = Path(vmsuper.__file__).resolve().parent.parent
    return {
        path.parts[2]
        for path in (*extra, sources, Path(sys.prefix))
        if len(path.parts) > 2 and path.parts[:2] == ("/", "tmp")
    }

"""Suite-wide gates: tests that need KVM or tap devices skip without them on a developer's
machine, and fail in CI (CI=true) or with VMSUPER_REQUIRE_KVM=1."""

from __future__ import annotations

import os

import pytest
from hostcaps import kvm_unusable_reason, required_strictly, tap_unusable_reason

from vmsuper.supervisor.serve_client import SERVE_VARIABLE
from vmsuper.testing import SANDBOX_VARIABLE

# vmsuper's own tests look at their plugins from the host (pids, parents, fds), so their runs
# are unsandboxed unless the suite is run with VMSUPER_TEST_SANDBOX=1 (see docs/security.md).
os.environ.setdefault(SANDBOX_VARIABLE, "0")
# For the same reason their runs are children of their own `vmsuper run`, even where a
# `vmsuper serve` listens (tests/test_serve.py starts servers of its own).
os.environ[SERVE_VARIABLE] = "0"


def _gate(reason: str | None, what: str) -> None:
    if reason is None:
        return
    if required_strictly():
        pytest.fail(f"{what} is required here (CI or VMSUPER_REQUIRE_KVM=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _kvm_gate(request: pytest.FixtureRequest) -> None:
    """Tests marked `kvm` need a usable /dev/kvm."""
    if request.node.get_closest_marker("kvm") is not None:
        _gate(kvm_unusable_reason(), "KVM")


@pytest.fixture
def taps_allowed() -> None:
    """For tests that create tap devices (root, or CAP_NET_ADMIN, and /dev/net/tun)."""
    _gate(tap_unusable_reason(), "creating tap devices")


@pytest.fixture(autouse=True)
def _tmp_path_open_to_the_plugin_user(request: pytest.FixtureRequest) -> None:
    """A sandboxed plugin runs as an unprivileged user (nobody, say), who must enter the
    folder a test writes it to; pytest makes tmp_path 0700. Its parent (pytest-of-USER)
    stays 0700, so no one else reaches it."""
    if "tmp_path" in request.fixturenames:
        os.chmod(request.getfixturevalue("tmp_path"), 0o755)

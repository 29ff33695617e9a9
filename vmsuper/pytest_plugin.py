"""pytest plugin: test your vmsuper plugins on a KVM host.

Registered through the `pytest11` entry point, so installing vmsuper is enough. The `vmsuper`
fixture runs a VM with your plugin (a script path or a module-level Python function) and gives
back its exit status, output and per-VCPU logs:

    def test_my_plugin(vmsuper):
        result = vmsuper.run("plugins/my_plugin.py", VmSpec(vcpus=2))
        assert result.status == 0

Every test gets its own folder under pytest's tmp_path, so the fixture is safe under
pytest-xdist. When a test that used the fixture fails, its report shows, for each run: the
outcome and its cause, the log folder, vmsuper's stdout and stderr (the plugin's pass
through), and the last lines of the supervisor's and each VCPU's log.

Without a usable /dev/kvm the fixture skips the test, saying why, or fails it in CI
(CI=true) or with VMSUPER_REQUIRE_KVM=1.

pytest-xdist. The fixture's VMs share the host through a capacity guard (`vmsuper.capacity`):
at most ``--vmsuper-max-vcpus`` VCPUs (or ``VMSUPER_MAX_VCPUS``; default: the CPU count) run at
once, across xdist workers and pytest sessions. A test that had to wait for room says so in
its report (user property ``vmsuper_capacity_wait_s`` and a "vmsuper capacity" section).

With ``--vmsuper-serve`` (or ``vmsuper_serve = true`` in the ini file) the session starts one
`vmsuper serve` of its own, and every VM the fixture starts (on xdist's local workers too) is
forked by it: a VM then starts without an interpreter and imports of its own, which is most of
its start (see `vmsuper.session_server`). The server ends with the session.

Each VM the fixture starts also puts the host's name and the run's log folder into the test's
report (user properties ``vmsuper_host`` and ``vmsuper_log_dir``, and a "vmsuper run"
section), so a test that fails on a remote xdist worker (``--tx ssh=...``) says where to look.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from vmsuper.capacity import (
    CapacityError,
    CapacityGuard,
    Lease,
    default_max_vcpus,
    parse_max_vcpus,
)
from vmsuper.session_server import SessionServer, SessionServerError
from vmsuper.supervisor.serve_client import SERVE_VARIABLE
from vmsuper.testing import (
    VmResult,
    VmRunner,
    VmSpec,
    kvm_unusable_reason,
    required_strictly,
)

__all__ = ["VmResult", "VmRunner", "VmSpec"]

MAX_VCPUS_OPTION = "--vmsuper-max-vcpus"
SERVE_OPTION = "--vmsuper-serve"
SERVE_INI = "vmsuper_serve"
WAIT_PROPERTY = "vmsuper_capacity_wait_s"
HOST_PROPERTY = "vmsuper_host"
LOG_PROPERTY = "vmsuper_log_dir"
_RUNNER = pytest.StashKey[VmRunner]()
_SERVER = pytest.StashKey[SessionServer]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("vmsuper").addoption(
        MAX_VCPUS_OPTION,
        metavar="N",
        default=None,
        help="most VCPUs of vmsuper VMs running at once on this host, across xdist workers "
        "and pytest sessions (default: $VMSUPER_MAX_VCPUS, else the CPU count)",
    )
    parser.getgroup("vmsuper").addoption(
        SERVE_OPTION,
        action="store_true",
        default=None,
        help="start one 'vmsuper serve' for the session: the fixture's VMs start faster",
    )
    parser.addini(
        SERVE_INI, type="bool", default=False, help=f"as {SERVE_OPTION}, from the ini file"
    )


def pytest_configure(config: pytest.Config) -> None:
    """With --vmsuper-serve, the session's server: started by the controlling process (xdist's
    workers inherit the variable that names it), unless VMSUPER_SERVE=0 keeps runs local."""
    wanted = config.getoption(SERVE_OPTION) or config.getini(SERVE_INI)
    if not wanted or hasattr(config, "workerinput") or os.environ.get(SERVE_VARIABLE) == "0":
        return
    try:
        config.stash[_SERVER] = SessionServer()
    except SessionServerError as exc:
        raise pytest.UsageError(f"{SERVE_OPTION}: {exc}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(_SERVER, None)
    if server is not None:
        del config.stash[_SERVER]
        server.stop()


def _max_vcpus(config: pytest.Config) -> int:
    text = config.getoption(MAX_VCPUS_OPTION)
    try:
        if text is not None:
            return parse_max_vcpus(str(text), MAX_VCPUS_OPTION)
        return default_max_vcpus()
    except CapacityError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture
def vmsuper(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VmRunner]:
    """A VmRunner whose runs live in this test's own temporary folder and share the host's
    VCPUs with every other test VM (the capacity guard).

    The folder is opened (0755) to the unprivileged user a sandboxed plugin runs as, so that
    a plugin written there can run; its parent stays private to the test's user.
    """
    reason = kvm_unusable_reason()
    if reason is not None:
        if required_strictly():
            pytest.fail(f"the vmsuper fixture needs KVM (CI or VMSUPER_REQUIRE_KVM=1): {reason}")
        pytest.skip(f"the vmsuper fixture needs KVM: {reason}")
    item = request.node

    def waited(lease: Lease, vcpus: int) -> None:
        total = sum(value for name, value in item.user_properties if name == WAIT_PROPERTY)
        item.user_properties[:] = [p for p in item.user_properties if p[0] != WAIT_PROPERTY]
        item.user_properties.append((WAIT_PROPERTY, round(total + lease.waited_s, 3)))
        item.add_report_section(
            "call",
            "vmsuper capacity",
            f"a {vcpus}-VCPU VM waited {lease.waited_s:.3f} s for {len(lease.fds)} of the "
            f"host's {guard.max_vcpus} VCPU slots",
        )

    def started(log_dir: Path) -> None:
        item.user_properties.append((HOST_PROPERTY, socket.gethostname()))
        item.user_properties.append((LOG_PROPERTY, str(log_dir.resolve())))
        item.add_report_section(
            "call", "vmsuper run", f"host: {socket.gethostname()}\nlog folder: {log_dir.resolve()}"
        )

    tmp_path.chmod(0o755)
    guard = CapacityGuard(_max_vcpus(request.config))
    runner = VmRunner(tmp_path / "vmsuper", capacity=guard, on_wait=waited, on_start=started)
    item.stash[_RUNNER] = runner
    try:
        yield runner
    finally:
        runner.stop_all()
        runner.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report gets a section per part of each run the fixture started."""
    report = yield
    runner = item.stash.get(_RUNNER, None)
    if runner is not None and report.failed and report.when != "teardown":
        report.sections.extend(runner.report_sections())
    return report

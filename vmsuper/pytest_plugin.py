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
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from vmsuper.testing import (
    VmResult,
    VmRunner,
    VmSpec,
    kvm_unusable_reason,
    required_strictly,
)

__all__ = ["VmResult", "VmRunner", "VmSpec"]

_RUNNER = pytest.StashKey[VmRunner]()


@pytest.fixture
def vmsuper(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VmRunner]:
    """A VmRunner whose runs live in this test's own temporary folder.

    The folder is opened (0755) to the unprivileged user a sandboxed plugin runs as, so that
    a plugin written there can run; its parent stays private to the test's user.
    """
    reason = kvm_unusable_reason()
    if reason is not None:
        if required_strictly():
            pytest.fail(f"the vmsuper fixture needs KVM (CI or VMSUPER_REQUIRE_KVM=1): {reason}")
        pytest.skip(f"the vmsuper fixture needs KVM: {reason}")
    tmp_path.chmod(0o755)
    runner = VmRunner(tmp_path / "vmsuper")
    request.node.stash[_RUNNER] = runner
    yield runner
    runner.stop_all()


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

"""pytest plugin: test your vmsuper plugins on a KVM host.

Registered through the `pytest11` entry point, so installing vmsuper is enough. The `vmsuper`
fixture runs a VM with your plugin (a script path or a module-level Python function) and gives
back its exit status, output and per-VCPU logs:

    def test_my_plugin(vmsuper):
        result = vmsuper.run("plugins/my_plugin.py", VmSpec(vcpus=2))
        assert result.status == 0

Every test gets its own folder under pytest's tmp_path, so the fixture is safe under
pytest-xdist.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsuper.testing import VmResult, VmRunner, VmSpec

__all__ = ["VmResult", "VmRunner", "VmSpec"]


@pytest.fixture
def vmsuper(tmp_path: Path) -> VmRunner:
    """A VmRunner whose runs live in this test's own temporary folder.

    The folder is opened (0755) to the unprivileged user a sandboxed plugin runs as, so that
    a plugin written there can run; its parent stays private to the test's user.
    """
    tmp_path.chmod(0o755)
    return VmRunner(tmp_path / "vmsuper")

"""The pytest plugin as users meet it: a test file of theirs using the `vmsuper` fixture.

Each test writes such a file (and a plugin script) into a scratch project with `pytester` and
runs pytest on it, in process and under pytest-xdist, then checks the inner outcome.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from vmsuper.testing import SANDBOX_VARIABLE

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.kvm

PLUGIN_SCRIPT = f"""\
#!{sys.executable}
import sys
from vmsuper.plugin import Connection, Init

conn = Connection.from_env()
(vcpu,) = conn.get_vcpus()
conn.start()
event = vcpu.wait()
print("first event:", type(event).__name__, "irqchip:", conn.check_extension(0))
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""

USER_TESTS = """
from pathlib import Path

from vmsuper.plugin import Connection
from vmsuper.pytest_plugin import VmSpec

SCRIPT = Path(__file__).parent / "my_plugin.py"


def callable_plugin():
    conn = Connection.from_env()
    vcpus = conn.get_vcpus()
    print("callable plugin sees", len(vcpus), "VCPUs")
    return 7 if len(vcpus) != 2 else None


def failing_plugin():
    return 3


def test_script_plugin(vmsuper):
    result = vmsuper.run(SCRIPT)
    assert result.status == 0, result.stderr
    assert "first event: Init irqchip: True" in result.stdout
    assert result.records(), "the run left a supervisor log"


def test_script_plugin_exit_status(vmsuper):
    result = vmsuper.run(SCRIPT, VmSpec(args=["5"], transport="pipes"))
    assert result.status == 5


def test_callable_plugin(vmsuper):
    result = vmsuper.run(callable_plugin, VmSpec(vcpus=2))
    assert result.status == 0, result.stderr
    assert "callable plugin sees 2 VCPUs" in result.stdout


def test_callable_plugin_return_value_is_the_status(vmsuper):
    assert vmsuper.run(failing_plugin).status == 3
"""


def make_project(pytester: pytest.Pytester) -> None:
    script = pytester.path / "my_plugin.py"
    script.write_text(PLUGIN_SCRIPT)
    script.chmod(0o755)
    pytester.makepyfile(test_user=textwrap.dedent(USER_TESTS))


def test_fixture_runs_script_and_callable_plugins(pytester: pytest.Pytester) -> None:
    make_project(pytester)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_fixture_under_xdist(pytester: pytest.Pytester) -> None:
    make_project(pytester)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*2 workers*"])


SERVED_TESTS = """
import json
import os
from pathlib import Path

SCRIPT = Path(__file__).parent / "report_parents.py"


def test_the_run_is_forked_by_the_session_s_server(vmsuper):
    result = vmsuper.run(SCRIPT)
    assert result.status == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    socket = os.environ["VMSUPER_SERVE_SOCKET"]
    assert seen["server"] == ["{python}", "-m", "vmsuper", "serve"], seen
    assert seen["socket"] == socket
    Path(os.environ["SERVED_TEST_OUT"], os.environ.get("PYTEST_XDIST_WORKER", "main")).write_text(
        json.dumps({{"socket": socket, "server": seen["server_pid"]}})
    )
"""

# Unsandboxed (the sandbox hides the host's processes): the command line of the supervisor's
# parent, and the socket it was told of.
REPORT_PARENTS = f"""\
#!{sys.executable}
import json, os
supervisor = os.getppid()
with open(f"/proc/{{supervisor}}/stat") as stat:
    server = int(stat.read().rsplit(")", 1)[1].split()[1])
with open(f"/proc/{{server}}/cmdline") as cmdline:
    argv = cmdline.read().rstrip("\\0").split("\\0")
print(json.dumps({{"server": argv, "server_pid": server,
                  "socket": os.environ.get("VMSUPER_SERVE_SOCKET")}}))
"""


@pytest.mark.parametrize("how", ["option", "ini"])
def test_vmsuper_serve_forks_every_run_of_the_session_from_one_server_it_then_stops(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    script = pytester.path / "report_parents.py"
    script.write_text(REPORT_PARENTS)
    script.chmod(0o755)
    pytester.makepyfile(test_user=textwrap.dedent(SERVED_TESTS.format(python=sys.executable)))
    out = pytester.mkdir("out")
    monkeypatch.setenv("SERVED_TEST_OUT", str(out))
    monkeypatch.setenv(SANDBOX_VARIABLE, "0")
    monkeypatch.delenv("VMSUPER_SERVE", raising=False)  # the suite's own runs stay local
    monkeypatch.delenv("VMSUPER_SERVE_SOCKET", raising=False)
    args = ["-n", "2", "-p", "no:cacheprovider"]
    if how == "option":
        args.append("--vmsuper-serve")
    else:
        pytester.makeini("[pytest]\nvmsuper_serve = true\n")
    # Two copies of the test, so both workers run one.
    pytester.makepyfile(test_user2=textwrap.dedent(SERVED_TESTS.format(python=sys.executable)))
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2)
    seen = [json.loads(path.read_text()) for path in out.iterdir()]
    assert len(seen) == 2 and len({s["socket"] for s in seen}) == 1  # one server for all
    assert len({s["server"] for s in seen}) == 1
    assert not psutil.pid_exists(seen[0]["server"])  # stopped with the session
    assert not Path(seen[0]["socket"]).parent.exists()  # and its folder removed


def test_vmsuper_serve_0_keeps_the_session_without_a_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_user="""
import os

def test_no_server_was_named():
    assert "VMSUPER_SERVE_SOCKET" not in os.environ
"""
    )
    monkeypatch.setenv("VMSUPER_SERVE", "0")
    monkeypatch.delenv("VMSUPER_SERVE_SOCKET", raising=False)
    result = pytester.runpytest_subprocess("--vmsuper-serve", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


FAILING_TESTS = """
from pathlib import Path

from vmsuper.pytest_plugin import VmSpec

SCRIPT = Path(__file__).parent / "my_plugin.py"


def test_plugin_fails(vmsuper):
    result = vmsuper.run(SCRIPT, VmSpec(args=["3"]))
    assert result.status == 0


def test_plugin_passes(vmsuper):
    assert vmsuper.run(SCRIPT).status == 0
"""


def test_a_failing_test_reports_the_run(pytester: pytest.Pytester) -> None:
    script = pytester.path / "my_plugin.py"
    script.write_text(
        PLUGIN_SCRIPT.replace(
            "import sys\n",
            "import sys\nprint('plugin complains', file=sys.stderr, flush=True)\n",
            1,
        )
    )
    script.chmod(0o755)
    pytester.makepyfile(test_user=textwrap.dedent(FAILING_TESTS))
    result = pytester.runpytest("-p", "no:cacheprovider", "-rP")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    failure, passes = out.split("= PASSES =")
    result.stdout.fnmatch_lines(
        [
            "*- vmsuper: outcome -*",
            "outcome: status 3: plugin exited with status 3",
            "log folder: */vmsuper/run1/logs",
            "read the logs: vmsuper logs */vmsuper/run1/logs",
            "*- vmsuper: stdout (the plugin's) -*",
            "first event: Init irqchip: True",
            "*- vmsuper: stderr (vmsuper's and the plugin's) -*",
            "vmsuper: logs in */vmsuper/run1/logs",
            "plugin complains",
            "*- vmsuper: supervisor.jsonl, last 20 lines -*",
            '*super  info     run_finished  status=3  reason="plugin exited with status 3"',
            "*- vmsuper: vcpu-0.jsonl, last 20 lines -*",
            "*vcpu0  info     vcpu_exit_counts  *",
        ]
    )
    # Only the failing test gets the sections.
    assert "vmsuper: outcome" in failure
    assert "vmsuper: outcome" not in passes


SKIPPING_TESTS = """
import pytest

import vmsuper.testing


@pytest.fixture(autouse=True)
def no_kvm(monkeypatch):
    monkeypatch.setattr(vmsuper.testing, "KVM_PATH", "/nonexistent/kvm")


def test_needs_kvm(vmsuper):
    raise AssertionError("ran without KVM")
"""


@pytest.mark.parametrize("ci", [False, True])
def test_without_kvm_the_fixture_skips_or_fails_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: bool
) -> None:
    monkeypatch.delenv("VMSUPER_REQUIRE_KVM", raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_user=SKIPPING_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    reason = "/nonexistent/kvm is not usable: No such file or directory"
    if ci:
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            [f"*the vmsuper fixture needs KVM (CI or VMSUPER_REQUIRE_KVM=1): {reason}*"]
        )
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED * the vmsuper fixture needs KVM: {reason}"])
    assert "ran without KVM" not in result.stdout.str()


SANDBOX_TESTS = """
from pathlib import Path

from vmsuper.pytest_plugin import VmSpec

SCRIPT = Path(__file__).parent / "pid_plugin.py"


def test_runs_are_sandboxed_by_default(vmsuper):
    assert VmSpec().sandbox is True
    result = vmsuper.run(SCRIPT)
    assert result.status == 0, result.stderr
    assert "sandbox = true" in result.config_path.read_text()
    # In the sandbox's own pid namespace the plugin's pid is tiny.
    assert int(result.stdout) < 10, result.stdout
"""


def test_the_fixture_sandboxes_by_default(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SANDBOX_VARIABLE)
    script = pytester.path / "pid_plugin.py"
    script.write_text(f"#!{sys.executable}\nimport os\nprint(os.getpid())\n")
    script.chmod(0o755)
    pytester.makepyfile(test_user=SANDBOX_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


FAILING_ANYWHERE_TESTS = """
from pathlib import Path

SCRIPT = Path(__file__).parent / "my_plugin.py"


def test_fails(vmsuper):
    result = vmsuper.run(SCRIPT)
    assert result.status == 1, "deliberately wrong"
"""


def test_a_failing_test_names_its_host_and_log_folder(pytester: pytest.Pytester) -> None:
    script = pytester.path / "my_plugin.py"
    script.write_text(PLUGIN_SCRIPT)
    script.chmod(0o755)
    pytester.makepyfile(test_fail=textwrap.dedent(FAILING_ANYWHERE_TESTS))
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "--junitxml=report.xml"
    )
    result.assert_outcomes(failed=1)
    host = socket.gethostname()
    result.stdout.fnmatch_lines(
        ["*Captured vmsuper run call*", f"host: {host}", "log folder: */vmsuper/run1/logs"]
    )
    properties = {
        prop.get("name"): prop.get("value")
        for prop in ET.parse(pytester.path / "report.xml").iter("property")
    }
    assert properties["vmsuper_host"] == host
    log_dir = Path(properties["vmsuper_log_dir"] or "")
    assert (log_dir / "supervisor.jsonl").exists()

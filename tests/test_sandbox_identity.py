"""The sandboxed plugin is not host root, sees no broad host folder, and no other run's logs.

Real plugins under real bwrap, started by a real `vmsuper run` (as root, as on this machine's
CI): what the plugin can do is checked from inside (a probe reporting JSON) and, for its
identity, from the host's /proc. Nothing here changes the host: kernel knobs are only opened
for writing, never written.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hostcaps import bound_below_tmp
from rawplugin import plugin_source

from vmsuper.supervisor import sandbox_user
from vmsuper.supervisor.config import MountConfig, PluginConfig
from vmsuper.supervisor.sandbox import Sandbox, SandboxError, too_broad
from vmsuper.testing import VmResult, VmRunner, VmSpec, finish, write_python_plugin

# Kernel knobs a process of host root may write; the ones this kernel has.
KNOBS = tuple(
    path
    for path in (
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/printk_ratelimit",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/fs/suid_dumpable",
        "/proc/sys/user/max_user_namespaces",
    )
    if os.path.exists(path)
)

IDENTITY_PROBE = """
import ctypes, subprocess
R = RESULTS

def write_open(path):
    try:
        os.close(os.open(path, os.O_WRONLY))  # opened only: nothing is ever written
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "opened"

R["knobs"] = {path: write_open(path) for path in sys.argv[2].split(",")}
R["sysrq"] = write_open("/proc/sysrq-trigger")
mounts = {}
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    mounts[fields[4]] = fields[5].split(",")
R["proc_sys_options"] = mounts.get("/proc/sys", [])
R["usr_options"] = mounts.get("/usr", [])
setuid = subprocess.run([sys.argv[1]], capture_output=True, text=True)
R["setuid"] = setuid.stdout.split()
R["uid"], R["euid"] = os.getuid(), os.geteuid()
print(json.dumps(R), flush=True)
# Stay until vmsuper shuts down, so that the host can look at this process.
MAIN.recv(1)
"""

# Prints its real and effective uid and its effective capabilities: installed setuid root.
SETUID_HELPER = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char line[256];
    const char *caps = "?";
    FILE *status = fopen("/proc/self/status", "r");
    while (status != NULL && fgets(line, sizeof line, status) != NULL)
        if (strncmp(line, "CapEff:", 7) == 0) {
            line[strcspn(line, "\n")] = 0;
            caps = line + 8;
            break;
        }
    while (*caps == '\t' || *caps == ' ') caps++;
    printf("%d %d %s\n", (int)getuid(), (int)geteuid(), caps);
    return 0;
}
"""


@pytest.fixture(scope="module")
def setuid_helper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A setuid-root program in a folder the sandboxed plugin can read."""
    folder = tmp_path_factory.mktemp("setuid")
    folder.chmod(0o755)
    source = folder / "helper.c"
    source.write_text(SETUID_HELPER)
    binary = folder / "helper"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    os.chown(binary, 0, 0)
    binary.chmod(0o4755)
    yield binary
    binary.unlink()


def host_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def plugin_process(vmsuper_pid: int, plugin: Path) -> psutil.Process:
    """The sandboxed plugin among vmsuper's descendants (bwrap, its init, the plugin)."""
    for process in psutil.Process(vmsuper_pid).children(recursive=True):
        if str(plugin) in process.cmdline()[:3]:
            return process
    raise AssertionError(f"no process runs {plugin}")


def run_probe_and_look(
    tmp_path: Path, setuid_helper: Path, spec_user: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run IDENTITY_PROBE sandboxed; returns (what it found inside, its host /proc status)."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    plugin = write_python_plugin(folder, plugin_source(IDENTITY_PROBE), name="probe.py")
    spec = VmSpec(
        sandbox=True,
        user=spec_user,
        args=[str(setuid_helper), ",".join(KNOBS)],
        mounts=[(setuid_helper.parent, None, False)],
    )
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        found = json.loads(line)
        status = host_status(plugin_process(proc.pid, plugin).pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, config, logs, timeout=30)
    assert line, result.stderr
    return found, status


@pytest.mark.kvm
def test_the_sandboxed_plugin_is_not_host_root(tmp_path: Path, setuid_helper: Path) -> None:
    found, status = run_probe_and_look(tmp_path, setuid_helper)
    nobody = sandbox_user.plugin_user(None)
    assert nobody.uid != 0
    # From the host: real, effective, saved and filesystem ids, no groups, no_new_privs.
    assert status["Uid"].split() == [str(nobody.uid)] * 4
    assert status["Gid"].split() == [str(nobody.gid)] * 4
    assert status["Groups"].strip() == ""
    assert status["NoNewPrivs"] == "1"
    assert status["CapEff"] == status["CapPrm"] == "0000000000000000"
    # No kernel knob can be opened for writing; /proc/sys is a read-only mount.
    assert set(found["knobs"]) == set(KNOBS) and "/proc/sys/kernel/core_pattern" in KNOBS
    assert all(err in ("EACCES", "EROFS", "EPERM") for err in found["knobs"].values()), found[
        "knobs"
    ]
    assert found["sysrq"] in ("EACCES", "EROFS", "EPERM", "ENOENT")
    if os.path.exists("/proc/sysrq-trigger"):
        assert found["sysrq"] != "ENOENT"
    assert "ro" in found["proc_sys_options"]
    # A setuid-root program gains nothing: binds are nosuid, and no_new_privs holds anyway.
    assert "nosuid" in found["usr_options"]
    uid, euid, caps = found["setuid"]
    assert int(uid) == int(euid) == found["uid"] == found["euid"] != 0
    assert caps == "0000000000000000"


@pytest.mark.kvm
def test_the_plugin_user_is_configurable(tmp_path: Path, setuid_helper: Path) -> None:
    _, status = run_probe_and_look(tmp_path, setuid_helper, spec_user="daemon")
    daemon = sandbox_user.plugin_user("daemon")
    assert status["Uid"].split() == [str(daemon.uid)] * 4
    assert status["Gid"].split() == [str(daemon.gid)] * 4


@pytest.mark.kvm
def test_a_plugin_its_user_cannot_execute_is_a_start_error(tmp_path: Path) -> None:
    folder = tmp_path / "plugin"
    folder.mkdir()
    ran = tmp_path / "ran"
    plugin = write_python_plugin(folder, f"open({str(ran)!r}, 'w')\n")
    plugin.chmod(0o700)  # root's only
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(sandbox=True))
    assert result.status == 125
    user = sandbox_user.plugin_user(None)
    assert (
        f"vmsuper: cannot sandbox the plugin: {plugin} is not executable by the plugin's user, "
        f"uid {user.uid} ({user.name})"
    ) in result.stderr
    assert not ran.exists()


@pytest.mark.kvm
def test_a_writable_mount_its_user_cannot_write_is_a_start_error(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, "pass\n")
    data = tmp_path / "data"
    data.mkdir()  # root's, 0755
    result = VmRunner(tmp_path / "runs").run(
        plugin, VmSpec(sandbox=True, mounts=[(data, "/data", True)])
    )
    assert result.status == 125
    assert "/data is not writable by the plugin's user" in result.stderr


def test_a_source_changed_after_its_check_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plugin").mkdir()
    plugin = write_python_plugin(tmp_path / "plugin", "pass\n")
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere" / "data").mkdir(parents=True)
    mount = MountConfig(src=tmp_path / "a" / "data")
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin, mounts=(mount,)))
    assert sandbox.staged
    # A folder on the way becomes a symlink between the check and the start.
    (tmp_path / "a").rename(tmp_path / "old")
    (tmp_path / "a").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SandboxError) as info:
        sandbox.check()
    assert str(info.value) == (
        f"cannot sandbox the plugin: cannot show the binds: {tmp_path / 'a' / 'data'} now "
        f"leads to {tmp_path / 'elsewhere' / 'data'}"
    )
    # Gone altogether.
    (tmp_path / "a").unlink()
    with pytest.raises(SandboxError) as info:
        sandbox.check()
    assert str(info.value) == (
        f"cannot sandbox the plugin: cannot show the binds: {tmp_path / 'a' / 'data'}: "
        "No such file or directory"
    )


def test_user_namespace_refusal_is_named(tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    (tmp_path / "kernel").mkdir()
    (tmp_path / "user" / "max_user_namespaces").write_text("96369\n")
    assert sandbox_user.user_namespace_problem(tmp_path) is None
    (tmp_path / "kernel" / "unprivileged_userns_clone").write_text("0\n")
    problem = sandbox_user.user_namespace_problem(tmp_path)
    assert problem is not None
    assert problem.startswith(
        "the kernel refuses unprivileged user namespaces (kernel.unprivileged_userns_clone = 0)"
    )
    (tmp_path / "user" / "max_user_namespaces").write_text("0\n")
    problem = sandbox_user.user_namespace_problem(tmp_path)
    assert problem is not None and "(user.max_user_namespaces = 0)" in problem
    assert "[plugin] sandbox = false" in problem
    # This host allows them (the sandbox tests need it).
    assert sandbox_user.user_namespace_problem() is None


def test_a_vmsuper_user_is_preferred(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pwd.getpwnam

    def with_vmsuper(name: str) -> pwd.struct_passwd:
        if name == "vmsuper":
            return pwd.struct_passwd(("vmsuper", "x", 990, 990, "", "/nonexistent", ""))
        return real(name)

    monkeypatch.setattr(sandbox_user.pwd, "getpwnam", with_vmsuper)
    assert sandbox_user.plugin_user(None) == sandbox_user.PluginUser("vmsuper", 990, 990, True)
    assert sandbox_user.plugin_user("nobody").name == "nobody"


def test_default_and_refused_users() -> None:
    user = sandbox_user.plugin_user(None)
    assert user.switch and user.uid != 0 and user.gid != 0
    assert user.name in sandbox_user.DEFAULT_USERS
    with pytest.raises(sandbox_user.UserError, match="uid or gid 0"):
        sandbox_user.plugin_user("root")
    with pytest.raises(sandbox_user.UserError, match="no user 'no-such-user-vmsuper'"):
        sandbox_user.plugin_user("no-such-user-vmsuper")


# -- no broad host folder --------------------------------------------------------------------

LOOK_PROBE = """
import socket
R = RESULTS
def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return errno.errorcode[exc.errno]
def connect(path):
    try:
        socket.socket(socket.AF_UNIX).connect(path)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "connected"
for path in sys.argv[1:]:
    R[path] = connect(path) if path.endswith(".sock") else listing(path)
R["shadow"] = os.path.exists("/etc/shadow")
report()
"""


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("variable", "value"),
    [("PYTHONPATH", "/root"), ("LD_LIBRARY_PATH", "/usr/lib:/"), ("PYTHONPATH", "/etc")],
)
def test_search_paths_never_show_broad_folders(tmp_path: Path, variable: str, value: str) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(LOOK_PROBE))
    spec = VmSpec(sandbox=True, env={variable: value}, args=["/root", "/etc"])
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    broad = value.split(":")[-1]
    assert result.status == 125, result.stdout
    assert (
        f"vmsuper: cannot sandbox the plugin: {broad} (from {variable}) is too broad to show "
        "the plugin whole"
    ) in result.stderr
    assert "[[plugin.mounts]]" in result.stderr


@pytest.fixture
def plugin_in_tmp() -> Iterator[Path]:
    """A plugin placed right in /tmp, with a file of the host's beside it."""
    name = f"vmsuper-test-{uuid.uuid4().hex}"
    secret = Path("/tmp", f"{name}.secret")
    secret.write_text("host only")
    plugin = write_python_plugin(Path("/tmp"), plugin_source(LOOK_PROBE), name=f"{name}.py")
    yield plugin
    plugin.unlink()
    secret.unlink()


@pytest.mark.kvm
def test_a_plugin_in_tmp_does_not_show_tmp(tmp_path: Path, plugin_in_tmp: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(plugin_in_tmp, VmSpec(sandbox=True, args=["/tmp"]))
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    # The file alone, not its neighbours (and the project's own folder if it lives in /tmp).
    assert set(found["/tmp"]) == {plugin_in_tmp.name, *bound_below_tmp()}
    assert not found["shadow"]


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Listening unix sockets: one in a host folder outside the binds (open to all), one in the
    plugin's own folder (root's, as created)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "plugin").mkdir()
    paths = (outside / "service.sock", tmp_path / "plugin" / "service.sock")
    servers = []
    for path in paths:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen()
        servers.append(server)
    paths[0].chmod(0o777)
    yield paths
    for server in servers:
        server.close()


@pytest.mark.kvm
def test_host_unix_sockets_are_unreachable(tmp_path: Path, listening: tuple[Path, Path]) -> None:
    outside, beside = listening
    plugin = write_python_plugin(tmp_path / "plugin", plugin_source(LOOK_PROBE))
    spec = VmSpec(sandbox=True, args=[str(outside), str(beside)])
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found[str(outside)] == "ENOENT"  # not bound: not there
    assert found[str(beside)] == "EACCES"  # bound, but the socket is not the plugin user's


@pytest.mark.parametrize(
    "folder",
    [
        "/",
        "/tmp",
        "/etc",
        "/run",
        "/var",
        "/var/lib",
        "/opt",
        "/srv",
        "/proc",
        "/sys",
        "/dev",
        "/boot",
        "/home",
        "/root",
        "/home/someone",
        "/run/user/0",
        "/proc/1",
        "/dev/shm",
        "/usr",
    ],
)
def test_broad_folders(folder: str) -> None:
    assert too_broad(folder)


@pytest.mark.parametrize("folder", ["/tmp/x", "/opt/tool", "/etc/vmsuper", "/srv/vms/plugin"])
def test_folders_of_their_own_are_not_broad(folder: str) -> None:
    assert not too_broad(folder)


def test_pth_and_venv_entries_are_refused_when_broad(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    (site / "wide.pth").write_text("/etc\n")
    plugin = tmp_path / "plugin" / "p.py"
    plugin.parent.mkdir()
    plugin.write_text(f"#!{venv / 'bin' / 'python'}\n")
    plugin.chmod(0o755)
    expected = f"/etc (from a .pth file or editable install in {site}) is too broad"
    with pytest.raises(SandboxError, match=re.escape(expected)):
        Sandbox.for_plugin(PluginConfig(path=plugin), environ={}, bwrap="bwrap")


# -- other runs' logs --------------------------------------------------------------------------

LOG_PROBE = """
R = RESULTS
runs = sys.argv[1]
try:
    R["listing"] = sorted(os.listdir(runs))
except OSError as exc:
    R["listing"] = errno.errorcode[exc.errno]
try:
    R["read"] = open(sys.argv[2]).read()
except OSError as exc:
    R["read"] = errno.errorcode[exc.errno]
report()
"""


def run_in_folder(folder: Path, plugin: Path, args: list[str]) -> VmResult:
    """`vmsuper run` of a config beside the plugin, with the default log folder."""
    config = folder / "vm.toml"
    config.write_text(
        f'[plugin]\npath = "{plugin.name}"\nargs = {json.dumps(args)}\nsandbox = true\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmsuper", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    return finish(proc, config, folder / "runs", timeout=60)


@pytest.mark.kvm
def test_other_runs_logs_are_hidden_and_private(tmp_path: Path) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    first = write_python_plugin(tmp_path, f"import sys\nprint({secret!r}, file=sys.stderr)\n")
    assert run_in_folder(tmp_path, first, []).status == 0
    [earlier] = (tmp_path / "runs").iterdir()
    log = earlier / "supervisor.jsonl"
    assert secret in log.read_text()
    # Only its owner may enter or read a run's logs.
    assert earlier.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "runs").stat().st_mode & 0o777 == 0o700
    assert log.stat().st_mode & 0o777 == 0o600
    probe = write_python_plugin(tmp_path, plugin_source(LOG_PROBE), name="probe.py")
    result = run_in_folder(tmp_path, probe, [str(tmp_path / "runs"), str(log)])
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["listing"] == []  # an empty tmpfs over the log root
    assert found["read"] == "ENOENT"

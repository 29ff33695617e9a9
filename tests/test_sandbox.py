"""The plugin sandbox: the bwrap command line, the seccomp filter, and real sandboxed VMs.

The first half checks what `Sandbox.for_plugin` binds for scripts, venvs, editable installs and
user mounts, and how set-up failures are reported. The second half runs real plugins (Python on
the SDK, Python on the raw wire, and a native C program) under real bwrap and real KVM and
checks, from inside and from the host, every promise docs/security.md makes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import resource
import signal
import socket
import subprocess
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import test_lifecycle as lifecycle
import test_main_requests as main_requests
from bpf_vm import run_filter, well_formed
from hostcaps import bound_below_tmp
from rawplugin import plugin_source

from vmsuper.shared import bpf, kvm, plugin_pb2, prctl
from vmsuper.shared.asm import assemble
from vmsuper.supervisor import seccomp
from vmsuper.supervisor.config import MountConfig, PluginConfig
from vmsuper.supervisor.plugin_process import PluginProcess, PluginStartError, unwrap_status
from vmsuper.supervisor.sandbox import (
    NAMESPACES,
    Bind,
    Sandbox,
    SandboxError,
    script_interpreters,
)
from vmsuper.supervisor.sandbox_user import STAGE, plugin_user
from vmsuper.testing import SANDBOX_VARIABLE, VmRunner, VmSpec, finish, write_python_plugin

UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def executable(path: Path, text: str = "#!/bin/sh\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def option_values(argv: list[str], option: str) -> list[tuple[str, ...]]:
    """The operands of every occurrence of `option` (two for binds, one for the rest)."""
    width = 2 if "bind" in option or option == "--symlink" else 1
    return [tuple(argv[i + 1 : i + 1 + width]) for i, a in enumerate(argv) if a == option]


def host_binds(sandbox: Sandbox, option: str) -> list[tuple[str, ...]]:
    """`option_values` of the sandbox's command line, a staged source shown as its host path."""
    sources = sandbox.sources()
    found: list[tuple[str, ...]] = []
    for src, dst in option_values(sandbox.argv(None), option):
        if sandbox.staged and src.startswith(STAGE + "/"):
            src = sources[int(src.removeprefix(STAGE + "/"))]
        found.append((src, dst))
    return found


def open_to_the_plugin_user(folder: Path) -> None:
    """Make `folder` the sandboxed plugin's, for a writable mount."""
    user = plugin_user(None)
    os.chown(folder, user.uid, user.gid)


# -- the command line ----------------------------------------------------------------------------


def test_command_line_unshares_everything_and_shows_no_host_devices(tmp_path: Path) -> None:
    plugin = executable(tmp_path / "plugin" / "p.sh")
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin), environ={"PATH": "/usr/bin"})
    argv = sandbox.argv(7)
    assert argv[0] == sandbox.bwrap and argv[-1] == "--"
    for flag in (*NAMESPACES, "--unshare-net", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert option_values(argv, "--cap-drop") == [("ALL",)]
    assert option_values(argv, "--seccomp") == [("7",)]
    assert option_values(argv, "--dev") == [("/dev",)]
    assert option_values(argv, "--proc") == [("/proc",)]
    assert option_values(argv, "--tmpfs") == [("/tmp",)]
    assert argv[-5:-3] == ["--remount-ro", "/"]  # after every bind
    assert "--dev-bind" not in argv and "--bind" not in argv  # nothing writable by default
    assert not [a for a in argv if a.startswith("/dev/")]
    ro = host_binds(sandbox, "--ro-bind")
    assert ("/usr", "/usr") in ro
    assert (str(plugin.parent), str(plugin.parent)) in ro
    # Kernel knobs read-only, over the sandbox's own /proc.
    ro_try = option_values(argv, "--ro-bind-try")
    for knob in ("/proc/sys", "/proc/sysrq-trigger"):
        assert (knob, knob) in ro_try
        assert argv.index(knob) > argv.index("--proc")
    # The plugin's folder is under /tmp here: it must be bound after the private /tmp exists.
    assert argv.index(str(plugin.parent)) > argv.index("--tmpfs")
    assert sandbox.executables == (str(plugin), "/bin/sh")
    assert "--seccomp" not in sandbox.argv(None)


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A base installation and a venv on it, with a .pth path and an editable finder."""
    base = tmp_path / "base"
    real = executable(base / "bin" / "python3.11", "")
    (base / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(real)
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\ninclude-system-site-packages = 0\n")
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    for folder in ("extra", "src/pkg", "src/other", "pythonpath"):
        (tmp_path / folder).mkdir(parents=True)
    (site / "extra.pth").write_text(
        f"# a comment\n{tmp_path / 'extra'}\n{tmp_path / 'missing'}\nimport os\n"
    )
    (site / "__editable___pkg_0_1_finder.py").write_text(
        "from pathlib import Path\n"
        f"MAPPING: dict[str, str] = {{'pkg': {str(tmp_path / 'src/pkg')!r}, "
        f"'pkg.other': {str(tmp_path / 'src/other')!r}}}\n"
        "NAMESPACES: dict[str, list[str]] = {}\n"
    )
    return base, venv


@pytest.mark.parametrize("shebang", ["#!/usr/bin/env python", "#!{venv}/bin/python -u"])
def test_python_script_gets_interpreter_venv_and_sources(tmp_path: Path, shebang: str) -> None:
    base, venv = fake_python(tmp_path)
    plugin = executable(tmp_path / "plugin" / "p.py", shebang.format(venv=venv) + "\n")
    environ = {"PATH": f"{venv / 'bin'}:/usr/bin", "PYTHONPATH": str(tmp_path / "pythonpath")}
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin), environ=environ, bwrap="bwrap")
    want = {
        str(p)
        for p in (
            plugin.parent,
            venv,
            base,
            tmp_path / "extra",
            tmp_path / "src/pkg",
            tmp_path / "src/other",
            tmp_path / "pythonpath",
        )
    }
    assert {b.dst for b in sandbox.binds} == want
    assert all(b.src == b.dst and not b.writable for b in sandbox.binds)
    assert sandbox.executables[0] == str(plugin)
    assert sandbox.executables[-1] == str(venv / "bin" / "python")


def test_shebang_forms(tmp_path: Path) -> None:
    tool = executable(tmp_path / "bin" / "mytool", "\x7fELF")  # a binary: the chain ends there
    env = {"PATH": str(tmp_path / "bin")}
    cases = {
        "#!/bin/sh -e\n": ["/bin/sh"],
        "#! /bin/sh\n": ["/bin/sh"],
        "#!/usr/bin/env -S mytool -u\n": ["/usr/bin/env", str(tool)],
        "#!/usr/bin/env FOO=1 mytool\n": ["/usr/bin/env", str(tool)],
        "#!/usr/bin/env ghost\n": ["/usr/bin/env"],
        "\x7fELF\x02\x01\x01": [],
        "": [],
    }
    for text, want in cases.items():
        script = executable(tmp_path / "script", text)
        assert script_interpreters(str(script), env) == want, text
    inner = executable(tmp_path / "inner", "#!/bin/sh\n")
    outer = executable(tmp_path / "outer", f"#!{inner}\n")
    assert script_interpreters(str(outer), env) == [str(inner), "/bin/sh"]


def test_home_and_root_folders_are_never_bound_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    tool = executable(home / "bin" / "tool")  # its prefix would be the home folder
    plugin = executable(home / "plugin", f"#!{tool}\n")
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin), environ={}, bwrap="bwrap")
    assert sorted(b.dst for b in sandbox.binds) == [str(tool), str(plugin)]


def test_user_mounts_follow_derived_binds_and_replace_them(tmp_path: Path) -> None:
    plugin = executable(tmp_path / "plugin" / "p.sh")
    data = tmp_path / "data"
    mounts = (
        MountConfig(src=data, dst=Path("/srv/data/deep"), writable=True),
        MountConfig(src=data, dst=Path("/srv")),
        MountConfig(src=plugin.parent, dst=plugin.parent, writable=True),
    )
    config = PluginConfig(path=plugin, mounts=mounts)
    sandbox = Sandbox.for_plugin(config, environ={}, bwrap="bwrap")
    assert sandbox.binds == (
        Bind(str(data), "/srv"),
        Bind(str(data), "/srv/data/deep", writable=True),
        Bind(str(plugin.parent), str(plugin.parent), writable=True),
    )
    assert host_binds(sandbox, "--bind") == [
        (str(data), "/srv/data/deep"),
        (str(plugin.parent), str(plugin.parent)),
    ]


def test_missing_bwrap_is_a_start_error_that_says_what_to_do(tmp_path: Path) -> None:
    plugin = executable(tmp_path / "p.sh")
    with pytest.raises(SandboxError) as info:
        Sandbox.for_plugin(PluginConfig(path=plugin), environ={"PATH": str(tmp_path / "empty")})
    assert isinstance(info.value, PluginStartError)
    message = str(info.value)
    assert message.startswith("cannot sandbox the plugin: bwrap (bubblewrap) is not installed")
    assert "[plugin] sandbox = false" in message


def test_check_passes_for_a_visible_plugin(tmp_path: Path) -> None:
    plugin = executable(tmp_path / "plugin" / "p.sh")
    Sandbox.for_plugin(PluginConfig(path=plugin)).check()


def test_check_names_a_plugin_the_sandbox_does_not_show(tmp_path: Path) -> None:
    plugin = executable(tmp_path / "p.sh")
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin))
    hidden = Sandbox(sandbox.bwrap, binds=(), executables=(str(plugin),))
    with pytest.raises(SandboxError, match=f"{plugin} is not executable inside the sandbox"):
        hidden.check()


def test_check_reports_what_bwrap_cannot_do(tmp_path: Path) -> None:
    plugin = executable(tmp_path / "plugin" / "p.sh")
    # /usr is read-only inside, so bwrap cannot make a mount point there.
    mount = MountConfig(src=tmp_path, dst=Path(f"/usr/vmsuper-test-{uuid.uuid4().hex}"))
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin, mounts=(mount,)))
    with pytest.raises(SandboxError) as info:
        sandbox.check()
    assert str(info.value).startswith("cannot sandbox the plugin: bwrap cannot set up the sandbox")
    assert str(mount.dst) in str(info.value)


# -- starting the plugin in the sandbox -----------------------------------------------------------


READY_LINE = b"vmsuper: sandbox ready\n"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


def never_reaped() -> int:
    raise AssertionError("reaped a sandbox that has not ended")


def test_wait_started_takes_only_the_starter_s_line(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, READY_LINE + b"the plugin's own output\n")
    Sandbox("bwrap", (), ()).wait_started(read_end, never_reaped)
    assert os.read(read_end, 100) == b"the plugin's own output\n"


def test_wait_started_passes_on_what_comes_before_the_line(
    pipe: tuple[int, int], capfd: pytest.CaptureFixture[str]
) -> None:
    read_end, write_end = pipe
    # The first read (as long as the line) ends inside the line: the rest must not overshoot.
    os.write(write_end, b"bwrap: a warning\n" + READY_LINE + b"plugin")
    Sandbox("bwrap", (), ()).wait_started(read_end, never_reaped)
    assert os.read(read_end, 100) == b"plugin"
    assert capfd.readouterr().err == "bwrap: a warning\n"


def test_wait_started_gives_up_after_the_timeout(pipe: tuple[int, int]) -> None:
    with pytest.raises(SandboxError, match=re.escape("did not start in 0.05 s")):
        Sandbox("bwrap", (), ()).wait_started(pipe[0], never_reaped, timeout=0.05)


def test_wait_started_reports_bwrap_s_complaint_or_its_status(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, b"bwrap: Can't mkdir /x: Read-only file system\n")
    os.close(write_end)
    with pytest.raises(SandboxError) as info:
        Sandbox("bwrap", (), ()).wait_started(read_end, lambda: 1)
    assert str(info.value) == (
        "cannot sandbox the plugin: bwrap cannot set up the sandbox: "
        "bwrap: Can't mkdir /x: Read-only file system"
    )
    silent_read, silent_write = os.pipe()
    os.close(silent_write)
    try:
        with pytest.raises(SandboxError, match=r"bwrap cannot set up the sandbox: status 5$"):
            Sandbox("bwrap", (), ()).wait_started(silent_read, lambda: 5)
    finally:
        os.close(silent_read)


def spawn_sandboxed(sandbox: Sandbox, plugin: Path) -> PluginProcess:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        return PluginProcess.spawn(plugin, ["an arg"], {}, theirs.fileno(), sandbox=sandbox)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_spawn_starts_the_plugin_with_its_stderr_untouched(tmp_path: Path) -> None:
    out = tmp_path / "plugin" / "out.txt"
    plugin = executable(
        tmp_path / "plugin" / "p.sh",
        f'#!/bin/sh\necho "$0 $*" >&2\necho "$CROSVM_SOCKET" > {out}\n',
    )
    open_to_the_plugin_user(out.parent)
    sandbox = Sandbox.for_plugin(
        PluginConfig(path=plugin, mounts=(MountConfig(src=out.parent, writable=True),))
    )
    process = spawn_sandboxed(sandbox, plugin)
    try:
        assert os.waitstatus_to_exitcode(process.wait()) == 0
        assert read_all(process.stderr_fd) == f"{plugin} an arg\n".encode()
    finally:
        process.close()
    assert out.read_text().strip().isdigit()


def is_subreaper() -> bool:
    flag = ctypes.c_int()
    prctl.prctl(prctl.PR_GET_CHILD_SUBREAPER, ctypes.byref(flag))
    return bool(flag.value)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_the_sandboxed_plugin_s_cpu_time_and_its_namespace_init_are_reaped_here(
    tmp_path: Path,
) -> None:
    # bwrap exits without waiting for its namespace's init, which reaped the plugin: unless
    # the spawner adopts and reaps that init, the plugin's CPU time is nobody's it knows of.
    plugin = executable(
        tmp_path / "plugin" / "p.sh",
        "#!/bin/sh\ni=0\nwhile [ $i -lt 300000 ]; do i=$((i+1)); done\ntimes >&2\n",
    )
    sandbox = Sandbox.for_plugin(PluginConfig(path=plugin))
    assert not is_subreaper()
    children_before = psutil.Process().children()
    cpu_before = children_cpu_s()
    process = spawn_sandboxed(sandbox, plugin)
    try:
        assert is_subreaper()  # while the plugin runs
        assert os.waitstatus_to_exitcode(process.wait()) == 0
        # `times`: the shell's own user and system time, then its children's ("0m0.25s 0m0.01s").
        own = read_all(process.stderr_fd).decode().splitlines()[0].split()
    finally:
        process.close()
    plugin_cpu = sum(int(t.split("m")[0]) * 60 + float(t.split("m")[1][:-1]) for t in own)
    assert plugin_cpu > 0.1
    # (bwrap alone takes a few ms: without the init reaped here, the growth is near 0.)
    assert children_cpu_s() - cpu_before >= plugin_cpu - 0.02  # `times` rounds to 10 ms
    assert psutil.Process().children() == children_before  # the init too, zombie or not
    assert not is_subreaper()


@pytest.mark.parametrize("cause", ["hidden plugin", "bwrap fails"])
def test_spawn_refuses_a_sandbox_that_cannot_start(tmp_path: Path, cause: str) -> None:
    ran = tmp_path / "ran"
    plugin = executable(tmp_path / "plugin" / "p.sh", f"#!/bin/sh\ntouch {ran}\n")
    sandbox = Sandbox.for_plugin(
        PluginConfig(path=plugin, mounts=(MountConfig(src=tmp_path, writable=True),))
    )
    if cause == "hidden plugin":
        sandbox = Sandbox(sandbox.bwrap, binds=(), executables=(str(plugin),))
        expected = f"{plugin} is not executable inside the sandbox"
    else:
        mount = Bind(str(tmp_path), f"/usr/vmsuper-test-{uuid.uuid4().hex}")
        sandbox = Sandbox(sandbox.bwrap, (*sandbox.binds, mount), sandbox.executables)
        expected = "bwrap cannot set up the sandbox: bwrap: Can't mkdir"
    children_before = psutil.Process().children()
    with pytest.raises(SandboxError, match=re.escape(expected)):
        spawn_sandboxed(sandbox, plugin)
    assert not ran.exists()
    assert psutil.Process().children() == children_before  # reaped, nothing left


@pytest.mark.parametrize(
    ("raw", "seen"),
    [
        (3 << 8, 3 << 8),  # exit(3) passes through
        (0, 0),
        (137 << 8, signal.SIGKILL),  # bwrap's "child killed by SIGKILL"
        (139 << 8, signal.SIGSEGV),
        (128 << 8, 128 << 8),  # 128 itself is no signal
        (255 << 8, 255 << 8),  # beyond any signal number
        (signal.SIGKILL, signal.SIGKILL),  # bwrap itself killed
    ],
)
def test_unwrap_status(raw: int, seen: int) -> None:
    assert unwrap_status(raw) == seen


# -- the seccomp filter --------------------------------------------------------------------------


def test_syscall_numbers_match_the_kernel_headers() -> None:
    header = dict(
        (m[1], int(m[2])) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", UNISTD.read_text())
    )
    ours = {
        **seccomp.ALLOWED,
        **seccomp.DENIED,
        "ioctl": seccomp.NR_IOCTL,
        "socket": seccomp.NR_SOCKET,
        "socketpair": seccomp.NR_SOCKETPAIR,
        "clone": seccomp.NR_CLONE,
        "unshare": seccomp.NR_UNSHARE,
        "clone3": seccomp.NR_CLONE3,
    }
    checked = {name: nr for name, nr in ours.items() if name in header}
    assert len(checked) >= len(ours) - 5, "the header is too old to check most numbers"
    assert checked == {name: header[name] for name in checked}


def test_allowed_denied_and_special_calls_do_not_overlap() -> None:
    special = {
        seccomp.NR_IOCTL,
        seccomp.NR_SOCKET,
        seccomp.NR_SOCKETPAIR,
        seccomp.NR_CLONE,
        seccomp.NR_UNSHARE,
        seccomp.NR_CLONE3,
    }
    allowed, denied = set(seccomp.ALLOWED.values()), set(seccomp.DENIED.values())
    assert len(allowed) == len(seccomp.ALLOWED) and len(denied) == len(seccomp.DENIED)
    assert not allowed & denied and not (allowed | denied) & special


def test_filter_is_well_formed() -> None:
    well_formed(seccomp.build_filter())


ALLOW = seccomp.SECCOMP_RET_ALLOW


def refused(err: int) -> int:
    return seccomp.SECCOMP_RET_ERRNO | err


@pytest.fixture(scope="module")
def program() -> bytes:
    return seccomp.build_filter()


def test_every_system_call_number_gets_its_listed_verdict(program: bytes) -> None:
    plain = {**dict.fromkeys(seccomp.ALLOWED.values(), ALLOW)}
    plain.update(dict.fromkeys(seccomp.DENIED.values(), refused(errno.EPERM)))
    special = {seccomp.NR_IOCTL, seccomp.NR_SOCKET, seccomp.NR_SOCKETPAIR}
    special |= {seccomp.NR_CLONE, seccomp.NR_UNSHARE}
    for nr in range(1024):
        if nr in special:
            continue
        want = plain.get(nr, refused(errno.ENOSYS))
        assert run_filter(program, nr) == want, nr
    assert run_filter(program, seccomp.NR_CLONE3) == refused(errno.ENOSYS)
    for name in ("read", "write", "mmap", "futex", "execve", "exit_group", "sendmsg", "recvmsg"):
        assert run_filter(program, seccomp.ALLOWED[name]) == ALLOW
    for high in (bpf.X32_SYSCALL_BIT | 0, bpf.X32_SYSCALL_BIT | 1, 0xFFFFFFFF):
        assert run_filter(program, high - (1 << 32) if high >= 1 << 31 else high) == refused(
            errno.ENOSYS
        )
    # A 32-bit entry point (int 0x80: i386 numbers) is refused whatever the number.
    assert run_filter(program, 0, arch=0x40000003) == refused(errno.ENOSYS)


AF_PACKET, AF_BLUETOOTH, AF_ALG, AF_VSOCK = 17, 31, 38, 40
NETLINK_AUDIT = 9


@pytest.mark.parametrize("nr", [seccomp.NR_SOCKET, seccomp.NR_SOCKETPAIR])
def test_socket_families_are_an_allowlist(program: bytes, nr: int) -> None:
    for family in (seccomp.AF_UNIX, seccomp.AF_INET, seccomp.AF_INET6):
        assert run_filter(program, nr, (family, socket.SOCK_STREAM, 0)) == ALLOW
        # The family is an int: the kernel ignores the high half, and so does the filter.
        assert run_filter(program, nr, (family | 0x1_0000_0000, 1, 0)) == ALLOW
    assert run_filter(program, nr, (seccomp.AF_NETLINK, 3, seccomp.NETLINK_ROUTE)) == ALLOW
    assert run_filter(program, nr, (seccomp.AF_NETLINK, 3, NETLINK_AUDIT)) == refused(
        errno.EPROTONOSUPPORT
    )
    for family in (0, AF_PACKET, AF_BLUETOOTH, AF_ALG, AF_VSOCK, 45, 46, 0xFFFF):
        assert run_filter(program, nr, (family, 1, 0)) == refused(errno.EAFNOSUPPORT), family


def test_argument_rules_of_clone_unshare_and_ioctl(program: bytes) -> None:
    thread_flags = 0x3D0F00  # what the C library passes for a thread
    assert run_filter(program, seccomp.NR_CLONE, (thread_flags,)) == ALLOW
    assert run_filter(program, seccomp.NR_CLONE, (0x10000000 | 17,)) == refused(errno.EPERM)
    assert run_filter(program, seccomp.NR_UNSHARE, (0x400,)) == ALLOW  # CLONE_FILES
    for flag in (0x10000000, seccomp.CLONE_NEWTIME):
        assert run_filter(program, seccomp.NR_UNSHARE, (flag,)) == refused(errno.EPERM)
    assert run_filter(program, seccomp.NR_IOCTL, (1, 0x5401)) == ALLOW  # TCGETS
    for request in (seccomp.TIOCSTI, seccomp.TIOCLINUX):
        assert run_filter(program, seccomp.NR_IOCTL, (1, request)) == refused(errno.EPERM)


# -- real sandboxed runs -------------------------------------------------------------------------

PROBE = """
import ctypes, socket, threading, termios
port, secret, marker, ro_dir, rw_dir = sys.argv[1:6]
libc = ctypes.CDLL(None, use_errno=True)
R = RESULTS

def errno_name(call):
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"

def syscall_errno(*args):
    ctypes.set_errno(0)
    libc.syscall(*args)
    return errno.errorcode.get(ctypes.get_errno(), "ok")

def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()

R["dev"] = sorted(os.listdir("/dev"))
R["kvm"] = os.path.exists("/dev/kvm")
R["tun"] = os.path.exists("/dev/net/tun")
R["interfaces"] = [name for _, name in socket.if_nameindex()]
R["connect"] = errno_name(lambda: socket.create_connection(("127.0.0.1", int(port)), 5))
with open(f"/tmp/{marker}", "w") as f:
    f.write("inside")
R["tmp"] = os.listdir("/tmp")
R["pid"], R["ppid"], R["sid"] = os.getpid(), os.getppid(), os.getsid(0)
R["own_folder"] = errno_name(lambda: open(os.path.join(sys.path[0], "new.txt"), "w"))
R["root"] = errno_name(lambda: os.mkdir("/new"))
R["secret"] = os.path.exists(secret)
R["shadow"] = os.path.exists("/etc/shadow")
R["ro_read"] = open(os.path.join(ro_dir, "hello.txt")).read()
R["ro_write"] = errno_name(lambda: open(os.path.join(ro_dir, "new.txt"), "w"))
with open(os.path.join(rw_dir, "out.txt"), "w") as f:
    f.write("written inside")
R["capabilities"] = status_field("CapEff")
R["seccomp"] = status_field("Seccomp")
R["no_new_privs"] = status_field("NoNewPrivs")
R["unshare_user"] = syscall_errno(272, 0x10000000)
R["unshare_files"] = syscall_errno(272, 0x400)
R["keyctl"] = syscall_errno(250, 0, 0)
R["clone3"] = syscall_errno(435, 0, 0)
R["tiocsti"] = errno_name(lambda: fcntl.ioctl(1, termios.TIOCSTI, b"x"))
R["families"] = {
    name: errno_name(lambda: socket.socket(family, kind, proto).close())
    for name, family, kind, proto in [
        ("vsock", 40, socket.SOCK_STREAM, 0),
        ("packet", 17, socket.SOCK_DGRAM, 0),
        ("bluetooth", 31, socket.SOCK_STREAM, 0),
        ("alg", 38, socket.SOCK_SEQPACKET, 0),
        ("netlink_audit", 16, socket.SOCK_RAW, 9),
        ("netlink_route", 16, socket.SOCK_RAW, 0),
    ]
}
R["vsock_pair"] = errno_name(lambda: socket.socketpair(40, socket.SOCK_STREAM))

def loopback(family, host):
    with socket.create_server((host, 0), family=family) as server:
        with socket.create_connection(server.getsockname()[:2], 5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                return peer.recv(4).decode()

R["inet"] = loopback(socket.AF_INET, "127.0.0.1")
R["inet6"] = loopback(socket.AF_INET6, "::1")
left, right = socket.socketpair()
with left, right:
    left.sendall(b"unix")
    R["unix"] = right.recv(4).decode()
R["addrinfo"] = sorted({a[4][0] for a in socket.getaddrinfo(
    "localhost", 80, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)})
worked = []
thread = threading.Thread(target=lambda: worked.append(True))
thread.start()
thread.join()
R["thread"] = worked == [True]
R["check_extension"] = errno_of(
    req(check_extension=pb.MainRequest.CheckExtension(extension=3)))
fds = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
R["fds"] = sorted(fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}"))  # not listdir's
R["socket_fd"] = MAIN.fileno()
report()
"""


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on the host's loopback that accepts connections."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.mark.kvm
def test_the_plugin_sees_only_its_sandbox(tmp_path: Path, listener: int) -> None:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    plugin = write_python_plugin(plugin_dir, plugin_source(PROBE), name="probe.py")
    secret = tmp_path / "secret.txt"
    secret.write_text("host only")
    ro_dir, rw_dir = tmp_path / "ro", tmp_path / "rw"
    ro_dir.mkdir()
    rw_dir.mkdir()
    open_to_the_plugin_user(rw_dir)
    (ro_dir / "hello.txt").write_text("read me")
    marker = f"vmsuper-sandbox-{uuid.uuid4().hex}"
    spec = VmSpec(
        sandbox=True,
        args=[str(listener), str(secret), marker, "/data/ro", str(rw_dir)],
        mounts=[(ro_dir, "/data/ro", False), (rw_dir, None, True)],
    )
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert not found["kvm"] and not found["tun"]
    assert set(found["dev"]) <= {
        *("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm"),
        *("fd", "stdin", "stdout", "stderr", "core", "console"),
    }
    assert found["interfaces"] == ["lo"]
    assert found["connect"] == "ECONNREFUSED"  # the host's listener is not reachable
    # Only the marker, and the first folder of the binds below /tmp (the plugin's, the mounts').
    # (The project's sources and venv are bound too: when they live below /tmp, so does theirs.)
    assert set(found["tmp"]) == {marker, *bound_below_tmp(tmp_path)}
    assert not Path("/tmp", marker).exists()
    assert found["ppid"] == 1 and found["pid"] < 10  # a pid namespace of its own
    # A session led inside the namespace (one led outside reads as 0): no controlling terminal.
    assert found["sid"] in (1, found["pid"])
    assert found["own_folder"] == "EROFS" and found["root"] == "EROFS"
    assert not found["secret"] and not found["shadow"]
    assert found["ro_read"] == "read me" and found["ro_write"] == "EROFS"
    assert (rw_dir / "out.txt").read_text() == "written inside"
    assert found["capabilities"] == "0000000000000000"
    assert found["seccomp"] == "2" and found["no_new_privs"] == "1"
    assert found["unshare_user"] == "EPERM" and found["unshare_files"] == "ok"
    assert found["keyctl"] == "EPERM" and found["tiocsti"] == "EPERM"
    assert found["clone3"] == "ENOSYS" and found["thread"]
    assert found["families"] == {
        **dict.fromkeys(("vsock", "packet", "bluetooth", "alg"), "EAFNOSUPPORT"),
        "netlink_audit": "EPROTONOSUPPORT",
        "netlink_route": "ok",
    }
    assert found["vsock_pair"] == "EAFNOSUPPORT"
    assert found["inet"] == found["inet6"] == "ping" and found["unix"] == "unix"
    assert "127.0.0.1" in found["addrinfo"]
    assert found["check_extension"] == 0
    assert found["fds"] == [found["socket_fd"]]


SDK_GUEST = """
        mov     $0x80, %dx
        mov     $42, %al
        out     %al, %dx
        in      %dx, %al
        out     %al, %dx
halt:   cli
        hlt
        jmp     halt
"""

SDK_PLUGIN = """
import json, os, sys, threading
from vmsuper.plugin import Connection, Init, Io, Space
from vmsuper.shared import kvm

LOAD = 0x1000
conn = Connection.from_env()
memory = conn.create_memory(0, 0x10000)
code = open(sys.argv[1], "rb").read()
memory.mmap[LOAD:LOAD + len(code)] = code
conn.reserve_range(Space.IOPORT, 0x80, 1)
[vcpu] = conn.get_vcpus()
seen = []
done = threading.Event()

def serve():
    while True:
        event = vcpu.wait()
        if isinstance(event, Init):
            sregs = vcpu.get_sregs()
            for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
                seg.base = 0
                seg.selector = 0
            vcpu.set_sregs(sregs)
            vcpu.set_regs(kvm.kvm_regs(rip=LOAD, rsp=0x8000, rflags=2))
            vcpu.resume()
        elif isinstance(event, Io) and event.is_write:
            seen.append(event.data[0])
            vcpu.resume()
            if len(seen) == 2:
                done.set()
                return
        elif isinstance(event, Io):
            vcpu.resume(bytes([7]))
        else:
            vcpu.resume()

threading.Thread(target=serve, daemon=True).start()
conn.start()
finished = done.wait(30)
print(json.dumps({"seen": seen, "pid": os.getpid(), "ppid": os.getppid()}), flush=True)
sys.exit(0 if finished else 1)
"""


@pytest.mark.kvm
@pytest.mark.parametrize("transport", ["socket", "pipes"])
def test_sdk_plugin_runs_a_guest_sandboxed(tmp_path: Path, transport: str) -> None:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    guest = plugin_dir / "guest.bin"
    guest.write_bytes(assemble(SDK_GUEST, origin=0x1000))
    plugin = write_python_plugin(plugin_dir, SDK_PLUGIN)
    spec = VmSpec(sandbox=True, transport=transport, args=[str(guest)])
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["seen"] == [42, 7]  # the guest wrote 42, read 7 and wrote it back
    assert found["ppid"] == 1 and found["pid"] < 10
    assert "vcpus_started" in result.events()


NATIVE_PLUGIN = r"""
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static const unsigned char request[] = { REQUEST };

static void *thread_body(void *arg) { return arg; }

/* What the seccomp filter lets a C program do: errno of socket() per family, and a thread. */
static void probe(void) {
    static const int families[] = { AF_UNIX, AF_INET, AF_INET6, 40 /* AF_VSOCK */, AF_PACKET };
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
        int fd = socket(families[i], SOCK_STREAM, 0);
        printf("%d:%d ", families[i], fd < 0 ? errno : 0);
        if (fd >= 0)
            close(fd);
    }
    pthread_t thread;
    void *out = NULL;
    int ok = pthread_create(&thread, NULL, thread_body, &thread) == 0
        && pthread_join(thread, &out) == 0 && out == &thread;
    printf("thread:%d\n", ok);
}

int main(int argc, char **argv) {
    const char *fd_text = getenv("CROSVM_SOCKET");
    if (fd_text == NULL)
        return 10;
    int fd = atoi(fd_text);
    if (send(fd, request, sizeof request, 0) != (ssize_t)sizeof request)
        return 11;
    unsigned char response[4096];
    ssize_t n = recv(fd, response, sizeof response, 0);
    if (n < 0)
        return 12;
    for (ssize_t i = 0; i < n; i++)
        printf("%02x", response[i]);
    printf("\n");
    if (argc > 1 && strcmp(argv[1], "probe") == 0)
        probe();
    fflush(stdout);
    if (argc > 1 && strncmp(argv[1], "signal:", 7) == 0)
        raise(atoi(argv[1] + 7));
    if (argc > 1 && strncmp(argv[1], "exit:", 5) == 0)
        return atoi(argv[1] + 5);
    return 0;
}
"""


@pytest.fixture(scope="module")
def native_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A C plugin that sends one CheckExtension, prints the answer in hex, then ends as told."""
    request = plugin_pb2.MainRequest(
        check_extension=plugin_pb2.MainRequest.CheckExtension(extension=kvm.KVM_CAP_USER_MEMORY)
    ).SerializeToString()
    folder = tmp_path_factory.mktemp("native")
    folder.chmod(0o755)  # for the sandboxed plugin's unprivileged user
    source = folder / "plugin.c"
    source.write_text(NATIVE_PLUGIN.replace("REQUEST", ", ".join(str(b) for b in request)))
    binary = folder / "plugin"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    return binary


def check_extension_answer(stdout: str) -> plugin_pb2.MainResponse:
    response = plugin_pb2.MainResponse.FromString(bytes.fromhex(stdout.splitlines()[0]))
    assert response.WhichOneof("message") == "check_extension"
    return response


@pytest.mark.kvm
def test_native_plugin_talks_through_the_sandbox(tmp_path: Path, native_plugin: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(native_plugin, VmSpec(sandbox=True))
    assert result.status == 0, result.stderr
    response = check_extension_answer(result.stdout)
    assert response.errno == 0 and response.check_extension.has_extension


@pytest.mark.kvm
def test_native_plugin_runs_under_the_filter(tmp_path: Path, native_plugin: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(native_plugin, VmSpec(sandbox=True, args=["probe"]))
    assert result.status == 0, result.stderr
    check_extension_answer(result.stdout)
    allowed = {f"{family}:0" for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)}
    refused = {f"{family}:{errno.EAFNOSUPPORT}" for family in (AF_VSOCK, AF_PACKET)}
    # pthread_create tries clone3 first, gets ENOSYS, and falls back to clone.
    assert set(result.stdout.splitlines()[1].split()) == allowed | refused | {"thread:1"}


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("how", "status", "outcome"),
    [
        ("exit:3", 3, "plugin exited with status 3"),
        ("signal:9", 128 + 9, "plugin killed by SIGKILL"),
        ("signal:11", 128 + 11, "plugin killed by SIGSEGV"),
    ],
)
def test_exit_statuses_pass_through_the_sandbox(
    tmp_path: Path, native_plugin: Path, how: str, status: int, outcome: str
) -> None:
    result = VmRunner(tmp_path / "runs").run(native_plugin, VmSpec(sandbox=True, args=[how]))
    assert result.status == status, result.stderr
    check_extension_answer(result.stdout)  # it really ran in the sandbox and talked first
    exited = [r for r in result.records() if r["event"] == "plugin_exited"]
    assert [r["outcome"] for r in exited] == [outcome]


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.kvm
def test_grace_period_kill_leaves_no_sandboxed_process(tmp_path: Path) -> None:
    body = """
    print(json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        time.sleep(1)
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    spec = VmSpec(sandbox=True, grace_period=0.3)
    proc, config, logs = VmRunner(tmp_path / "runs").start(plugin, spec)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    tree = psutil.Process(proc.pid).children(recursive=True)
    names = [p.name() for p in tree]
    assert names.count("bwrap") == 2 and len(tree) == 3  # bwrap, its pid-1 init, the plugin
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, config, logs, timeout=30)
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert "plugin_killed" in result.events()
    # vmsuper waits for the pid namespace to empty before it exits: nothing is left, at once.
    assert alive([p.pid for p in tree]) == []


@pytest.mark.kvm
def test_missing_mount_source_is_a_config_error(tmp_path: Path) -> None:
    plugin = write_python_plugin(tmp_path, "import sys\n")
    spec = VmSpec(sandbox=True, mounts=[(tmp_path / "nowhere", None, False)])
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 2
    assert f"[plugin] mounts[0].src: {tmp_path / 'nowhere'} does not exist" in result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("cause", ["no bwrap", "bwrap fails"])
def test_unavailable_sandbox_refuses_to_run_the_plugin(tmp_path: Path, cause: str) -> None:
    ran = tmp_path / "ran"
    plugin = write_python_plugin(tmp_path, f"open({str(ran)!r}, 'w')\n")
    if cause == "no bwrap":
        spec = VmSpec(sandbox=True, env={"PATH": str(tmp_path / "empty")})
        expected = "bwrap (bubblewrap) is not installed"
    else:
        spec = VmSpec(sandbox=True, mounts=[(tmp_path, f"/usr/vmsuper-{uuid.uuid4().hex}", False)])
        expected = "bwrap cannot set up the sandbox: bwrap: Can't mkdir"
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 125
    assert f"vmsuper: cannot sandbox the plugin: {expected}" in result.stderr
    # Found before structlog is imported, logged after the run's first record (launch.py).
    assert result.events()[:2] == ["run_started", "plugin_start_failed"]
    assert not ran.exists()


# -- other suites' end-to-end tests, sandboxed -------------------------------------------------


@pytest.fixture
def sandboxed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every VmSpec made during the test defaults to sandbox = true."""
    monkeypatch.setenv(SANDBOX_VARIABLE, "1")
    assert VmSpec().sandbox is True


SANDBOXED_VARIANTS: list[Callable[[Path], Any]] = [
    main_requests.test_memory_create_destroy_and_every_error,
    main_requests.test_io_events_of_every_length_and_irq_events,
    main_requests.test_connections_shutdown_eventfd_and_capabilities,
    main_requests.test_dirty_log_and_start_rules,
    lifecycle.test_plugin_stderr_is_echoed_and_logged_and_stdout_passes,
    lifecycle.test_no_fd_of_the_run_reaches_the_plugin_except_its_socket,
    lifecycle.test_plugin_exit_with_running_vcpus_reaps_workers,
    lifecycle.test_vmsuper_sigkill_takes_the_plugin_and_workers_with_it,
]


@pytest.mark.kvm
@pytest.mark.usefixtures("sandboxed_by_default")
@pytest.mark.parametrize("test", SANDBOXED_VARIANTS, ids=lambda t: t.__name__.removeprefix("test_"))
def test_end_to_end_sandboxed(tmp_path: Path, test: Callable[[Path], Any]) -> None:
    test(tmp_path)


def test_vmspec_writes_sandbox_and_mounts(tmp_path: Path) -> None:
    spec = VmSpec(sandbox=None, mounts=[(tmp_path, "/data", True), ("rel", None, False)])
    text = spec.to_toml(tmp_path / "p.py", tmp_path / "logs")
    assert "sandbox =" not in text
    assert (
        textwrap.dedent(f"""\
        [[plugin.mounts]]
        src = "{tmp_path}"
        dst = "/data"
        writable = true
        [[plugin.mounts]]
        src = "rel"
        writable = false
        """)
        in text
    )
    assert "sandbox = false" in VmSpec(sandbox=False).to_toml(tmp_path / "p.py", tmp_path)


def test_vmspec_default_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SANDBOX_VARIABLE, raising=False)
    assert VmSpec().sandbox is True  # as `vmsuper run`
    monkeypatch.setenv(SANDBOX_VARIABLE, "0")
    assert VmSpec().sandbox is False
    monkeypatch.setenv(SANDBOX_VARIABLE, "1")
    assert VmSpec().sandbox is True

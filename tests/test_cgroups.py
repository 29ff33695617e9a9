"""The plugin's cgroup: where it goes on v1 and v2 hosts, what it writes, and real runs that hit
its limits (a memory hog, a fork bomb) and end with the named cause and nothing left behind."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from rawplugin import plugin_source

from vmsuper.supervisor import cgroups
from vmsuper.supervisor.cgroups import CgroupError, PluginCgroup, PluginLimits
from vmsuper.supervisor.plugin_process import PluginStartError
from vmsuper.testing import VmRunner, VmSpec, write_python_plugin

V1_SELF = "4:memory:/outer/run\n3:pids:/\n2:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"


def fake_v1(root: Path) -> None:
    """A hybrid host like this kind: v1 controllers, an empty v2 hierarchy beside them."""
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("\n")
    for name in ("memory/outer/run", "pids", "cpu"):
        (root / name).mkdir(parents=True)


def fake_v2(root: Path, own: str, *, subtree: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    folder = root / own.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cgroup.subtree_control").write_text(subtree)
    return folder


LIMITS = PluginLimits(memory=64 << 20, processes=16, cpu=0.5)


def test_plan_takes_v1_controllers_at_vmsuper_s_own_cgroups(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    assert cgroups.plan(LIMITS, tmp_path, V1_SELF) == [
        (tmp_path / "memory/outer/run", 1, ["memory"]),
        (tmp_path / "pids", 1, ["pids"]),
        (tmp_path / "cpu", 1, ["cpu"]),
    ]
    # Only the controllers of the limits that are set.
    assert cgroups.plan(PluginLimits(processes=4), tmp_path, V1_SELF) == [
        (tmp_path / "pids", 1, ["pids"])
    ]


def test_plan_prefers_v2_and_names_a_missing_controller(tmp_path: Path) -> None:
    own = fake_v2(tmp_path / "v2", "/system.slice/vm.service")
    self_cgroup = "0::/system.slice/vm.service\n"
    assert cgroups.plan(LIMITS, tmp_path / "v2", self_cgroup) == [
        (own, 2, ["memory", "pids", "cpu"])
    ]
    (tmp_path / "v2" / "cgroup.controllers").write_text("cpu memory\n")
    with pytest.raises(CgroupError, match="the pids controller is not available") as info:
        cgroups.plan(LIMITS, tmp_path / "v2", self_cgroup)
    assert "set [limits] plugin_memory, plugin_processes and plugin_cpu to 0" in str(info.value)


def test_v2_cgroup_gets_every_limit_and_a_delegating_parent(tmp_path: Path) -> None:
    own = fake_v2(tmp_path, "/vm.scope", subtree="cpu\n")
    name = f"vmsuper-{os.getpid()}"
    (own / name).mkdir()
    (own / name / "cgroup.procs").write_text("")
    (own / name / "memory.swap.max").write_text("max\n")
    # Reused from a dead run with this pid: its counts are not this run's.
    (own / name / "pids.events").write_text("max 2\n")
    cgroup = PluginCgroup.create(LIMITS, name=name, root=tmp_path, self_cgroup="0::/vm.scope\n")
    try:
        folder = own / name
        assert cgroup.groups == [cgroups.Group(folder, 2, ("memory", "pids", "cpu"))]
        assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
        written = {f: (folder / f).read_text() for f in ("memory.max", "pids.max", "cpu.max")}
        assert written == {"memory.max": str(64 << 20), "pids.max": "16", "cpu.max": "50000 100000"}
        assert (folder / "memory.swap.max").read_text() == "0"
        assert (folder / "memory.oom.group").read_text() == "1"
        assert cgroup.violation() is None
        (folder / "pids.events").write_text("max 3\n")
        assert cgroup.violation() == "plugin killed: process limit (16) reached"
        (folder / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
        assert cgroup.violation() == "plugin killed: memory limit (64 MiB) reached"
    finally:
        cgroup.groups = []  # a fake: nothing to remove
        cgroup.remove()


def test_counter_values_are_read_from_key_value_lines() -> None:
    text = b"oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"
    assert cgroups.counter_value(text, "oom_kill") == 7
    assert cgroups.counter_value(text, "oom") == 0  # a prefix of a key is not the key
    assert cgroups.counter_value(b"max 12\n", "max") == 12
    assert cgroups.counter_value(b"", "max") == 0
    assert cgroups.counter_value(b"max many\n", "max") == 0


def test_each_counter_file_is_opened_once_for_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks run every WATCH_INTERVAL for the whole run: one pread each, on files kept
    open, and closed with the cgroup."""
    own = fake_v2(tmp_path, "/vm.scope", subtree="memory pids cpu\n")
    name = f"vmsuper-{os.getpid()}"
    (own / name).mkdir()
    (own / name / "cgroup.procs").write_text("")
    cgroup = PluginCgroup.create(LIMITS, name=name, root=tmp_path, self_cgroup="0::/vm.scope\n")
    folder = own / name
    (folder / "pids.events").write_text("max 0\n")
    (folder / "memory.events").write_text("oom_kill 0\n")
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(Path(path).name)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cgroups.os, "open", counting_open)
    try:
        for _ in range(20):
            assert cgroup.violation() is None
        (folder / "pids.events").write_text("max 1\n")  # the same file, new contents
        assert cgroup.violation() == "plugin killed: process limit (16) reached"
        assert sorted(opened) == ["memory.events", "pids.events"]
        kept = list(cgroup._counter_fds.values())
        assert len(kept) == 2
    finally:
        cgroup.groups = []  # a fake: nothing to remove
        cgroup.remove()
    for fd in kept:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the cgroup


@pytest.mark.parametrize("version", [1, 2])
def test_the_plugin_s_process_joins_v1_through_tasks_and_v2_through_cgroup_procs(
    tmp_path: Path, version: int
) -> None:
    """On v1, the forked child moves its only thread (`tasks`): moving a whole process
    (cgroup.procs) makes the kernel wait for an RCU grace period first (`join_file`)."""
    name = f"vmsuper-{os.getpid()}"
    if version == 1:
        fake_v1(tmp_path)
        self_cgroup = V1_SELF
        folders = [tmp_path / f / name for f in ("memory/outer/run", "pids", "cpu")]
    else:
        self_cgroup = "0::/vm.scope\n"
        folders = [fake_v2(tmp_path, "/vm.scope", subtree="memory pids cpu\n") / name]
    for folder in folders:
        folder.mkdir()
        for file in ("tasks", "cgroup.procs"):
            (folder / file).write_text("")
    cgroup = PluginCgroup.create(LIMITS, name=name, root=tmp_path, self_cgroup=self_cgroup)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                cgroup.enter()
                status = 0
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        cgroup.groups = []  # a fake: nothing to remove
        cgroup.remove()
    joined = "tasks" if version == 1 else "cgroup.procs"
    for folder in folders:
        written = {f: (folder / f).read_text() for f in ("tasks", "cgroup.procs")}
        assert written == {"tasks": "", "cgroup.procs": "", joined: "0"}


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "with another process"])
def test_v2_cgroup_with_processes_moves_vmsuper_into_a_leaf_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alone: bool
) -> None:
    own = fake_v2(tmp_path, "/vm.scope")
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n" + ("" if alone else "4242\n"))
    writes: list[tuple[str, str]] = []
    real_write = cgroups._write

    def write(path: Path, value: object) -> None:
        # The kernel refuses controllers to children of a cgroup that holds processes.
        if path.name == "cgroup.subtree_control" and (own / "cgroup.procs").read_text().strip():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        if path.name == "cgroup.procs" and str(value) == "0":
            (own / "cgroup.procs").write_text("")  # the writer leaves `own`
        writes.append((str(path.relative_to(own)), str(value)))
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    if not alone:
        with pytest.raises(CgroupError, match=r"vm.scope holds other processes \(1\)"):
            cgroups._delegate(own, ["memory", "pids"])
        assert writes == []
        return
    cgroups._delegate(own, ["memory", "pids"])
    assert writes == [
        ("vmsuper-supervisor/cgroup.procs", "0"),
        ("cgroup.subtree_control", "+memory +pids"),
    ]


def test_a_cgroup_that_cannot_be_made_is_a_start_error(tmp_path: Path) -> None:
    fake_v1(tmp_path)
    (tmp_path / "pids").rmdir()
    with pytest.raises(PluginStartError) as info:
        PluginCgroup.create(LIMITS, root=tmp_path, self_cgroup=V1_SELF)
    assert str(info.value).startswith(
        "cannot limit the plugin: the pids controller is not available; run vmsuper where"
    )
    assert not any(p.name.startswith("vmsuper-") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    ("size", "text"),
    [(512 << 20, "512 MiB"), (3 << 30, "3 GiB"), (1536 << 20, "1536 MiB"), (1000, "1000 bytes")],
)
def test_format_size(size: int, text: str) -> None:
    assert cgroups.format_size(size) == text


# -- real cgroups on this host ---------------------------------------------------------------


def leftover_cgroups(pid: int) -> list[str]:
    """Every cgroup directory named after the supervisor `pid`, in every hierarchy."""
    found = []
    for dirpath, dirnames, _ in os.walk(cgroups.CGROUP_ROOT):
        found += [os.path.join(dirpath, d) for d in dirnames if d == f"vmsuper-{pid}"]
    return found


def run_pid(result_records: list[dict[str, object]]) -> int:
    started = [r for r in result_records if r["event"] == "run_started"]
    return int(str(started[0]["pid"]))


HOG = """
import sys
print(json.dumps({"started": True}), flush=True)
chunks = []
while True:
    chunks.append(bytearray(1 << 20))
"""

FORK_BOMB = """
import signal
print(json.dumps({"started": True}), flush=True)
while True:
    try:
        if os.fork() == 0:  # the children keep the plugin's command line, marker included
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends them
            while True:
                signal.pause()  # until a signal ends it
    except OSError:
        pass
"""


@pytest.mark.kvm
@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "unsandboxed"])
def test_memory_hog_is_killed_with_the_cause_named(tmp_path: Path, sandbox: bool) -> None:
    plugin = write_python_plugin(tmp_path, plugin_source(HOG))
    spec = VmSpec(sandbox=sandbox, extra_toml='[limits]\nplugin_memory = "64M"\n')
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 128 + signal.SIGKILL, result.stderr
    reason = "plugin killed: memory limit (64 MiB) reached"
    assert f"vmsuper: {reason} (exit status 137)" in result.stderr
    records = result.records()
    assert [r["reason"] for r in records if r["event"] == "plugin_limit_reached"] == [reason]
    assert leftover_cgroups(run_pid(records)) == []


@pytest.mark.kvm
@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "unsandboxed"])
def test_fork_bomb_is_held_at_its_limit_then_killed_and_reaped(
    tmp_path: Path, sandbox: bool
) -> None:
    marker = f"vmsuper-bomb-{os.getpid()}-{sandbox}"
    plugin = write_python_plugin(tmp_path, plugin_source(FORK_BOMB))
    spec = VmSpec(sandbox=sandbox, args=[marker], extra_toml="[limits]\nplugin_processes = 12\n")
    result = VmRunner(tmp_path / "runs").run(plugin, spec)
    assert result.status == 128 + signal.SIGKILL, result.stderr
    assert "vmsuper: plugin killed: process limit (12) reached (exit status 137)" in result.stderr
    # Not one of the bomb's processes is left, even those the plugin's death orphaned.
    assert [
        p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])
    ] == []
    assert leftover_cgroups(run_pid(result.records())) == []


@pytest.mark.kvm
def test_the_plugin_runs_in_its_cgroup_with_the_configured_limits(tmp_path: Path) -> None:
    body = """
    import resource
    RESULTS["cgroup"] = open("/proc/self/cgroup").read()
    RESULTS["nproc"] = list(resource.getrlimit(resource.RLIMIT_NPROC))
    report()
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    limits = '[limits]\nplugin_memory = "96MiB"\nplugin_processes = 40\nplugin_cpu = 0.25\n'
    result = VmRunner(tmp_path / "runs").run(plugin, VmSpec(extra_toml=limits))
    assert result.status == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["nproc"] == [cgroups.nproc_backstop(40)] * 2 == [296, 296]
    own = cgroups.own_cgroups(found["cgroup"])
    supervisor = f"vmsuper-{run_pid(result.records())}"
    layout = cgroups.plan(PluginLimits(1, 1, 1), cgroups.CGROUP_ROOT, found["cgroup"])
    for _, version, controllers in layout:
        path = own["" if version == 2 else controllers[0]]
        assert path.rsplit("/", 1)[-1] == supervisor, found["cgroup"]
    assert leftover_cgroups(run_pid(result.records())) == []


def test_limits_are_written_to_this_host_s_cgroups() -> None:
    """The real files (v1 here, or v2) take what `create` writes, and `remove` leaves nothing."""
    cgroup = PluginCgroup.create(LIMITS, name=f"vmsuper-{os.getpid()}")
    try:
        values = {}
        for group in cgroup.groups:
            for name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max"):
                if (group.path / name).exists():
                    values[name] = (group.path / name).read_text().strip()
            if (group.path / "cpu.cfs_quota_us").exists():
                values["cpu.max"] = (group.path / "cpu.cfs_quota_us").read_text().strip()
        assert values.pop("memory.max", None) or values.pop("memory.limit_in_bytes") == str(
            64 << 20
        )
        assert values["pids.max"] == "16"
        assert values["cpu.max"] in ("50000", "50000 100000")
        child = subprocess.Popen(["sleep", "60"], preexec_fn=cgroup.enter)
        assert cgroup.pids() == [child.pid]
    finally:
        problems = cgroup.remove()  # kills the sleeper to empty the cgroup
    assert child.wait() == -signal.SIGKILL
    assert problems == []
    assert leftover_cgroups(os.getpid()) == []


# Each of its threads and processes blocks in a read of stdin until the test kills them all (or
# closes stdin, should it fail first).
JOINED_PROCESS = """
import os, sys, threading
threading.Thread(target=os.read, args=(0, 1), daemon=True).start()
child = os.fork()
if child == 0:
    os.read(0, 1)
    os._exit(0)
print(child, flush=True)
os.read(0, 1)
"""


def test_what_the_joined_process_starts_is_in_this_host_s_cgroups_with_it() -> None:
    """`enter` moves the forked child's one thread (v1: `tasks`): the threads and processes it
    starts afterwards are in every hierarchy's cgroup too, as after a move of the process."""
    cgroup = PluginCgroup.create(LIMITS, name=f"vmsuper-{os.getpid()}")
    try:
        joined = subprocess.Popen(
            [sys.executable, "-c", JOINED_PROCESS],
            preexec_fn=cgroup.enter,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert joined.stdin is not None and joined.stdout is not None
        grandchild = int(joined.stdout.readline())
        threads = {int(t) for t in os.listdir(f"/proc/{joined.pid}/task")}
        assert len(threads) == 2  # the main thread and the one it started
        for group in cgroup.groups:
            procs = (group.path / "cgroup.procs").read_text().split()
            assert sorted(map(int, procs)) == sorted([joined.pid, grandchild]), group
            if group.version == 1:
                tasks = {int(t) for t in (group.path / "tasks").read_text().split()}
                assert tasks == threads | {grandchild}, group
    finally:
        problems = cgroup.remove()  # kills both to empty the cgroup
    assert joined.wait() == -signal.SIGKILL
    joined.stdin.close()
    joined.stdout.close()
    assert problems == []
    assert leftover_cgroups(os.getpid()) == []


def test_a_dead_run_s_cgroup_is_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    layout = cgroups.plan(LIMITS, cgroups.CGROUP_ROOT, Path("/proc/self/cgroup").read_text())
    stale = [own / f"vmsuper-{dead.pid}" for own, _, _ in layout]
    for path in stale:
        path.mkdir()
    cgroup = PluginCgroup.create(LIMITS, name=f"vmsuper-{os.getpid()}")
    assert cgroup.remove() == []
    assert [p for p in stale if p.exists()] == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'plugin_memory = "lots"',
            "expected a size like \"512M\" or a number of bytes, got 'lots'",
        ),
        ("plugin_memory = 4096", "expected 0 (no limit) or a size from 1M to 1P, got 4096"),
        ("plugin_memory = true", 'expected a size ("512M") or a number of bytes, got boolean'),
        ("plugin_processes = -1", "expected 0 (no limit) or an integer up to 4194304, got -1"),
        ("plugin_processes = 2.5", "expected an integer, got number"),
        ("plugin_cpu = 0.001", "expected 0 (no limit) or cores from 0.01 to 4096, got 0.001"),
        ("plugin_cpu = nan", "expected 0 (no limit) or cores from 0.01 to 4096, got nan"),
        ('plugin_cpu = "2"', "expected a number, got string"),
    ],
)
def test_bad_limit_values_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    from vmsuper.supervisor.config import ConfigError, load_config

    config = tmp_path / "vm.toml"
    config.write_text(f'[plugin]\npath = "/bin/true"\n[limits]\n{line}\n')
    key = line.split(" ", 1)[0]
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == f"{config}: [limits] {key}: {message}"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("2g", 2 << 30),
        ("8388608", 8 << 20),
        ("1 GB", 1 << 30),
    ],
)
def test_sizes(tmp_path: Path, text: str, size: int) -> None:
    from vmsuper.supervisor.config import load_config

    config = tmp_path / "vm.toml"
    config.write_text(f'[plugin]\npath = "/bin/true"\n[limits]\nplugin_memory = "{text}"\n')
    loaded = load_config(config)
    assert loaded.limits.plugin_memory == size
    assert loaded.limits.to_limits().plugin_memory == size
    assert re.fullmatch(r"\d+", str(loaded.limits.plugin_memory))


@pytest.mark.kvm
def test_a_sigkilled_run_s_cgroup_is_removed_by_the_next_run(tmp_path: Path) -> None:
    body = """
    print(json.dumps({"pid": os.getpid()}), flush=True)
    while True:
        signal.pause()  # until a signal ends it
    """
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    proc, _config, _logs = VmRunner(tmp_path / "runs").start(plugin, VmSpec(sandbox=True))
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    made = leftover_cgroups(proc.pid)
    assert made  # one per hierarchy in use
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # The plugin dies with vmsuper (bwrap --die-with-parent); its cgroup stays, empty.
    deadline = time.monotonic() + 10
    while any(cgroup_pids(p) for p in made) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(cgroup_pids(p) for p in made)
    # The next run (this one, or any other test's running meanwhile) removes it.
    (tmp_path / "next").mkdir()
    quick = write_python_plugin(tmp_path / "next", "import sys\n")
    result = VmRunner(tmp_path / "runs").run(quick, VmSpec())
    assert result.status == 0, result.stderr
    assert leftover_cgroups(proc.pid) == []


def cgroup_pids(path: str) -> list[str]:
    try:
        return Path(path, "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


class _FailingTimerLibc:
    """A C library whose timerfd calls fail with `err` (the one named by `failing`)."""

    def __init__(self, failing: str, err: int) -> None:
        self.failing, self.err, self.opened = failing, err, -1

    def timerfd_create(self, clock: int, flags: int) -> int:
        if self.failing == "timerfd_create":
            ctypes.set_errno(self.err)
            return -1
        self.opened = os.eventfd(0)  # an fd to close, standing in for the timer
        return self.opened

    def timerfd_settime(self, fd: int, flags: int, new: bytes, old: None) -> int:
        ctypes.set_errno(self.err)
        return -1


@pytest.mark.parametrize("failing", ["timerfd_create", "timerfd_settime"])
def test_a_watch_timer_that_cannot_be_made_names_the_call(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    libc = _FailingTimerLibc(failing, errno.EMFILE)
    monkeypatch.setattr(cgroups, "_libc", libc)
    with pytest.raises(OSError, match=f"^.*{failing}: Too many open files") as raised:
        cgroups._interval_timer(cgroups.WATCH_INTERVAL)
    assert raised.value.errno == errno.EMFILE
    if libc.opened >= 0:  # the timer made before the failing call is closed
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(libc.opened)

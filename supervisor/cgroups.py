"""The plugin's own cgroup: bounds on its memory, processes and CPU, and the cause when one bites.

Each run makes one cgroup named ``vmsuper-<supervisor pid>`` below vmsuper's own, before the
plugin starts. The plugin's process writes itself into it between fork and exec (`enter`;
`join_file` says through which file), so the plugin, bwrap and everything they start are in
it from their first instruction; nothing can be started outside. The limits come from
``[limits] plugin_memory``, ``plugin_processes`` and ``plugin_cpu``; a limit of 0 is no
limit, and with all three at 0 no cgroup is made.

Two layouts are supported:

- cgroup v2 (a unified hierarchy at /sys/fs/cgroup with the controllers): one directory,
  ``memory.max`` (``memory.swap.max`` 0, ``memory.oom.group`` 1: an out-of-memory kill takes
  the whole plugin), ``pids.max`` and ``cpu.max``. A cgroup with processes cannot hand
  controllers to children, so when vmsuper's cgroup lacks them and vmsuper is alone in it,
  vmsuper moves itself into a leaf ``vmsuper-supervisor`` first (as container runtimes do in a
  delegated cgroup). At the root cgroup no move is needed.
- cgroup v1 (one hierarchy per controller, as on this kind of host, where the v2 hierarchy
  beside them has no controllers): one directory per controller, ``memory.limit_in_bytes``
  (and ``memory.memsw.limit_in_bytes``, so swap does not extend it), ``pids.max``,
  ``cpu.cfs_quota_us``. Each controller is taken from v2 where v2 has it, else from v1.

When the cgroup cannot be made (no permission, a controller missing), the run fails with a
message saying why and what to change (`CgroupError`): a sandbox that quietly lacked its limits
would make the same config safe on one host and not on another.

`violation` reads the kernel's event counters (v2 ``memory.events`` oom_kill, v1
``memory.oom_control`` oom_kill, ``pids.events`` max): an out-of-memory kill or a refused fork
ends the run with a cause that names the limit. The supervisor checks them when the plugin
exits and on a timer (`watch_fd`), since a fork bomb held at its limit never exits by itself.

`remove` kills whatever is left in the cgroup, waits until it is empty and removes it. A
vmsuper killed with SIGKILL cannot remove its cgroup: the next run removes every
``vmsuper-<pid>`` whose pid is gone (an empty cgroup holds no resources meanwhile).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from vmsuper.shared import libc_calls
from vmsuper.supervisor.plugin_process import PluginStartError

CGROUP_ROOT = Path("/sys/fs/cgroup")
V2_HYBRID_MOUNT = "unified"  # where hybrid hosts mount the v2 hierarchy beside the v1 ones
NAME_PREFIX = "vmsuper-"
SUPERVISOR_LEAF = "vmsuper-supervisor"
CPU_PERIOD_US = 100_000
WATCH_INTERVAL = 0.25
"""Seconds between two reads of the event counters. An out-of-memory kill of the plugin itself
is seen at its exit; the timer is for what does not end the plugin (a fork refused at the
limit, a child killed), where a quarter of a second changes nothing, and each read wakes the
supervisor, for every VM a host runs."""
EMPTY_TIMEOUT = 5.0  # seconds to wait for killed processes to leave the cgroup
_libc = ctypes.CDLL(None, use_errno=True)


class CgroupError(PluginStartError):
    """The plugin's cgroup cannot be set up; the message says why and what to change."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"cannot limit the plugin: {reason}; run vmsuper where it may make cgroups (as root, "
            "or in a delegated cgroup of its own), or set [limits] plugin_memory, "
            "plugin_processes and plugin_cpu to 0 to run the plugin without these limits"
        )
        self.reason = reason


class PluginLimits(NamedTuple):
    """What the plugin's cgroup allows; 0 is no limit."""

    memory: int = 0  # bytes
    processes: int = 0  # tasks: processes and threads
    cpu: float = 0.0  # cores

    def controllers(self) -> tuple[str, ...]:
        wanted = (("memory", self.memory), ("pids", self.processes), ("cpu", self.cpu))
        return tuple(name for name, value in wanted if value)


def format_size(size: int) -> str:
    """1 << 29 -> "512 MiB"; sizes that are not whole units stay in bytes."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


class Group(NamedTuple):
    """One cgroup directory of the plugin's, and the controllers it carries there."""

    path: Path
    version: int
    controllers: tuple[str, ...]


def for_run(memory: int, processes: int, cpu: float) -> PluginCgroup | None:
    """The plugin's cgroup with the config's limits, or None when every limit is 0."""
    limits = PluginLimits(memory, processes, cpu)
    return PluginCgroup.create(limits) if limits.controllers() else None


def probe(root: Path = CGROUP_ROOT) -> tuple[bool, str]:
    """For `vmsuper check`: can this host give the plugin its cgroup? (works, detail)."""
    try:
        cgroup = PluginCgroup.create(PluginLimits(64 << 20, 16, 1.0), root=root)
    except (CgroupError, OSError) as exc:
        return False, getattr(exc, "reason", str(exc))
    layout = ", ".join(f"{'+'.join(g.controllers)} on v{g.version}" for g in cgroup.groups)
    problems = cgroup.remove()
    return not problems, "; ".join(problems) or layout


# -- finding where the controllers are -----------------------------------------------------------


def own_cgroups(text: str) -> dict[str, str]:
    """/proc/self/cgroup -> {controller: path}; the v2 hierarchy's path is under ""."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            found[name] = path
    return found


def plan(limits: PluginLimits, root: Path, self_cgroup: str) -> list[tuple[Path, int, list[str]]]:
    """(vmsuper's own cgroup directory, version, controllers to use there) for each hierarchy."""
    own = own_cgroups(self_cgroup)
    v2_mount = root if (root / "cgroup.controllers").exists() else root / V2_HYBRID_MOUNT
    v2_available = _words(v2_mount / "cgroup.controllers")
    v2: list[str] = []
    v1: list[tuple[Path, int, list[str]]] = []
    for name in limits.controllers():
        if name in v2_available and "" in own:
            v2.append(name)
        elif (root / name).is_dir() and name in own and v2_mount != root:
            v1.append((root / name / own[name].lstrip("/"), 1, [name]))
        else:
            raise CgroupError(f"the {name} controller is not available")
    places = v1
    if v2:
        places.insert(0, (v2_mount / own[""].lstrip("/"), 2, v2))
    return places


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


# -- the cgroup ----------------------------------------------------------------------------------


class PluginCgroup:
    """The plugin's cgroup for one run: made by `create`, entered by the plugin before exec,
    watched while it runs, emptied and removed by `remove`."""

    def __init__(self, limits: PluginLimits, groups: list[Group]) -> None:
        self.limits = limits
        self.groups = groups
        self._join_fds: list[int] = []
        self.watch_fd = -1
        # The event counters at creation: nonzero only in a reused cgroup of a dead run.
        self._counted: dict[tuple[Path, str], int] = {}
        # Each counter file stays open, read again from its start at each check (one pread):
        # the checks run every WATCH_INTERVAL for the whole run.
        self._counter_fds: dict[Path, int] = {}

    @classmethod
    def create(
        cls,
        limits: PluginLimits,
        *,
        name: str | None = None,
        root: Path = CGROUP_ROOT,
        self_cgroup: str | None = None,
    ) -> PluginCgroup:
        """Make the cgroup with its limits written; raises `CgroupError` saying why not."""
        name = name or f"{NAME_PREFIX}{os.getpid()}"
        if self_cgroup is None:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        cgroup = cls(limits, [])
        try:
            for own, version, controllers in plan(limits, root, self_cgroup):
                remove_stale(own)
                if version == 2:
                    _delegate(own, controllers)
                path = own / name
                # One that exists is a dead run's with this pid, left because busy: reuse it.
                path.mkdir(exist_ok=True)
                cgroup.groups.append(Group(path, version, tuple(controllers)))
                cgroup._write_limits(cgroup.groups[-1])
            for group in cgroup.groups:
                fd = os.open(group.path / join_file(group), os.O_WRONLY | os.O_CLOEXEC)
                cgroup._join_fds.append(fd)
            cgroup.violation()  # takes the counters' starting values
            cgroup.watch_fd = _interval_timer(WATCH_INTERVAL)
        except OSError as exc:
            cgroup.remove()
            where = f" ({exc.filename})" if exc.filename else ""
            raise CgroupError(f"{exc.strerror}{where}") from exc
        except CgroupError:
            cgroup.remove()
            raise
        return cgroup

    def _write_limits(self, group: Group) -> None:
        limits, path = self.limits, group.path
        if "memory" in group.controllers:
            if group.version == 2:
                _write(path / "memory.max", limits.memory)
                _write_if_there(path / "memory.swap.max", 0)
                _write(path / "memory.oom.group", 1)
            else:
                _write(path / "memory.limit_in_bytes", limits.memory)
                _write_if_there(path / "memory.memsw.limit_in_bytes", limits.memory)
        if "pids" in group.controllers:
            _write(path / "pids.max", limits.processes)
        if "cpu" in group.controllers:
            quota = max(1000, round(limits.cpu * CPU_PERIOD_US))
            if group.version == 2:
                _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                _write(path / "cpu.cfs_period_us", CPU_PERIOD_US)
                _write(path / "cpu.cfs_quota_us", quota)

    def enter(self) -> None:
        """Runs in the plugin's process between fork and exec, its only thread: join the
        cgroup (see `join_file`), and take the RLIMIT_NPROC backstop (see `nproc_backstop`)."""
        for fd in self._join_fds:
            os.write(fd, b"0")
        if self.limits.processes:
            backstop = nproc_backstop(self.limits.processes)
            resource.setrlimit(resource.RLIMIT_NPROC, (backstop, backstop))

    def violation(self) -> str | None:
        """Why the plugin must stop, if it hit a limit: an out-of-memory kill in its cgroup or
        a fork refused at its process limit."""
        for group in self.groups:
            if "memory" in group.controllers:
                events = "memory.events" if group.version == 2 else "memory.oom_control"
                if self._grew(group.path / events, "oom_kill"):
                    return (
                        f"plugin killed: memory limit ({format_size(self.limits.memory)}) reached"
                    )
            if "pids" in group.controllers and self._grew(group.path / "pids.events", "max"):
                return f"plugin killed: process limit ({self.limits.processes}) reached"
        return None

    def _grew(self, path: Path, key: str) -> bool:
        value = self._counter(path, key)
        return value > self._counted.setdefault((path, key), value)

    def _counter(self, path: Path, key: str) -> int:
        fd = self._counter_fds.get(path)
        try:
            if fd is None:
                fd = self._counter_fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return counter_value(os.pread(fd, 4096, 0), key)
        except OSError:
            return 0

    def pids(self) -> list[int]:
        """Every process in the cgroup."""
        found: set[int] = set()
        for group in self.groups:
            with contextlib.suppress(OSError):
                found.update(int(w) for w in (group.path / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (through cgroup.kill where the kernel has it)."""
        for group in self.groups:
            if group.version == 2:
                with contextlib.suppress(OSError):
                    _write(group.path / "cgroup.kill", 1)
                    return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, *, timeout: float = EMPTY_TIMEOUT) -> list[str]:
        """Kill what is left, wait until the cgroup is empty, remove it. Returns the problems
        (a cgroup that stayed busy), for the log; the run has ended whatever they are."""
        for fd in self._join_fds:
            os.close(fd)
        self._join_fds = []
        if self.watch_fd >= 0:
            os.close(self.watch_fd)
            self.watch_fd = -1
        for fd in self._counter_fds.values():
            os.close(fd)
        self._counter_fds.clear()
        problems = []
        deadline = time.monotonic() + timeout
        for group in reversed(self.groups):
            while True:
                try:
                    group.path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        problems.append(f"cannot remove {group.path}: {exc.strerror}")
                        break
                    self.kill_all()
                    time.sleep(0.01)  # killed processes leave the cgroup as they are reaped
        self.groups = []
        return problems


def join_file(group: Group) -> str:
    """The file the plugin's process writes itself into to join `group`.

    On v2 it is cgroup.procs (a domain cgroup takes whole processes only). On v1 it is
    `tasks`, which moves the writing thread alone: the same as moving the process for the
    forked child, whose only thread it is (its later threads and children start in the
    cgroup), and much cheaper. Moving a whole process takes the kernel's lock on every thread
    group, whose writer waits for an RCU grace period first (about 6 ms here, more on a busy
    host) while the plugin waits to start; a thread moving itself does not take that lock.
    """
    return "cgroup.procs" if group.version == 2 else "tasks"


def _write(path: Path, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _write_if_there(path: Path, value: object) -> None:
    if path.exists():
        _write(path, value)


def counter_value(text: bytes, key: str) -> int:
    """The value of `key` in the text of an event-counter file (lines of "key value"); 0 when
    the file has no such line."""
    wanted = key.encode()
    for line in text.splitlines():
        name, _, value = line.partition(b" ")
        if name == wanted:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _delegate(own: Path, controllers: list[str]) -> None:
    """Make `own` (vmsuper's v2 cgroup) hand `controllers` to its children."""
    enabled = _words(own / "cgroup.subtree_control")
    missing = [c for c in controllers if c not in enabled]
    if not missing:
        return
    request = " ".join(f"+{c}" for c in missing)
    try:
        _write(own / "cgroup.subtree_control", request)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    # Processes in `own` (vmsuper itself): a cgroup with processes cannot hand controllers on.
    others = [pid for pid in _pids(own) if pid != os.getpid()]
    if others:
        raise CgroupError(
            f"vmsuper's cgroup {own} holds other processes ({len(others)}), so it cannot "
            "hand the memory, pids and cpu controllers to the plugin's"
        )
    leaf = own / SUPERVISOR_LEAF
    leaf.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", 0)
    _write(own / "cgroup.subtree_control", request)


def _pids(path: Path) -> list[int]:
    return [int(w) for w in _words(path / "cgroup.procs")]


def remove_stale(own: Path) -> None:
    """Remove the empty cgroups of runs whose supervisor is gone (killed with SIGKILL)."""
    for path in _stale_candidates(own):
        with contextlib.suppress(OSError):
            path.rmdir()  # refused while anything is in it


def _stale_candidates(own: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for entry in os.scandir(own):
            pid = entry.name.removeprefix(NAME_PREFIX)
            stale = pid.isdigit() and entry.is_dir() and not _alive(int(pid))
            if entry.name.startswith(NAME_PREFIX) and stale:
                yield Path(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the timer -----------------------------------------------------------------------------------

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


def _interval_timer(seconds: float) -> int:
    """A timerfd that becomes readable every `seconds` (os.timerfd_create is Python 3.13+)."""
    fd: int = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        libc_calls.check(fd, "timerfd_create")
    whole, part = int(seconds), int((seconds % 1) * 1e9)
    spec = struct.pack("4q", whole, part, whole, part)  # struct itimerspec: interval, value
    try:
        libc_calls.check(_libc.timerfd_settime(fd, 0, spec, None), "timerfd_settime")
    except OSError:
        os.close(fd)
        raise
    return fd


def drain_timer(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)


def nproc_backstop(processes: int) -> int:
    """RLIMIT_NPROC for a plugin whose cgroup allows `processes`.

    The cgroup is the per-run limit, and reaching it is what names the cause. RLIMIT_NPROC
    counts every process of the plugin's user on the whole host, and runs share that user
    (`nobody` by default), so it is set well above: a second bound that holds if the cgroup
    ever does not, and that another run's plugins do not reach first.
    """
    return max(4 * processes, processes + 256)

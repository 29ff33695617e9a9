"""Confined VCPU workers (workers/confine.py): the filter, checked for every system call
number in a BPF interpreter, and real runs whose workers are looked at from outside
(/proc) and made to misbehave on purpose (`MISBEHAVE_VARIABLE`): each barrier must hold, and
the run must end with the cause named."""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from bpf_vm import run_filter, well_formed
from rawplugin import WAIT_FOR_SHUTDOWN, plugin_source

from vmsuper.shared import abi, bpf, hotpath, kvm
from vmsuper.shared.libc_calls import check
from vmsuper.shared.prctl import PR_SET_NO_NEW_PRIVS, prctl
from vmsuper.shared.shm import SharedRegion
from vmsuper.supervisor import outcome, runner_seccomp, runners
from vmsuper.supervisor.busy_board import BOARD_NAME
from vmsuper.supervisor.vcpus import workers_user
from vmsuper.testing import VmRunner, VmSpec, finish, write_python_plugin
from vmsuper.workers import confine
from vmsuper.workers.worker_process import close_fds_except

ALLOW = bpf.SECCOMP_RET_ALLOW
TRAP = bpf.SECCOMP_RET_TRAP
KILL = bpf.SECCOMP_RET_KILL_PROCESS
NR = bpf.SYSCALLS
PID = 4242
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4

# -- the filter ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program() -> bytes:
    return confine.build_filter(PID)


def test_the_allowlist_names_real_system_calls() -> None:
    assert set(confine.ALLOWED) <= set(NR)
    assert all(why for why in confine.ALLOWED.values())


def test_filter_is_well_formed(program: bytes) -> None:
    well_formed(program)


def test_every_system_call_number_gets_its_verdict(program: bytes) -> None:
    special = {NR[name] for name in ("mmap", "mprotect", "rt_sigaction", "tgkill")}
    allowed = {NR[name] for name in confine.ALLOWED}
    for nr in range(1024):
        if nr in special:
            continue
        assert run_filter(program, nr) == (ALLOW if nr in allowed else TRAP), bpf.syscall_name(nr)
    for name in ("open", "openat", "ioctl", "kill", "execve", "clone", "clone3", "socket", "fork"):
        assert run_filter(program, NR[name]) == TRAP, name
    for high in (bpf.X32_SYSCALL_BIT, bpf.X32_SYSCALL_BIT | NR["read"], 0xFFFFFFFF):
        assert run_filter(program, high - (1 << 32) if high >= 1 << 31 else high) == KILL
    # A 32-bit entry point (int 0x80: i386 numbers) is killed whatever the number.
    assert run_filter(program, 3, arch=0x40000003) == KILL


def test_argument_rules(program: bytes) -> None:
    for name in ("mmap", "mprotect"):
        assert run_filter(program, NR[name], (0, 4096, PROT_READ | PROT_WRITE)) == ALLOW
        assert run_filter(program, NR[name], (0, 4096, PROT_READ | PROT_EXEC)) == TRAP
        assert run_filter(program, NR[name], (0, 4096, PROT_EXEC | 1 << 32)) == TRAP
    assert run_filter(program, NR["rt_sigaction"], (signal.SIGTERM, 1, 0, 8)) == ALLOW
    assert run_filter(program, NR["rt_sigaction"], (signal.SIGSYS, 1, 0, 8)) == KILL
    assert run_filter(program, NR["tgkill"], (PID, PID, signal.SIGABRT)) == ALLOW
    assert run_filter(program, NR["tgkill"], (PID + 1, PID + 1, signal.SIGKILL)) == TRAP
    assert run_filter(program, NR["tgkill"], (1, 1, signal.SIGKILL)) == TRAP


def test_misbehaviour_comes_only_from_a_well_formed_variable() -> None:
    name = confine.MISBEHAVE_VARIABLE
    assert confine.misbehaviour_from_environment(0, {}) is None
    assert confine.misbehaviour_from_environment(1, {name: "1:open"}) == "open"
    assert confine.misbehaviour_from_environment(0, {name: "1:open"}) is None
    for bad in ("open", "1:", "x:open", "1:reboot"):
        with pytest.raises(ValueError, match=name):
            confine.misbehaviour_from_environment(0, {name: bad})


def test_a_seccomp_kill_is_described_by_its_system_call() -> None:
    assert confine.describe_seccomp_kill(NR["openat"]) == (
        "worker killed by seccomp (syscall openat)"
    )
    assert confine.describe_seccomp_kill(999) == "worker killed by seccomp (syscall syscall 999)"
    assert confine.describe_seccomp_kill(None) == "worker killed by seccomp (SIGSYS)"


def test_workers_run_as_an_unprivileged_user() -> None:
    user = workers_user(None)
    if os.geteuid() == 0:
        assert user.switch and user.uid != 0 and user.gid != 0
        assert user.name in confine.WORKER_USERS
    else:
        assert not user.switch and user.uid == os.getuid()


# -- real runs -------------------------------------------------------------------------------


def _confined_pids(log_dir: Path, vcpus: int, deadline: float) -> dict[int, int]:
    """VCPU -> pid of its worker, once each has logged that it is confined."""
    pids: dict[int, int] = {}
    while len(pids) < vcpus:
        assert time.monotonic() < deadline, f"workers confined so far: {pids}"
        for vcpu in range(vcpus):
            path = log_dir / f"vcpu-{vcpu}.jsonl"
            if vcpu in pids or not path.exists():
                continue
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["event"] == "worker_confined":
                    pids[vcpu] = record["pid"]
        time.sleep(0.05)
    return pids


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue
    return links


@pytest.fixture
def unsandboxed_run(tmp_path: Path) -> Iterator[tuple[VmRunner, Path]]:
    # Guest memory first: the supervisor maps it, and the workers must not keep that.
    body = "assert create_memory(1, 0, 0x10000) == 0\n" + WAIT_FOR_SHUTDOWN
    plugin = write_python_plugin(tmp_path, plugin_source(body))
    runner = VmRunner(tmp_path / "runs")
    yield runner, plugin
    runner.stop_all()


@pytest.mark.kvm
@pytest.mark.parametrize("transport", ["socket", "pipes"])
def test_live_workers_are_confined(unsandboxed_run: tuple[VmRunner, Path], transport: str) -> None:
    runner, plugin = unsandboxed_run
    # Unsandboxed: the plugin's children would otherwise count bwrap's.
    proc, config, log_dir = runner.start(
        plugin, VmSpec(vcpus=2, sandbox=False, transport=transport)
    )
    assert proc.stdout is not None
    plugin_pid = json.loads(proc.stdout.readline())["pid"]
    pids = _confined_pids(log_dir, 2, time.monotonic() + 30)
    workers = {p.pid for p in psutil.Process(proc.pid).children()} - {plugin_pid}
    assert workers == set(pids.values())
    expected_user = workers_user(None)
    for vcpu, pid in pids.items():
        status = _status(pid)
        assert status["Seccomp"].strip() == "2"
        assert status["NoNewPrivs"].strip() == "1"
        for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert status[caps].strip() == "0" * 16, caps
        if os.geteuid() == 0:
            assert status["CapBnd"].strip() == "0" * 16
            uids = {int(uid) for uid in status["Uid"].split()}
            gids = {int(gid) for gid in status["Gid"].split()}
            assert uids == {expected_user.uid} and gids == {expected_user.gid}
            assert status["Groups"].strip() == ""
        kvm_links = [link for link in _links(pid) if "kvm" in link]
        assert kvm_links == [f"anon_inode:kvm-vcpu:{vcpu}"]
        # Shared mappings: the region and its own kvm_run page only (no other VCPU's page,
        # no guest memory).
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        shared = {line.split(maxsplit=5)[5] for line in maps if line.split()[1][3] == "s"}
        assert shared == {"/memfd:vmsuper-shm (deleted)", f"anon_inode:kvm-vcpu:{vcpu}"}
        assert not [link for link in _links(pid) if link.endswith(f"/{BOARD_NAME}")]
    # The supervisor holds the busy VCPUs' board open (so the workers closed it).
    assert [link for link in _links(proc.pid) if link.endswith(f"/{BOARD_NAME}")]
    # In the supervisor, each runner thread runs under its own filter, the main thread not.
    deadline = time.monotonic() + 30
    while True:
        tasks = {int(tid): _status(int(tid)) for tid in os.listdir(f"/proc/{proc.pid}/task")}
        confined = [t["Seccomp"].strip() for t in tasks.values()].count("2")
        if confined == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the runners install their filters as they start
    assert confined == 2
    assert tasks[proc.pid]["Seccomp"].strip() == "0"
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, config, log_dir, timeout=30)
    assert result.status == 128 + signal.SIGTERM, result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("action", "cause"),
    [
        ("open", "worker killed by seccomp (syscall openat)"),
        ("ioctl", "worker killed by seccomp (syscall ioctl)"),
        ("kill", "worker killed by seccomp (syscall kill)"),
        ("exec_mapping", "worker killed by seccomp (syscall mmap)"),
        # Another VCPU's block of the shared region is not mapped in the worker any more.
        ("write_other", "worker was killed by signal 11 (SIGSEGV)"),
    ],
)
def test_a_worker_that_misbehaves_is_killed_and_named(
    unsandboxed_run: tuple[VmRunner, Path],
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    cause: str,
) -> None:
    runner, plugin = unsandboxed_run
    monkeypatch.setenv(confine.MISBEHAVE_VARIABLE, f"1:{action}")
    result = runner.run(plugin, VmSpec(vcpus=2, sandbox=False), timeout=60)
    assert result.status == outcome.EXIT_VCPU_FAILED, result.stderr
    assert f"vmsuper: vcpu 1: {cause} (exit status 126)" in result.stderr.splitlines()
    finished = [r for r in result.records() if r["event"] == "run_finished"]
    assert finished[0]["reason"] == f"vcpu 1: {cause}"
    # The misbehaving worker got no further: 1 logged it was confined and nothing after.
    events = [r["event"] for r in result.vcpu_records(1)]
    assert events[-1] == "worker_confined", events
    # Every worker was reaped before vmsuper exited (126: not by the signal "kill" tried).
    for vcpu in (0, 1):
        assert not psutil.pid_exists(result.vcpu_records(vcpu)[0]["pid"])
    assert not psutil.pid_exists(json.loads(result.stdout.splitlines()[0])["pid"])  # the plugin


# -- one process, confined or trapped, without a VM ------------------------------------------------


def _in_child(body: Callable[[int], None]) -> tuple[int, dict[str, str]]:
    """Fork; the child runs `body(write_fd)`, which writes one byte when it is ready to be
    looked at, then waits for the parent to let it exit 0. Returns the child's wait status
    and its /proc status as it was when it said it was ready (empty if it never did)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            close_fds_except({0, 1, 2, ready_w, go_r})  # what the test process holds (KVM...)
            body(ready_w)
            os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    status: dict[str, str] = {}
    try:
        if os.read(ready_r, 1):
            status = _status(pid)
    finally:
        os.close(go_w)
        os.close(ready_r)
        _, wait_status = os.waitpid(pid, 0)
    return wait_status, status


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    shared = SharedRegion.create(2)
    yield shared
    shared.close()


def test_a_trapped_call_is_stored_and_the_process_dies_by_sigsys(region: SharedRegion) -> None:
    slot = region.slot(1)

    def trap_getppid(_ready: int) -> None:
        allow: bpf.Program = [bpf.ret(ALLOW)]
        verdicts: dict[int, bpf.Program] = {
            NR["getppid"]: [bpf.ret(TRAP)],
            NR["rt_sigaction"]: [
                bpf.load(bpf.offset_arg_low(0)),
                bpf.Insn(bpf.BPF_JEQ_K, signal.SIGSYS, jt="kill"),
                bpf.ret(ALLOW),
                "kill",
                bpf.ret(KILL),
            ],
        }
        hotpath.trap_syscalls(slot.cell_address("trapped_syscall"))
        check(prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
        confine._install_filter(bpf.build_filter(verdicts, allow, foreign=KILL))
        os.getppid()

    wait_status, _ = _in_child(trap_getppid)
    assert os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGSYS
    assert slot.trapped_syscall == NR["getppid"]
    assert region.slot(0).trapped_syscall is None


def test_an_unprivileged_worker_keeps_its_user_and_is_confined(region: SharedRegion) -> None:
    """What a worker of a supervisor that is not root gets: the same, without a user switch."""
    nobody = pwd.getpwnam("nobody")

    def become_nobody_then_confine(ready: int) -> None:
        hotpath.binding()  # a worker has the engine loaded, as its supervisor's user, by now
        if os.geteuid() == 0:  # stand in for an unprivileged supervisor
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            confine._libc.prctl(4, 1, 0, 0, 0)  # dumpable again, as a forked worker is
        confine.confine(0, confine.Confinement(), region, region.slot(0))
        os.write(ready, b"!")

    wait_status, status = _in_child(become_nobody_then_confine)
    assert os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
    for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert status[caps].strip() == "0" * 16, caps
    expected = nobody.pw_uid if os.geteuid() == 0 else os.getuid()
    assert {int(uid) for uid in status["Uid"].split()} == {expected}


# -- runner threads ----------------------------------------------------------------------------


def test_the_runner_filter_allows_its_vcpu_s_ioctls_only() -> None:
    eperm = bpf.SECCOMP_RET_ERRNO | errno.EPERM
    program = runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS)
    well_formed(program)
    allowed = {NR[name] for name in runner_seccomp.ALLOWED}
    special = {NR["ioctl"], NR["mmap"], NR["mprotect"]}
    for nr in set(range(1024)) - special:
        assert run_filter(program, nr) == (ALLOW if nr in allowed else eperm), nr
    for request in (kvm.KVM_RUN, kvm.KVM_GET_REGS, kvm.KVM_SET_MSRS):
        assert run_filter(program, NR["ioctl"], (7, request)) == ALLOW
        assert run_filter(program, NR["ioctl"], (8, request)) == eperm
    for request in (kvm.KVM_CREATE_VCPU, kvm.KVM_SET_USER_MEMORY_REGION, 0x5412):
        assert run_filter(program, NR["ioctl"], (7, request)) == eperm
    assert run_filter(program, NR["mmap"], (0, 4096, PROT_READ | PROT_WRITE)) == ALLOW
    assert run_filter(program, NR["mprotect"], (0, 4096, PROT_READ | PROT_EXEC)) == eperm
    assert run_filter(program, 0, arch=0x40000003) == KILL


def test_the_runner_filter_sends_on_its_own_channel_only() -> None:
    eperm = bpf.SECCOMP_RET_ERRNO | errno.EPERM
    program = runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS, send_fd=9)
    well_formed(program)
    assert run_filter(program, NR["sendto"], (9,)) == ALLOW
    for fd in (7, 8, 10, 0):
        assert run_filter(program, NR["sendto"], (fd,)) == eperm
    for other in ("sendmsg", "recvfrom", "recvmsg", "connect"):
        assert run_filter(program, NR[other], (9,)) == eperm
    without = runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS)
    assert run_filter(without, NR["sendto"], (9,)) == eperm


def test_the_runner_filter_signals_its_own_worker_only_and_only_to_wake_it() -> None:
    """A runner wakes its worker from a read with `abi.WAKE_SIGNAL` through the worker's pidfd
    (here 11): any other pidfd, signal, siginfo (a pointer, whichever half) or flag is
    refused, and so is every other way to signal."""
    eperm = bpf.SECCOMP_RET_ERRNO | errno.EPERM
    send = NR["pidfd_send_signal"]
    program = runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS, send_fd=9, wake_pidfd=11)
    well_formed(program)
    wake = abi.WAKE_SIGNAL
    assert run_filter(program, send, (11, wake, 0, 0)) == ALLOW
    # The kernel reads the pidfd and the signal as ints: their low halves are all of them.
    assert run_filter(program, send, (11 | 1 << 32, wake | 1 << 32, 0, 0)) == ALLOW
    for args in (
        (12, wake, 0, 0),
        (7, wake, 0, 0),
        (11, signal.SIGKILL, 0, 0),
        (11, signal.SIGTERM, 0, 0),
        (11, wake, 0x7FFF_0000, 0),
        (11, wake, 1 << 32, 0),
        (11, wake, 0, 1),
        (11, wake, 0, 1 << 40),
    ):
        assert run_filter(program, send, args) == eperm, args
    for other in ("kill", "tgkill", "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        assert run_filter(program, NR[other], (11, wake)) == eperm
    without = runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS, send_fd=9)
    assert run_filter(without, send, (11, wake, 0, 0)) == eperm


def _idle_children(count: int) -> tuple[list[int], int]:
    """Fork `count` children that wait until the returned fd (a pipe's write end) is closed,
    then exit 0: (their pids, that fd)."""
    hold, release = os.pipe()
    pids: list[int] = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(release)
            os.read(hold, 1)  # EOF once the parent closes its end
            os._exit(0)
        pids.append(pid)
    os.close(hold)
    return pids, release


def test_a_confined_runner_thread_can_wake_its_worker_and_nothing_else() -> None:
    seen: dict[str, int] = {}
    (worker, other), release = _idle_children(2)
    worker_fd, other_fd = os.pidfd_open(worker), os.pidfd_open(other)
    try:

        def attempt(key: str, pidfd: int, signum: int) -> None:
            try:
                signal.pidfd_send_signal(pidfd, signum)
                seen[key] = 0
            except OSError as exc:
                seen[key] = exc.errno or -1

        def confined_thread() -> None:
            runner_seccomp.confine_thread(
                runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS, wake_pidfd=worker_fd)
            )
            attempt("wake", worker_fd, abi.WAKE_SIGNAL)  # ignored by default: harmless
            attempt("kill_worker", worker_fd, signal.SIGKILL)
            attempt("wake_other", other_fd, abi.WAKE_SIGNAL)

        thread = threading.Thread(target=confined_thread)
        thread.start()
        thread.join(30)
        assert seen == {"wake": 0, "kill_worker": errno.EPERM, "wake_other": errno.EPERM}
    finally:
        os.close(release)
        os.close(worker_fd)
        os.close(other_fd)
        statuses = [os.waitpid(pid, 0)[1] for pid in (worker, other)]
    assert statuses == [0, 0]  # neither was killed: both ended when released, with status 0


def test_a_runner_thread_s_filter_holds_that_thread_only(tmp_path: Path) -> None:
    seen: dict[str, int] = {}
    confined, release = threading.Event(), threading.Event()

    def confined_thread() -> None:
        runner_seccomp.confine_thread(runner_seccomp.build_filter(7, runners.ALLOWED_IOCTLS))
        seen["tid"] = threading.get_native_id()
        try:
            os.open(tmp_path / "x", os.O_CREAT | os.O_WRONLY)
        except OSError as exc:
            seen["open"] = exc.errno or 0
        confined.set()
        release.wait(30)

    thread = threading.Thread(target=confined_thread)
    thread.start()
    try:
        assert confined.wait(30)
        assert seen["open"] == errno.EPERM
        assert _status(seen["tid"])["Seccomp"].strip() == "2"
        # The rest of the process is not confined.
        os.close(os.open(tmp_path / "y", os.O_CREAT | os.O_WRONLY))
        assert _status(os.getpid())["Seccomp"].strip() == "0"
    finally:
        release.set()
        thread.join(30)
    assert not (tmp_path / "x").exists()

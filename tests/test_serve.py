"""`vmsuper serve`: runs handed to a ready supervisor behave as runs of their own command.

Real servers (`python -m vmsuper serve`, each with a runtime folder of its own) and real runs
(`python -m vmsuper run`, unsandboxed as the suite's are, with plugins in Python); hostile
commands talk to the server's socket directly.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmsuper import __version__
from vmsuper.shared import wire
from vmsuper.supervisor import serve_client
from vmsuper.supervisor.serve import Refusal, parse_request, refusal
from vmsuper.testing import VmSpec, write_python_plugin

TIMEOUT = 60


class Server:
    def __init__(self, runtime: Path, socket_path: Path | None = None) -> None:
        self.runtime = runtime
        self.env = dict(os.environ, VMSUPER_RUNTIME_DIR=str(runtime))
        self.env.pop(serve_client.SERVE_VARIABLE, None)
        where = ["--socket", str(socket_path)] if socket_path else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmsuper", "serve", *where],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.banner = self.proc.stderr.readline()  # once the run's modules are imported
        assert "listening on" in self.banner, self.banner
        self.socket = socket_path or runtime / serve_client.SOCKET_NAME

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> str:
        """SIGTERM: it ends once its runs have; a second one, should a run hang, stops them."""
        for _ in range(2):
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                _, err = self.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                continue
            return err
        self.proc.kill()
        _, err = self.proc.communicate()
        return err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    started = Server(tmp_path / "runtime")
    try:
        yield started
    finally:
        rest = started.stop()
        assert started.proc.returncode == 0, rest
        assert "vmsuper serve: stopped" in rest
        assert not started.socket.exists()


def config(folder: Path, body: str) -> Path:
    plugin = write_python_plugin(folder, body)
    path = folder / "vm.toml"
    path.write_text(VmSpec(sandbox=False, grace_period=0.3).to_toml(plugin, folder / "logs"))
    return path


def start_run(
    cfg: Path | str, env: dict[str, str], cwd: Path, umask: int = 0o022
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmsuper", "run", str(cfg)],
        env=env,
        cwd=cwd,
        umask=umask,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


REPORT_AND_EXIT = """
import json, os, sys
supervisor = os.getppid()
with open(f"/proc/{supervisor}/stat") as stat:
    grandparent = int(stat.read().rsplit(")", 1)[1].split()[1])
print(json.dumps({"supervisor": supervisor, "its_parent": grandparent,
                  "marker": os.environ.get("SERVE_TEST_MARKER"), "umask": os.umask(0)}))
sys.stdout.flush()
sys.exit(7)
"""

REPORT_AND_WAIT = """
import json, os, signal, sys
print(json.dumps({"plugin": os.getpid(), "supervisor": os.getppid()}), flush=True)
signal.pause()  # until vmsuper stops it
"""


@pytest.mark.kvm
def test_a_run_is_forked_by_the_server_with_the_command_s_streams_folder_env_and_status(
    server: Server, tmp_path: Path
) -> None:
    config(tmp_path, REPORT_AND_EXIT)
    env = dict(server.env, SERVE_TEST_MARKER="from-the-command")
    # A config named relative to the command's folder: the run works in that folder.
    proc = start_run("vm.toml", env, cwd=tmp_path, umask=0o027)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 7, err  # the plugin's status, as a run of its own gives
    report = json.loads(out.splitlines()[0])  # the plugin's stdout is the command's
    assert report["its_parent"] == server.proc.pid  # the supervisor is the server's fork
    assert report["marker"] == "from-the-command"
    assert report["umask"] == 0o027
    assert "vmsuper: logs in" in err  # the supervisor's stderr is the command's
    records = [json.loads(line) for line in (tmp_path / "logs" / "supervisor.jsonl").open()]
    assert {r["pid"] for r in records} == {report["supervisor"]}


REPORT_RAW_ENVIRONMENT = """
import os, sys
supervisor = os.getppid()
with open(f"/proc/{supervisor}/stat") as stat:
    its_parent = int(stat.read().rsplit(")", 1)[1].split()[1])
print(os.environb.get(b"SERVE_TEST_MARKER", b"(none)").hex(), its_parent, flush=True)
sys.exit(7)
"""


@pytest.mark.kvm
def test_undecodable_bytes_in_the_environment_and_command_line_are_handed_over_unchanged(
    server: Server, tmp_path: Path
) -> None:
    # Not UTF-8: os.environ and sys.argv hold such bytes as lone surrogates (\udcXX).
    named = config(tmp_path, REPORT_RAW_ENVIRONMENT).rename(tmp_path / "vm-\udcff.toml")
    env = dict(server.env, SERVE_TEST_MARKER="latin-1 caf\udce9 \udcff\udcfe")
    proc = start_run(named.name, env, cwd=tmp_path)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 7, err  # the plugin's status: the server took the run
    marker, its_parent = out.split()
    assert bytes.fromhex(marker) == b"latin-1 caf\xe9 \xff\xfe"
    assert int(its_parent) == server.proc.pid  # the supervisor is the server's fork


@pytest.mark.kvm
def test_a_served_command_ends_with_the_run_s_status_without_the_interpreter_s_teardown(
    server: Server, tmp_path: Path
) -> None:
    # The teardown frees every module and runs the exit handlers: a few milliseconds that
    # release nothing the system does not, as for a direct run (entry.exit_now).
    config(tmp_path, REPORT_AND_EXIT)
    command = (
        "import atexit, sys\n"
        "atexit.register(print, 'torn down')\n"
        "sys.argv = ['vmsuper', 'run', 'vm.toml']\n"
        "from vmsuper.supervisor.entry import main\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", command],
        env=server.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 7, done.stderr  # the plugin's status
    report = json.loads(done.stdout.splitlines()[0])
    assert report["its_parent"] == server.proc.pid  # served
    assert "torn down" not in done.stdout


@pytest.mark.kvm
def test_a_command_whose_folder_is_gone_runs_the_vm_itself(server: Server, tmp_path: Path) -> None:
    cfg = config(tmp_path, REPORT_AND_EXIT)
    gone = tmp_path / "gone"
    script = f'mkdir "{gone}" && cd "{gone}" && rmdir "{gone}" && exec "$@"'
    done = subprocess.run(
        ["sh", "-c", script, "sh", sys.executable, "-m", "vmsuper", "run", str(cfg)],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 7, done.stderr  # the plugin's status, from a run of its own
    said = "vmsuper: cannot hand the run to vmsuper serve (No such file or directory: the"
    assert said in done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["its_parent"] != server.proc.pid  # not the server's fork


@pytest.mark.kvm
def test_without_a_server_the_command_runs_the_vm_itself(tmp_path: Path) -> None:
    cfg = config(tmp_path, REPORT_AND_EXIT)
    env = dict(os.environ, VMSUPER_RUNTIME_DIR=str(tmp_path / "runtime"))
    env.pop(serve_client.SERVE_VARIABLE, None)
    proc = start_run(cfg, env, cwd=tmp_path)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 7, err
    assert json.loads(out.splitlines()[0])["supervisor"] == proc.pid


@pytest.mark.kvm
def test_serve_0_keeps_the_run_in_its_command_even_with_a_server(
    server: Server, tmp_path: Path
) -> None:
    cfg = config(tmp_path, REPORT_AND_EXIT)
    env = dict(server.env, **{serve_client.SERVE_VARIABLE: "0"})
    proc = start_run(cfg, env, cwd=tmp_path)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 7, err
    assert json.loads(out.splitlines()[0])["supervisor"] == proc.pid


def wait_gone(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=TIMEOUT)


@pytest.mark.kvm
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_command_s_stop_signals_reach_the_run(
    server: Server, tmp_path: Path, signum: int
) -> None:
    proc = start_run(config(tmp_path, REPORT_AND_WAIT), server.env, cwd=tmp_path)
    assert proc.stdout is not None
    pids = json.loads(proc.stdout.readline())  # the plugin runs: the run is under way
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signum, err  # as the supervisor reports it for itself
    assert signal.Signals(signum).name in err
    wait_gone(pids["plugin"])
    wait_gone(pids["supervisor"])


@pytest.mark.kvm
def test_a_command_that_dies_takes_its_run_with_it_and_the_server_serves_on(
    server: Server, tmp_path: Path
) -> None:
    proc = start_run(config(tmp_path, REPORT_AND_WAIT), server.env, cwd=tmp_path)
    assert proc.stdout is not None
    pids = json.loads(proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    wait_gone(pids["supervisor"])  # stopped by the server (SIGTERM), its plugin with it
    wait_gone(pids["plugin"])
    (tmp_path / "again").mkdir()
    again = start_run(config(tmp_path / "again", REPORT_AND_EXIT), server.env, cwd=tmp_path)
    assert again.wait(timeout=TIMEOUT) == 7


# -- hostile or confused commands ----------------------------------------------------------------


def talk(server: Server, payload: bytes, fds: list[int]) -> dict[str, object]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(str(server.socket))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        conn.sendmsg([payload], rights)
        reply: dict[str, object] = json.loads(conn.recv(1 << 16))
        assert conn.recv(1) == b""  # the server has closed its end, and whatever came with it
        return reply
    finally:
        conn.close()


def request(**changes: object) -> bytes:
    body: dict[str, object] = {
        "version": __version__,
        "argv": ["run", "vm.toml"],
        "cwd": "/",
        "env": {},
        "umask": 0o022,
    }
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.kvm
def test_bad_requests_are_refused_with_their_fds_closed_and_the_server_serves_on(
    server: Server, tmp_path: Path
) -> None:
    baseline = server.fd_count()
    stdio = [0, 1, 2]
    cases = [
        (b"{not json", stdio, "malformed request"),
        (request(), [], "expected 3 fds"),
        (request(), [0, 1, 2, 2], "expected 3 fds"),
        (request(argv=["check"]), stdio, "only 'vmsuper run'"),
        (request(umask=-1), stdio, "umask"),
        (request(cwd="relative"), stdio, "not absolute"),
        (request(env={"A": "b\0c"}), stdio, "NUL"),
        (request(shell="rm -rf /"), stdio, "malformed request"),
        (request(argv="run"), stdio, "malformed request"),
    ]
    for payload, fds, reason in cases:
        reply = talk(server, payload, fds)
        assert reason in str(reply["refused"]) and reply["local"] is False, (payload, reply)
    reply = talk(server, request(version="0.0.0-other"), stdio)
    assert reply["local"] is True  # another version: its command runs the VM itself
    assert server.fd_count() == baseline
    cfg = config(tmp_path, REPORT_AND_EXIT)
    assert start_run(cfg, server.env, cwd=tmp_path).wait(timeout=TIMEOUT) == 7


@pytest.mark.kvm
def test_a_peer_of_another_user_is_refused(tmp_path: Path) -> None:
    # The socket is the user's own (0600, in a 0700 folder); this one is put where another
    # user can reach it, to meet the server's own check of who is calling.
    reachable = Path(tempfile.mkdtemp(prefix="vmsuper-serve-"))
    reachable.chmod(0o755)
    server = Server(tmp_path / "runtime", reachable / "serve.sock")
    try:
        server.socket.chmod(0o777)
        nobody = pwd.getpwnam("nobody")
        answer_r, answer_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # little but system calls until _exit: the parent may have other threads
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                os.write(answer_w, json.dumps(talk(server, request(), [0, 1, 2])).encode())
            finally:
                os._exit(0)
        os.close(answer_w)
        with os.fdopen(answer_r, "rb") as answer:
            reply = json.loads(answer.read())
        os.waitpid(pid, 0)
        assert "is not this server's user" in str(reply["refused"]) and reply["local"] is False
    finally:
        server.stop()
        reachable.rmdir()


@pytest.mark.kvm
def test_a_second_server_on_the_same_socket_is_refused(server: Server) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmsuper", "serve"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 1
    assert "already listens" in done.stderr
    assert server.socket.exists() and server.proc.poll() is None


@pytest.mark.kvm
def test_a_socket_left_by_a_server_that_died_is_taken_over(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left.bind(str(runtime / serve_client.SOCKET_NAME))
    left.close()  # the file stays, with nobody listening
    server = Server(runtime)
    try:
        cfg = config(tmp_path, REPORT_AND_EXIT)
        proc = start_run(cfg, server.env, cwd=tmp_path)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 7, err
        assert json.loads(out.splitlines()[0])["its_parent"] == server.proc.pid
    finally:
        server.stop()


def test_a_file_in_the_socket_s_place_is_left_alone(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    precious = runtime / serve_client.SOCKET_NAME
    precious.write_text("not a socket")
    env = dict(os.environ, VMSUPER_RUNTIME_DIR=str(runtime))
    done = subprocess.run(
        [sys.executable, "-m", "vmsuper", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 1
    assert "exists and is not a socket" in done.stderr
    assert precious.read_text() == "not a socket"


def run_here_with_no_config(env: dict[str, str], folder: Path) -> str:
    """`vmsuper run` of a config that does not exist: status 2 shows the command ran it here
    (no server took it); returns its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "vmsuper", "run", str(folder / "absent.toml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2 and "config file not found" in done.stderr
    return done.stderr


def stand_in_listener(runtime: Path) -> socket.socket:
    """A stand-in server's socket where `vmsuper run` looks for one (`runtime` made 0700)."""
    runtime.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(runtime / serve_client.SOCKET_NAME))
    listener.listen(1)
    return listener


def take_request(listener: socket.socket) -> socket.socket:
    """Accept a command and read its request; the command's streams that come with it are
    closed (a stand-in must not keep them open). Returns the connection."""
    conn, _ = listener.accept()
    _, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * 4))
    for _, _, payload in ancillary:
        for fd in array.array("i", payload):
            os.close(fd)
    return conn


def test_a_server_that_sends_a_run_back_has_the_command_run_it(tmp_path: Path) -> None:
    """A stand-in server that refuses with `local`, or closes unanswered: the command runs
    the VM itself."""
    runtime = tmp_path / "runtime"
    listener = stand_in_listener(runtime)

    def refuse(answer: bytes) -> None:
        conn = take_request(listener)
        if answer:
            conn.send(answer)
        conn.close()

    env = dict(os.environ, VMSUPER_RUNTIME_DIR=str(runtime))
    env.pop(serve_client.SERVE_VARIABLE, None)
    sent_back = json.dumps({"refused": "its code changed", "local": True}).encode()
    for answer, said in (
        (sent_back, "did not take the run (its code changed); running it here"),
        (b"", "closed the connection without an answer; running the VM here"),
    ):
        stand_in = threading.Thread(target=refuse, args=(answer,))
        stand_in.start()
        stderr = run_here_with_no_config(env, tmp_path)
        stand_in.join()
        assert said in stderr
    listener.close()


def test_the_installed_command_imports_no_re_before_its_run_is_handed_over(
    tmp_path: Path,
) -> None:
    """The `vmsuper` script itself (bin/vmsuper), run with `-X importtime` against a stand-in
    server that takes the run and says it ended with 3: everything it imports comes before
    the hand-over. pip's entry-point wrapper imported re (with enum) first."""
    command = Path(sys.executable).with_name("vmsuper")
    assert command.is_file(), "./dev installs the vmsuper command beside the interpreter"
    runtime = tmp_path / "runtime"
    listener = stand_in_listener(runtime)
    # Stands in for the run (its pidfd goes over): blocks in a read of its stdin until killed.
    run = subprocess.Popen(["cat"], stdin=subprocess.PIPE)

    def take_and_end() -> None:
        conn = take_request(listener)
        pidfd = os.pidfd_open(run.pid)
        wire.send_datagram(conn, json.dumps({"started": run.pid}).encode(), [pidfd])
        os.close(pidfd)
        wire.send_datagram(conn, json.dumps({"exit": 3}).encode())
        conn.close()

    stand_in = threading.Thread(target=take_and_end)
    stand_in.start()
    env = dict(os.environ, VMSUPER_RUNTIME_DIR=str(runtime))
    env.pop(serve_client.SERVE_VARIABLE, None)
    try:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", str(command), "run", "vm.toml"],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        stand_in.join()
        listener.close()
        run.kill()
        run.wait()
        assert run.stdin is not None
        run.stdin.close()
    assert done.returncode == 3, done.stderr  # the status the stand-in sent
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "vmsuper.supervisor.serve_client" in imported
    assert not imported & {"re", "enum", "json", "socket", "typing", "collections"}


def test_a_socket_named_by_the_variable_is_used_only_if_this_user_s_server_listens(
    tmp_path: Path,
) -> None:
    """VMSUPER_SERVE_SOCKET may name a socket in a folder others can write: the command
    hands its environment and streams to a server of its own user only."""
    shared = Path(tempfile.mkdtemp(prefix="vmsuper-serve-"))
    shared.chmod(0o777)
    path = shared / "serve.sock"
    nobody = pwd.getpwnam("nobody")
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a stand-in server of another user: little but system calls until _exit
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(str(path))
            listener.listen(1)
            os.write(ready_w, b"!")
            conn, _ = listener.accept()
            data, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * 4))
            os.write(got_w, f"{len(data)} {len(ancillary)}".encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(got_w)
    try:
        assert os.read(ready_r, 1) == b"!"
        env = dict(os.environ, VMSUPER_SERVE_SOCKET=str(path))
        env.pop(serve_client.SERVE_VARIABLE, None)
        stderr = run_here_with_no_config(env, tmp_path)
        assert f"{path} is a server of uid {nobody.pw_uid}, not this user's" in stderr
        with os.fdopen(got_r, "rb") as got:
            assert got.read() == b"0 0"  # nothing sent: no environment, no streams
    finally:
        os.waitpid(pid, 0)
        os.close(ready_r)
        path.unlink(missing_ok=True)
        shared.rmdir()


# -- the request's checks, alone ---------------------------------------------------------------


def test_a_well_formed_request_is_taken() -> None:
    taken = parse_request(request(env={"PATH": "/bin"}), [5, 6, 7])
    assert (taken.argv, taken.cwd, taken.env, taken.umask) == (
        ["run", "vm.toml"],
        "/",
        {"PATH": "/bin"},
        0o022,
    )


def test_a_truncated_request_is_refused() -> None:
    with pytest.raises(Refusal, match="longer than"):
        raise refusal(wire.MessageTooLarge(2 << 20, 1 << 20))


def test_a_request_of_another_version_goes_back_to_its_command() -> None:
    with pytest.raises(Refusal) as info:
        parse_request(request(version="9"), [0, 1, 2])
    assert info.value.local


def test_after_the_server_s_preparation_user_lookups_load_nothing() -> None:
    """The first user lookup of a process loads the C library's NSS modules (for an absent
    user, a millisecond and more here); the server loads them before it forks, so a run's
    lookups (whom the plugin and the workers run as, whose homes to hide) map nothing new."""
    probe = """
import os, pwd
from vmsuper.supervisor import serve, sandbox_user
serve._prepare_a_run()
before = open("/proc/self/maps").read().count("\\n")
for name in ("no-such-user-of-vmsuper", *sandbox_user.DEFAULT_USERS):
    try:
        pwd.getpwnam(name)
    except KeyError:
        pass
pwd.getpwall()
print(before, open("/proc/self/maps").read().count("\\n"))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    before, after = map(int, done.stdout.split())
    assert after == before, "a user lookup mapped new objects after the server's preparation"

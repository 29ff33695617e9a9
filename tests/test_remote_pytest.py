"""The pytest plugin across hosts: pytest-xdist workers reached over ssh (execnet gateways).

The test starts its own sshd on a free port of 127.0.0.1 with keys made for it, runs a small
suite with ``-d --tx 2*ssh=...//python=<this venv's python>`` against it, and checks that the
VMs ran in the remote workers (processes under that sshd) and that a failing test names the
host and the remote log folder in the controller's report.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

SSHD = Path("/usr/sbin/sshd")
DEADLINE = 30.0

SUITE = """
import json, os
from pathlib import Path
import psutil
from vmsuper.testing import VmSpec

MARKS = Path({marks!r})


def plugin():
    return 0


def _record(name, result):
    (MARKS / (name + ".json")).write_text(json.dumps(
        {{
            "ancestors": [p.pid for p in psutil.Process().parents()],
            "log_dir": str(result.log_dir.resolve()),
        }}
    ))


def test_passes(vmsuper):
    result = vmsuper.run(plugin, VmSpec(sandbox=False))
    _record("passes", result)
    assert result.status == 0, result.stderr


def test_fails(vmsuper):
    result = vmsuper.run(plugin, VmSpec(sandbox=False))
    _record("fails", result)
    assert result.status == 1, "deliberately wrong"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + DEADLINE
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise AssertionError("sshd did not listen in time") from None
            time.sleep(0.05)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """An sshd of this test's own on 127.0.0.1; yields (client ssh_config, sshd's pid)."""
    if not SSHD.exists():
        pytest.fail("sshd is not installed (./dev installs openssh-server)")
    if os.geteuid() != 0:
        pytest.fail("the remote-worker test logs in as root on 127.0.0.1; run it as root")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True
        )
    shutil.copy(keys / "client_key.pub", keys / "authorized_keys")
    port = _free_port()
    (keys / "sshd_config").write_text(
        textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            Port {port}
            HostKey {keys / "host_key"}
            AuthorizedKeysFile {keys / "authorized_keys"}
            PidFile {keys / "sshd.pid"}
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            MaxStartups 20
            """)
    )
    config = keys / "ssh_config"
    config.write_text(
        textwrap.dedent(f"""\
            Host vmsuper-remote
                HostName 127.0.0.1
                Port {port}
                User root
                IdentityFile {keys / "client_key"}
                IdentitiesOnly yes
                StrictHostKeyChecking no
                UserKnownHostsFile /dev/null
                LogLevel ERROR
                BatchMode yes
            """)
    )
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port, proc)
        yield config, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_xdist_ssh_workers_run_the_vms_and_name_the_host_on_failure(
    tmp_path: Path, sshd: tuple[Path, int]
) -> None:
    config, sshd_pid = sshd
    marks = tmp_path / "marks"
    marks.mkdir()
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_remote_suite.py").write_text(textwrap.dedent(SUITE.format(marks=str(marks))))
    remote = tmp_path / "remote"
    spec = f"2*ssh=vmsuper-remote//ssh_config={config}//python={sys.executable}//chdir={remote}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-d",
            "--tx",
            spec,
            "--rsyncdir",
            str(suite),
            f"--rootdir={suite}",
            f"--junitxml={tmp_path / 'report.xml'}",
            "-W",
            "ignore::DeprecationWarning",
            str(suite / "test_remote_suite.py"),
        ],
        cwd=suite,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # one test fails, on purpose
    assert "1 failed, 1 passed" in out, out
    for name in ("passes", "fails"):
        record = json.loads((marks / f"{name}.json").read_text())
        assert sshd_pid in record["ancestors"], f"{name} did not run under the test's sshd"
        assert (Path(record["log_dir"]) / "supervisor.jsonl").exists()
    host = socket.gethostname()
    failing = json.loads((marks / "fails.json").read_text())
    assert "Captured vmsuper run call" in out, out
    assert f"host: {host}" in out
    assert f"log folder: {failing['log_dir']}" in out
    assert "[gw" in out and "ssh" in out  # the report names the ssh workers

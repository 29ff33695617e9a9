"""A real run's logs as `vmsuper logs` reads them: at every level, live, and at debug level.

The guest and plugin are the plugin guide's complete example (docs/examples): a console on
port 0xe9 (async writes), a read of port 0x500 the plugin answers with 21, and a write of the
doubled number to port 0x501.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmsuper.supervisor import logview
from vmsuper.testing import VmRunner, VmSpec, finish, write_python_plugin

pytestmark = pytest.mark.kvm

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"

# The example's plugin, then (with an argument) a wait on a FIFO before exiting, so a test
# can look at the run while it is live.
PLUGIN = f"""
import sys
sys.path.insert(0, {str(EXAMPLES)!r})
import minimal_plugin

status = minimal_plugin.main()
if len(sys.argv) > 1:
    with open(sys.argv[1]) as fifo:
        fifo.read()
sys.exit(status)
"""


def example_plugin(folder: Path) -> Path:
    return write_python_plugin(folder, PLUGIN, name="example_plugin.py")


def view(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    logview.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    status = logview.run(parser.parse_args(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def wait_for_record(path: Path, event: str, timeout: float = 60) -> dict[str, Any]:
    """The first record of `event` in the log at `path`, once it is written."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.endswith("}"):
                    record = json.loads(line)
                    if record["event"] == event:
                        return dict(record)
        assert time.monotonic() < deadline, f"no {event} record in {path}"
        time.sleep(0.02)


def test_a_run_at_warning_level_still_records_its_start_end_and_counts(tmp_path: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(
        example_plugin(tmp_path), VmSpec(log_level="warning", sandbox=False)
    )
    assert result.status == 0, result.stderr
    assert result.events() == ["run_started", "run_finished"]
    assert result.events("vcpu-0") == ["vcpu_exit_counts"]
    status, out, err = view([str(result.log_dir), "--summary", "--json"])
    assert (status, err) == (0, "")
    summary = json.loads(out)
    assert summary["run"] == {"status": 0, "reason": "plugin exited with status 0"}
    assert summary["missing"] == []
    vcpu0 = summary["vcpus"]["0"]
    # The greeting's 22 bytes, the question and the answer.
    assert vcpu0["exits"]["async_write"] == len("Hello from the guest!\n")
    assert vcpu0["ranges"]["ioport:0x500+2"] == 2
    assert vcpu0["run_seconds"] > 0
    assert vcpu0["exits_per_second"] == pytest.approx(vcpu0["total"] / vcpu0["run_seconds"])
    status, out, _ = view([str(result.log_dir), "--summary"])
    assert out.startswith("run finished: status 0 (plugin exited with status 0)\n")
    assert "did not shut down cleanly" not in out
    # --follow on the finished run returns at once.
    status, out, _ = view([str(result.log_dir), "--follow", "--json"])
    assert status == 0
    assert json.loads(out.splitlines()[-1])["event"] == "run_finished"


def test_run_names_its_log_folder_on_stderr_first(tmp_path: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(example_plugin(tmp_path), VmSpec(sandbox=False))
    assert result.status == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"vmsuper: logs in {result.log_dir}"


def test_summary_and_follow_of_a_live_run_and_after(tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    spec = VmSpec(log_level="warning", sandbox=False, args=[str(fifo)])
    proc, config, log_dir = VmRunner(tmp_path / "runs").start(example_plugin(tmp_path), spec)
    try:
        # At warning level run_started is all a healthy live run writes; the plugin then
        # waits on the FIFO until the test lets it go.
        wait_for_record(log_dir / "supervisor.jsonl", "run_started")
        status, out, _ = view([str(log_dir), "--summary"])
        assert status == 0
        assert out.startswith(f"run: live (supervisor pid {proc.pid})"), out
        assert "did not shut down cleanly" not in out
        follower = subprocess.Popen(
            [*logview_command(), str(log_dir), "--follow", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        with open(fifo, "w"):
            pass  # lets the plugin exit
    result = finish(proc, config, log_dir, 60)
    assert result.status == 0, result.stderr
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["event"] == "run_finished"


def test_follow_returns_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    spec = VmSpec(sandbox=False, args=[str(fifo)])
    proc, config, log_dir = VmRunner(tmp_path / "runs").start(example_plugin(tmp_path), spec)
    wait_for_record(log_dir / "vcpu-0.jsonl", "running")
    follower = subprocess.Popen(
        [*logview_command(), str(log_dir), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.send_signal(signal.SIGKILL)
    finish(proc, config, log_dir, 60)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 1
    assert "the supervisor is gone without a run_finished record" in err
    status, out, _ = view([str(log_dir), "--summary"])
    assert status == 0
    assert out.startswith("run: no run_finished record, and the supervisor")


def logview_command() -> list[str]:
    return [sys.executable, "-m", "vmsuper", "logs"]


def test_debug_exit_records_have_hex_ports_data_and_response_time(tmp_path: Path) -> None:
    result = VmRunner(tmp_path / "runs").run(
        example_plugin(tmp_path), VmSpec(log_level="debug", sandbox=False)
    )
    assert result.status == 0, result.stderr
    exits = [r for r in result.vcpu_records(0) if r["event"] == "exit" and r["kind"] == "io"]
    by_port: dict[str, list[dict[str, Any]]] = {}
    for record in exits:
        by_port.setdefault(record["port"], []).append(record)
    assert set(by_port) == {"0xe9", "0x500", "0x501"}
    console = by_port["0xe9"]
    assert bytes.fromhex("".join(r["data"] for r in console)) == b"Hello from the guest!\n"
    assert {r["response_us"] for r in console} == {None}  # async writes: no Resume
    [question] = by_port["0x500"]
    assert (question["is_write"], question["data"]) == (False, "1500")  # 21, as answered
    assert isinstance(question["response_us"], float) and question["response_us"] > 0
    [answer] = by_port["0x501"]
    assert (answer["is_write"], answer["data"]) == (True, "2a00")  # 42, as written
    assert isinstance(answer["response_us"], float) and answer["response_us"] > 0
    assert "resumed" not in answer

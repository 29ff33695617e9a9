"""Structured JSON-lines logging: fields, levels, re-configuration and fork."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vmsuper.shared import logs


@pytest.fixture(autouse=True)
def _close_log_file() -> Iterator[None]:
    yield
    logs.close_logging()


def read(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_record_fields_and_order(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    log = logs.configure_logging(path, level="info")
    log.info("vm_created", vcpus=2, name="demo run")
    [record] = read(path)
    assert list(record)[:4] == ["timestamp", "level", "pid", "event"]
    assert record["event"] == "vm_created"
    assert record["level"] == "info"
    assert record["pid"] == os.getpid()
    assert "vcpu" not in record
    assert record["vcpus"] == 2
    assert record["name"] == "demo run"
    stamp = datetime.fromisoformat(record["timestamp"])
    assert stamp.tzinfo is not None
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert len(record["timestamp"]) == len("2025-01-01T00:00:00.000000Z")


def test_vcpu_field_from_configuration_or_call(tmp_path: Path) -> None:
    path = tmp_path / "vcpu-3.jsonl"
    log = logs.configure_logging(path, level="debug", vcpu=3)
    log.debug("exit", kind="io")
    log.info("other", vcpu=5)
    records = read(path)
    assert [r["vcpu"] for r in records] == [3, 5]
    assert list(records[0])[:5] == ["timestamp", "level", "pid", "vcpu", "event"]


def test_levels_are_filtered(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = logs.configure_logging(path, level="warning")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert [(r["event"], r["level"]) for r in read(path)] == [
        ("w", "warning"),
        ("e", "error"),
        ("c", "critical"),
    ]


def test_filtered_records_are_not_rendered(tmp_path: Path) -> None:
    class Loud:
        def __repr__(self) -> str:
            raise AssertionError("rendered a filtered record")

    path = tmp_path / "log.jsonl"
    log = logs.configure_logging(path, level="info")
    log.debug("hot_path", value=Loud())
    assert path.read_text() == ""


def test_unknown_level_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.configure_logging(tmp_path / "x.jsonl", level="loud")


def test_level_is_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    logs.configure_logging(path, level="ERROR").warning("dropped")
    assert path.read_text() == ""


def test_appends_and_creates_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "log.jsonl"
    logs.configure_logging(path, level="info").info("first")
    logs.configure_logging(path, level="info").info("second")
    assert [r["event"] for r in read(path)] == ["first", "second"]


def test_every_line_is_json_with_awkward_values(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = logs.configure_logging(path, level="info")
    log.info("values", text="line\nbreak", data=b"\x00\xff", obj=object(), nested={"a": [1, 2]})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["text"] == "line\nbreak"
    assert first["nested"] == {"a": [1, 2]}
    assert second["level"] == "error"
    assert "RuntimeError: boom" in second["exception"]


def test_reconfiguration_reaches_cached_loggers(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    logs.configure_logging(first, level="info")
    cached = logs.get_logger(component="runner")
    cached.info("one")
    logs.configure_logging(second, level="error", vcpu=1)
    cached.info("dropped")
    cached.error("two")
    assert [r["event"] for r in read(first)] == ["one"]
    [record] = read(second)
    assert record["event"] == "two"
    assert record["component"] == "runner"
    assert record["vcpu"] == 1


def test_forked_worker_writes_its_own_file(tmp_path: Path) -> None:
    parent_path, child_path = tmp_path / "supervisor.jsonl", tmp_path / logs.vcpu_log_name(0)
    log = logs.configure_logging(parent_path, level="info")
    log.info("before_fork")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        status = 0
        try:
            logs.configure_logging(child_path, level="info", vcpu=0)
            log.info("in_worker")
            logs.close_logging()
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log.info("after_fork")
    parent = read(parent_path)
    assert [r["event"] for r in parent] == ["before_fork", "after_fork"]
    assert {r["pid"] for r in parent} == {os.getpid()}
    [child] = read(child_path)
    assert child["event"] == "in_worker"
    assert child["vcpu"] == 0
    assert child["pid"] == pid


def test_echo_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.jsonl"
    log = logs.configure_logging(path, level="info", echo_stderr=True)
    log.info("plugin_started", pid_of_plugin=42)
    err = capsys.readouterr().err
    assert "super  info     plugin_started  pid_of_plugin=42" in err
    assert read(path)[0]["event"] == "plugin_started"


def test_after_close_records_go_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log.jsonl"
    log = logs.configure_logging(path, level="info")
    logs.close_logging()
    log.info("late")
    assert path.read_text() == ""
    assert json.loads(capsys.readouterr().err)["event"] == "late"


def test_format_text() -> None:
    record = {
        "timestamp": "2025-03-04T05:06:07.123456Z",
        "level": "warning",
        "pid": 9,
        "vcpu": 1,
        "event": "slow_exit",
        "port": 1016,
        "note": "two words",
        "plain": "ok",
        "counts": {"io": 3},
    }
    assert logs.format_text(record) == (
        '05:06:07.123456  vcpu1  warning  slow_exit  port=1016  note="two words"'
        '  plain=ok  counts={"io":3}'
    )


def test_vcpu_log_name() -> None:
    assert logs.vcpu_log_name(12) == "vcpu-12.jsonl"
    assert logs.SUPERVISOR_LOG == "supervisor.jsonl"


def test_log_folders_and_files_are_private(tmp_path: Path) -> None:
    # New: every folder made is 0700 and the file 0600, whatever the umask lets through.
    fresh = tmp_path / "runs" / "run-1" / "supervisor.jsonl"
    logs.configure_logging(fresh, level="info")
    assert [mode(p) for p in (fresh.parent.parent, fresh.parent, fresh)] == [0o700, 0o700, 0o600]
    # Left by an earlier run in a fixed folder: made private too.
    old = tmp_path / "fixed"
    old.mkdir(mode=0o755)
    (old / "supervisor.jsonl").write_text("")
    (old / "supervisor.jsonl").chmod(0o644)
    logs.configure_logging(old / "supervisor.jsonl", level="info")
    assert (mode(old), mode(old / "supervisor.jsonl")) == (0o700, 0o600)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_essential_records_are_kept_at_every_level(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.jsonl"
    log = logs.configure_logging(path, level="error")
    log.info("dropped")
    logs.essential_logger().info("run_finished", status=0)
    log.warning("dropped too")
    [record] = read(path)
    assert (record["event"], record["level"], record["status"]) == ("run_finished", "info", 0)
    assert record["pid"] == os.getpid()


def test_essential_records_carry_the_worker_s_vcpu(tmp_path: Path) -> None:
    path = tmp_path / "vcpu-2.jsonl"
    logs.configure_logging(path, level="warning", vcpu=2)
    logs.essential_logger().info("vcpu_exit_counts", exits={})
    assert [(r["event"], r["vcpu"]) for r in read(path)] == [("vcpu_exit_counts", 2)]


def test_run_is_live_while_the_supervisor_holds_its_log(tmp_path: Path) -> None:
    assert not logs.run_is_live(tmp_path)  # no log at all
    logs.configure_logging(tmp_path / logs.SUPERVISOR_LOG, level="info", mark_live=True)
    assert logs.run_is_live(tmp_path)
    logs.close_logging()
    assert not logs.run_is_live(tmp_path)
    logs.configure_logging(tmp_path / logs.SUPERVISOR_LOG, level="info")
    assert not logs.run_is_live(tmp_path)


def test_a_killed_supervisor_is_not_live(tmp_path: Path) -> None:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            logs.configure_logging(tmp_path / logs.SUPERVISOR_LOG, level="info", mark_live=True)
            os.write(ready_w, b"x")
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x", "the child never locked its log"
        assert logs.run_is_live(tmp_path)
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not logs.run_is_live(tmp_path)


def test_what_structlog_s_import_left_for_later_works_on_first_use(tmp_path: Path) -> None:
    # A fresh interpreter, so that structlog is imported here with its stand-ins.
    log_file = tmp_path / "x.jsonl"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from vmsuper.shared import logs\n"
        "deferred = ('asyncio', 'structlog.stdlib', 'structlog.threadlocal', 'logging')\n"
        "assert not [name for name in deferred if name in sys.modules]\n"
        f"log = logs.configure_logging(Path({str(log_file)!r}), level='info')\n"
        "import asyncio\n"
        "assert type(sys.modules['asyncio']) is type(sys)\n"
        "asyncio.run(log.ainfo('from_a_coroutine', n=1))\n"
        "import logging, structlog\n"
        "assert type(sys.modules['logging']) is type(sys)\n"
        "assert isinstance(structlog.stdlib.LoggerFactory()('x'), logging.Logger)\n"
        "assert structlog.stdlib is sys.modules['structlog.stdlib']\n"
        "assert callable(structlog.threadlocal.merge_threadlocal)\n"
        "assert structlog.threadlocal is sys.modules['structlog.threadlocal']\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    [record] = read(log_file)
    assert (record["event"], record["n"]) == ("from_a_coroutine", 1)

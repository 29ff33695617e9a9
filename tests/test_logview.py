"""`vmsuper logs`: merging, filters, malformed lines, summary and follow, on synthetic folders."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vmsuper.shared import logs as logs_module
from vmsuper.supervisor import logview

T0 = datetime(2025, 3, 4, 5, 6, 7, 0, tzinfo=UTC)


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rec(seconds: float, event: str, level: str = "info", **fields: Any) -> dict[str, Any]:
    return {"timestamp": stamp(seconds), "level": level, "pid": 1, "event": event, **fields}


def write(folder: Path, name: str, records: list[dict[str, Any]]) -> Path:
    path = folder / name
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write(
        tmp_path,
        "supervisor.jsonl",
        [
            rec(0.0, "run_started"),
            rec(0.5, "vcpu_started", vcpu=0),
            rec(3.0, "run_finished", status=0, reason="plugin exited"),
        ],
    )
    write(
        tmp_path,
        "vcpu-0.jsonl",
        [
            rec(1.0, "exit", "debug", vcpu=0, kind="io", port=1016),
            rec(
                2.0,
                "vcpu_exit_counts",
                vcpu=0,
                exits={"io": 10, "mmio": 2},
                ranges={"a": 4},
                run_seconds=1.5,
            ),
        ],
    )
    write(
        tmp_path,
        "vcpu-1.jsonl",
        [
            rec(1.5, "slow", "warning", vcpu=1),
            rec(
                2.5,
                "vcpu_exit_counts",
                vcpu=1,
                exits={"io": 1, "user": 1},
                ranges={"b": 1},
                run_seconds=0.5,
            ),
        ],
    )
    return tmp_path


@contextlib.contextmanager
def live_supervisor(folder: Path) -> Iterator[None]:
    """Hold the lock a running supervisor holds on its log (see `logs.run_is_live`)."""
    with (folder / "supervisor.jsonl").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        yield


def logs(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = logview.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def events(text: str) -> list[str]:
    return [line.split()[3] for line in text.splitlines()]


def test_merges_files_by_time(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = logs([str(run_dir)], capsys)
    assert status == 0
    assert err == ""
    assert events(out) == [
        "run_started",
        "vcpu_started",
        "exit",
        "slow",
        "vcpu_exit_counts",
        "vcpu_exit_counts",
        "run_finished",
    ]
    assert out.splitlines()[2] == "05:06:08.000000  vcpu0  debug    exit  kind=io  port=1016"
    assert out.splitlines()[0] == "05:06:07.000000  super  info     run_started"


def test_json_prints_lines_as_written(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = logs([str(run_dir), "--json", "--vcpu", "1"], capsys)
    assert status == 0
    assert out.splitlines() == (run_dir / "vcpu-1.jsonl").read_text().splitlines()


def test_vcpu_filter(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = logs([str(run_dir), "--vcpu", "0"], capsys)
    assert events(out) == ["vcpu_started", "exit", "vcpu_exit_counts"]
    _, out, _ = logs([str(run_dir), "--vcpu", "0", "--vcpu", "1"], capsys)
    assert events(out) == ["vcpu_started", "exit", "slow", "vcpu_exit_counts", "vcpu_exit_counts"]


def test_vcpu_taken_from_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "vcpu-7.jsonl", [rec(0, "no_vcpu_field")])
    _, out, _ = logs([str(tmp_path), "--vcpu", "7"], capsys)
    assert out.split()[1:4] == ["vcpu7", "info", "no_vcpu_field"]


def test_event_filter_exact_and_glob(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = logs([str(run_dir), "--event", "exit"], capsys)
    assert events(out) == ["exit"]
    _, out, _ = logs([str(run_dir), "--event", "run_*", "--event", "slow"], capsys)
    assert events(out) == ["run_started", "slow", "run_finished"]


def test_level_filter(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = logs([str(run_dir), "--level", "warning"], capsys)
    assert events(out) == ["slow"]
    _, out, _ = logs([str(run_dir), "--level", "info"], capsys)
    assert "exit" not in events(out)
    assert len(events(out)) == 6


def test_since_until_relative_and_iso(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = logs([str(run_dir), "--since", "1", "--until", "2"], capsys)
    assert events(out) == ["exit", "slow", "vcpu_exit_counts"]
    _, out, _ = logs([str(run_dir), "--since", stamp(2.5)], capsys)
    assert events(out) == ["vcpu_exit_counts", "run_finished"]
    naive = (T0 + timedelta(seconds=0.5)).replace(tzinfo=None).isoformat()
    _, out, _ = logs([str(run_dir), "--until", naive], capsys)
    assert events(out) == ["run_started", "vcpu_started"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.5", logview.TimeBound(offset=2.5)),
        ("0", logview.TimeBound(offset=0.0)),
        ("2025-03-04T05:06:07Z", logview.TimeBound(at=T0)),
        ("2025-03-04T06:06:07+01:00", logview.TimeBound(at=T0)),
        ("2025-03-04T05:06:07", logview.TimeBound(at=T0)),
    ],
)
def test_parse_time_bound(text: str, expected: logview.TimeBound) -> None:
    bound = logview.parse_time_bound(text)
    assert bound.offset == expected.offset
    assert bound.at == expected.at


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "yesterday", "5s"])
def test_parse_time_bound_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        logview.parse_time_bound(text)


def test_bad_since_is_usage_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        logview.main([str(run_dir), "--since", "soon"])
    assert info.value.code == 2
    assert "--since" in capsys.readouterr().err


def test_malformed_lines_reported_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "supervisor.jsonl", [rec(0, "first")])
    with path.open("a") as f:
        f.write("{not json\n")
        f.write("[1, 2]\n")
        f.write("\n")
        f.write(json.dumps({"event": "no_time"}) + "\n")
        f.write(json.dumps({"timestamp": "noon", "event": "bad_time"}) + "\n")
        f.write(json.dumps(rec(1, "last")) + "\n")
    status, out, err = logs([str(tmp_path)], capsys)
    assert status == 0
    assert events(out) == ["first", "last"]
    assert err.splitlines() == [
        f"vmsuper logs: {path}:2: skipped malformed line (not JSON)",
        f"vmsuper logs: {path}:3: skipped malformed line (not a JSON object)",
        f"vmsuper logs: {path}:5: skipped malformed line (no timestamp)",
        f"vmsuper logs: {path}:6: skipped malformed line (bad timestamp 'noon')",
    ]


def test_malformed_reports_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "supervisor.jsonl"
    path.write_text("junk\n" * 50)
    status, out, err = logs([str(tmp_path)], capsys)
    assert status == 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == logview.MAX_MALFORMED_REPORTS + 1
    assert lines[-1] == f"vmsuper logs: {path}: further malformed lines are not reported"


def test_unterminated_last_line_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "supervisor.jsonl", [rec(0, "first")])
    with path.open("a") as f:
        f.write(json.dumps(rec(1, "cut_short")))
    _, out, _ = logs([str(tmp_path)], capsys)
    assert events(out) == ["first", "cut_short"]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = logs([str(tmp_path / "nope")], capsys)
    assert status == 1
    assert out == ""
    assert err == f"vmsuper logs: error: no such folder: {tmp_path / 'nope'}\n"


def test_folder_without_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other.txt").write_text("x")
    status, _, err = logs([str(tmp_path)], capsys)
    assert status == 1
    assert err.startswith(f"vmsuper logs: error: no logs in {tmp_path}")


def test_file_instead_of_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "supervisor.jsonl", [rec(0, "x")])
    status, _, err = logs([str(path)], capsys)
    assert status == 1
    assert err == f"vmsuper logs: error: not a folder: {path}\n"


def test_summary_text(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(run_dir, "vcpu-2.jsonl", [rec(1, "started", vcpu=2)])
    status, out, _ = logs([str(run_dir), "--summary"], capsys)
    assert status == 0
    assert out == (
        "run finished: status 0 (plugin exited)\n"
        "\n"
        "per VCPU:\n"
        "  vcpu   run time  exits  exits/s\n"
        "  vcpu0   1.500 s     12      8.0\n"
        "  vcpu1   0.500 s      2      4.0\n"
        "  vcpu2         -      -        -\n"
        "\n"
        "exits by kind:\n"
        "  vcpu   io  mmio  user  total\n"
        "  vcpu0  10     2     0     12\n"
        "  vcpu1   1     0     1      2\n"
        "  total  11     2     1     14\n"
        "\n"
        "exits by reserved range:\n"
        "  range  vcpu0  vcpu1  total\n"
        "  a          4      0      4\n"
        "  b          0      1      1\n"
        "  total      4      1      5\n"
        "\n"
        "no exit counts from vcpu2 (worker did not shut down cleanly)\n"
    )


def test_summary_json_and_vcpu_filter(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = logs([str(run_dir), "--summary", "--json", "--vcpu", "1"], capsys)
    assert status == 0
    assert json.loads(out) == {
        "run": {"status": 0, "reason": "plugin exited"},
        "live": False,
        "supervisor_pid": 1,
        "vcpus": {
            "1": {
                "run_seconds": 0.5,
                "total": 2,
                "exits_per_second": 4.0,
                "exits": {"io": 1, "user": 1},
                "ranges": {"b": 1},
            }
        },
        "missing": [],
    }


def test_summary_sums_repeated_counts() -> None:
    records = [
        logview.Record(T0, {"event": "vcpu_exit_counts", "vcpu": 0, "exits": {"io": 2}}, "", 0, 1),
        logview.Record(
            T0, {"event": "vcpu_exit_counts", "vcpu": 0, "exits": {"io": 3, "x": True}}, "", 0, 2
        ),
    ]
    summary = logview.summarize(records)
    assert summary.exits == {0: {"io": 5}}


def test_summary_of_a_dead_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "supervisor.jsonl", [rec(0, "run_started", vcpus=1)])
    _, out, _ = logs([str(tmp_path), "--summary"], capsys)
    assert out.startswith(
        "run: no run_finished record, and the supervisor (supervisor pid 1) is gone"
    )
    assert "no exit counts from vcpu0 (worker did not shut down cleanly)" in out
    _, out, _ = logs([str(tmp_path), "--summary", "--json"], capsys)
    summary = json.loads(out)
    assert (summary["run"], summary["live"], summary["missing"]) == (None, False, [0])


def test_summary_of_a_live_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Timestamps are recent: the run time so far is measured to now.
    def at(seconds_ago: float, event: str, **fields: Any) -> dict[str, Any]:
        when = datetime.now(UTC) - timedelta(seconds=seconds_ago)
        return {**rec(0, event, **fields), "timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}

    write(tmp_path, "supervisor.jsonl", [at(60, "run_started", vcpus=2)])
    write(tmp_path, "vcpu-0.jsonl", [at(50, "running", vcpu=0)])
    with live_supervisor(tmp_path):
        status, out, _ = logs([str(tmp_path), "--summary"], capsys)
        _, as_json, _ = logs([str(tmp_path), "--summary", "--json"], capsys)
    assert status == 0
    assert out.startswith("run: live (supervisor pid 1)")
    assert "did not shut down cleanly" not in out
    assert "no run_finished" not in out
    [vcpu0] = [line.split() for line in out.splitlines() if line.startswith("  vcpu0")]
    assert vcpu0[2:4] == ["s", "so"] and 50 <= float(vcpu0[1]) < 3600
    summary = json.loads(as_json)
    assert summary["live"] is True
    assert summary["missing"] == []
    assert sorted(summary["vcpus"]) == ["0", "1"]
    assert summary["vcpus"]["1"]["run_seconds"] is None


def test_summary_rejects_filters(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = logs([str(run_dir), "--summary", "--event", "x"], capsys)
    assert status == 2
    assert out == ""
    assert "--summary takes only --vcpu and --json" in err


class SignallingOut(io.StringIO):
    """Output that tells the writer thread when the follower has printed something."""

    def __init__(self) -> None:
        super().__init__()
        self.printed = threading.Event()

    def write(self, text: str) -> int:
        self.printed.set()
        return super().write(text)


def test_follow_reads_growing_files_until_run_finished(tmp_path: Path) -> None:
    sup = write(tmp_path, "supervisor.jsonl", [rec(0, "run_started")])
    out = SignallingOut()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            assert out.printed.wait(30)
            vcpu = tmp_path / "vcpu-0.jsonl"
            line = json.dumps(rec(1, "exit", vcpu=0, kind="io"))
            with vcpu.open("a") as f:  # a new file, and a line in two pieces
                f.write(line[:10])
                f.flush()
                time.sleep(0.05)
                f.write(line[10:] + "\n")
            write(tmp_path, "vcpu-0.jsonl", [rec(2, "vcpu_exit_counts", vcpu=0, exits={})])
            write(tmp_path, "supervisor.jsonl", [rec(3, "run_finished", status=0, reason="ok")])
        except BaseException as exc:
            failures.append(exc)
            write(tmp_path, "supervisor.jsonl", [rec(3, "run_finished", status=1, reason="x")])

    args = argparse.Namespace(
        dir=tmp_path,
        vcpu=None,
        event=None,
        level=None,
        since=None,
        until=None,
        follow=True,
        summary=False,
        json=False,
    )
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with live_supervisor(tmp_path):
            status = logview.run(args, out=out, err=io.StringIO(), poll_interval=0.01)
    finally:
        thread.join()
    assert not failures
    assert status == 0
    assert events(out.getvalue()) == ["run_started", "exit", "vcpu_exit_counts", "run_finished"]
    assert sup.exists()


def test_follow_on_finished_run_exits(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = logs([str(run_dir), "--follow", "--json", "--event", "run_*"], capsys)
    assert status == 0
    assert [json.loads(line)["event"] for line in out.splitlines()] == [
        "run_started",
        "run_finished",
    ]


def test_run_finished_from_a_worker_does_not_stop_follow(tmp_path: Path) -> None:
    write(tmp_path, "vcpu-0.jsonl", [rec(0, "run_finished", vcpu=0)])
    write(tmp_path, "supervisor.jsonl", [rec(1, "run_started")])
    folder = logview._Folder(tmp_path, logview._Malformed(io.StringIO()))
    folder.discover()
    try:
        batch = folder.read(final=False)
        assert [logview._is_run_finished(r, folder) for r in batch] == [False, False]
    finally:
        folder.close()


def follow_args(folder: Path, **overrides: Any) -> argparse.Namespace:
    fields: dict[str, Any] = {
        "dir": folder,
        "vcpu": None,
        "event": None,
        "level": None,
        "since": None,
        "until": None,
        "follow": True,
        "summary": False,
        "json": False,
    }
    return argparse.Namespace(**{**fields, **overrides})


def test_follow_returns_when_the_supervisor_died(tmp_path: Path) -> None:
    write(tmp_path, "supervisor.jsonl", [rec(0, "run_started", vcpus=1)])
    write(tmp_path, "vcpu-0.jsonl", [rec(1, "running", vcpu=0)])
    out, err = io.StringIO(), io.StringIO()
    status = logview.run(follow_args(tmp_path), out=out, err=err, poll_interval=0.01)
    assert status == 1
    assert events(out.getvalue()) == ["run_started", "running"]
    assert "the supervisor is gone without a run_finished record" in err.getvalue()


def test_follow_keeps_going_while_the_supervisor_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "supervisor.jsonl", [rec(0, "run_started", vcpus=1)])
    checks: list[bool] = []
    polled_enough = threading.Event()

    def counted(folder: Path) -> bool:
        checks.append(logs_module.run_is_live(folder))
        if len(checks) >= 10:
            polled_enough.set()
        return checks[-1]

    monkeypatch.setattr(logview, "run_is_live", counted)
    result: list[int] = []
    with live_supervisor(tmp_path):
        thread = threading.Thread(
            target=lambda: result.append(
                logview.run(
                    follow_args(tmp_path), out=io.StringIO(), err=io.StringIO(), poll_interval=0.01
                )
            )
        )
        thread.start()
        assert polled_enough.wait(30)
        assert thread.is_alive()
        assert all(checks)
    # The lock is gone with its holder: the follower notices and returns.
    thread.join(30)
    assert result == [1]
    assert checks[-2:] == [False, False]


def test_unknown_vcpu_is_an_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(run_dir, "supervisor.jsonl", [rec(0.1, "run_started", vcpus=2)])
    for extra in ([], ["--summary"], ["--follow"]):
        status, out, err = logs([str(run_dir), "--vcpu", "5", *extra], capsys)
        assert status == 2
        assert out == ""
        assert err == "vmsuper logs: error: no VCPU 5 in this run (it has VCPUs 0, 1)\n"


def test_vcpu_count_comes_from_run_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "supervisor.jsonl", [rec(0, "run_started", vcpus=4)])
    status, _, err = logs([str(tmp_path), "--vcpu", "3"], capsys)
    assert (status, err) == (0, "")
    status, _, err = logs([str(tmp_path), "--vcpu", "4"], capsys)
    assert status == 2
    assert "no VCPU 4 in this run (it has VCPUs 0-3)" in err


def test_unknown_event_is_an_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = logs([str(run_dir), "--event", "exits", "--event", "run_*"], capsys)
    assert status == 2
    assert out == ""
    assert err == (
        "vmsuper logs: error: no record of this run has event 'exits'; its events: exit,"
        " run_finished, run_started, slow, vcpu_exit_counts, vcpu_started\n"
    )
    # An event the run has, outside the time window: no output, no error.
    status, out, err = logs([str(run_dir), "--event", "slow", "--until", "1"], capsys)
    assert (status, out, err) == (0, "", "")


def test_unknown_event_while_following_is_a_warning(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = logs([str(run_dir), "--follow", "--event", "vcpu_failed"], capsys)
    assert status == 0
    assert out == ""
    assert err.startswith("vmsuper logs: warning: no record of this run has event 'vcpu_failed'")


def make_run(root: Path, name: str, started: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    write(folder, "supervisor.jsonl", [rec(started, "run_started", vcpus=1, run=name)])
    return folder


def test_without_dir_the_latest_run_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run(tmp_path / "runs", "b-older", 1)
    newest = make_run(tmp_path / "configs" / "runs", "a-newer", 2)
    (tmp_path / "configs" / "runs" / "not-a-run").mkdir()
    monkeypatch.chdir(tmp_path)
    status, out, err = logs(["--json"], capsys)
    assert status == 0
    assert json.loads(out)["run"] == "a-newer"
    assert err == f"vmsuper logs: reading the latest run, {newest}\n"
    # A folder of runs: its latest.
    status, out, _ = logs([str(tmp_path / "runs"), "--json"], capsys)
    assert (status, json.loads(out)["run"]) == (0, "b-older")


def test_without_dir_and_no_runs_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "configs" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    status, out, err = logs([], capsys)
    assert status == 1
    assert out == ""
    assert err == (
        "vmsuper logs: error: no run folders in the default log roots ./runs and ./*/runs"
        f" below {tmp_path} (looked in: {tmp_path / 'configs' / 'runs'}); give the run's"
        " folder (vmsuper run prints it when it starts)\n"
    )


def test_help_is_plain_text_and_says_when_follow_returns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        logview.main(["--help"])
    out = capsys.readouterr().out
    assert "`" not in out  # plain text, no markup
    assert "--follow" in out and "supervisor is gone without" in out.replace("\n", " ")

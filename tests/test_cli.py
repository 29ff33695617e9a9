"""The `vmsuper` command line: parsing, config overrides, dispatch and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from vmsuper import __version__
from vmsuper.supervisor import cli
from vmsuper.supervisor.config import Config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    plugin = tmp_path / "plugin.sh"
    plugin.write_text("#!/bin/sh\n")
    plugin.chmod(0o755)
    path = tmp_path / "hello.toml"
    path.write_text(
        '[vm]\nvcpus = 2\n[plugin]\npath = "plugin.sh"\ngrace_period = 3.0\n'
        '[log]\ndir = "logs"\nlevel = "warning"\n'
    )
    return path


class FakeRunner:
    def __init__(self, status: int = 0, raises: BaseException | None = None) -> None:
        self.configs: list[Config] = []
        self.config_paths: list[Path | None] = []
        self.status = status
        self.raises = raises

    def run(self, config: Config, config_path: Path | None = None) -> int:
        self.configs.append(config)
        self.config_paths.append(config_path)
        if self.raises is not None:
            raise self.raises
        return self.status


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    fake = FakeRunner(status=7)
    module = types.ModuleType("vmsuper.supervisor.launch")
    module.run = fake.run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vmsuper.supervisor.launch", module)
    return fake


def test_run_without_flags_uses_the_file(config_file: Path, runner: FakeRunner) -> None:
    assert cli.main(["run", str(config_file)]) == 7
    [config] = runner.configs
    assert config.vm.vcpus == 2
    assert config.vm.low_latency is False
    assert config.plugin.grace_period == 3.0
    assert config.plugin.vcpu_transport == "socket"
    assert config.log.dir == config_file.parent / "logs"
    assert config.log.level == "warning"
    assert runner.config_paths == [config_file]  # for the run's run.json


def test_run_flags_override_config(
    config_file: Path, runner: FakeRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = [
        "run",
        str(config_file),
        "--vcpus",
        "4",
        "--log-dir",
        "out/{name}",
        "--log-level",
        "debug",
        "--transport",
        "pipes",
        "--grace-period",
        "0.5",
        "--low-latency",
    ]
    assert cli.main(argv) == 7
    [config] = runner.configs
    assert config.vm.vcpus == 4
    assert config.vm.low_latency is True
    assert config.plugin.vcpu_transport == "pipes"
    assert config.plugin.grace_period == 0.5
    assert config.log.level == "debug"
    assert config.log.dir == cwd / "out" / "hello"  # relative to the current directory


def test_no_low_latency_flag(config_file: Path, runner: FakeRunner) -> None:
    config_file.write_text(config_file.read_text().replace("[vm]\n", "[vm]\nlow_latency = true\n"))
    cli.main(["run", str(config_file), "--no-low-latency"])
    assert runner.configs[-1].vm.low_latency is False


def test_sandbox_flags_override_the_config(config_file: Path, runner: FakeRunner) -> None:
    cli.main(["run", str(config_file), "--no-sandbox"])
    assert runner.configs[-1].plugin.sandbox is False
    config_file.write_text(
        config_file.read_text().replace("[plugin]\n", "[plugin]\nsandbox = false\n")
    )
    assert "sandbox = false" in config_file.read_text()
    cli.main(["run", str(config_file), "--sandbox"])
    assert runner.configs[-1].plugin.sandbox is True


def test_timeout_flag_overrides_the_config(config_file: Path, runner: FakeRunner) -> None:
    cli.main(["run", str(config_file), "--timeout", "2.5"])
    assert runner.configs[-1].vm.timeout == 2.5


def test_overrides_from_args_maps_flags_to_keys() -> None:
    args = cli.build_parser().parse_args(
        ["run", "x.toml", "--vcpus", "3", "--no-low-latency", "--log-dir", "/abs/d"]
    )
    assert cli.overrides_from_args(args) == {
        "vm.vcpus": 3,
        "vm.low_latency": False,
        "log.dir": Path("/abs/d"),
    }
    assert cli.overrides_from_args(cli.build_parser().parse_args(["run", "x.toml"])) == {}


def test_config_error_exit_status_and_message(
    config_file: Path, runner: FakeRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text(config_file.read_text().replace("vcpus = 2", "vcpus = 99"))
    assert cli.main(["run", str(config_file)]) == cli.USAGE_ERROR == 2
    err = capsys.readouterr().err
    assert err == (
        f"vmsuper run: error: {config_file}: [vm] vcpus: expected an integer from 1 to 64, got 99\n"
    )
    assert runner.configs == []


def test_missing_config_file(
    tmp_path: Path, runner: FakeRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", str(tmp_path / "none.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--vcpus", "65"], "argument --vcpus: expected an integer from 1 to 64, got '65'"),
        (["--vcpus", "two"], "argument --vcpus: expected an integer from 1 to 64"),
        (["--grace-period", "-1"], "argument --grace-period: expected seconds >= 0"),
        (["--grace-period", "nan"], "argument --grace-period: expected seconds >= 0"),
        (["--timeout", "-3"], "argument --timeout: expected seconds >= 0"),
        (["--transport", "tcp"], "argument --transport: invalid choice"),
        (["--log-level", "loud"], "argument --log-level: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_usage_errors(
    config_file: Path,
    runner: FakeRunner,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    complaint: str,
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(config_file), *flags])
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err
    assert runner.configs == []


def test_interrupt_is_130(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRunner(raises=KeyboardInterrupt())
    module = types.ModuleType("vmsuper.supervisor.launch")
    module.run = fake.run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vmsuper.supervisor.launch", module)
    assert cli.main(["run", str(config_file)]) == 130


def test_check_gets_its_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def check_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    module = types.ModuleType("vmsuper.supervisor.check")
    module.main = check_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vmsuper.supervisor.check", module)
    assert cli.main(["check", "--help", "-v"]) == 3
    assert cli.main(["check"]) == 3
    assert seen == [["--help", "-v"], []]


def test_logs_dispatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = {"timestamp": "2025-01-01T00:00:00.000000Z", "level": "info", "event": "hi"}
    (tmp_path / "supervisor.jsonl").write_text(json.dumps(record) + "\n")
    assert cli.main(["logs", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == record
    assert cli.main(["logs", str(tmp_path / "nope")]) == 1


def test_logs_help_is_the_log_viewer_s(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["logs", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vmsuper logs ")
    assert "--summary" in out and "--follow" in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "check", "logs", "stats", "top", "serve"):
        assert f"    {command} " in out


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def _finds_none(code: str) -> None:
    """`code`, run in a fresh interpreter, prints an empty list (of what it looked for)."""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


# What `vmsuper run` must not import before it serves the plugin (start-up time): the other
# commands' modules; rich, asyncio with ssl, structlog's standard library integration and
# thread-local context, and logging (structlog's console renderer, async methods and the rest
# that vmsuper does not use: shared/logs.py); tempfile with random (only a runtime
# folder in <tmp>);
# protobuf's pure-Python message module with text_format (the upb backend never calls them:
# shared/deferred_imports.py); the VCPU workers' modules (imported with the runner, once the
# plugin is started: supervisor/launch.py); shutil with its compression modules (PATH look-ups:
# supervisor/which.py); subprocess (the plugin's spawn forks itself: plugin_process.py);
# hashlib with OpenSSL (the hot path's staleness check digests with binascii's CRC-32);
# typing_extensions, which msgspec does without (supervisor/msgspec_import.py).
NOT_IMPORTED_BY_RUN = (
    "vmsuper.supervisor.logview",
    "vmsuper.supervisor.check",
    "rich",
    "asyncio",
    "ssl",
    "structlog.stdlib",
    "structlog.threadlocal",
    "logging",
    "tempfile",
    "random",
    "google.protobuf.text_format",
    "shutil",
    "subprocess",
    "hashlib",
    "vmsuper.workers.worker_process",
    "vmsuper.workers.vcpu_worker",
    "vmsuper.workers.vcpu_protocol",
    "vmsuper.workers.exit_engine",
    "typing_extensions",
)


def test_the_cli_imports_only_what_its_command_needs() -> None:
    _finds_none(
        "import sys, vmsuper.supervisor.cli, vmsuper.supervisor.runner\n"
        "vmsuper.supervisor.cli.build_parser().parse_args(['run', 'vm.toml'])\n"
        f"print([m for m in {NOT_IMPORTED_BY_RUN!r} if m in sys.modules])"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["--help"],
        ["run", "--help"],
        ["logs", "--help"],
        ["stats"],
        ["top", "--help"],
    ],
)
def test_commands_other_than_run_do_not_import_the_config(argv: list[str]) -> None:
    """The config's modules (msgspec, with inspect) are a good part of a run's start; a command
    that reads no config must not pay for them."""
    _finds_none(
        "import contextlib, io, os, sys\n"
        "os.environ['VMSUPER_RUNTIME_DIR'] = '/nonexistent/vmsuper-runtime'\n"
        "from vmsuper.supervisor import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    cli.main({argv!r})\n"
        "print([m for m in ('msgspec', 'vmsuper.supervisor.config') if m in sys.modules])"
    )


# What `vmsuper run` must not import before it knows whether `vmsuper serve` takes the run:
# anything a served run would not need here (supervisor/serve_client.py).
NOT_IMPORTED_BEFORE_THE_HAND_OVER = (
    "typing",
    "json",  # nor re, and with neither of these enum (supervisor/serve_json.py)
    "re",
    "socket",
    "signal",
    "enum",
    "threading",
    "contextlib",
    "collections",
    "pathlib",  # not even at the interpreter's start (./dev's scripts/editable_finder.py)
    "msgspec",
    "structlog",
    "google.protobuf",
    "vmsuper.supervisor.cli",
    "vmsuper.supervisor.config",
    "vmsuper.supervisor.serve",
)


def test_the_hand_over_to_a_server_imports_next_to_nothing() -> None:
    _finds_none(
        "import os, sys\n"
        "os.environ['VMSUPER_RUNTIME_DIR'] = '/nonexistent/vmsuper-runtime'\n"
        "os.environ.pop('VMSUPER_SERVE', None)\n"
        "from vmsuper.supervisor import entry  # noqa: F401  (the command's first step)\n"
        "from vmsuper.supervisor.serve_client import hand_over\n"
        "assert hand_over(['run', 'vm.toml']) is None  # no server there\n"
        f"print([m for m in {NOT_IMPORTED_BEFORE_THE_HAND_OVER!r} if m in sys.modules])"
    )


# What the runner needs for the VM and the event loop, imported only once the plugin is started
# (supervisor/launch.py), so that the plugin's start overlaps these imports.
IMPORTED_AFTER_THE_PLUGIN_STARTS = (
    "vmsuper.supervisor.runner",
    "vmsuper.shared.kvm",
    "vmsuper.shared.hotpath",
    "vmsuper.shared.shm",
    "vmsuper.shared.plugin_pb2",
    "google.protobuf",
    "vmsuper.workers.main_worker",
    "vmsuper.supervisor.vcpus",
)


def test_the_plugin_is_started_before_the_runner_is_imported() -> None:
    _finds_none(
        "import sys, vmsuper.supervisor.cli, vmsuper.supervisor.launch\n"
        f"print([m for m in {IMPORTED_AFTER_THE_PLUGIN_STARTS!r} if m in sys.modules])"
    )


def test_protobuf_s_pure_python_messages_wait_for_first_use() -> None:
    # Imported, a message made, encoded and decoded: the stand-in is still there. Printing a
    # message (text_format reads the real module) still works.
    done = _python(
        "import sys\n"
        "from vmsuper.shared import deferred_imports, plugin_pb2\n"
        "name = deferred_imports.PROTOBUF_PURE_PYTHON\n"
        "request = plugin_pb2.MainRequest()\n"
        "request.create.id = 7\n"
        "again = plugin_pb2.MainRequest.FromString(request.SerializeToString())\n"
        "print(type(sys.modules[name]).__name__, again.create.id)\n"
        "from google.protobuf.internal import python_message\n"
        "print(python_message._AttachFieldHelpers.__name__, str(again).split())\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ImportedOnFirstUse 7",
        "_AttachFieldHelpers ['create', '{', 'id:', '7', '}']",
    ]


def test_a_direct_run_imports_with_the_collector_paused_then_resumes_it(tmp_path: Path) -> None:
    """supervisor/collector.py: off from the command's first step to the runner's start, then
    on, with the start-up's objects frozen."""
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[plugin]\npath = "/bin/true"\nsandbox = false\n[log]\ndir = "{tmp_path / "logs"}"\n'
    )
    done = _python(
        "import gc, os, sys\n"
        "os.environ['VMSUPER_RUNTIME_DIR'] = '/nonexistent/vmsuper-runtime'\n"
        "from vmsuper.supervisor import config, entry, runner\n"
        "load = config.load_config\n"
        "def loading(*args, **kwargs):\n"
        "    print('config', gc.isenabled())\n"
        "    return load(*args, **kwargs)\n"
        "def running(*args, **kwargs):\n"
        "    print('runner', gc.isenabled(), gc.get_freeze_count() > 1000)\n"
        "    return 0\n"
        "config.load_config, runner.run = loading, running\n"
        f"sys.argv = ['vmsuper', 'run', {str(config)!r}]\n"
        "entry.main()\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["config False", "runner True True"]


@pytest.mark.kvm
def test_a_direct_run_starts_its_plugin_and_makes_its_vm_before_it_imports_structlog(
    tmp_path: Path,
) -> None:
    """supervisor/launch.py: structlog's import overlaps the plugin's start, and the VM has
    lived through it (supervisor/machine.py); the log is open (and locked) before, and its first
    record is written once structlog is in."""
    config = tmp_path / "vm.toml"
    log_dir = tmp_path / "logs"
    config.write_text(f'[plugin]\npath = "/bin/true"\nsandbox = false\n[log]\ndir = "{log_dir}"\n')
    done = _python(
        "import os, sys, types\n"
        "os.environ['VMSUPER_RUNTIME_DIR'] = '/nonexistent/vmsuper-runtime'\n"
        "from vmsuper.supervisor import entry, machine, plugin_process\n"
        "spawn, make = plugin_process.PluginProcess.spawn, machine.open_machine\n"
        "def spawning(*args, **kwargs):\n"
        f"    print('spawn', 'structlog' in sys.modules, os.listdir({str(log_dir)!r}))\n"
        "    return spawn(*args, **kwargs)\n"
        "def making():\n"
        "    print('machine', 'structlog' in sys.modules)\n"
        "    return make()\n"
        "plugin_process.PluginProcess.spawn, machine.open_machine = spawning, making\n"
        "runner = types.ModuleType('vmsuper.supervisor.runner')\n"
        "def running(config, path, launch):\n"
        "    made = type(launch.machine).__name__\n"
        "    print('runner', 'structlog' in sys.modules, launch.plugin is not None, made)\n"
        "    launch.abandon()\n"
        "    launch.close()\n"
        "    return 0\n"
        "runner.run = running\n"
        "sys.modules[runner.__name__] = runner\n"
        f"sys.argv = ['vmsuper', 'run', {str(config)!r}]\n"
        "entry.main()\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "spawn False ['supervisor.jsonl']",
        "machine False",
        "runner True True Machine",
    ]
    records = [json.loads(line) for line in (log_dir / "supervisor.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["run_started"]


def test_the_collector_is_resumed_only_where_it_was_paused() -> None:
    done = _python(
        "import gc\n"
        "from vmsuper.supervisor import collector\n"
        "collector.resume()\n"  # never paused: as it was
        "print(gc.isenabled(), gc.get_freeze_count())\n"
        "gc.disable()\n"
        "collector.pause()\n"  # off already, by its owner: left to it
        "collector.resume()\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True 0", "False 0"]


def test_no_dataclass_is_made_on_the_run_path() -> None:
    # @dataclass compiles each class's methods at import: about half a millisecond a class on
    # every `vmsuper run`'s start-up (shared/records.py has the cheap kind).
    _finds_none(
        "import dataclasses, sys, vmsuper.supervisor.cli, vmsuper.supervisor.launch\n"
        "import vmsuper.supervisor.runner, vmsuper.workers.worker_process\n"
        "print(sorted(f'{name}.{c.__qualname__}' for name, m in list(sys.modules.items())\n"
        "    if name.startswith('vmsuper.') for c in vars(m).values()\n"
        "    if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == name))"
    )


def test_exit_now_flushes_output_and_keeps_the_status() -> None:
    done = _python(
        "import sys\n"
        "from vmsuper.supervisor import entry\n"
        "print('to stdout', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "entry.exit_now(7)\n"
        "print('not reached')\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (7, "to stdout", "to stderr")


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"vmsuper {__version__}\n"


def test_help_is_as_wide_as_columns_says(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def help_lines(columns: str) -> list[str]:
        monkeypatch.setenv("COLUMNS", columns)
        with pytest.raises(SystemExit):
            cli.main(["run", "--help"])
        return capsys.readouterr().out.splitlines()

    narrow, wide = help_lines("60"), help_lines("200")
    assert max(len(line) for line in narrow) <= 60 < max(len(line) for line in wide)


def test_run_help_names_the_overridden_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("[vm] vcpus", "[vm] low_latency", "[plugin] vcpu_transport", "[log] dir"):
        assert key in text


def test_python_dash_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmsuper", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == f"vmsuper {__version__}\n"

"""Config loading: defaults, every key's validation message, path resolution, overrides."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from vmsuper.supervisor.config import (
    DEFAULT_LOG_DIR,
    Config,
    ConfigError,
    LimitsConfig,
    LogConfig,
    MountConfig,
    NetConfig,
    PluginConfig,
    VmConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_TABLE = '[plugin]\npath = "plugin.sh"\n'


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    plugin = tmp_path / "plugin.sh"
    plugin.write_text("#!/bin/sh\n")
    plugin.chmod(0o755)
    return tmp_path


def write(folder: Path, text: str, name: str = "hello.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def error_of(path: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_defaults(folder: Path) -> None:
    config = load_config(write(folder, PLUGIN_TABLE))
    assert config.vm == VmConfig(vcpus=1, low_latency=False)
    assert config.plugin.path == folder / "plugin.sh"
    assert config.plugin.args == ()
    assert config.plugin.env == {}
    assert config.plugin.vcpu_transport == "socket"
    assert config.plugin.grace_period == 1.0
    assert config.plugin.sandbox is True
    assert config.plugin.mounts == ()
    assert config.net is None
    assert config.log.level == "info"
    assert config.log.dir.parent == folder / "runs"
    assert re.fullmatch(rf"hello-\d{{8}}-\d{{6}}-{os.getpid()}", config.log.dir.name)
    assert DEFAULT_LOG_DIR == "runs/{name}-{time}-{pid}"


def test_every_key(folder: Path) -> None:
    path = write(
        folder,
        """
[vm]
vcpus = 64
low_latency = true
[plugin]
path = "./plugin.sh"
args = ["--verbose", "x y"]
env = { KEY = "value", OTHER = "" }
vcpu_transport = "pipes"
grace_period = 0
[net]
host_ip = "100.115.92.5"
netmask = "255.255.255.252"
mac = "DE:21:E8:47:6B:6A"
[log]
dir = "/abs/logs"
level = "debug"
""",
    )
    config = load_config(path)
    assert config == Config(
        vm=VmConfig(vcpus=64, low_latency=True),
        plugin=PluginConfig(
            path=folder / "plugin.sh",
            args=("--verbose", "x y"),
            env={"KEY": "value", "OTHER": ""},
            vcpu_transport="pipes",
            grace_period=0.0,
        ),
        net=NetConfig(
            host_ip=ipaddress.IPv4Address("100.115.92.5"),
            netmask=ipaddress.IPv4Address("255.255.255.252"),
            mac="de:21:e8:47:6b:6a",
        ),
        log=LogConfig(dir=Path("/abs/logs"), level="debug", root=Path("/abs/logs")),
    )
    assert isinstance(config.plugin.grace_period, float)


def test_config_is_frozen(folder: Path) -> None:
    config = load_config(write(folder, PLUGIN_TABLE))
    with pytest.raises(AttributeError):
        config.vm.vcpus = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            PLUGIN_TABLE + "[vm]\nvcpus = 65\n",
            "hello.toml: [vm] vcpus: expected an integer from 1 to 64, got 65",
        ),
        (
            PLUGIN_TABLE + "[vm]\nvcpus = 0\n",
            "hello.toml: [vm] vcpus: expected an integer from 1 to 64, got 0",
        ),
        ('[vm]\nvcpus = "2"\n', "hello.toml: [vm] vcpus: expected an integer, got string"),
        ("[vm]\nvcpus = true\n", "hello.toml: [vm] vcpus: expected an integer, got boolean"),
        ("[vm]\nvcpus = 1.5\n", "hello.toml: [vm] vcpus: expected an integer, got number"),
        (
            "[vm]\nlow_latency = 1\n",
            "hello.toml: [vm] low_latency: expected a boolean, got integer",
        ),
        ("[vm]\ncpus = 1\n", "hello.toml: unknown key [vm] cpus"),
        (
            PLUGIN_TABLE + "[vm]\nfast_exits = false\n",
            "hello.toml: [vm] fast_exits: removed: every exit is served by the C exit engine"
            " (there is no Python exit path to choose any more); delete the key",
        ),
        (
            PLUGIN_TABLE + "[vm]\ntimeout = -1\n",
            "hello.toml: [vm] timeout: expected seconds >= 0 (0: never), got -1.0",
        ),
        (
            PLUGIN_TABLE + "[vm]\ntimeout = inf\n",
            "hello.toml: [vm] timeout: expected seconds >= 0 (0: never), got inf",
        ),
        ("[vm]\ntimeout = '5s'\n", "hello.toml: [vm] timeout: expected a number, got string"),
        (
            PLUGIN_TABLE + "[vm]\nstall_warning = nan\n",
            "hello.toml: [vm] stall_warning: expected seconds >= 0 (0: never), got nan",
        ),
        ("vm = 3\n", "hello.toml: [vm]: expected a table, got integer"),
        ("[vmm]\n", "hello.toml: unknown table [vmm]"),
        ("[plugin]\npathh = 'x'\n", "hello.toml: unknown key [plugin] pathh"),
        ("[plugin]\nargs = []\n", "hello.toml: [plugin] path is required"),
        ("[vm]\nvcpus = 1\n", "hello.toml: [plugin] path is required"),
        ("[plugin]\npath = ''\n", "hello.toml: [plugin] path: must not be empty"),
        ("[plugin]\npath = 3\n", "hello.toml: [plugin] path: expected a string, got integer"),
    ],
)
def test_errors_name_file_and_key(
    folder: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    write(folder, text)
    monkeypatch.chdir(folder)
    assert error_of(Path("hello.toml")) == message


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("args = '--verbose'", "[plugin] args: expected an array, got string"),
        ("args = ['a', 2]", "[plugin] args[1]: expected a string, got integer"),
        ('args = ["a\\u0000b"]', "[plugin] args[0]: must not contain a NUL character"),
        ("env = { A = 1 }", "[plugin] env.A: expected a string, got integer"),
        ("env = { 'A=B' = 'x' }", "[plugin] env: invalid variable name 'A=B'"),
        ("env = { '' = 'x' }", "[plugin] env: invalid variable name ''"),
        ('env = { A = "a\\u0000" }', "[plugin] env.A: must not contain a NUL character"),
        (
            "vcpu_transport = 'tcp'",
            "[plugin] vcpu_transport: expected one of 'socket', 'pipes', got 'tcp'",
        ),
        ("grace_period = -1", "[plugin] grace_period: expected seconds >= 0, got -1.0"),
        ("grace_period = nan", "[plugin] grace_period: expected seconds >= 0, got nan"),
        ("grace_period = inf", "[plugin] grace_period: expected seconds >= 0, got inf"),
        ("grace_period = 'soon'", "[plugin] grace_period: expected a number, got string"),
    ],
)
def test_plugin_key_errors(folder: Path, lines: str, message: str) -> None:
    path = write(folder, PLUGIN_TABLE + lines + "\n")
    assert error_of(path) == f"{path}: {message}"


NET = {"host_ip": "'100.115.92.5'", "netmask": "'255.255.255.252'", "mac": "'de:21:e8:47:6b:6a'"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"host_ip": "'100.115.92'"}, "[net] host_ip: expected an IPv4 address, got '100.115.92'"),
        ({"host_ip": "'::1'"}, "[net] host_ip: expected an IPv4 address, got '::1'"),
        ({"host_ip": "5"}, "[net] host_ip: expected a string, got integer"),
        ({"host_ip": "'0.0.0.0'"}, "[net] host_ip: not usable as a host address: 0.0.0.0"),
        ({"host_ip": "'224.0.0.1'"}, "[net] host_ip: not usable as a host address: 224.0.0.1"),
        (
            {"host_ip": "'100.115.92.4'"},
            "[net] host_ip: 100.115.92.4 is the network or broadcast address of 100.115.92.4/30",
        ),
        (
            {"host_ip": "'100.115.92.7'"},
            "[net] host_ip: 100.115.92.7 is the network or broadcast address of 100.115.92.4/30",
        ),
        ({"netmask": "'255.0.255.0'"}, "[net] netmask: not a contiguous netmask: 255.0.255.0"),
        ({"netmask": "'255.255.255.256'"}, "[net] netmask: expected an IPv4 address, got"),
        (
            {"netmask": "'255.255.255.255'"},
            "[net] netmask: must leave room for the guest, got 255.255.255.255",
        ),
        ({"netmask": "'0.0.0.0'"}, "[net] netmask: must leave room for the guest, got 0.0.0.0"),
        ({"mac": "'de:21:e8:47:6b'"}, "[net] mac: expected a MAC address like"),
        ({"mac": "'de-21-e8-47-6b-6a'"}, "[net] mac: expected a MAC address like"),
        (
            {"mac": "'01:00:5e:00:00:01'"},
            "[net] mac: must be a unicast address (first octet even), got 01:00:5e:00:00:01",
        ),
        ({"mac": None}, "[net] mac is required"),
        ({"extra": "1"}, "unknown key [net] extra"),
    ],
)
def test_net_errors(folder: Path, changes: dict[str, str | None], message: str) -> None:
    table = {**NET, **changes}
    body = "".join(f"{k} = {v}\n" for k, v in table.items() if v is not None)
    path = write(folder, PLUGIN_TABLE + "[net]\n" + body)
    assert error_of(path).startswith(f"{path}: {message}")


def test_net_slash_31_allows_either_address(folder: Path) -> None:
    net = "[net]\nhost_ip = '10.0.0.0'\nnetmask = '255.255.255.254'\nmac = '02:00:00:00:00:01'\n"
    config = load_config(write(folder, PLUGIN_TABLE + net))
    assert config.net is not None
    assert config.net.host_ip == ipaddress.IPv4Address("10.0.0.0")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("level = 'verbose'", "[log] level: expected one of 'debug', 'info', 'warning', 'error'"),
        ("level = 'INFO'", "[log] level: expected one of"),
        ("dir = ''", "[log] dir: must not be empty"),
        ("dir = 7", "[log] dir: expected a string, got integer"),
        ("dir = 'runs/{user}'", "[log] dir: unknown placeholder {user}; use {name}, {time}, {pid}"),
        ("dir = 'runs/{0}'", "[log] dir: unknown placeholder {0}"),
        ("dir = 'runs/{'", "[log] dir: "),
    ],
)
def test_log_errors(folder: Path, lines: str, message: str) -> None:
    path = write(folder, PLUGIN_TABLE + "[log]\n" + lines + "\n")
    assert error_of(path).startswith(f"{path}: {message}")


def test_log_dir_placeholders_and_relative(folder: Path) -> None:
    path = write(folder, PLUGIN_TABLE + "[log]\ndir = '../out/{name}-{{x}}-{pid}'\n", "demo.toml")
    config = load_config(path)
    assert config.log.dir == folder.parent / "out" / f"demo-{{x}}-{os.getpid()}"


def test_log_dir_expands_user(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(folder / "home"))
    config = load_config(write(folder, PLUGIN_TABLE + "[log]\ndir = '~/logs'\n"))
    assert config.log.dir == folder / "home" / "logs"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"config file not found: {missing}"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert error_of(tmp_path) == f"config file is a directory: {tmp_path}"


def test_toml_syntax_error_names_line(folder: Path) -> None:
    path = write(folder, PLUGIN_TABLE + "[vm]\nvcpus = = 2\n")
    message = error_of(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 4" in message


def test_not_utf8(folder: Path) -> None:
    path = folder / "hello.toml"
    path.write_bytes(b"[plugin]\npath = '\xff'\n")
    assert error_of(path) == f"{path}: not valid UTF-8 (byte 17)"


def test_relative_paths_follow_the_config_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sub = folder / "sub"
    sub.mkdir()
    path = write(sub, '[plugin]\npath = "../plugin.sh"\n[log]\ndir = "logs"\n')
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(path)
    assert config.plugin.path == folder / "plugin.sh"
    assert config.log.dir == sub / "logs"


def test_relative_config_path_from_cwd(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(folder, PLUGIN_TABLE)
    monkeypatch.chdir(folder.parent)
    config = load_config(Path(folder.name) / "hello.toml")
    assert config.plugin.path == folder / "plugin.sh"
    assert config.plugin.path.is_absolute()
    assert config.log.dir.is_absolute()


def test_bare_plugin_name_prefers_config_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for where in (folder, bin_dir):
        tool = where / "tool"
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    config = load_config(write(folder, "[plugin]\npath = 'tool'\n"))
    assert config.plugin.path == folder / "tool"


def test_bare_plugin_name_falls_back_to_path(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "pathtool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    config = load_config(write(folder, "[plugin]\npath = 'pathtool'\n"))
    assert config.plugin.path == tool


def test_bare_plugin_name_not_found(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(folder / "empty"))
    path = write(folder, "[plugin]\npath = 'ghost'\n")
    assert error_of(path) == f"{path}: [plugin] path: 'ghost' is neither in {folder} nor on PATH"
    config = load_config(path, check_plugin=False)
    assert config.plugin.path == Path("ghost")


def test_plugin_missing(folder: Path) -> None:
    path = write(folder, "[plugin]\npath = './ghost.py'\n")
    assert error_of(path) == f"{path}: [plugin] path: {folder / 'ghost.py'} does not exist"
    assert load_config(path, check_plugin=False).plugin.path == folder / "ghost.py"


def test_plugin_not_executable(folder: Path) -> None:
    (folder / "plain.py").write_text("print()\n")
    path = write(folder, "[plugin]\npath = 'plain.py'\n")
    message = error_of(path)
    assert message.startswith(f"{path}: [plugin] path: {folder / 'plain.py'} is not executable")


def test_plugin_is_directory(folder: Path) -> None:
    (folder / "dir.d").mkdir()
    path = write(folder, "[plugin]\npath = './dir.d'\n")
    assert error_of(path) == f"{path}: [plugin] path: {folder / 'dir.d'} is not a file"


def test_overrides_replace_file_values(folder: Path) -> None:
    path = write(folder, PLUGIN_TABLE + "[vm]\nvcpus = 2\n")
    config = load_config(
        path,
        overrides={
            "vm.vcpus": 8,
            "vm.low_latency": True,
            "plugin.vcpu_transport": "pipes",
            "plugin.grace_period": 2.5,
            "log.level": "error",
            "log.dir": folder / "elsewhere" / "{name}",
        },
    )
    assert config.vm == VmConfig(vcpus=8, low_latency=True)
    assert config.plugin.vcpu_transport == "pipes"
    assert config.plugin.grace_period == 2.5
    assert config.log == LogConfig(
        dir=folder / "elsewhere" / "hello", level="error", root=folder / "elsewhere"
    )


def test_override_creates_missing_table(folder: Path) -> None:
    path = write(folder, "[vm]\nvcpus = 2\n")
    config = load_config(path, overrides={"plugin.path": str(folder / "plugin.sh")})
    assert config.plugin.path == folder / "plugin.sh"


def test_override_errors_say_overridden(folder: Path) -> None:
    path = write(folder, PLUGIN_TABLE)
    message = error_of(path, overrides={"vm.vcpus": 100})
    assert message == f"{path}: [vm] vcpus (overridden): expected an integer from 1 to 64, got 100"
    message = error_of(path, overrides={"log.level": "loud"})
    assert message.startswith(f"{path}: [log] level (overridden): expected one of")


@pytest.mark.parametrize("key", ["vm.cpus", "vmm.vcpus", "vm", "plugin.path.x"])
def test_unknown_override_key(folder: Path, key: str) -> None:
    path = write(folder, PLUGIN_TABLE)
    assert error_of(path, overrides={key: 1}) == f"{path}: unknown override key {key!r}"


def test_example_config_shows_every_key() -> None:
    example = ROOT / "configs" / "example.toml"
    raw = msgspec.toml.decode(example.read_bytes())
    for table, struct in {
        "vm": VmConfig,
        "plugin": PluginConfig,
        "net": NetConfig,
        "log": LogConfig,
        "limits": LimitsConfig,
    }.items():
        # log.root is filled in by load_config, not written.
        assert set(raw[table]) == set(struct.__struct_fields__) - {"root"}, table
    assert set(raw) == set(Config.__struct_fields__)
    assert set(raw["plugin"]["mounts"][0]) == set(MountConfig.__struct_fields__)
    config = load_config(example, check_plugin=False)
    assert config.vm.vcpus == 2
    assert config.log.dir.parent == example.parent / "runs"


MOUNT = PLUGIN_TABLE + "[[plugin.mounts]]\n"


def test_mounts_resolve_relative_to_the_config_folder(folder: Path) -> None:
    (folder / "data").mkdir()
    text = (
        PLUGIN_TABLE + "sandbox = false\n"
        '[[plugin.mounts]]\nsrc = "data"\n'
        '[[plugin.mounts]]\nsrc = "./data/"\ndst = "/srv/x/../data"\nwritable = true\n'
    )
    config = load_config(write(folder, text))
    assert config.plugin.sandbox is False
    assert config.plugin.mounts == (
        MountConfig(src=folder / "data", dst=folder / "data", writable=False),
        MountConfig(src=folder / "data", dst=Path("/srv/data"), writable=True),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('src = "nope"', "[plugin] mounts[0].src: {folder}/nope does not exist"),
        (
            'src = "."\ndst = "rel/x"',
            "[plugin] mounts[0].dst: expected an absolute path, got 'rel/x'",
        ),
        (
            'src = "."\ndst = "/x/.."',
            "[plugin] mounts[0].dst: must not be / (the sandbox's own root)",
        ),
        ('src = "."\nwritable = 1', "[plugin] mounts[0].writable: expected a boolean, got integer"),
        ('dst = "/a"', "[plugin] mounts[0] src is required"),
        ('src = "."\nmode = "rw"', "unknown key [plugin] mounts[0] mode"),
        ('src = ""', "[plugin] mounts[0].src: must not be empty"),
    ],
)
def test_mount_errors_name_the_key(folder: Path, body: str, message: str) -> None:
    path = write(folder, MOUNT + body + "\n")
    assert error_of(path) == f"{path}: " + message.format(folder=folder)


def test_mount_source_is_not_checked_without_plugin_checks(folder: Path) -> None:
    path = write(folder, MOUNT + 'src = "later"\n')
    assert load_config(path, check_plugin=False).plugin.mounts[0].src == folder / "later"


def test_sandbox_must_be_a_boolean_and_can_be_overridden(folder: Path) -> None:
    path = write(folder, PLUGIN_TABLE + 'sandbox = "no"\n')
    assert error_of(path) == f"{path}: [plugin] sandbox: expected a boolean, got string"
    path = write(folder, PLUGIN_TABLE)
    assert load_config(path, overrides={"plugin.sandbox": False}).plugin.sandbox is False


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            '"no-such-user-vmsuper"',
            "[plugin] user: no user 'no-such-user-vmsuper' in the passwd database",
        ),
        ('"root"', "[plugin] user: root has uid or gid 0: the plugin would be root"),
        ('"a/b"', "[plugin] user: expected a user name, got 'a/b'"),
        ("1000", "[plugin] user: expected a string, got integer"),
    ],
)
def test_plugin_user_errors_name_the_key(folder: Path, value: str, message: str) -> None:
    path = write(folder, PLUGIN_TABLE + f"user = {value}\n")
    assert error_of(path) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            '"no-such-user-vmsuper"',
            "[vm] worker_user: no user 'no-such-user-vmsuper' in the passwd database",
        ),
        ('"root"', "[vm] worker_user: root has uid or gid 0: the VCPU workers would be root"),
        ('"a b"', "[vm] worker_user: expected a user name, got 'a b'"),
        ("0", "[vm] worker_user: expected a string, got integer"),
    ],
)
def test_worker_user_errors_name_the_key(folder: Path, value: str, message: str) -> None:
    path = write(folder, f"[vm]\nworker_user = {value}\n" + PLUGIN_TABLE)
    assert error_of(path) == f"{path}: {message}"
    assert load_config(write(folder, PLUGIN_TABLE)).vm.worker_user is None
    kept = load_config(write(folder, '[vm]\nworker_user = "daemon"\n' + PLUGIN_TABLE))
    assert kept.vm.worker_user == "daemon"


def test_plugin_user_is_kept_and_checked_only_with_plugin_checks(folder: Path) -> None:
    assert load_config(write(folder, PLUGIN_TABLE + 'user = "daemon"\n')).plugin.user == "daemon"
    path = write(folder, PLUGIN_TABLE + 'user = "no-such-user-vmsuper"\n')
    assert load_config(path, check_plugin=False).plugin.user == "no-such-user-vmsuper"
    assert load_config(write(folder, PLUGIN_TABLE)).plugin.user is None


@pytest.mark.parametrize(
    ("template", "root"),
    [
        (None, "runs"),
        ('"logs"', "logs"),
        ('"logs/{name}/{time}"', "logs"),
        ('"{name}-{pid}"', "."),
        ('"/var/tmp/vm/{{x}}/{name}"', "/var/tmp/vm/{x}"),
    ],
)
def test_log_root_is_the_folder_before_the_first_placeholder(
    folder: Path, template: str | None, root: str
) -> None:
    text = PLUGIN_TABLE + ("" if template is None else f"[log]\ndir = {template}\n")
    config = load_config(write(folder, text))
    assert config.log.root == Path(os.path.normpath(folder / root))
    assert config.log.dir == config.log.root or config.log.root in config.log.dir.parents


def test_log_root_is_not_a_key(folder: Path) -> None:
    path = write(folder, PLUGIN_TABLE + '[log]\nroot = "x"\n')
    assert error_of(path) == f"{path}: unknown key [log] root"
    assert "unknown override key 'log.root'" in error_of(
        write(folder, PLUGIN_TABLE), overrides={"log.root": "x"}
    )


def test_a_run_s_msgspec_decodes_as_the_one_with_typing_extensions(folder: Path) -> None:
    """A run imports msgspec as if typing_extensions were not installed
    (`supervisor/msgspec_import.py`); where something imported typing_extensions first,
    msgspec uses it. Both must decode a config alike and refuse a bad one alike."""
    good = write(
        folder,
        PLUGIN_TABLE
        + '[vm]\nvcpus = 3\npoll_us = 7\n[[plugin.mounts]]\nsrc = "/usr"\nwritable = true\n'
        + '[net]\nhost_ip = "10.0.0.1"\nnetmask = "255.255.255.0"\nmac = "DE:21:E8:47:6B:6A"\n'
        + '[log]\nlevel = "debug"\ndir = "/abs/logs"\n[limits]\nplugin_memory = "64M"\n',
        "good.toml",
    )
    bad = write(folder, PLUGIN_TABLE + '[limits]\nplugin_memory = "lots"\n', "bad.toml")
    code = (
        "import sys\n"
        "from vmsuper.supervisor.config import ConfigError, load_config\n"
        "print('typing_extensions' in sys.modules)\n"
        f"print(repr(load_config({str(good)!r})))\n"
        f"try:\n    load_config({str(bad)!r})\n"
        "except ConfigError as exc:\n    print(exc)\n"
        "import typing_extensions\n"  # importable as usual afterwards
        "print(typing_extensions.__name__)\n"
    )
    outputs = []
    for first in ("", "import typing_extensions\n"):
        done = subprocess.run(
            [sys.executable, "-c", first + code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.splitlines())
    as_a_run, with_it = outputs
    assert as_a_run[0] == "False" and with_it[0] == "True"
    assert as_a_run[1:] == with_it[1:]
    assert as_a_run[1:] == [repr(load_config(good)), error_of(bad), "typing_extensions"]


def test_the_config_structs_annotations_are_objects_not_strings() -> None:
    """A run's start reads them (msgspec and config_shape): a string annotation would be
    compiled then, each time (see supervisor/config.py)."""
    structs = (Config, VmConfig, PluginConfig, MountConfig, NetConfig, LogConfig, LimitsConfig)
    for struct in structs:
        strings = [name for name, hint in struct.__annotations__.items() if isinstance(hint, str)]
        assert not strings, (struct.__name__, strings)

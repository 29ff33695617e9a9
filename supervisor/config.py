"""The run configuration: a TOML file decoded into frozen, validated structs.

msgspec checks the shape (tables, key names, types); this module adds the checks msgspec
cannot express with a useful message (ranges, addresses, the plugin executable) and turns
every failure into one `ConfigError` naming the file and the key, e.g.
``hello.toml: [vm] vcpus: expected an integer from 1 to 64, got 65``.

Paths in the file are relative to the file's folder, so a config works from any directory:

- ``[plugin] path``: a path with a "/" is taken relative to the config folder. A bare name
  ("myplugin") is the file of that name in the config folder if there is one, else it is
  looked up on PATH. Either way the result is absolute, and it must be an executable file.
- ``[[plugin.mounts]] src``: relative to the config folder; ``dst`` (where the sandboxed
  plugin sees it) is an absolute path and defaults to the resolved ``src``.
- ``[log] dir``: relative to the config folder. It may contain the placeholders ``{name}``
  (the config file's stem), ``{time}`` (local start time, YYYYmmdd-HHMMSS) and ``{pid}``
  (the supervisor's pid); the default is ``runs/{name}-{time}-{pid}``, i.e.
  ``runs/<config stem>-<YYYYmmdd-HHMMSS>-<pid>`` next to the config file.

``[plugin] sandbox`` defaults to true: the plugin is untrusted code and runs in a bubblewrap
sandbox (see supervisor/sandbox.py and docs/security.md) unless the config says
``sandbox = false``. The default does not depend on the host: a host without bwrap refuses to
run the plugin with a message saying so, rather than quietly running it unconfined.
"""

# No `from __future__ import annotations` here: msgspec and config_shape read the structs'
# annotations at a run's start, and string annotations would each be compiled then (1.7 ms of
# every `vmsuper run` here).

import ipaddress
import math
import os
import pwd
import re
import string
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from vmsuper.supervisor import config_shape
from vmsuper.supervisor.msgspec_import import msgspec
from vmsuper.supervisor.which import which
from vmsuper.workers.limits import MAX_VCPUS, Limits

DEFAULT_POLL_US = 50
MAX_POLL_US = 10_000
DEFAULT_STALL_WARNING = 5.0

Transport = Literal["socket", "pipes"]
LogLevel = Literal["debug", "info", "warning", "error"]
DEFAULT_LOG_DIR = "runs/{name}-{time}-{pid}"
LOG_DIR_PLACEHOLDERS = ("name", "time", "pid")


_DEFAULT_LIMITS = Limits()
_SIZE_DESCRIPTION = 'a size ("512M") or a number of bytes'


class ConfigError(Exception):
    """The config file is missing, unreadable or wrong; the message names file and key."""


class VmConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    vcpus: int = 1
    low_latency: bool = False
    poll_us: int = DEFAULT_POLL_US
    timeout: float = 0.0
    """Seconds the run may last before it is shut down as for SIGTERM; 0: no limit."""
    stall_warning: float = DEFAULT_STALL_WARNING
    """Seconds a VCPU may wait on the plugin (or stay in Init) before a warning; 0: never."""
    worker_user: str | None = None
    """The unprivileged host user a root vmsuper's VCPU workers switch to (None: the first of
    `workers/confine.py`'s `WORKER_USERS` this host has)."""


class MountConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A host path the sandboxed plugin sees at `dst` (None: at `src`)."""

    src: Path
    dst: Path | None = None
    writable: bool = False


class PluginConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    path: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    vcpu_transport: Transport = "socket"
    grace_period: float = 1.0
    sandbox: bool = True
    mounts: tuple[MountConfig, ...] = ()
    # The host user a sandboxed plugin runs as when vmsuper is root (None: "vmsuper" if this
    # host has such a user, else "nobody"; see supervisor/sandbox_user.py).
    user: str | None = None


class NetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    host_ip: ipaddress.IPv4Address
    netmask: ipaddress.IPv4Address
    mac: str


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    dir: Path = Path(DEFAULT_LOG_DIR)
    level: LogLevel = "info"
    # Not a key of the file: set by load_config to the folder that holds every run's log
    # folder (`dir` up to its first placeholder), which the sandboxed plugin must not see.
    root: Path | None = None


# Fields filled in by load_config, refused in the file and in overrides.
_DERIVED_KEYS = ("log.root",)

# Keys vmsuper no longer has, with what replaced them: refused with that sentence.
_REMOVED_KEYS = {
    "vm.fast_exits": "removed: every exit is served by the C exit engine (there is no Python "
    "exit path to choose any more); delete the key",
}


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """What one plugin may make the supervisor hold; defaults and errnos in workers/limits.py."""

    connections: int = _DEFAULT_LIMITS.connections
    objects: int = _DEFAULT_LIMITS.objects
    memory_slots: int = _DEFAULT_LIMITS.memory_slots
    guest_memory: int = _DEFAULT_LIMITS.guest_memory
    reserved_ranges: int = _DEFAULT_LIMITS.reserved_ranges
    irq_routes: int = _DEFAULT_LIMITS.irq_routes
    request_size: int = _DEFAULT_LIMITS.request_size
    fds_per_message: int = _DEFAULT_LIMITS.fds_per_message
    plugin_open_files: int = _DEFAULT_LIMITS.plugin_open_files
    # A size: bytes, or a string with a unit ("512M", "8GiB"); an int once loaded.
    plugin_memory: Annotated[int | str, msgspec.Meta(description=_SIZE_DESCRIPTION)] = (
        _DEFAULT_LIMITS.plugin_memory
    )
    plugin_processes: int = _DEFAULT_LIMITS.plugin_processes
    plugin_cpu: float = _DEFAULT_LIMITS.plugin_cpu
    plugin_log_bytes: int = _DEFAULT_LIMITS.plugin_log_bytes
    plugin_log_lines: int = _DEFAULT_LIMITS.plugin_log_lines

    def to_limits(self) -> Limits:
        fields = msgspec.structs.asdict(self)
        fields["plugin_memory"] = parse_size(self.plugin_memory)
        return Limits(**fields)


# Upper bounds: what KVM or the shared-memory table can hold, or what stays sane.
_LIMIT_MAXIMA = {
    "connections": 4096,
    "objects": 1 << 20,
    "memory_slots": 509,  # KVM_USER_MEM_SLOTS on x86
    "guest_memory": 1 << 46,
    "reserved_ranges": 1 << 16,
    "irq_routes": 4096,  # KVM_MAX_IRQ_ROUTES
    "request_size": 64 << 20,
    "fds_per_message": 253,  # SCM_MAX_FD
    "plugin_open_files": 1 << 20,
    "plugin_log_bytes": 1 << 40,
    "plugin_log_lines": 1 << 32,
}
# The plugin's cgroup: 0 is no limit; otherwise from the minimum to the maximum.
MIN_PLUGIN_MEMORY = 1 << 20
MAX_PLUGIN_MEMORY = 1 << 50
MAX_PLUGIN_PROCESSES = 1 << 22  # PID_MAX_LIMIT
MIN_PLUGIN_CPU = 0.01  # cgroups take no quota under 1 ms per 100 ms period
MAX_PLUGIN_CPU = 4096.0
_SIZE = re.compile(r"\s*(\d+)\s*(?:([KMGTP])(?:i?B)?|B)?\s*", re.IGNORECASE)
_SIZE_SHIFTS = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(value: int | str) -> int:
    """A number of bytes, or "512M" / "512MiB" / "512MB" (all powers of 1024) -> bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f'expected a size like "512M" or a number of bytes, got {value!r}')
    unit = (match[2] or "").upper()
    return int(match[1]) << _SIZE_SHIFTS.get(unit, 0)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    vm: VmConfig = msgspec.field(default_factory=VmConfig)
    plugin: PluginConfig
    net: NetConfig | None = None
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)


class _KeyError(Exception):
    """A semantic check failed; `key` is a dotted path such as "vm.vcpus"."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def load_config(
    path: str | Path,
    *,
    overrides: Mapping[str, object] | None = None,
    check_plugin: bool = True,
) -> Config:
    """Read, validate and resolve a config file.

    `overrides` maps dotted keys ("vm.vcpus", "log.dir", ...) to values that replace the
    file's; they are validated like the file's values. A relative override path is still
    relative to the config folder, so callers pass absolute paths for command-line values.
    `check_plugin=False` skips the checks on the host's files: that the plugin exists and is
    executable, and that each mount's source exists.
    """
    path = Path(path)
    label = str(path)
    overridden = set(overrides or ())
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        # Decoded here rather than by the TOML parser, so the message does not depend on how
        # a msgspec release reports bad bytes.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not valid UTF-8 (byte {exc.start})") from None
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {_toml_message(exc)}") from None
    if not isinstance(raw, dict):  # pragma: no cover - TOML documents are always tables
        raise ConfigError(f"{label}: expected a TOML table")
    raw.setdefault("plugin", {})  # so a missing [plugin] reports "[plugin] path is required"
    for dotted in _DERIVED_KEYS:
        table, _, key = dotted.partition(".")
        if isinstance(raw.get(table), dict) and key in raw[table]:
            raise ConfigError(f"{label}: unknown key {config_shape.key_label(dotted)}")
    _apply_overrides(raw, overrides or {}, label)
    for dotted, why in _REMOVED_KEYS.items():
        table, _, key = dotted.partition(".")
        if isinstance(raw.get(table), dict) and key in raw[table]:
            raise ConfigError(_format(label, dotted, why, overridden))
    try:
        config_shape.check(raw, Config)
    except config_shape.ShapeError as exc:
        raise ConfigError(_format(label, exc.key, exc.message, overridden)) from None
    # The shape is known good: what conversion could still refuse is a bug of the walk above,
    # reported with msgspec's own words rather than blamed on a key.
    config = msgspec.convert(raw, Config, dec_hook=_dec_hook)
    folder = path.resolve().parent
    # Path("./x") prints as "x", so whether the file wrote a bare name is read from the text.
    bare = "/" not in raw["plugin"]["path"]
    try:
        _check(config)
        return _resolve(config, folder, path.stem, bare=bare, check_plugin=check_plugin)
    except _KeyError as exc:
        raise ConfigError(_format(label, exc.key, exc.message, overridden)) from None


def _format(label: str, key: str, message: str, overridden: set[str]) -> str:
    where = config_shape.key_label(key)
    if any(key == o or key.startswith((f"{o}.", f"{o}[")) for o in overridden):
        where += " (overridden)"
    return f"{label}: {where}: {message}" if where else f"{label}: {message}"


def _toml_message(exc: msgspec.DecodeError) -> str:
    message = str(exc)
    return message[:1].lower() + message[1:]


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, object], label: str) -> None:
    if not overrides:
        return  # resolving the fields' annotations is the costly part: most runs have none
    tables = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for dotted, value in overrides.items():
        table, _, key = dotted.partition(".")
        struct = _struct_of(tables.get(table))
        fields = {f.name for f in msgspec.structs.fields(struct)} if struct is not None else set()
        if key not in fields or dotted in _DERIVED_KEYS:
            raise ConfigError(f"{label}: unknown override key {dotted!r}")
        section = raw.setdefault(table, {})
        if isinstance(section, dict):
            section[key] = str(value) if isinstance(value, Path) else value


def _struct_of(annotation: object) -> type[msgspec.Struct] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _dec_hook(kind: type, value: object) -> object:
    """Builds the two field types TOML has no literal for; config_shape checked the strings."""
    if kind is Path:
        return Path(typing.cast(str, value))
    if kind is ipaddress.IPv4Address:
        return ipaddress.IPv4Address(typing.cast(str, value))
    raise NotImplementedError(kind)


def _check(config: Config) -> None:
    """The checks msgspec's types cannot state; each raises `_KeyError` naming its key."""
    vcpus = config.vm.vcpus
    if not 1 <= vcpus <= MAX_VCPUS:
        raise _KeyError("vm.vcpus", f"expected an integer from 1 to {MAX_VCPUS}, got {vcpus}")
    poll_us = config.vm.poll_us
    if not 0 <= poll_us <= MAX_POLL_US:
        raise _KeyError("vm.poll_us", f"expected an integer from 0 to {MAX_POLL_US}, got {poll_us}")
    for key in ("timeout", "stall_warning"):
        seconds = getattr(config.vm, key)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise _KeyError(f"vm.{key}", f"expected seconds >= 0 (0: never), got {seconds}")
    plugin = config.plugin
    grace = plugin.grace_period
    if not (math.isfinite(grace) and grace >= 0):
        raise _KeyError("plugin.grace_period", f"expected seconds >= 0, got {grace}")
    for name, value in plugin.env.items():
        if not name or "=" in name or "\0" in name:
            raise _KeyError("plugin.env", f"invalid variable name {name!r}")
        if "\0" in value:
            raise _KeyError(f"plugin.env.{name}", "must not contain a NUL character")
    for i, arg in enumerate(plugin.args):
        if "\0" in arg:
            raise _KeyError(f"plugin.args[{i}]", "must not contain a NUL character")
    for key, user in (("plugin.user", plugin.user), ("vm.worker_user", config.vm.worker_user)):
        if user is not None and not re.fullmatch(r"[^\0/:\s]+", user):
            raise _KeyError(key, f"expected a user name, got {user!r}")
    for i, mount in enumerate(plugin.mounts):
        _check_mount(i, mount)
    if config.net is not None:
        _check_net(config.net)
    for name, top in _LIMIT_MAXIMA.items():
        value = getattr(config.limits, name)
        if not 1 <= value <= top:
            raise _KeyError(f"limits.{name}", f"expected an integer from 1 to {top}, got {value}")
    _check_plugin_limits(config.limits)


def _check_plugin_limits(limits: LimitsConfig) -> None:
    try:
        memory = parse_size(limits.plugin_memory)
    except ValueError as exc:
        raise _KeyError("limits.plugin_memory", str(exc)) from None
    if memory and not MIN_PLUGIN_MEMORY <= memory <= MAX_PLUGIN_MEMORY:
        raise _KeyError(
            "limits.plugin_memory",
            f"expected 0 (no limit) or a size from 1M to {MAX_PLUGIN_MEMORY >> 50}P, "
            f"got {limits.plugin_memory!r}",
        )
    processes = limits.plugin_processes
    if not 0 <= processes <= MAX_PLUGIN_PROCESSES:
        raise _KeyError(
            "limits.plugin_processes",
            f"expected 0 (no limit) or an integer up to {MAX_PLUGIN_PROCESSES}, got {processes}",
        )
    cpu = limits.plugin_cpu
    if not (math.isfinite(cpu) and (cpu == 0 or MIN_PLUGIN_CPU <= cpu <= MAX_PLUGIN_CPU)):
        raise _KeyError(
            "limits.plugin_cpu",
            f"expected 0 (no limit) or cores from {MIN_PLUGIN_CPU} to {MAX_PLUGIN_CPU:g}, "
            f"got {cpu}",
        )


def _check_mount(index: int, mount: MountConfig) -> None:
    key = f"plugin.mounts[{index}]"
    for name, value in (("src", mount.src), ("dst", mount.dst)):
        if value is not None and "\0" in str(value):
            raise _KeyError(f"{key}.{name}", "must not contain a NUL character")
    if mount.dst is not None:
        if not mount.dst.is_absolute():
            raise _KeyError(f"{key}.dst", f"expected an absolute path, got {str(mount.dst)!r}")
        if os.path.normpath(mount.dst) == "/":
            raise _KeyError(f"{key}.dst", "must not be / (the sandbox's own root)")


def _check_net(net: NetConfig) -> None:
    try:
        network = ipaddress.IPv4Network(f"{net.host_ip}/{net.netmask}", strict=False)
    except ValueError:
        raise _KeyError("net.netmask", f"not a contiguous netmask: {net.netmask}") from None
    if network.prefixlen == 0 or network.prefixlen == 32:
        raise _KeyError("net.netmask", f"must leave room for the guest, got {net.netmask}")
    host = net.host_ip
    if host.is_unspecified or host.is_multicast or host.is_loopback or host.is_reserved:
        raise _KeyError("net.host_ip", f"not usable as a host address: {host}")
    if network.prefixlen <= 30 and host in (network.network_address, network.broadcast_address):
        raise _KeyError("net.host_ip", f"{host} is the network or broadcast address of {network}")
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", net.mac):
        raise _KeyError(
            "net.mac", f"expected a MAC address like 02:00:00:00:00:01, got {net.mac!r}"
        )
    if int(net.mac[:2], 16) & 1:
        raise _KeyError("net.mac", f"must be a unicast address (first octet even), got {net.mac}")


def _resolve(config: Config, folder: Path, stem: str, *, bare: bool, check_plugin: bool) -> Config:
    plugin_path = _resolve_plugin(config.plugin.path, folder, bare=bare, check=check_plugin)
    mounts = tuple(
        _resolve_mount(i, m, folder, check=check_plugin) for i, m in enumerate(config.plugin.mounts)
    )
    if check_plugin and config.plugin.user is not None:
        _check_user(config.plugin.user, "plugin.user", "the plugin")
    if check_plugin and config.vm.worker_user is not None:
        _check_user(config.vm.worker_user, "vm.worker_user", "the VCPU workers")
    log_dir = _absolute(Path(_expand_log_dir(str(config.log.dir), stem)), folder)
    log_root = _absolute(Path(_log_root(str(config.log.dir))), folder)
    net = config.net
    if net is not None:
        net = msgspec.structs.replace(net, mac=net.mac.lower())
    return msgspec.structs.replace(
        config,
        plugin=msgspec.structs.replace(config.plugin, path=plugin_path, mounts=mounts),
        net=net,
        log=msgspec.structs.replace(config.log, dir=log_dir, root=log_root),
        limits=msgspec.structs.replace(
            config.limits, plugin_memory=parse_size(config.limits.plugin_memory)
        ),
    )


def _resolve_mount(index: int, mount: MountConfig, folder: Path, *, check: bool) -> MountConfig:
    src = _absolute(mount.src, folder)
    if check and not src.exists():
        raise _KeyError(f"plugin.mounts[{index}].src", f"{src} does not exist")
    dst = src if mount.dst is None else Path(os.path.normpath(mount.dst))
    return msgspec.structs.replace(mount, src=src, dst=dst)


def _absolute(path: Path, folder: Path) -> Path:
    return Path(os.path.normpath(folder / path.expanduser()))


def _resolve_plugin(path: Path, folder: Path, *, bare: bool, check: bool) -> Path:
    text = str(path)
    if bare:
        local = folder / text
        if not local.exists():
            found = which(text)
            if found is not None:
                return Path(os.path.abspath(found))
            if check:
                raise _KeyError("plugin.path", f"{text!r} is neither in {folder} nor on PATH")
            return path
        resolved = local
    else:
        resolved = _absolute(path, folder)
    if check:
        if not resolved.exists():
            raise _KeyError("plugin.path", f"{resolved} does not exist")
        if not resolved.is_file():
            raise _KeyError("plugin.path", f"{resolved} is not a file")
        if not os.access(resolved, os.X_OK):
            raise _KeyError(
                "plugin.path",
                f"{resolved} is not executable (chmod +x it; a script needs a #! line)",
            )
    return resolved


def _check_user(name: str, key: str, who: str) -> None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise _KeyError(key, f"no user {name!r} in the passwd database") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise _KeyError(key, f"{name} has uid or gid 0: {who} would be root")


def _log_root(template: str) -> str:
    """The part of a (checked) log folder template before its first placeholder: the folder
    every run's log folder is made in ("runs/{name}-{time}" -> "runs"; no placeholder: all)."""
    parts = template.split("/")
    for index, part in enumerate(parts):
        if any(field is not None for _, field, _, _ in string.Formatter().parse(part)):
            root = "/".join(parts[:index]) or ("/" if template.startswith("/") else ".")
            return root.format_map({})
    return template.format_map({})


def _expand_log_dir(template: str, stem: str) -> str:
    values = {
        "name": stem,
        "time": time.strftime("%Y%m%d-%H%M%S"),
        "pid": str(os.getpid()),
    }
    allowed = ", ".join("{" + p + "}" for p in LOG_DIR_PLACEHOLDERS)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise _KeyError("log.dir", f"{exc} (write {{{{ and }}}} for literal braces)") from None
    for field in fields:
        if field not in values:
            raise _KeyError("log.dir", f"unknown placeholder {{{field}}}; use {allowed}")
    try:
        return template.format_map(values)
    except (ValueError, IndexError) as exc:
        raise _KeyError("log.dir", str(exc)) from None

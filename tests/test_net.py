"""The [net] tap: creation, configuration, lifetime, naming and input validation."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from vmsuper.supervisor import net
from vmsuper.supervisor.net import (
    NetError,
    NetSettings,
    NetSettingsError,
    Tap,
    format_mac,
    parse_mac,
    unique_tap_name,
)

IFF_UP = 0x1
SYS_NET = Path("/sys/class/net")
SETTINGS = NetSettings.parse("10.213.7.1", "255.255.255.0", "02:5a:00:11:22:33")
GUEST_MAC = bytes.fromhex("025a00445566")
GUEST_IP = IPv4Address("10.213.7.2")


@pytest.fixture
def tap_name(taps_allowed: None) -> Iterator[str]:
    """A fresh name; afterwards the interface must be gone (no test leaves a device behind)."""
    name = unique_tap_name("vmst")
    yield name
    assert not (SYS_NET / name).exists(), f"test left interface {name} behind"


def open_fds() -> set[str]:
    # The listing's own directory fd is closed by the time the existence check runs.
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.lexists(f"/proc/self/fd/{fd}")}


def ipv4_of(name: str) -> tuple[str, int]:
    ip = shutil.which("ip")
    assert ip is not None, "iproute2's `ip` is needed to read interface addresses"
    out = subprocess.run(
        [ip, "-j", "-4", "addr", "show", "dev", name], check=True, capture_output=True, text=True
    ).stdout
    (link,) = json.loads(out)
    (addr,) = link["addr_info"]
    return addr["local"], addr["prefixlen"]


def test_create_configures_an_up_tap(tap_name: str) -> None:
    with Tap.create(SETTINGS, name=tap_name) as tap:
        sysfs = SYS_NET / tap_name
        assert tap.name == tap_name
        assert int((sysfs / "flags").read_text(), 16) & IFF_UP
        assert (sysfs / "address").read_text().strip() == "02:5a:00:11:22:33"
        assert int((sysfs / "type").read_text()) == 1  # ARPHRD_ETHER: a tap, not a tun
        # IFF_TAP | IFF_NO_PI, and not IFF_PERSIST: the device dies with its last fd.
        assert int((sysfs / "tun_flags").read_text(), 16) == 0x1002
        assert ipv4_of(tap_name) == ("10.213.7.1", 24)
        assert not os.get_inheritable(tap.fd)
        assert not os.get_blocking(tap.fd)


def test_close_removes_the_device_and_is_idempotent(tap_name: str) -> None:
    tap = Tap.create(SETTINGS, name=tap_name)
    fd = tap.fd
    assert (SYS_NET / tap_name).exists()
    tap.close()
    assert tap.closed
    assert not (SYS_NET / tap_name).exists()
    with pytest.raises(OSError):
        os.fstat(fd)
    tap.close()
    with pytest.raises(NetError, match="closed"):
        _ = tap.fd


TUNSETPERSIST = 0x400454CB


@pytest.mark.parametrize("persistent", [False, True], ids=["copy", "copy made persistent"])
def test_close_removes_the_device_whatever_a_copy_of_the_fd_did(
    tap_name: str, persistent: bool
) -> None:
    """What the plugin holds after GetNetConfig cannot keep the device: not an open copy, not
    TUNSETPERSIST through that copy (which needs no capability)."""
    tap = Tap.create(SETTINGS, name=tap_name)
    copy = os.dup(tap.fd)
    try:
        if persistent:
            fcntl.ioctl(copy, TUNSETPERSIST, 1)
            assert int((SYS_NET / tap_name / "tun_flags").read_text(), 16) & 0x0800
        tap.close()
        assert not (SYS_NET / tap_name).exists()
    finally:
        os.close(copy)
    assert not (SYS_NET / tap_name).exists()


def test_default_name_is_unique_and_cleaned_up(taps_allowed: None) -> None:
    with Tap.create(SETTINGS) as first, Tap.create(SETTINGS) as second:
        assert first.name != second.name
        assert first.name.startswith("vms") and second.name.startswith("vms")
        assert (SYS_NET / first.name).exists() and (SYS_NET / second.name).exists()
    assert not (SYS_NET / first.name).exists()
    assert not (SYS_NET / second.name).exists()


def arp_request(target: IPv4Address) -> bytes:
    ether = b"\xff" * 6 + GUEST_MAC + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP.packed
    return ether + arp + bytes(6) + target.packed


def test_the_fd_carries_plain_ethernet_frames(tap_name: str) -> None:
    """A plugin writes a guest's ARP request; the host answers from the tap's MAC and IP."""
    with Tap.create(SETTINGS, name=tap_name) as tap:
        os.write(tap.fd, arp_request(SETTINGS.host_ip))
        deadline = time.monotonic() + 10
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no ARP reply from the host"
            if not select.select([tap.fd], [], [], remaining)[0]:
                continue
            frame = os.read(tap.fd, 2048)
            # Other traffic (IPv6 router solicitations, ...) may come first: skip it.
            if frame[12:14] != b"\x08\x06" or frame[20:22] != b"\x00\x02":
                continue
            assert frame[0:6] == GUEST_MAC
            assert frame[6:12] == SETTINGS.mac
            assert frame[22:28] == SETTINGS.mac  # sender hardware address
            assert frame[28:32] == SETTINGS.host_ip.packed  # sender protocol address
            break


def test_name_in_use_is_refused_and_the_first_tap_is_untouched(tap_name: str) -> None:
    before = open_fds()
    with Tap.create(SETTINGS, name=tap_name) as tap:
        with pytest.raises(NetError, match="already exists"):
            Tap.create(SETTINGS, name=tap_name)
        assert open_fds() == before | {str(tap.fd)}
        assert ipv4_of(tap_name) == ("10.213.7.1", 24)


def test_name_of_a_non_tap_interface_is_refused(taps_allowed: None) -> None:
    with pytest.raises(NetError, match=r"'lo'.*already exists"):
        Tap.create(SETTINGS, name="lo")
    assert int((SYS_NET / "lo" / "flags").read_text(), 16) & IFF_UP


@pytest.mark.parametrize(
    "name",
    ["vmstoolongname16", "a" * 40, "", "has space", "a/b", "a:b", "tap%d", ".", "..", "tåp"],
)
def test_invalid_names_are_refused_before_anything_is_created(
    taps_allowed: None, name: str
) -> None:
    before = open_fds()
    with pytest.raises(NetError, match="invalid tap name"):
        Tap.create(SETTINGS, name=name)
    assert open_fds() == before
    if len(name) > 15:
        # The kernel would have cut the name to 15 characters: nothing may exist under that.
        assert not (SYS_NET / name[:15]).exists()


@pytest.mark.parametrize(
    ("request_code", "step"),
    [
        (net._TUNSETIFF, "cannot create"),
        (net._TUNGETIFF, "cannot query"),
        (net._SIOCSIFADDR, "cannot set the address of"),
        (net._SIOCSIFNETMASK, "cannot set the netmask of"),
        (net._SIOCSIFHWADDR, "cannot set the MAC address of"),
        (net._SIOCGIFFLAGS, "cannot read the flags of"),
        (net._SIOCSIFFLAGS, "cannot bring up"),
    ],
)
def test_a_failing_step_is_named_and_leaves_nothing_behind(
    tap_name: str, monkeypatch: pytest.MonkeyPatch, request_code: int, step: str
) -> None:
    real_ioctl = net._ioctl

    def failing_ioctl(fd: int, request: int, arg: bytes) -> bytes:
        if request == request_code:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_ioctl(fd, request, arg)

    monkeypatch.setattr(net, "_ioctl", failing_ioctl)
    before = open_fds()
    with pytest.raises(NetError, match=f"{step} tap '{tap_name}': Input/output error$") as info:
        Tap.create(SETTINGS, name=tap_name)
    assert info.value.errno == errno.EIO
    assert open_fds() == before
    assert not (SYS_NET / tap_name).exists()


def test_permission_errors_say_what_is_needed(
    tap_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(net, "_ioctl", denied)
    with pytest.raises(NetError, match=r"Operation not permitted \(vmsuper needs CAP_NET_ADMIN"):
        Tap.create(SETTINGS, name=tap_name)


def test_without_privileges_opening_the_tun_device_fails_clearly(tap_name: str) -> None:
    """A process without root's rights (uid nobody, so no capabilities) gets the full story."""
    code = textwrap.dedent(
        f"""
        import os
        from vmsuper.supervisor.net import NetError, NetSettings, Tap
        settings = NetSettings.parse("10.213.7.1", "255.255.255.0", "02:5a:00:11:22:33")
        os.setresgid(65534, 65534, 65534)
        os.setgroups([])
        os.setresuid(65534, 65534, 65534)
        try:
            Tap.create(settings, name={tap_name!r})
        except NetError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == (
        "cannot create a tap device: /dev/net/tun: Permission denied"
        " (vmsuper needs CAP_NET_ADMIN for [net])"
    )


def test_unique_tap_names() -> None:
    names = [unique_tap_name() for _ in range(5000)]
    assert len(set(names)) == len(names)
    pid = f"{os.getpid():06x}"
    for name in names:
        assert len(name) <= 15
        assert name.startswith("vms" + pid)
    longest = [unique_tap_name("abcde") for _ in range(5000)]
    assert len(set(longest)) == len(longest)
    assert all(name.startswith("abcde" + pid) and len(name) <= 15 for name in longest)


@pytest.mark.parametrize("prefix", ["", "abcdef", "a b", "a/b"])
def test_unique_tap_name_rejects_unusable_prefixes(prefix: str) -> None:
    with pytest.raises(NetSettingsError):
        unique_tap_name(prefix)


def test_parse_and_format_mac() -> None:
    mac = parse_mac("02:5A:00:11:22:FF")
    assert mac == bytes.fromhex("025a001122ff")
    assert format_mac(mac) == "02:5a:00:11:22:ff"
    assert parse_mac(format_mac(mac)) == mac


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("02:00:00:00:00", "six two-digit hex octets"),
        ("02:00:00:00:00:01:02", "six two-digit hex octets"),
        ("02:00:00:00:00:zz", "six two-digit hex octets"),
        ("2:0:0:0:0:1", "six two-digit hex octets"),
        ("02-00-00-00-00-01", "six two-digit hex octets"),
        (" 02:00:00:00:00:01", "six two-digit hex octets"),
        ("", "six two-digit hex octets"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "not a usable address"),
    ],
)
def test_parse_mac_rejects_bad_input(text: str, match: str) -> None:
    with pytest.raises(NetSettingsError, match=match):
        parse_mac(text)


def test_format_mac_needs_six_bytes() -> None:
    with pytest.raises(NetSettingsError, match="6 bytes, got 5"):
        format_mac(bytes(5))


@pytest.mark.parametrize(
    ("host_ip", "netmask", "prefix"),
    [
        ("10.0.0.1", "255.255.255.0", 24),
        ("192.168.1.254", "255.255.255.252", 30),
        ("10.0.0.0", "255.255.255.254", 31),
        ("169.254.0.22", "255.255.255.255", 32),
        ("100.115.92.5", "128.0.0.0", 1),
    ],
)
def test_net_settings_accepts_usable_addresses(host_ip: str, netmask: str, prefix: int) -> None:
    settings = NetSettings.parse(host_ip, netmask, "02:00:00:00:00:01")
    assert settings.host_ip == IPv4Address(host_ip)
    assert settings.prefixlen == prefix
    assert settings.host_ip in settings.network


@pytest.mark.parametrize(
    ("host_ip", "netmask", "match"),
    [
        ("10.0.0.1", "255.0.255.0", "not a valid netmask"),
        ("10.0.0.1", "0.0.0.255", "not a valid netmask"),
        ("10.0.0.1", "0.0.0.0", "not a valid netmask"),
        ("10.0.0.0", "255.255.255.0", "network address of 10.0.0.0/24"),
        ("10.0.0.255", "255.255.255.0", "broadcast address of 10.0.0.0/24"),
        ("0.0.0.0", "255.255.255.0", "unspecified"),
        ("127.0.0.2", "255.0.0.0", "loopback"),
        ("224.0.0.5", "255.255.255.0", "multicast"),
        ("255.255.255.255", "255.255.255.255", "reserved"),
        ("10.0.0.256", "255.255.255.0", "invalid host_ip '10.0.0.256'"),
        ("10.0.0.1", "255.255.255", "invalid netmask '255.255.255'"),
    ],
)
def test_net_settings_rejects_unusable_addresses(host_ip: str, netmask: str, match: str) -> None:
    with pytest.raises(NetSettingsError, match=match):
        NetSettings.parse(host_ip, netmask, "02:00:00:00:00:01")


def test_net_settings_checks_types_and_mac() -> None:
    ip, mask = IPv4Address("10.0.0.1"), IPv4Address("255.255.255.0")
    with pytest.raises(NetSettingsError, match="host_ip must be an IPv4Address"):
        NetSettings("10.0.0.1", mask, bytes.fromhex("020000000001"))  # type: ignore[arg-type]
    with pytest.raises(NetSettingsError, match="netmask must be an IPv4Address"):
        NetSettings(ip, 24, bytes.fromhex("020000000001"))  # type: ignore[arg-type]
    with pytest.raises(NetSettingsError, match="mac must be bytes"):
        NetSettings(ip, mask, "02:00:00:00:00:01")  # type: ignore[arg-type]
    with pytest.raises(NetSettingsError, match="6 bytes, got 7"):
        NetSettings(ip, mask, bytes(7))
    with pytest.raises(NetSettingsError, match="multicast"):
        NetSettings(ip, mask, bytes.fromhex("030000000001"))
    assert isinstance(NetSettingsError("x"), ValueError)


def test_a_persistent_tap_that_appears_meanwhile_is_not_adopted(
    tap_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If someone creates a persistent tap of our name between the check and TUNSETIFF, the
    kernel attaches us to it; closing would not remove it, so create() must refuse it."""
    ip = shutil.which("ip")
    assert ip is not None, "iproute2's `ip` is needed to make a persistent tap"
    subprocess.run([ip, "tuntap", "add", "dev", tap_name, "mode", "tap"], check=True)
    try:

        def not_found(name: str) -> int:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

        monkeypatch.setattr(net.socket, "if_nametoindex", not_found)
        before = open_fds()
        try:
            adopted = Tap.create(SETTINGS, name=tap_name)
        except NetError as exc:
            assert str(exc).endswith(f"'{tap_name}': a persistent tap of that name exists")
        else:
            adopted.close()  # or `ip tuntap del` below could not remove the device
            pytest.fail("create() adopted an existing persistent tap")
        assert open_fds() == before
        assert not int((SYS_NET / tap_name / "flags").read_text(), 16) & IFF_UP
        assert (SYS_NET / tap_name / "address").read_text().strip() != "02:5a:00:11:22:33"
    finally:
        subprocess.run([ip, "tuntap", "del", "dev", tap_name, "mode", "tap"], check=True)

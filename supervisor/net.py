"""The tap behind `[net]`: created, addressed and brought up by vmsuper, handed to the plugin.

The plugin gets the tap's fd from `GetNetConfig` and moves Ethernet frames itself; the supervisor
only owns the device's life. The tap is non-persistent, so the kernel removes it when the last fd
to it is closed (ours and every copy handed out), and a crashed vmsuper leaves nothing behind.
The plugin can make it persistent through its copy (TUNSETPERSIST needs no capability), so
`close` does not rely on that: it clears persistence, deletes the link (RTM_DELLINK, by the
index it was created with), and checks that the device is gone.

As crosvm's plugin host did, the fd is opened with `IFF_TAP | IFF_NO_PI` and without
`IFF_VNET_HDR` (frames are plain Ethernet, no virtio-net header) and in non-blocking mode. The
MAC set on the device is the *host* side's, reported to the plugin as `host_mac_address`.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from types import TracebackType

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16  # including the terminating NUL: names have at most 15 characters
MAX_NAME_LEN = IFNAMSIZ - 1

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
_TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
_TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_PERSIST = 0x0800
# <linux/sockios.h>
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_SIOCSIFHWADDR = 0x8924
# <net/if.h>, <net/if_arp.h>
_IFF_UP = 0x1
_ARPHRD_ETHER = 1
# <linux/netlink.h>, <linux/rtnetlink.h>
_RTM_DELLINK = 17
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")

_PERMISSION_HINT = " (vmsuper needs CAP_NET_ADMIN for [net])"
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
# pid_max is at most 2**22 (PID_MAX_LIMIT), so a pid always fits six hex digits; a fixed width
# keeps "pid 0x1a, call 0x2b" and "pid 0x1a2, call 0xb" apart.
_PID_DIGITS = 6
# A prefix of at most 5 characters leaves four or more hex digits for the counter: at least
# 65536 names per prefix in one process.
_MAX_PREFIX_LEN = 5
_name_counters: dict[str, itertools.count[int]] = {}


class NetError(Exception):
    """The tap could not be created or configured; `errno` is the OS error, if there was one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NetSettingsError(NetError, ValueError):
    """A MAC, address, netmask or interface name that cannot be used for a tap."""


@dataclass(frozen=True)
class NetSettings:
    """The host side of the tap: its IPv4 address, netmask and MAC (6 bytes, unicast)."""

    host_ip: IPv4Address
    netmask: IPv4Address
    mac: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.host_ip, IPv4Address):
            raise NetSettingsError(f"host_ip must be an IPv4Address, got {self.host_ip!r}")
        if not isinstance(self.netmask, IPv4Address):
            raise NetSettingsError(f"netmask must be an IPv4Address, got {self.netmask!r}")
        if not isinstance(self.mac, bytes):
            raise NetSettingsError(f"mac must be bytes, got {type(self.mac).__name__}")
        _check_mac(self.mac)
        prefix = _prefix_length(self.netmask)
        ip = self.host_ip
        for bad, what in (
            (ip.is_unspecified, "the unspecified address"),
            (ip.is_loopback, "a loopback address"),
            (ip.is_multicast, "a multicast address"),
            (ip.is_reserved, "a reserved address (240.0.0.0/4, including broadcast)"),
        ):
            if bad:
                raise NetSettingsError(f"host_ip {ip} is {what}; the tap needs a unicast address")
        if prefix <= 30:
            network = self.network
            if ip == network.network_address:
                raise NetSettingsError(f"host_ip {ip} is the network address of {network}")
            if ip == network.broadcast_address:
                raise NetSettingsError(f"host_ip {ip} is the broadcast address of {network}")

    @classmethod
    def parse(cls, host_ip: str, netmask: str, mac: str) -> NetSettings:
        """Settings from their usual text forms ("10.0.0.1", "255.255.255.0", "02:..:01")."""
        return cls(_parse_ipv4(host_ip, "host_ip"), _parse_ipv4(netmask, "netmask"), parse_mac(mac))

    @property
    def prefixlen(self) -> int:
        return _prefix_length(self.netmask)

    @property
    def network(self) -> IPv4Network:
        return IPv4Network((self.host_ip, self.prefixlen), strict=False)


def parse_mac(text: str) -> bytes:
    """Parse "aa:bb:cc:dd:ee:ff" into 6 bytes, refusing addresses a tap cannot carry."""
    if not isinstance(text, str) or _MAC_RE.fullmatch(text) is None:
        raise NetSettingsError(
            f"invalid MAC address {text!r}: expected six two-digit hex octets separated by ':'"
            " (e.g. 02:00:00:00:00:01)"
        )
    mac = bytes.fromhex(text.replace(":", ""))
    _check_mac(mac)
    return mac


def format_mac(mac: bytes) -> str:
    """The usual lower-case, colon-separated form of a 6-byte MAC."""
    if len(mac) != 6:
        raise NetSettingsError(f"a MAC address has 6 bytes, got {len(mac)}")
    return ":".join(f"{octet:02x}" for octet in mac)


def unique_tap_name(prefix: str = "vms") -> str:
    """A tap name no other call, in this process or any other live one, returns.

    The form is prefix + pid (six hex digits) + a per-process, per-prefix counter (hex), at
    most 15 characters, so parallel test workers and several supervisors never pick the same
    name.
    """
    if not 1 <= len(prefix) <= _MAX_PREFIX_LEN:
        raise NetSettingsError(
            f"tap name prefix {prefix!r} must have 1 to {_MAX_PREFIX_LEN} characters"
        )
    _check_ifname(prefix)
    counter = next(_name_counters.setdefault(prefix, itertools.count()))
    name = f"{prefix}{os.getpid():0{_PID_DIGITS}x}{counter:x}"
    if len(name) > MAX_NAME_LEN:
        raise NetError(f"no unique tap names left for prefix {prefix!r} in this process")
    return name


class Tap:
    """A configured, up, non-persistent tap device and the fd that keeps it alive."""

    def __init__(self, fd: int, name: str, settings: NetSettings, index: int = 0) -> None:
        self._fd = fd
        self.name = name
        self.settings = settings
        self.index = index or socket.if_nametoindex(name)

    @classmethod
    def create(cls, settings: NetSettings, *, name: str | None = None) -> Tap:
        """Create the tap (named `name`, or a fresh unique name) with `settings` applied, up.

        On any failure the device is gone again before NetError is raised.
        """
        if name is None:
            name = unique_tap_name()
        _check_ifname(name)
        try:
            socket.if_nametoindex(name)
        except OSError:
            pass
        else:
            raise NetError(f"cannot create tap {name!r}: an interface of that name already exists")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise NetError(
                f"cannot create a tap device: {TUN_PATH}: {exc.strerror}{_hint(exc.errno)}",
                exc.errno,
            ) from exc
        try:
            _attach(fd, name)
            index = socket.if_nametoindex(name)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                _configure(sock.fileno(), name, settings)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, settings, index)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise NetError(f"tap {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Remove the device, whatever the copies handed out did to it, and close our fd.

        Raises NetError if the device is still there afterwards.
        """
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            # Made persistent through a copy of the fd, the device would outlive every fd.
            fcntl.ioctl(fd, _TUNSETPERSIST, 0)  # the argument is the value, not a pointer
        except OSError:
            pass
        finally:
            os.close(fd)
        if _link_name(self.index) != self.name:
            return  # gone with our fd
        try:
            _delete_link(self.index)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise NetError(
                    f"cannot delete tap {self.name!r}: {exc.strerror}", exc.errno
                ) from exc
        if _link_name(self.index) == self.name:
            raise NetError(f"tap {self.name!r} is still there after it was deleted")

    def __enter__(self) -> Tap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"Tap({self.name!r}, {state}, {self.settings.host_ip}/{self.settings.prefixlen})"


def _ioctl(fd: int, request: int, arg: bytes) -> bytes:
    """The one place ioctls go through (so tests can make any step fail)."""
    return fcntl.ioctl(fd, request, arg)


def _link_name(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def _delete_link(index: int) -> None:
    """RTM_DELLINK for interface `index`, and its acknowledgement; OSError on refusal."""
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), _RTM_DELLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0
        )
        sock.sendall(header + body)
        reply = sock.recv(65536)
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if kind != _NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink reply type {kind}")
    (error,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
    if error:
        raise OSError(-error, os.strerror(-error))


def _step(fd: int, request: int, arg: bytes, what: str, name: str) -> bytes:
    try:
        return _ioctl(fd, request, arg)
    except OSError as exc:
        raise NetError(
            f"cannot {what} tap {name!r}: {exc.strerror}{_hint(exc.errno)}", exc.errno
        ) from exc


def _attach(fd: int, name: str) -> None:
    """TUNSETIFF: create the device and bind it to fd; refuse to adopt a persistent one."""
    _step(fd, _TUNSETIFF, _ifreq(name, struct.pack("=H", _IFF_TAP | _IFF_NO_PI)), "create", name)
    flags = struct.unpack_from("=H", _step(fd, _TUNGETIFF, _ifreq(name), "query", name), 16)[0]
    if flags & _IFF_PERSIST:
        # Lost a race with someone creating a persistent tap of this name: TUNSETIFF attached us
        # to their device, which closing would not remove.
        raise NetError(f"cannot create tap {name!r}: a persistent tap of that name exists")


def _configure(sock: int, name: str, settings: NetSettings) -> None:
    """Address, netmask and MAC first (a MAC change may need the device down), then up."""
    _step(
        sock, _SIOCSIFADDR, _ifreq(name, _sockaddr_in(settings.host_ip)), "set the address of", name
    )
    _step(
        sock,
        _SIOCSIFNETMASK,
        _ifreq(name, _sockaddr_in(settings.netmask)),
        "set the netmask of",
        name,
    )
    hwaddr = struct.pack("=H14s", _ARPHRD_ETHER, settings.mac)
    _step(sock, _SIOCSIFHWADDR, _ifreq(name, hwaddr), "set the MAC address of", name)
    flags = struct.unpack_from(
        "=H", _step(sock, _SIOCGIFFLAGS, _ifreq(name), "read the flags of", name), 16
    )[0]
    _step(sock, _SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", flags | _IFF_UP)), "bring up", name)


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s24s", name.encode("ascii"), payload)


def _sockaddr_in(address: IPv4Address) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"", address.packed)


def _hint(code: int | None) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return _PERMISSION_HINT
    if code == errno.ENOENT:
        return " (is the tun module loaded?)"
    return ""


def _check_ifname(name: str) -> None:
    """The kernel's rules for interface names, plus no '%' (a template it would expand)."""
    if not isinstance(name, str):
        raise NetSettingsError(f"a tap name must be a string, got {name!r}")
    if not 1 <= len(name) <= MAX_NAME_LEN:
        raise NetSettingsError(
            f"invalid tap name {name!r}: must have 1 to {MAX_NAME_LEN} characters"
        )
    if name in (".", "..") or any(not ("!" <= c <= "~") or c in "/:%" for c in name):
        raise NetSettingsError(
            f"invalid tap name {name!r}: printable ASCII only, no whitespace, '/', ':' or '%',"
            " and not '.' or '..'"
        )


def _check_mac(mac: bytes) -> None:
    if len(mac) != 6:
        raise NetSettingsError(f"a MAC address has 6 bytes, got {len(mac)}")
    if mac[0] & 1:
        raise NetSettingsError(
            f"MAC address {format_mac(mac)} is a multicast address (the low bit of the first"
            " octet is set); a tap needs a unicast MAC"
        )
    if mac == bytes(6):
        raise NetSettingsError("MAC address 00:00:00:00:00:00 is not a usable address")


def _prefix_length(netmask: IPv4Address) -> int:
    host_bits = int(netmask) ^ 0xFFFFFFFF
    if host_bits & (host_bits + 1) or host_bits == 0xFFFFFFFF:
        raise NetSettingsError(
            f"netmask {netmask} is not a valid netmask (contiguous leading one bits, at least one)"
        )
    return 32 - host_bits.bit_length()


def _parse_ipv4(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError as exc:
        raise NetSettingsError(f"invalid {what} {text!r}: {exc}") from exc

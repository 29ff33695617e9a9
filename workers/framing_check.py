"""Recognising a plugin that speaks the other VCPU transport than the config says.

A plugin built on crosvm's client library speaks `pipes`: it reads each response as a varint
length followed by the message. Configured for `socket`, it gets one socket per VCPU where it
expects two pipes; what reaches a VCPU channel then is not a request of the socket transport,
and nothing on the wire says why: the run fails or hangs with a protocol error nobody can
place. The first request on a channel is always the Init `Wait`, so that one is looked at:
bytes that are not a request but are exactly one length-delimited request mean the plugin
frames its messages as on pipes. Only the first request is checked, so the per-exit path
costs nothing.

A client that cannot even pair up its VCPU channels (crosvm's library, given one socket per
VCPU where it expects two pipes, fails in `crosvm_connect` with EPROTO) never writes to them:
then the only trace is a plugin that took its channels and failed before Start, and
`unused_channels_hint` says what that usually means.

Sans-I/O: bytes and facts in, a verdict out.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from vmsuper.shared.plugin_pb2 import VcpuRequest
from vmsuper.shared.wire import MAX_VARINT_LEN

__all__ = ["PIPES_FIX", "length_delimited_request", "unused_channels_hint"]

PIPES_FIX = '[plugin] vcpu_transport = "pipes"'


def _request(data: bytes) -> VcpuRequest | None:
    """`data` as a request naming a message, or None."""
    request = VcpuRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:
        return None
    return request if request.WhichOneof("message") is not None else None


def _varint(data: bytes) -> tuple[int, int] | None:
    """(value, bytes used) of the varint `data` starts with, or None."""
    value = 0
    for index, byte in enumerate(data[:MAX_VARINT_LEN]):
        value |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return value, index + 1
    return None


def length_delimited_request(data: bytes) -> str | None:
    """The request `data` holds behind a length prefix, by name, when `data` is not a plain
    request itself but exactly one length-delimited one; else None."""
    if _request(data) is not None:
        return None
    prefix = _varint(data)
    if prefix is None:
        return None
    length, used = prefix
    if length != len(data) - used:
        return None
    inner = _request(data[used:])
    return None if inner is None else inner.WhichOneof("message")


def unused_channels_hint(
    *, transport: str, channels_given: bool, started: bool, plugin_failed: bool
) -> str | None:
    """A hint for a plugin that failed after GetVcpus and before Start on the socket
    transport, as one built on crosvm's client library does there; None otherwise."""
    if transport != "socket" or not channels_given or started or not plugin_failed:
        return None
    return (
        "the plugin took its VCPU channels (one socket per VCPU) and failed before Start;"
        " a plugin built on crosvm's libcrosvm_plugin.so expects two pipes per VCPU:"
        f" set {PIPES_FIX}"
    )
